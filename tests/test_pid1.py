"""fugue as PID 1 of a container: the entrypoint of contrib/container/Dockerfile, run in a
new pid namespace with `unshare --pid --fork --mount-proc` (what `docker run` does).

fuguectl is PID 1 there and stays PID 1 (the keeper): an upgrade replaces the master and
the namespace lives on; orphans are reaped without a warning; TERM drains; INT quick-stops.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import PY, ROOT, http_get, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0,
                                reason="needs root and unshare (util-linux) for a pid namespace")

CONTRIB = os.path.join(ROOT, "contrib", "container")


def entrypoint():
    with open(os.path.join(CONTRIB, "Dockerfile")) as f:
        line = next(line for line in f if line.startswith("ENTRYPOINT "))
    return json.loads(line[len("ENTRYPOINT "):])


def container_config(workdir):
    """contrib/container/fugue.toml with the image's paths pointed at the test's directory."""
    with open(os.path.join(CONTRIB, "fugue.toml")) as f:
        text = f.read()
    (workdir / "tmp").mkdir(exist_ok=True)
    text = (text.replace('"/srv/app/app.py"', f'"{workdir}/app.py"').replace('"/srv/app"', f'"{workdir}"')
            .replace('"0.0.0.0:8000"', '"127.0.0.1:0"').replace('"/run/fugue/fugue.pid"', f'"{workdir}/fugue.pid"')
            .replace('"/run/fugue"', f'"{workdir}/tmp"'))
    path = workdir / "fugue.toml"
    path.write_text(text)
    return str(path)


def start_pid1(fugue_proc, workdir):
    """(Proc of unshare, host pid of fuguectl as PID 1, config path)."""
    argv = entrypoint()
    assert argv[0] == "fuguectl" and argv[-2] == "-c", argv
    conf = container_config(workdir)
    p = fugue_proc(["unshare", "--pid", "--fork", "--mount-proc", PY, "-m", "fugue.ctl"] + argv[1:-1] + [conf])
    p.started()

    def pid1():
        with open(f"/proc/{p.popen.pid}/task/{p.popen.pid}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else None
    keeper = wait_for(pid1, what="PID 1 of the namespace")
    with open(f"/proc/{keeper}/status") as f:
        assert re.search(r"^NSpid:\s+\d+\s+1$", f.read(), re.M), "fuguectl is PID 1 in its namespace"
    return p, keeper, conf


def ctl_inside(keeper, *args):
    """fuguectl run inside the namespace (pids in the pid file are the namespace's)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(["nsenter", "-t", str(keeper), "-p", "-m", PY, "-m", "fugue.ctl"] + list(args),
                          env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def host_pids(p, title):
    out = []
    for pid in p.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title.encode()):
                    out.append(pid)
        except OSError:
            pass
    return out


def zombies_of(pid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                if fields[0] == "Z" and int(fields[1]) == pid:
                    out.append(int(name))
            except (OSError, IndexError):
                pass
    return out


def slow_request(port, seconds):
    result = {}

    def run():
        try:
            result["status"] = http_get(port, f"/slow?s={seconds}", timeout=30)[0]
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            result["error"] = repr(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def wait_in_flight(keeper, conf):
    def busy():
        rc, out, _ = ctl_inside(keeper, "status", "--json", "-c", conf)
        return rc == 0 and json.loads(out)["totals"]["in_flight"] > 0
    wait_for(busy, what="a request in flight")


def test_pid1_upgrade_keeps_the_namespace_orphans_are_reaped_quietly_term_drains(fugue_proc, workdir):
    p, keeper, conf = start_pid1(fugue_proc, workdir)
    assert "generation 1" in p.body()
    rc, out, err = ctl_inside(keeper, "upgrade", "-c", conf)
    assert rc == 0, err
    assert p.popen.poll() is None and os.path.exists(f"/proc/{keeper}")  # the namespace survived
    wait_for(lambda: "generation 2" in p.body(), what="the upgraded master serving")
    # kill -9 of the master: its workers are orphans of PID 1 now, and a new master serves at once
    masters = wait_for(lambda: [m for m in [host_pids(p, "fugue master")] if len(m) == 1],
                       what="the old master gone")[0]
    os.kill(masters[0], signal.SIGKILL)
    p.wait_log(r"\[keeper\] ERROR master pid \d+ killed by SIGKILL; starting a new master")
    wait_for(lambda: "generation 1" in p.body() and host_pids(p, "fugue master") not in ([], masters),
             what="a new master serving")
    wait_for(lambda: not zombies_of(keeper) and len(host_pids(p, "fugue worker")) == 2,
             what="the orphaned workers gone and reaped")
    assert "WARNING" not in p.log() and "unknown child" not in p.log()
    # TERM to PID 1 (docker stop): a graceful stop, the in-flight request answers
    t, result = slow_request(p.port, 2)
    wait_in_flight(keeper, conf)
    os.kill(keeper, signal.SIGTERM)
    t.join(30)
    assert result == {"status": 200}
    assert p.wait_exit() == 0, p.log()[-2000:]


def test_pid1_int_is_a_quick_stop(fugue_proc, workdir):
    p, keeper, conf = start_pid1(fugue_proc, workdir)
    t, result = slow_request(p.port, 20)
    wait_in_flight(keeper, conf)
    os.kill(keeper, signal.SIGINT)
    t.join(30)
    assert "error" in result, result  # cut off, not drained
    p.wait_exit()
    assert not host_pids(p, "fugue")


def test_a_master_that_never_gets_ready_ends_the_keeper_and_leaves_nothing(fugue_proc, workdir):
    """Under systemd (INVOCATION_ID) a broken app at start: the keeper exits non-zero, nothing stays."""
    (workdir / "behaviour.json").write_text('{"raise_at_import": true}')
    p = fugue_proc(["fuguectl", "start", "--foreground", "-w", "1", "--bind", "127.0.0.1:0", "app.py"],
                   env={"INVOCATION_ID": "0" * 32})
    assert p.wait_exit(60) == 1
    assert "[keeper] INFO keeper exiting (status 1)" in p.log()
    assert not p.pids()
    assert not [n for n in os.listdir(workdir / "tmp") if n.startswith("fugue-")]
    assert not (workdir / "fugue.pid").exists()


def test_master_killed_during_an_upgrade_leaves_one_master(fugue_proc, workdir):
    """kill -9 of the old master while the new one starts: the keeper adopts the new one
    (it has the listeners) instead of starting a third, and it serves."""
    p, keeper, conf = start_pid1(fugue_proc, workdir)
    old = host_pids(p, "fugue master")
    (workdir / "behaviour.json").write_text('{"version": "v2", "ready_delay": 2}')
    os.kill(old[0], signal.SIGUSR2)
    p.wait_log(r"upgrade: listeners handed to pid \d+")
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: "version v2" in p.body(), what="the new master serving")
    assert "starting a new master now" not in p.log()
    wait_for(lambda: len(host_pids(p, "fugue master")) == 1, what="one master")
    assert host_pids(p, "fugue master") != old


def test_a_replacement_master_that_cannot_start_ends_the_keeper(fugue_proc, workdir):
    """kill -9 of the master after the code on disk broke: the replacement fails at start and
    the keeper gives up with its status (the runtime's restart policy decides) instead of spinning."""
    p, keeper, conf = start_pid1(fugue_proc, workdir)
    (workdir / "behaviour.json").write_text('{"raise_at_import": true}')
    os.kill(host_pids(p, "fugue master")[0], signal.SIGKILL)
    assert p.wait_exit(60) == 1
    assert p.count_log(r"starting a new master now") == 1
    assert p.count_log(r"\[keeper\] INFO keeper exiting \(status 1\)") == 1
    assert not p.pids()
