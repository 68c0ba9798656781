"""Foreign workers: programs nobody wrote for fugue (Node.js, a stdlib-only Python
server) served through LISTEN_FDS, READY by stable_after or sd_notify, reloaded
under load, rolled back, upgraded; and fugue itself socket-activated."""

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import APPS, PY, SYSTEM_PYTHON, UnixHTTPConnection, wait_for
from fugue import foreign, policy
from fugue.policy import Kill, Promote, Ready, Spawn, WorkerState, WorkerView
from test_adapters import Load, status

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="needs node")


# -- pure parts -------------------------------------------------------------------------

STARTING, READY = WorkerState.STARTING, WorkerState.READY
INF = float("inf")


@pytest.mark.parametrize("workers, pending, expected", [
    # stable_after not reached yet: nothing but the wait
    ([WorkerView(10, 1, 1, STARTING, 0.0, INF, None, 1.0)], 1, []),
    # reached: Ready, and no replacement spawned for the worker it names
    ([WorkerView(10, 1, 1, STARTING, 0.0, INF, None, 0.5)], 1, [Ready(10)]),
    # READY and foreign (no heartbeat): promoted, never killed for silence
    ([WorkerView(10, 1, 1, READY, 0.0, INF)], 1, [Promote(1)]),
    ([WorkerView(10, 1, 1, READY, 0.0, INF)], None, []),
    # ready_timeout comes first: killed, and the slot refilled
    ([WorkerView(10, 1, 1, STARTING, -40.0, INF, None, 5.0)], 1, [Kill(10, "not ready after 30s"), Spawn(1, 1)]),
])
def test_policy_foreign_readiness(workers, pending, expected):
    actions, _ = policy.decide(policy.Snapshot(now=0.8, workers=tuple(workers), target=1,
                                               generation=1 if pending is None else 0, pending=pending))
    assert actions == expected


@pytest.mark.parametrize("data, fields", [
    (b"READY=1", {"READY": "1"}),
    (b"READY=1\nSTATUS=warming up: 3/4 = 75%\n", {"READY": "1", "STATUS": "warming up: 3/4 = 75%"}),
    (b"garbage\n=x\nMAINPID=12", {"MAINPID": "12"}),
])
def test_notify_datagrams_parse(data, fields):
    assert foreign.parse(data) == fields


def test_notify_socket_checks_the_senders_uid():
    ns = foreign.NotifySocket(1, 1, {os.getuid()})
    try:
        assert ns.address.startswith("@fugue-")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("\0" + ns.address[1:])
            s.send(b"READY=1\nSTATUS=up")
        wait_for(lambda: select.select([ns], [], [], 0)[0], what="the datagram")
        assert ns.read(os.getpid()) == ([({"READY": "1", "STATUS": "up"}, os.getpid())], 0)
        ns.allowed = {12345}
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("\0" + ns.address[1:])
            s.send(b"READY=1")
        wait_for(lambda: select.select([ns], [], [], 0)[0], what="the datagram")
        assert ns.read(os.getpid()) == ([], 1)
    finally:
        ns.close()


# -- process tests -----------------------------------------------------------------------


def fuguectl(*args):
    return ["fuguectl", "start", "--bind", "127.0.0.1:0", *args]


def set_version(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def reload_and_roll_back(p, load, program, broken_line):
    """v1 -> v2 under load (zero failures), then a v3 that crashes at start: rolled back."""
    load.wait(lambda ld: ld.count("generation 1 version v1") >= 30, "answers from generation 1")
    set_version(program, "'v1'" if program.suffix == ".js" else '"v1"',
                "'v2'" if program.suffix == ".js" else '"v2"')
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"generation 1\) stopped", count=2)
    before = load.count("generation 2 version v2")
    load.wait(lambda ld: ld.count("generation 2 version v2") >= before + 30, "answers from generation 2")
    program.write_text(broken_line + "\n" + program.read_text())
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: worker \d \(pid \d+, generation 3\) exited with status 1.*"
               r"generation 2 keeps serving")
    before = load.count("generation 2 version v2")
    load.wait(lambda ld: ld.count("generation 2 version v2") >= before + 30, "generation 2 still serving")


@needs_node
def test_node_server_reload_under_load_and_rollback(fugue_proc, workdir):
    program = workdir / "node_server.js"
    shutil.copy(os.path.join(APPS, "node_server.js"), program)
    # stable_after must outlast the program's start (a loaded machine included), or a
    # version that crashes while starting would count as READY: notify has no such guess.
    p = fugue_proc(fuguectl("--workers", "2", "--stable-after", "1.5", "--", "node", "node_server.js")).started()
    assert re.search(r"worker 1 \(pid \d+, generation 1\) ready \(up for 1.5s\)", p.log())
    body = p.body()
    assert "generation 1 version v1 node" in body
    load = Load(p.port)
    try:
        reload_and_roll_back(p, load, program, "throw new Error('broken on purpose');")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert "Error: broken on purpose" in p.log()  # the program's stderr is in the log
    assert re.search(r"node_server \d+ v1 serving on fd 3", p.log())  # and its stdout
    rows = status(p)["workers"]
    assert {r["generation"] for r in rows} == {2} and all(r["foreign"] for r in rows)
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_stdlib_server_notify_reload_under_load_and_rollback(fugue_proc, workdir):
    program = workdir / "stdlib_server.py"
    p = fugue_proc(fuguectl("--workers", "2", "--ready-mode", "notify", "--",
                            PY, "stdlib_server.py")).started()
    assert re.search(r"worker 2 \(pid \d+, generation 1\) ready \(READY=1\)", p.log())
    load = Load(p.port)
    try:
        reload_and_roll_back(p, load, program, "raise SystemExit('broken on purpose')")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    # The reason carries the program's last words on stderr (they are in the log too).
    assert re.search(r"reload failed: worker \d \(pid \d+, generation 3\) exited with status 1: "
                     r"last stderr line: broken on purpose; generation 2 keeps serving", p.log())
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_notify_without_ready_is_not_ready(fugue_proc, workdir):
    # A program that never says READY=1 does not count as serving, however long it runs.
    (workdir / "mute.py").write_text("import time\ntime.sleep(60)\n")
    p = fugue_proc(fuguectl("--workers", "1", "--ready-mode", "notify", "--ready-timeout", "1",
                            "--", PY, "mute.py"))
    assert p.wait_exit() == 1
    assert re.search(r"start failed: worker 1 .*not ready after 1s", p.log())


@needs_node
def test_usr2_upgrade_with_foreign_workers_under_load(fugue_proc, workdir):
    shutil.copy(os.path.join(APPS, "node_server.js"), workdir / "node_server.js")
    p = fugue_proc(fuguectl("--workers", "2", "--stable-after", "0.3", "--", "node", "node_server.js")).started()
    old = p.master_pid()
    load = Load(p.port)
    try:
        load.wait(lambda ld: ld.ok >= 30, "answers")
        p.signal(signal.SIGUSR2, old)
        wait_for(lambda: p.master_pid() != old, what="the new master's pid file")
        new = p.master_pid()
        wait_for(lambda: not os.path.exists(f"/proc/{old}") or _zombie(old), what="the old master gone")
        before = load.ok
        load.wait(lambda ld: ld.ok >= before + 30, "answers after the upgrade")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not p.pids(), what="everything gone")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_signal_then_sigkill_after_graceful_timeout(fugue_proc, workdir):
    (workdir / "stubborn.py").write_text(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGINT, lambda *a: print('got SIGINT', os.getpid(), flush=True))\n"
        "print('stubborn: handlers set', flush=True)\n"
        "while True:\n    time.sleep(0.05)\n")
    p = fugue_proc(fuguectl("--workers", "1", "--stable-after", "0.2", "--stop-signal", "INT",
                            "--graceful-timeout", "0.3", "--", PY, "stubborn.py")).started()
    p.wait_log(r"stubborn: handlers set")
    p.signal(signal.SIGTERM)
    p.wait_log(r"got SIGINT \d+")  # the configured stop signal, not TERM
    p.wait_log(r"killing worker 1 .*did not stop within graceful_timeout")
    assert p.wait_exit() == 0


@needs_node
def test_foreign_worker_respawns_and_sees_its_environment(fugue_proc, workdir):
    shutil.copy(os.path.join(APPS, "node_server.js"), workdir / "node_server.js")
    (workdir / "env.py").write_text(
        "import os, sys\n"
        "keys = ['LISTEN_FDS', 'LISTEN_FDNAMES', 'FUGUE_WORKER_ID', 'FUGUE_GENERATION']\n"
        "print('ENV', ' '.join(f'{k}={os.environ.get(k)}' for k in keys),\n"
        "      'PID_OK' if os.environ.get('LISTEN_PID') == str(os.getpid()) else 'PID_BAD',\n"
        "      'FD3', os.get_inheritable(3), flush=True)\n"
        "os.execvp('node', ['node', 'node_server.js'])\n")
    p = fugue_proc(fuguectl("--workers", "1", "--stable-after", "0.2", "--", PY, "env.py")).started()
    m = p.wait_log(r"ENV LISTEN_FDS=1 LISTEN_FDNAMES=l0 FUGUE_WORKER_ID=1 FUGUE_GENERATION=1 PID_OK FD3 True")
    assert m
    victim = int(re.search(r"pid (\d+)", p.body()).group(1))
    os.kill(victim, signal.SIGKILL)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)
    assert int(re.search(r"pid (\d+)", p.body()).group(1)) != victim


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_foreign_worker_runs_as_another_user_with_notify(fugue_proc, world_dir):
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs Debian's /usr/bin/python3")
    p = fugue_proc(fuguectl("--workers", "1", "--user", "nobody", "--group", "nogroup", "--ready-mode", "notify",
                            "--working-path", world_dir, "--", SYSTEM_PYTHON, "stdlib_server.py"),
                   cwd=world_dir).started()
    assert "uid 65534" in p.body()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activated_master_hands_its_listener_on(fugue_proc, workdir):
    path = str(workdir / "app.sock")
    # It passes on only the environment it is told to: the test tag, for the cleanup, too.
    p = fugue_proc(["systemd-socket-activate", "-l", path, "--fdname", "web",
                    "-E", "FUGUE_TEST_TAG", "-E", "PYTHONPATH", "-E", "PYTHONUNBUFFERED",
                    PY, "-m", "fugue.ctl", "start", "--workers", "1", "--app", "wsgi_app:app"])
    wait_for(lambda: os.path.exists(path), what="the activation socket")
    assert "generation 1 version v1 wsgi" in _unix_get(path)  # the first connection starts fugue
    p.started()
    assert re.search(r"listening on unix:\S+app.sock \(web\)", p.log())
    old = p.master_pid()
    p.signal(signal.SIGUSR2, old)
    wait_for(lambda: p.master_pid() != old, what="the new master's pid file")
    p.wait_log(r"upgrade done")
    wait_for(lambda: "generation 2 version v1 wsgi" in _unix_get(path), what="the new master's workers")
    os.kill(p.master_pid(), signal.SIGTERM)
    wait_for(lambda: not p.pids(), what="everything gone")
    assert os.path.exists(path)  # systemd's socket: not fugue's to unlink


def _unix_get(path):
    conn = UnixHTTPConnection(path, timeout=15)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(subprocess.call([PY, "-m", "pytest", "-q", __file__]))
