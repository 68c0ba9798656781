"""Process-tree helpers for the benchmarks: who is alive, whose children,
waiting on conditions with a deadline, and killing what we started.

Shared by the gunicorn and fugue halves so both are observed the same way:
through /proc, not through the server's own logs or claims.

Zombies count as dead everywhere here. This matters on machines whose pid 1
does not reap orphans (this one's does not): after a USR2 upgrade the old
master exits and the new one is orphaned. `become_subreaper()` makes the
benchmark process the orphans' new parent, and `reap_orphans()` collects them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")

POLL_S = 0.005
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make orphaned descendants re-parent to this process (Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def stat(pid: int) -> Optional[tuple]:
    """(state, ppid, pgrp) of a live or zombie pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    info = stat(pid)
    return info is not None and info[0] not in ("Z", "X")


def _live_processes() -> Iterable[tuple]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = stat(int(name))
            if info is not None and info[0] not in ("Z", "X"):
                yield int(name), info


def children(pid: int) -> set:
    """Live (non-zombie) children of `pid`."""
    return {child for child, (_, ppid, _) in _live_processes() if ppid == pid}


def group(pgid: int) -> set:
    """Live (non-zombie) members of process group `pgid`."""
    return {member for member, (_, _, pgrp) in _live_processes() if pgrp == pgid}


def wait_for(condition: Callable[[], T], timeout: float, what: str,
             interval: float = POLL_S) -> T:
    """Poll `condition` until it returns something truthy; return that.

    Raises TimeoutError naming `what` after `timeout` seconds. For external
    processes that offer no event to wait on, polling with a deadline is the
    honest way to wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def reap_orphans(keep: Iterable[int] = ()) -> list:
    """waitpid() our zombie children, except the pids in `keep`.

    `keep` holds the pids subprocess.Popen objects own, so their return codes
    stay theirs. Returns the pids reaped.
    """
    me, keep, reaped = os.getpid(), set(keep), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in keep:
            continue
        info = stat(int(name))
        if info is not None and info[1] == me and info[0] == "Z":
            try:
                os.waitpid(int(name), os.WNOHANG)
                reaped.append(int(name))
            except ChildProcessError:
                pass
    return reaped


def kill_group(pgid: int, grace: float = 5.0,
               popens: Iterable[subprocess.Popen] = ()) -> list:
    """End every process of group `pgid`: SIGTERM, then SIGKILL after `grace` s.

    Called from benchmarks' finally blocks. Reaps the given Popen objects and
    any orphans handed to us as subreaper. Returns the pids that needed SIGKILL.
    """
    popens = list(popens)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass

    def settled() -> bool:
        for p in popens:
            p.poll()
        reap_orphans(keep=[p.pid for p in popens])
        return not group(pgid)

    try:
        wait_for(settled, grace, f"process group {pgid} to exit", interval=0.02)
        stubborn = []
    except TimeoutError:
        stubborn = sorted(group(pgid))
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(settled, 5.0, f"process group {pgid} to die after SIGKILL")
    for p in popens:
        p.wait()
    return stubborn


def http_body(port, path="/", timeout=2.0):
    """One plain GET on a fresh connection to 127.0.0.1:port; the body, or None if it failed."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        return body.strip() if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def write_atomically(path, text):
    """Replace the file at `path` (a pathlib.Path) with `text` in one rename."""
    import os

    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
