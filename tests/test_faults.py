"""Faults under load: what production does to a process manager, done for real.

Every test here runs real masters (tests/apps/fault_app.py), injects the fault
with real signals or a misbehaving app, and, where it says "under load", keeps
bench/loadgen.py's exact-counting client running meanwhile and checks the
failures it counted, by kind. Waits are on conditions (a log line, a control
reply, /proc), never on sleeps.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import PY, ROOT, http_get
from faultkit import Load, ask, connections_of, gone, kill, load, quiet_fds, settled, status, until, worker_pids


def fault_app(fugue_proc, workers=2, bind="0", **options):
    return fugue_proc(["fault_app.py", bind, str(workers), json.dumps(options)])


# -- recycling: max_requests (with jitter) and max_memory ------------------------------------------

def test_max_requests_recycles_gracefully_under_load(fugue_proc):
    p = fault_app(fugue_proc, 2, max_requests=40, max_requests_jitter=10).started()
    first = settled(p, 2)
    old = {r["pid"] for r in first["workers"]}
    with_load = load(p.port, conns=6)
    p.wait_log(r"is recycling itself \(served \d+ requests", count=4)
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()
    data = settled(p, 2)
    assert not old & {r["pid"] for r in data["workers"]}
    # A recycled worker is a planned exit: its slot is refilled at once, not counted as a crash.
    assert all(r["restarts"] == 0 for r in data["workers"]), data["workers"]
    assert "respawning worker" not in p.log()
    served = [int(n) for n in re.findall(r"is recycling itself \(served (\d+) requests", p.log())]
    # Never before its limit (40 plus 0..10 of jitter); how far past it depends on what was in flight.
    assert all(n >= 40 for n in served), served


def test_max_memory_recycles_a_leaking_worker(fugue_proc):
    p = fault_app(fugue_proc, 1, max_memory=150 << 20, timeout=3).started()
    pid = settled(p, 1)["workers"][0]["pid"]
    assert p.body("/leak?mb=200").startswith("holding 200 MB")
    p.wait_log(r"worker 1 \(pid %d, generation 1\) is recycling itself \(RSS \d+ MB > max_memory 150 MB\)" % pid)
    p.wait_log(r"worker 1 \(pid %d, generation 1\) stopped" % pid)
    data = settled(p, 1)
    assert data["workers"][0]["pid"] != pid and data["workers"][0]["restarts"] == 0
    assert p.body().startswith("hello from worker 1")


# -- kill -9 ---------------------------------------------------------------------------------------

def test_kill9_random_workers_under_load_loses_only_their_inflight_requests(fugue_proc):
    p = fault_app(fugue_proc, 4).started()
    settled(p, 4)
    rng = random.Random(8)
    with_load = load(p.port, conns=12)
    exposed = 0  # connections the victims held when they died: the most that may fail
    for _ in range(6):
        data = settled(p, 4)
        victim = rng.choice(data["workers"])["pid"]
        until(lambda: with_load.snapshot().ok > 50, what="some load first")
        held = connections_of(p.port)
        kill(victim)
        exposed += held.get(victim, 0)
        until(lambda: gone(victim), what="the victim to die")
        p.wait_log(r"\(pid %d, generation 1\) killed by SIGKILL" % victim)
    result = with_load.stop()
    assert set(result.failures) <= {"reset", "eof_before_response", "eof_mid_response"}, result.failures_text()
    print("kill -9 x6:", result.failures_text(), "failed of", exposed, "exposed;", result.ok, "ok")
    assert result.failed <= exposed, (result.failures_text(), exposed)
    assert result.ok > 0
    data = settled(p, 4)  # every slot came back
    assert p.popen.poll() is None and data["ready_workers"] == 4


def leftovers(workdir, live_pids=()):
    """What is in tmp_path besides the run directories of live masters."""
    keep = {f"fugue-{pid}" for pid in live_pids}
    return sorted(set(os.listdir(workdir / "tmp")) - keep)


def refused(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        s.close()
    return False


def test_kill9_master_workers_exit_and_a_restart_takes_over(fugue_proc, workdir):
    path = str(workdir / "app.sock")
    p = fault_app(fugue_proc, 2, bind=path).started()
    master = p.master_pid()
    workers = worker_pids(p)
    with_load = Load("127.0.0.1", 0, conns=4, unix_path=path, timeout=10.0).start()
    until(lambda: with_load.snapshot().ok > 20, what="some load first")
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=http_get(0, "/slow?s=1", unix=path)))
    t.start()
    until(lambda: status(p)["totals"]["in_flight"] >= 1, what="a slow request in flight")
    kill(master)
    until(lambda: all(gone(pid) for pid in workers + [master]), what="the workers to exit")
    until(lambda: refused(path), what="nobody listening on the socket file")
    result = with_load.stop()
    t.join(10)
    # The orphaned workers drained: what was in flight finished. Then nobody listens: new
    # connections are refused, and those still queued when the last listener closed are reset.
    assert slow["r"][0] == 200
    assert set(result.failures) <= {"connect_refused", "reset"}, result.failures_text()
    assert os.path.exists(path) and (workdir / "fugue.pid").exists()  # stale, left by SIGKILL
    again = fault_app(fugue_proc, 2, bind=path).started()
    assert re.search(r"stale pid file .*fugue.pid \(pid %d is gone\); taking over" % master, again.log())
    assert again.master_pid() != master
    assert http_get(0, unix=path)[0] == 200
    assert leftovers(workdir, [again.master_pid()]) == []  # the dead master's run directory too


# -- kill -9 during an upgrade -------------------------------------------------------------------

def behave(workdir, **behaviour):
    (workdir / "behaviour.json").write_text(json.dumps(behaviour))


def new_master_started(p, n=1):
    return int(p.wait_log(r"upgrade: started new master pid (\d+)", count=n).group(1))


def only_these_alive(p, pids):
    """Exactly these processes (and nothing else of the test) are alive."""
    return until(lambda: sorted(p.pids()) == sorted(pids), what=f"exactly {sorted(pids)} alive")


def test_kill9_new_master_at_each_step_of_the_handoff(fugue_proc, workdir):
    """The old master rolls back each time; under load, no request is lost."""
    p = fault_app(fugue_proc, 2).started()
    old = p.master_pid()
    with_load = load(p.port, conns=6)
    serving = [old] + worker_pids(p)

    # 1. Forked, not yet connected to the handoff socket.
    behave(workdir, master_gate=str(workdir / "never"))
    p.signal(signal.SIGUSR2, old)
    new = new_master_started(p, 1)
    kill(new)
    p.wait_log(r"upgrade failed: new master pid %d killed by SIGKILL.*pid %d keeps serving" % (new, old))
    only_these_alive(p, serving)
    assert leftovers(workdir, [old]) == []

    # 2. Holding the listeners, its workers not ready yet.
    behave(workdir, worker_gate=str(workdir / "never"))
    p.signal(signal.SIGUSR2, old)
    new = new_master_started(p, 2)
    p.wait_log(r"upgrade: listeners handed to pid %d" % new)
    until(lambda: len(p.pids()) > len(serving) + 1, what="the new master's workers")
    kill(new)
    p.wait_log(r"upgrade failed: new master pid %d killed by SIGKILL" % new)
    only_these_alive(p, serving)  # its workers saw EOF on their channels and left
    assert leftovers(workdir, [old]) == []

    # 3. Ready: it told the old master so, and died before the old master read it (stopped meanwhile).
    gate = workdir / "gate"
    behave(workdir, worker_gate=str(gate))
    p.signal(signal.SIGUSR2, old)
    new = new_master_started(p, 3)
    p.wait_log(r"upgrade: listeners handed to pid %d" % new)
    os.kill(old, signal.SIGSTOP)
    try:
        gate.write_text("")
        p.wait_log(r"\[%d\] \[master\] INFO started: generation \d+ serving" % new)
        kill(new)
        until(lambda: gone(new), what="the new master dead")
    finally:
        os.kill(old, signal.SIGCONT)
    p.wait_log(r"new master pid %d killed by SIGKILL" % new)
    data = settled(p, 2, old)
    until(lambda: p.master_pid() == old, what="the pid file to name the old master")
    only_these_alive(p, [old] + [r["pid"] for r in data["workers"]])
    assert leftovers(workdir, [old]) == [] and not (workdir / "fugue.pid.oldbin").exists()
    serving = [old] + [r["pid"] for r in data["workers"]]

    # 4. Ready and serving; the old master stepped down and drains a slow request.
    behave(workdir)
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=http_get(p.port, "/slow?s=3")))
    t.start()
    until(lambda: status(p, old)["totals"]["in_flight"] >= 1, what="the slow request in flight")
    p.signal(signal.SIGUSR2, old)
    new = new_master_started(p, 4)
    p.wait_log(r"upgrade done: new master pid %d serving" % new)
    assert (workdir / "fugue.pid.oldbin").exists()
    kill(new)
    p.wait_log(r"new master pid %d killed by SIGKILL after taking over; this master \(pid %d\) resumes" % (new, old))
    until(lambda: p.master_pid() == old, what="the pid file back to the old master")
    t.join(20)
    assert slow["r"][0] == 200, slow  # the old master's draining worker finished it
    data = settled(p, 2, old)
    assert data["master"]["pid"] == old and not (workdir / "fugue.pid.oldbin").exists()
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()
    only_these_alive(p, [old] + [r["pid"] for r in data["workers"]])
    assert leftovers(workdir, [old]) == []


def test_kill9_old_master_right_after_the_handoff(fugue_proc, workdir):
    """The new master is the only one left: it serves, owns the pid file, cleans up after the old."""
    p = fault_app(fugue_proc, 2).started()
    first = p.master_pid()
    with_load = load(p.port, conns=6)
    gate = workdir / "gate"
    behave(workdir, worker_gate=str(gate))
    p.signal(signal.SIGUSR2, first)
    second = new_master_started(p)
    p.wait_log(r"upgrade: listeners handed to pid %d" % second)
    kill(first)
    p.wait_log(r"old master pid %d exited" % first)
    gate.write_text("")
    data = settled(p, 2, second)
    until(lambda: p.master_pid() == second, what="the pid file to name the new master")
    only_these_alive(p, [second] + [r["pid"] for r in data["workers"]])
    assert leftovers(workdir, [second]) == []

    # Once more, killed after it stepped down: its .oldbin is removed too.
    behave(workdir)
    p.signal(signal.SIGUSR2, second)
    third = int(p.wait_log(r"upgrade done: new master pid (\d+) serving").group(1))
    kill(second)
    p.wait_log(r"old master pid %d exited" % second)
    data = settled(p, 2, third)
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()
    assert p.master_pid() == third
    only_these_alive(p, [third] + [r["pid"] for r in data["workers"]])
    assert leftovers(workdir, [third]) == [] and not (workdir / "fugue.pid.oldbin").exists()


def test_kill9_master_during_an_upgrade_leaves_nothing_a_restart_cannot_take(fugue_proc, workdir):
    p = fault_app(fugue_proc, 1).started()
    old = p.master_pid()
    gate = workdir / "gate"
    behave(workdir, master_gate=str(gate))
    p.signal(signal.SIGUSR2, old)
    new = new_master_started(p)
    kill(old)
    until(lambda: gone(old), what="the old master to die")
    gate.write_text("")  # the new master now finds nobody on the handoff socket
    line = p.wait_log(r"fugue: upgrade: cannot take the listeners from the old master: .*").group(0)
    assert "Connection refused" in line and p.count_log("Traceback") == 0
    until(lambda: gone(new) and p.pids() == [], what="everything gone")
    behave(workdir)
    again = fault_app(fugue_proc, 1).started()
    assert again.body().startswith("hello from worker 1")
    assert leftovers(workdir, [again.master_pid()]) == []


# -- storms ------------------------------------------------------------------------------------------

def storm(pid, sig, n, spread=1.0):
    """n signals spread over `spread` seconds: the storm itself, not a wait for anything."""
    for _ in range(n):
        os.kill(pid, sig)
        time.sleep(spread / n)


def last_scale(p):
    changes = re.findall(r"workers: (\d+) -> (\d+)", p.log())
    return int(changes[-1][1])


def test_signal_and_command_storms_under_load(fugue_proc, workdir):
    p = fault_app(fugue_proc, 2, graceful_timeout=5).started()
    with_load = load(p.port, conns=6)
    master = p.master_pid()

    # 20 HUPs in one second: reloads run one at a time, the rest wait and coalesce; one generation serves.
    storm(master, signal.SIGHUP, 20)
    data = settled(p, 2)
    assert data["master"]["generation"] >= 2 and p.count_log(r"joins the reload already waiting") >= 1
    assert p.count_log(r"refused") == 0

    # USR2 during a HUP, and HUP during a USR2: the second waits its turn, nothing is half done.
    behave(workdir, worker_gate=str(workdir / "gate"))
    os.kill(master, signal.SIGHUP)
    p.wait_log(r"reload \(HUP\): starting generation")
    os.kill(master, signal.SIGUSR2)
    p.wait_log(r"upgrade \(USR2\) waits its turn: generation \d+ is still starting")
    behave(workdir)
    (workdir / "gate").write_text("")
    new = new_master_started(p)
    p.wait_log(r"upgrade done: new master pid %d" % new)
    until(lambda: gone(master) and p.master_pid() == new, what="the old master gone")
    settled(p, 2)
    master = new
    os.kill(master, signal.SIGUSR2)
    new = new_master_started(p, 2)
    os.kill(master, signal.SIGHUP)
    p.wait_log(r"reload \(HUP\) waits its turn: an upgrade is in progress")
    p.wait_log(r"upgrade done: new master pid %d" % new)
    p.wait_log(r"reload \(HUP\) passed on to the new master pid %d" % new)
    until(lambda: gone(master) and p.master_pid() == new, what="the old master gone")
    master = new

    # fuguectl reload from 10 shells at once: each gets its answer; one generation serves.
    env = dict(os.environ, PYTHONPATH=ROOT)
    shells = [subprocess.Popen([PY, "-m", "fugue.ctl", "reload"], cwd=workdir, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(10)]
    answers = [(s.wait(60), s.stdout.read().strip(), s.stderr.read().strip()) for s in shells]
    for rc, out, err in answers:  # each waits its turn (coalesced) and hears its own outcome
        assert (rc, err) == (0, "") and re.fullmatch(r"reload done: generation \d+ serving \([\d.]+s\)", out), (
            rc, out, err)
    settled(p, 2)
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()

    # TTIN x 50, then TTOU x 50 (signals of one kind coalesce: the log says how many arrived).
    storm(master, signal.SIGTTIN, 50, 0.5)
    until(lambda: status(p)["master"]["workers_wanted"] == last_scale(p), what="the TTINs to land")
    wanted = last_scale(p)
    assert wanted > 2
    settled(p, wanted)
    storm(master, signal.SIGTTOU, 50, 0.5)
    until(lambda: status(p)["master"]["workers_wanted"] == last_scale(p), what="the TTOUs to land")
    wanted = last_scale(p)
    data = settled(p, wanted)
    until(lambda: sorted(p.pids()) == sorted([master] + [r["pid"] for r in data["workers"]]),
          what="the stopped workers gone")
    assert ask(p, "scale", workers="2")["ok"]
    settled(p, 2)
    assert p.body().startswith("hello from worker")


# -- hung and stubborn workers -----------------------------------------------------------------------

def test_worker_blocked_forever_in_a_request_is_killed_after_timeout(fugue_proc, workdir):
    behave(workdir, threaded=False)  # the request runs on the worker's loop: its heartbeat stops
    p = fault_app(fugue_proc, 2, timeout=2).started()
    before = {r["id"]: r["pid"] for r in settled(p, 2)["workers"]}
    hung = {}

    def hang():
        try:
            hung["r"] = http_get(p.port, "/hang", timeout=30)
        except OSError as e:
            hung["e"] = e

    t = threading.Thread(target=hang)
    t.start()
    m = p.wait_log(r"killing worker (\d) \(pid (\d+), generation 1\): no heartbeat for 2s")
    slot, pid = int(m.group(1)), int(m.group(2))
    assert before[slot] == pid
    t.join(30)
    assert "e" in hung  # its client saw the connection go, not a hang
    data = settled(p, 2)
    assert {r["id"]: r["pid"] for r in data["workers"]}[slot] != pid
    other = 3 - slot
    assert {r["id"]: r["pid"] for r in data["workers"]}[other] == before[other]  # the other never stopped
    assert p.body().startswith("hello")


def test_worker_that_ignores_stop_is_killed_after_graceful_timeout(fugue_proc, workdir):
    behave(workdir, stubborn=True)  # SIGTERM ignored, and its drain never ends
    p = fault_app(fugue_proc, 1, graceful_timeout=1).started()
    first = settled(p, 1)["workers"][0]["pid"]
    behave(workdir)
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"killing worker 1 \(pid %d, generation 1\): did not stop within graceful_timeout" % first)
    until(lambda: gone(first), what="the stubborn worker gone")
    second = settled(p, 1)["workers"][0]["pid"]
    # The master's own graceful stop does not wait for it longer either.
    behave(workdir, stubborn=True)
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 3 serving")
    third = settled(p, 1)["workers"][0]["pid"]
    kill(third, signal.SIGTERM)  # ignored
    p.signal(signal.SIGTERM)
    p.wait_log(r"killing worker 1 \(pid %d, generation 3\): did not stop within graceful_timeout" % third)
    assert p.wait_exit() == 0
    assert p.pids() == [] and gone(second)


# -- the log's disk fills up -----------------------------------------------------------------------

@pytest.fixture
def tiny_disk(workdir):
    """A 64 KiB tmpfs at workdir/logs (root only), unmounted afterwards."""
    path = workdir / "logs"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)])


def fill(directory, log_file):
    """Fill the filesystem to the last byte, the log file's own last page included."""
    try:
        with open(directory / "filler", "wb") as f:
            f.write(b"x" * (1 << 20))
    except OSError:
        pass
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def test_full_disk_under_the_log_keeps_serving_and_says_so_once(fugue_proc, workdir, tiny_disk):
    log_file = tiny_disk / "fugue.log"
    p = fault_app(fugue_proc, 1, log_file=str(log_file))
    until(lambda: log_file.exists() and "started: generation 1" in log_file.read_text(), what="the log")
    master = int(re.search(r"\[(\d+)\] \[master\]", log_file.read_text()).group(1))
    port = int(re.search(r"listening on [\d.]+:(\d+)", log_file.read_text()).group(1))
    with_load = load(port, conns=4)
    fill(tiny_disk, log_file)
    size = log_file.stat().st_size
    settled(p, 1, master)
    fds_before = quiet_fds(master)
    for _ in range(3):  # each reload has a dozen lines to say, none of which can be written
        settled(p, 1, master)
        assert ask(p, "reload", master)["ok"]
    assert ask(p, "reopen-logs", master)["ok"]
    data = settled(p, 1, master)
    assert re.fullmatch(r"\d+ log lines lost since [\d:]+: No space left on device", data["master"]["log_trouble"])
    assert log_file.stat().st_size == size and quiet_fds(master) == fds_before
    result = with_load.stop()
    assert result.failed == 0 and result.ok > 0, result.failures_text()

    os.unlink(tiny_disk / "filler")  # space again: the next line says what was lost, once
    settled(p, 1, master)
    assert ask(p, "reload", master)["ok"]
    text = log_file.read_text()
    lost = re.findall(r"\[%d\] \[master\] WARNING (\d+) log lines lost since [\d-]+ [\d:]+: "
                      r"No space left on device" % master, text)
    assert len(lost) == 1 and int(lost[0]) >= 12, text[-2000:]
    assert "reload done: generation 5 serving" in text
    assert status(p, master)["master"]["log_trouble"] is None
    assert "Logging error" not in text and "internal error" not in text


# -- descriptors -------------------------------------------------------------------------------------

def reload_now(p, pid):
    """One reload through the control socket, retried while the last one's workers drain."""
    def attempt():
        reply = ask(p, "reload", pid)
        assert reply["ok"] or "still draining" in reply["text"], reply
        return reply["ok"]
    until(attempt, what="a reload to go through")


def upgrade_now(p, pid):
    """USR2 through the control socket; returns the new master's pid once the old one is gone."""
    reply = ask(p, "upgrade", pid)
    assert reply["ok"], reply
    new = int(re.search(r"new master pid (\d+) serving", reply["text"]).group(1))
    until(lambda: gone(pid) and p.master_pid() == new, what=f"old master {pid} gone")
    p.wait_log(r"\[%d\] \[master\] INFO old master pid %d exited" % (new, pid))  # handoff closed
    return new


def test_no_descriptor_leaks_after_100_reloads_and_20_upgrades(fugue_proc, workdir):
    p = fault_app(fugue_proc, 1).started()
    master = p.master_pid()
    reload_now(p, master)
    settled(p, 1)
    after_first = (quiet_fds(master), quiet_fds(worker_pids(p)[0]))
    for _ in range(99):
        reload_now(p, master)
    settled(p, 1)
    assert (quiet_fds(master), quiet_fds(worker_pids(p)[0])) == after_first

    master = upgrade_now(p, master)
    settled(p, 1, master)
    after_first = (quiet_fds(master), quiet_fds(worker_pids(p, master)[0]))
    for _ in range(19):
        master = upgrade_now(p, master)
    settled(p, 1, master)
    assert (quiet_fds(master), quiet_fds(worker_pids(p, master)[0])) == after_first
    assert leftovers(workdir, [master]) == []
