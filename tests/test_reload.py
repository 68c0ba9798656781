"""Reload (HUP) with rollback, upgrade (USR2) with handoff, and draining."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import threading

import pytest

from conftest import http_get, wait_for


def versions(p, n=12):
    return {re.search(r"version (\S+)", p.body()).group(1) for _ in range(n)}


def generations(p, n=12):
    return {int(re.search(r"generation (\d+)", p.body()).group(1)) for _ in range(n)}


def test_hup_switches_every_answer_to_the_new_generation(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2"]).started()
    assert versions(p) == {"v1"}
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"worker 2 \(pid \d+, generation 1\) stopped")
    assert versions(p) == {"v2"}
    assert generations(p) == {2}


BROKEN = [
    ("syntax", None, r"SyntaxError: .*\(app\.py, line \d+\)"),
    ("import", {"raise_at_import": True}, r"RuntimeError: broken at import on purpose \(app\.py, line \d+\)"),
    ("check", {"check_fails": True}, r"startup_check failed: RuntimeError: startup check failed on purpose"),
    ("never_ready", {"never_ready": True}, r"not ready after 2s"),
    ("exit", {"exit_at_import": 3}, r"exited with status 3"),
]


@pytest.mark.parametrize("kind, behaviour, reason", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_reload_rolls_back(fugue_proc, workdir, kind, behaviour, reason):
    p = fugue_proc(["app.py", "0", "2", json.dumps({"ready_timeout": 2})]).started()
    old = {int(m) for m in re.findall(r"worker \d \(pid (\d+), generation 1\) ready", p.log())}
    if kind == "syntax":
        with open(workdir / "app.py", "a") as f:
            f.write("\ndef broken(:\n")
    else:
        (workdir / "behaviour.json").write_text(json.dumps(behaviour))
    p.signal(signal.SIGHUP)
    line = p.wait_log(r"reload failed: .*; generation 1 keeps serving").group(0)
    assert re.search(reason, line), line
    assert p.popen.poll() is None
    assert generations(p) == {1} and versions(p) == {"v1"}
    # The same old workers serve: nothing was retired.
    pids = {int(re.search(r"pid (\d+)", p.body()).group(1)) for _ in range(12)}
    assert pids <= old
    # And a good deploy afterwards goes through.
    shutil.copy(os.path.join(os.path.dirname(__file__), "apps", "app.py"), workdir / "app.py")
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v3"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 3 serving")
    p.wait_log(r"worker \d \(pid \d+, generation 1\) stopped", count=2)  # the old ones are gone
    assert versions(p) == {"v3"}


def test_rolling_reload(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "3", json.dumps({"reload_strategy": "rolling"})]).started()
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    log = p.log()
    # One at a time: each old worker stops right after its replacement is ready.
    order = re.findall(r"(worker (\d) \(pid \d+, generation 2\) ready|stopping worker (\d) \(pid \d+, generation 1\))", log)
    events = [("ready", m[1]) if m[1] else ("stop", m[2]) for m in order]
    assert events == [("ready", "1"), ("stop", "1"), ("ready", "2"), ("stop", "2"), ("ready", "3"), ("stop", "3")]
    assert versions(p) == {"v2"}


def test_rolling_reload_rolls_back(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2", json.dumps({"reload_strategy": "rolling"})]).started()
    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: .*generation 1 keeps serving")
    assert generations(p) == {1}


def test_hup_and_usr2_during_a_reload_wait_their_turn(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    old = p.master_pid()
    (workdir / "behaviour.json").write_text(json.dumps({"ready_delay": 1.5, "version": "v2"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload \(HUP\): starting generation 2")
    (workdir / "behaviour.json").write_text(json.dumps({"ready_delay": 0.2, "version": "v3"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload \(HUP\) waits its turn: generation 2 is still starting")
    p.signal(signal.SIGUSR2)
    p.wait_log(r"upgrade \(USR2\) waits its turn: generation 2 is still starting")
    # In the order asked: generation 2, then the HUP's generation 3, then the upgrade.
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"reload \(HUP\): starting generation 3")
    p.wait_log(r"reload done: generation 3 serving")
    new = int(p.wait_log(r"upgrade done: new master pid (\d+) serving").group(1))
    assert new != old and "refused" not in p.log()
    wait_for(lambda: p.master_pid() == new, what="the new master's pid file")
    assert versions(p) == {"v3"}


def test_idle_keepalive_connection_survives_reload(fugue_proc, workdir):
    """The keep-alive race: an idle connection is not closed under its client."""
    p = fugue_proc(["app.py", "0", "1", json.dumps({"graceful_timeout": 20})]).started()
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    conn.request("GET", "/")
    first = conn.getresponse().read().decode()
    assert "generation 1" in first
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2"}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"stopping worker 1 \(pid \d+, generation 1\)")
    # The old worker is draining; our idle connection is still open. Reuse it:
    conn.request("GET", "/")
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 200 and "generation 1" in body
    assert resp.getheader("Connection") == "close"
    conn.close()
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) stopped")


def test_on_takedown_runs_when_draining(fugue_proc, workdir):
    (workdir / "takedown.py").write_text(
        "import fugue, runpy, sys\n"
        "fugue.on_takedown(lambda: print('takedown ran in worker', fugue.worker_id(), flush=True))\n"
        "sys.argv = ['app.py'] + sys.argv[1:]\n"
        "runpy.run_path('app.py', run_name='__main__')\n")
    p = fugue_proc(["takedown.py", "0", "1"]).started()
    p.signal(signal.SIGTERM)
    p.wait_exit()
    assert "takedown ran in worker 1" in p.log()


# -- upgrade ---------------------------------------------------------------------------------

def test_usr2_upgrade(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2"]).started()
    old = p.master_pid()
    # A slow request keeps an old worker busy, so the old master is seen draining.
    result = {}
    t = threading.Thread(target=lambda: result.update(r=http_get(p.port, "/slow?s=2")))
    t.start()
    wait_for(lambda: _established(p.port), what="slow request in flight")
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2"}))
    p.signal(signal.SIGUSR2, old)
    new = int(p.wait_log(r"upgrade done: new master pid (\d+) serving").group(1))
    assert new != old
    wait_for(lambda: (workdir / "fugue.pid.oldbin").exists() or not _alive(old), what=".oldbin")
    assert wait_for(lambda: p.master_pid() == new, what="new pid in the pid file")
    assert versions(p) == {"v2"}
    t.join(15)
    assert result["r"][0] == 200  # the in-flight request finished
    wait_for(lambda: not _alive(old), what="old master gone")
    wait_for(lambda: not (workdir / "fugue.pid.oldbin").exists(), what=".oldbin removed")
    p.wait_log(r"old master pid %d exited" % old)
    assert not [d for d in os.listdir(workdir / "tmp") if d.startswith("fugue-upgrade-")]


def test_usr2_with_broken_script_rolls_back(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    old = p.master_pid()
    with open(workdir / "app.py", "a") as f:
        f.write("\ndef broken(:\n")
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade failed: new master pid \d+ exited with status 1 .*pid %d keeps serving" % old)
    assert p.master_pid() == old
    assert p.body().startswith("hello")
    assert not (workdir / "fugue.pid.oldbin").exists()
    assert not [d for d in os.listdir(workdir / "tmp") if d.startswith("fugue-upgrade-")]


def test_usr2_with_failing_workers_rolls_back(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    old = p.master_pid()
    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade failed: new master pid \d+ exited with status 1.*keeps serving")
    assert p.master_pid() == old
    assert p.body().startswith("hello")
    wait_for(lambda: len(p.pids()) == 2, what="only the old master and its worker left")


def test_second_usr2_during_upgrade_is_passed_on_to_the_new_master(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    old = p.master_pid()
    (workdir / "behaviour.json").write_text(json.dumps({"ready_delay": 1.5}))
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade: listeners handed to pid")
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade \(USR2\) waits its turn: an upgrade is in progress")
    second = int(p.wait_log(r"upgrade done: new master pid (\d+)").group(1))
    p.wait_log(r"upgrade \(USR2\) passed on to the new master pid %d" % second)
    # The new master runs it once its old master is gone: never three masters.
    third = int(p.wait_log(r"upgrade done: new master pid (\d+)", count=2).group(1))
    assert len({old, second, third}) == 3
    assert p.count_log(r"upgrade: started new master") == 2
    wait_for(lambda: p.master_pid() == third, what="the third master's pid file")


def test_symlink_deploy_then_usr2_serves_new_release(fugue_proc, workdir, tmp_path):
    releases = tmp_path / "releases"
    for version in ("r1", "r2"):
        d = releases / version
        d.mkdir(parents=True)
        shutil.copy(workdir / "app.py", d / "app.py")
        (d / "behaviour.json").write_text(json.dumps({"version": version}))
        (d / "tmp").mkdir()
    current = tmp_path / "current"
    current.symlink_to(releases / "r1")
    pid_file = str(tmp_path / "app.pid")  # outside the releases, as a deploy keeps it
    p = fugue_proc(["app.py", "0", "1", json.dumps({"pid_file": pid_file})], cwd=current,
                   env={"PWD": str(current)}).started()
    assert versions(p) == {"r1"}
    current.unlink()
    current.symlink_to(releases / "r2")
    os.kill(int(open(pid_file).read()), signal.SIGUSR2)
    p.wait_log(r"upgrade done")
    assert versions(p) == {"r2"}


def test_notify_socket_gets_mainpid_and_ready(fugue_proc, workdir, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(20)

    def receive(until):
        got = []
        while True:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(cdata[:4], "little")
            got.append((pid, data.decode()))
            if until in data.decode():
                return got

    try:
        # Under systemd the process started is the keeper: it stays systemd's main process
        # (the only sender, MAINPID its own pid) while the masters behind it change.
        p = fugue_proc(["app.py", "0", "1"], env={"NOTIFY_SOCKET": path})
        keeper = p.popen.pid
        got = receive("READY=1")
        master = p.master_pid()
        assert master != keeper and {pid for pid, _ in got} == {keeper}
        assert f"MAINPID={keeper}" in got[-1][1]
        p.signal(signal.SIGHUP)
        got = receive("READY=1")
        assert got[0][1].startswith("RELOADING=1") and got[0][0] == keeper
        p.signal(signal.SIGUSR2)
        new = p.wait_log(r"upgrade done: new master pid (\d+)").group(1)
        got = receive("STATUS=generation 3 serving (upgraded)")
        assert got[-1][0] == keeper and f"MAINPID={keeper}" in got[-1][1]
        wait_for(lambda: p.master_pid() == int(new), what="the pid file naming the new master")
        # Workers never see NOTIFY_SOCKET.
        workers_seen = 0
        for pid in p.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    is_worker = b"worker" in f.read()
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue  # an old worker that just exited
            if is_worker:
                workers_seen += 1
                assert b"NOTIFY_SOCKET" not in environ
        assert workers_seen
        p.signal(signal.SIGTERM, int(new))
        assert "STOPPING=1" in receive("STOPPING=1")[-1][1]
        assert p.wait_exit() == 0  # the keeper ends with the master
    finally:
        sock.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # the title may hold spaces
    except OSError:
        return False


def _established(port):
    return bool(os.popen(f"ss -Htn state established '( sport = :{port} )'").read().strip())
