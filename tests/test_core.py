"""Core daemon: serving, respawn, scaling, privileges, logs, daemonizing, signals."""

import json
import os
import re
import signal
import socket
import threading

import pytest

from conftest import SYSTEM_PYTHON, http_get, wait_for


def answers(p, n=20):
    return [p.body() for _ in range(n)]


def test_workers_answer_with_distinct_pids(fugue_proc):
    p = fugue_proc(["app.py", "0", "3"]).started()
    bodies = set()
    wait_for(lambda: bodies.add(p.body()) or len({b.split()[5] for b in bodies}) == 3,
             what="answers from 3 distinct pids")
    ids = {re.search(r"worker (\d)", b).group(1) for b in bodies}
    assert ids == {"1", "2", "3"}


def test_kill9_worker_slot_comes_back(fugue_proc):
    p = fugue_proc(["app.py", "0", "2"]).started()
    victim = int(p.wait_log(r"worker 1 \(pid (\d+), generation 1\) ready").group(1))
    os.kill(victim, signal.SIGKILL)
    p.wait_log(r"worker 1 \(pid %d, generation 1\) killed by SIGKILL" % victim)
    assert p.body().startswith("hello")  # the other one keeps answering
    newpid = int(p.wait_log(r"worker 1 \(pid (\d+), generation 1\) ready", count=2).group(1))
    assert newpid != victim
    wait_for(lambda: f"pid {newpid} " in p.body(), what="the new worker answering")


def test_ttin_ttou(fugue_proc):
    p = fugue_proc(["app.py", "0", "1"]).started()
    p.signal(signal.SIGTTIN)
    p.wait_log(r"worker 2 \(pid \d+, generation 1\) ready")
    p.signal(signal.SIGTTOU)
    p.wait_log(r"workers: 2 -> 1")  # signals of one kind coalesce: one at a time
    p.signal(signal.SIGTTOU)
    p.wait_log(r"workers: 1 -> 0")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) stopped")
    p.wait_log(r"worker 2 \(pid \d+, generation 1\) stopped")
    p.signal(signal.SIGTTIN)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)
    assert p.body().startswith("hello from worker 1")


def test_graceful_stop_lets_inflight_request_finish(fugue_proc):
    p = fugue_proc(["app.py", "0", "1"]).started()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=http_get(p.port, "/slow?s=1.5")))
    t.start()
    wait_for(lambda: _established(p.port), what="the slow request in flight")
    p.signal(signal.SIGTERM)
    t.join(20)
    assert result["r"][0] == 200 and result["r"][1].startswith("slow done")
    assert p.wait_exit() == 0
    assert p.pids() == []


def test_quick_stop_does_not_wait(fugue_proc):
    p = fugue_proc(["app.py", "0", "1"]).started()
    result = {}

    def slow():
        try:
            result["r"] = http_get(p.port, "/slow?s=30")
        except Exception as e:  # noqa: BLE001
            result["e"] = e

    t = threading.Thread(target=slow)
    t.start()
    p.wait_log(r"ready")
    wait_for(lambda: _established(p.port), what="the slow connection")
    p.signal(signal.SIGINT)
    p.wait_exit(10)
    t.join(10)
    assert "e" in result
    assert p.pids() == []


def _established(port):
    out = os.popen(f"ss -Htn state established '( sport = :{port} )'").read()
    return bool(out.strip())


def test_crash_loop_backs_off(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "1"]).started()
    (workdir / "behaviour.json").write_text(json.dumps({"exit_at_import": 3}))
    os.kill(int(p.wait_log(r"worker 1 \(pid (\d+)").group(1)), signal.SIGKILL)
    p.wait_log(r"respawning worker 1 in [\d.]+s \(6 consecutive failures\)", timeout=20)
    # Backoff: 0.1, 0.15, 0.22, 0.34, 0.51 s... about 8 spawns in 5 s at most.
    import time
    t0 = time.monotonic()
    n0 = p.count_log(r"respawning worker 1")
    wait_for(lambda: time.monotonic() - t0 > 5, what="5 s")
    assert p.count_log(r"respawning worker 1") - n0 <= 5
    assert p.popen.poll() is None  # the master is still up
    (workdir / "behaviour.json").write_text("{}")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2, timeout=40)


def test_hung_worker_is_killed(fugue_proc):
    p = fugue_proc(["app.py", "0", "1", json.dumps({"timeout": 1})]).started()
    pid = int(p.wait_log(r"worker 1 \(pid (\d+), generation 1\) ready").group(1))
    os.kill(pid, signal.SIGSTOP)
    p.wait_log(r"killing worker 1 \(pid %d, generation 1\): no heartbeat for 1s" % pid)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) ready", count=2)


def test_master_kill9_workers_exit(fugue_proc):
    p = fugue_proc(["app.py", "0", "2"]).started()
    os.kill(p.popen.pid, signal.SIGKILL)
    p.popen.wait(5)
    wait_for(lambda: not p.pids(), what="workers to exit after the master died")


def test_usr1_reopens_logs(fugue_proc, workdir):
    log_file = workdir / "app.log"
    p = fugue_proc(["app.py", "0", "1", json.dumps({"log_file": str(log_file)})])
    wait_for(lambda: log_file.exists() and "started: generation 1" in log_file.read_text(), what="log")
    os.rename(log_file, workdir / "app.log.1")
    p.signal(signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "reopened log files" in log_file.read_text(), what="new log")
    # Workers write to the new file too: stop them and look for their lines.
    p.signal(signal.SIGTERM)
    p.wait_exit()
    assert "[worker 1] INFO draining" in log_file.read_text()


def test_daemonize_pid_file_and_launcher_status(fugue_proc, workdir):
    p = fugue_proc(["app.py", "0", "2", json.dumps({"daemonize": True, "log_file": "fugue.log"})])
    assert p.wait_exit() == 0
    assert re.search(r"fugue: master running as pid \d+", p.log())
    pid = p.master_pid()
    assert pid != p.popen.pid
    assert open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"fugue master app")
    port = int(re.search(r"listening on [\d.]+:(\d+)", (workdir / "fugue.log").read_text()).group(1))
    assert http_get(port)[0] == 200
    os.kill(pid, signal.SIGWINCH)  # daemonized: stop the workers, keep the master
    wait_for(lambda: "stopping all workers" in (workdir / "fugue.log").read_text(), what="WINCH")
    os.kill(pid, signal.SIGTTIN)
    wait_for(lambda: (workdir / "fugue.log").read_text().count("generation 1) ready") >= 3, what="TTIN")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(workdir / "fugue.pid"), what="pid file removed")
    wait_for(lambda: not p.pids(), what="everything gone")


def test_daemonize_failure_reported_by_launcher(fugue_proc, workdir):
    (workdir / "behaviour.json").write_text(json.dumps({"raise_at_import": True}))
    p = fugue_proc(["app.py", "0", "2", json.dumps({"daemonize": True, "log_file": "fugue.log"})])
    assert p.wait_exit() == 1
    assert "RuntimeError: broken at import on purpose (app.py, line" in p.log()
    assert not os.path.exists(workdir / "fugue.pid")
    wait_for(lambda: not p.pids(), what="nothing left behind")


def test_privileges_dropped_and_cwd(fugue_proc, world_dir, tmp_path):
    work = os.path.join(world_dir, "wd")
    os.mkdir(work, 0o755)
    opts = {"uid": "nobody", "gid": "nogroup", "working_path": work}
    p = fugue_proc([os.path.join(world_dir, "app.py"), "0", "1", json.dumps(opts)],
                   cwd=world_dir, python=SYSTEM_PYTHON).started()
    ids = json.loads(p.body("/ids"))
    assert ids["uid"] == ids["euid"] == 65534
    assert ids["gid"] == 65534
    assert ids["cwd"] == work
    assert 0 not in ids["groups"]


def test_unreadable_app_after_drop_is_one_clear_error(fugue_proc, workdir):
    # The default interpreter lives under /root (0700): nobody cannot run it.
    p = fugue_proc(["app.py", "0", "1", json.dumps({"uid": "nobody"})])
    assert p.wait_exit() == 1
    assert re.search(r"fugue: start failed: worker 1 .*(user nobody cannot (execute|read)|"
                     r"cannot chdir to \S+ as user nobody)", p.log())
    assert p.count_log("Traceback") == 0
    assert p.pids() == []


def test_ipv6(fugue_proc):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    p = fugue_proc(["app.py", "[::1]:0", "1"]).started()
    port = int(p.wait_log(r"listening on \[::1\]:(\d+)").group(1))
    status, body, _ = http_get(port, host="::1")
    assert status == 200 and body.startswith("hello from worker 1")


def test_master_log_file_gets_the_master_alone(fugue_proc, workdir):
    opts = {"log_file": str(workdir / "all.log"), "master_log_file": str(workdir / "master.log")}
    p = fugue_proc(["app.py", "0", "1", json.dumps(opts)])
    master_log = workdir / "master.log"
    wait_for(lambda: master_log.exists() and "started: generation 1" in master_log.read_text(), what="start")
    pid = int((workdir / "fugue.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    p.wait_exit()
    master_text, worker_text = master_log.read_text(), (workdir / "all.log").read_text()
    assert "[master]" in master_text and "[worker 1]" not in master_text
    assert "[worker 1] INFO draining" in worker_text and "[master]" not in worker_text
    # Each fugue line: time, pid, who.
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] \[worker 1\] ", worker_text.splitlines()[-1])
