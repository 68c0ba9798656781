"""Helpers shared by the fault-injection and hostile-input tests.

Everything here observes real processes: /proc for descriptors and liveness,
the master's control socket for its state, bench/loadgen.py for a client load
that counts every failed request by kind.
"""

import json
import os
import re
import signal
import subprocess
import sys

from conftest import ROOT, wait_for

sys.path.insert(0, os.path.join(ROOT, "bench"))

from loadgen import Load  # noqa: E402

from fugue import control  # noqa: E402


def load(port, conns=8, **kw):
    """A started exact-counting HTTP load (stop() -> Result with failures by kind)."""
    return Load("127.0.0.1", port, conns=conns, timeout=10.0, **kw).start()


def gone(pid):
    """True once `pid` has exited (a zombie counts as gone: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def fds(pid):
    """{fd: what it points to} of a live process ('socket:[123]' shown as 'socket')."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        out[int(name)] = re.sub(r"\[\d+\]", "", target)
    return out


def fd_kinds(pid):
    """Sorted descriptor targets of a process, for a readable diff when counts differ."""
    return sorted(fds(pid).values())


def quiet_fds(pid):
    """fd_kinds(pid) once two looks 0.1 s apart agree: a reply the test just read may
    come a moment before the master closes that connection."""
    last = [None]

    def check():
        now = fd_kinds(pid)
        same, last[0] = now == last[0], now
        return now if same else None
    return wait_for(check, 10, f"the descriptors of {pid} to settle", interval=0.1)


def run_dir(p, pid, tmp="tmp"):
    return os.path.join(p.cwd, tmp, f"fugue-{pid}")


def ask(p, cmd, pid=None, tmp="tmp", timeout=20.0, **fields):
    """One control command to the master of `p` (the pid file's, unless given)."""
    pid = pid or p.master_pid()
    return control.request(os.path.join(run_dir(p, pid, tmp), "control.sock"), cmd, timeout, **fields)


def status(p, pid=None, **kw):
    reply = ask(p, "status", pid, **kw)
    assert reply["ok"], reply
    return reply["data"]


def settled(p, workers, pid=None):
    """Wait until one generation serves with exactly `workers` READY workers and nothing
    else is alive (no rollout, no upgrade, nothing draining); return the status."""
    def check():
        data = status(p, pid)
        m = data["master"]
        rows = data["workers"]
        if m["pending_generation"] or m["upgrade"] or len(rows) != workers:
            return None
        if any(r["state"] != "ready" or r["generation"] != m["generation"] for r in rows):
            return None
        if sorted(r["id"] for r in rows) != list(range(1, workers + 1)):
            return None
        return data
    return wait_for(check, 60, f"{workers} ready workers of one generation")


def worker_pids(p, pid=None):
    return sorted(r["pid"] for r in status(p, pid)["workers"])


def connections_of(port):
    """{pid: number of established TCP connections it holds on the server side of `port`}."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    counts = {}
    for line in out.splitlines():
        for pid in set(re.findall(r"pid=(\d+)", line)):
            counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def as_nobody(fn):
    """Run fn() in a forked child that became uid/gid 65534; (its JSON-able result or the
    exception text). The child never returns into pytest."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                result = {"ok": fn()}
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
            os.write(w, json.dumps(result, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data or b"{}")


def kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def until(cond, timeout=30.0, what="condition"):
    return wait_for(cond, timeout, what)
