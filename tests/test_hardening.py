"""Issue 12: no way in for another local user, no way down for a client, a scrape or a full table.

Each test reproduces one attack or overload against a real master (tests/apps/fault_app.py)
and checks what fugue does now. A hostile local user is `nobody`: a forked child of this
test that dropped to uid 65534 (faultkit.as_nobody), or a target run with runuser and
Debian's world-readable /usr/bin/python3 on a world-readable copy of the code.
"""

import json
import os
import re
import signal
import select
import socket
import stat
import sys
import time

import pytest

from conftest import APPS, SYSTEM_PYTHON, http_get, wait_for
from faultkit import as_nobody, gone, status, until
from test_hostile import fault_app, home  # noqa: F401 - home is a fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody and plant files")


def shared(home, name):
    """A sticky world-writable directory like /tmp (or a logrotate-style shared log dir)."""
    d = os.path.join(home, name)
    os.mkdir(d)
    os.chmod(d, 0o1777)
    return d


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


# -- 1. log files ------------------------------------------------------------------------------

def test_log_file_symlink_planted_before_usr1_is_refused(fugue_proc, home):
    logs = shared(home, "logs")
    log_file = os.path.join(logs, "app.log")
    victim = os.path.join(home, "cron-job")  # stands for a file under /etc/cron.d
    with open(victim, "w") as f:
        f.write("precious\n")
    p = fault_app(fugue_proc, 1, cwd=home, log_file=log_file)
    wait_for(lambda: os.path.exists(log_file) and "started: generation 1 serving" in read(log_file),
             20, "the master to start, logging to its file")
    # logrotate renames the log; before its postrotate USR1 the other user plants a link.
    os.rename(log_file, log_file + ".1")
    assert as_nobody(lambda: os.symlink(victim, log_file)) == {"ok": None}
    p.signal(signal.SIGUSR1)
    wait_for(lambda: re.search(r"cannot reopen logs: log file .*app.log is a symlink; refusing to follow "
                               r"it; keeping the old files", read(log_file + ".1")), 15,
             "the refusal")
    assert read(victim) == "precious\n"
    assert os.path.islink(log_file)
    assert "reopened log files" not in read(log_file + ".1")
    from faultkit import ask

    reply = ask(p, "reopen-logs")  # fuguectl reopen-logs says so too (exit 1)
    assert not reply["ok"] and re.match(r"cannot reopen logs: log file .*app.log is a symlink", reply["text"]), reply
    trouble = status(p)["master"]["log_trouble"]
    assert re.match(r"2 log reopens refused since [\d:]+: log file .*app.log is a symlink", trouble), trouble
    # USR2 with the link still there: the new master refuses it, the old one goes on.
    p.signal(signal.SIGUSR2)
    wait_for(lambda: re.search(r"fugue: log file .*app.log is a symlink; refusing to follow it\n.*upgrade failed: "
                               r"new master pid \d+ exited with status 1", read(log_file + ".1")), 30,
             "the upgrade to fail")
    assert read(victim) == "precious\n"
    # Fixed by the operator: the next USR1 reopens and the trouble is gone.
    os.unlink(log_file)
    p.signal(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(log_file), 15, "the log to be reopened")
    wait_for(lambda: status(p)["master"]["log_trouble"] is None, 15, "log_trouble to clear")
    port = int(re.search(r"listening on [\d.]+:(\d+)", read(log_file + ".1")).group(1))
    assert http_get(port)[1].startswith("hello from worker 1")


def test_log_file_in_a_directory_another_user_can_rearrange_is_refused_at_start(fugue_proc, home):
    logs = os.path.join(home, "logs")
    os.mkdir(logs, 0o755)
    os.chown(logs, 65534, 65534)  # owned by the workers' user, as in many logrotate set-ups
    p = fault_app(fugue_proc, 1, cwd=home, log_file=os.path.join(logs, "app.log"))
    assert p.wait_exit() != 0
    out = p.log()
    assert re.search(r"^fugue: log file .*app.log: its directory is writable by another user without the "
                     r"sticky bit; refusing", out, re.M), out
    assert "Traceback" not in out and os.listdir(logs) == [] and p.pids() == []
    # A link planted at the name in a sticky shared directory: refused at start too.
    logs = shared(home, "shared")
    victim = os.path.join(home, "victim")
    open(victim, "w").close()
    as_nobody(lambda: os.symlink(victim, os.path.join(logs, "app.log")))
    p = fault_app(fugue_proc, 1, cwd=home, log_file=os.path.join(logs, "app.log"))
    assert p.wait_exit() != 0
    assert re.search(r"^fugue: log file .*app.log is a symlink; refusing to follow it", p.log(), re.M), p.log()
    assert os.path.getsize(victim) == 0


# -- 3. pid file -------------------------------------------------------------------------------

def test_pid_file_in_a_shared_directory_cannot_be_planted(fugue_proc, home):
    run = shared(home, "run")
    pid_file = os.path.join(run, "fugue.pid")
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())

    def plant():  # the temp names an old master would use, for the next few hundred pids
        for pid in range(last + 1, last + 400):
            fd = os.open(f"{pid_file}.{pid}.tmp", os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
        os.mkfifo(os.path.join(run, "fugue.pid.tmp"))
        return True

    assert as_nobody(plant) == {"ok": True}
    p = fault_app(fugue_proc, 1, cwd=home, pid_file=pid_file).started()
    st = os.lstat(pid_file)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert read(pid_file) == f"{p.popen.pid}\n"
    assert not [n for n in os.listdir(run) if os.lstat(os.path.join(run, n)).st_uid == 0 and n != "fugue.pid"]
    p.signal(signal.SIGTERM, p.popen.pid)
    p.wait_exit()
    assert not os.path.exists(pid_file)


def test_pid_file_another_user_owns_in_a_shared_directory_is_refused(fugue_proc, home):
    run = shared(home, "run")
    pid_file = os.path.join(run, "fugue.pid")
    as_nobody(lambda: open(pid_file, "w").write("1\n"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(APPS.rstrip("/")).rsplit("/tests", 1)[0])
    import subprocess

    done = subprocess.run([__import__("sys").executable, "-m", "fugue.ctl", "stop", "--pid-file", pid_file],
                          cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and done.stderr.strip() == (
        f"fugue: pid file {pid_file} belongs to uid 65534 in a directory others can write; refusing to use it")
    p = fault_app(fugue_proc, 1, cwd=home, pid_file=pid_file)
    assert p.wait_exit() != 0
    assert re.search(r"^fugue: pid file .* belongs to uid 65534", p.log(), re.M), p.log()


# -- 4. forged readiness for foreign workers --------------------------------------------------

def notify_names(master_pid):
    """The abstract NOTIFY_SOCKET names of a master, as anyone can read them."""
    with open("/proc/net/unix") as f:
        return sorted({line.split()[-1] for line in f if f"@fugue-{master_pid}-" in line})


def sd_notify(name, text):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("\0" + name[1:])
        s.send(text)


def test_notify_ready_is_taken_only_from_the_worker_and_its_children(fugue_proc, workdir):
    # The worker never listens and never says READY=1; a bystander of an allowed uid says it.
    (workdir / "mute.py").write_text("import time\ntime.sleep(1e6)\n")
    p = fugue_proc(["fuguectl", "start", "--bind", "127.0.0.1:0", "--workers", "1", "--ready-mode", "notify",
                    "--ready-timeout", "60", "--", sys.executable, "mute.py"])
    name, = wait_for(lambda: notify_names(p.popen.pid), 20, "the worker's notify socket")
    sd_notify(name, b"READY=1")
    p.wait_log(r"worker 1 \(pid \d+, generation 1\): dropped 1 notify message\(s\) not from the worker")
    assert "started" not in p.log() and " ready" not in p.log()
    p.signal(signal.SIGINT, p.popen.pid)
    p.wait_exit()


def test_notify_socket_places_the_sender_in_the_workers_tree():
    from fugue import foreign

    ns = foreign.NotifySocket(1, 1, {os.getuid()})
    try:
        pid = os.fork()
        if pid == 0:  # a descendant of this process (the "worker") speaks for it
            try:
                sd_notify(ns.address, b"READY=1")
                time.sleep(30)  # stay alive until read: a sender gone cannot be placed
            finally:
                os._exit(0)
        wait_for(lambda: select.select([ns], [], [], 0)[0], what="the datagram")
        assert ns.read(os.getpid()) == ([({"READY": "1"}, pid)], 0)
        sd_notify(ns.address, b"READY=1")  # the parent is not a descendant of the child
        wait_for(lambda: select.select([ns], [], [], 0)[0], what="the datagram")
        assert ns.read(pid) == ([], 1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finally:
        ns.close()


# -- 6. the status listener ----------------------------------------------------------------------

def test_status_listener_shows_paths_only_and_answers_only_known_hosts(fugue_proc, workdir):
    p = fault_app(fugue_proc, 1, status_bind="127.0.0.1:0", status_hosts=["metrics.internal"]).started()
    sport = int(p.wait_log(r"status listener on http://127\.0\.0\.1:(\d+)/status").group(1))
    hung = socket.create_connection(("127.0.0.1", p.port))
    try:
        hung.sendall(b"GET /hang?reset_token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: status(p)["workers"][0]["current"], 15, "the request in flight")
        for host in (f"127.0.0.1:{sport}", "localhost", "[::1]:1", "metrics.internal:9000", "Metrics.Internal."):
            code, body, _ = http_get(sport, "/status", headers={"Host": host})
            assert code == 200, (host, code)
            assert "/hang" in body and "s3cret" not in body, body
        for host in ("evil.example", f"evil.example:{sport}", "localhost.evil.example", "[::1]x"):
            code, body, _ = http_get(sport, "/status", headers={"Host": host})
            assert (code, body) == (421, "misdirected request: this Host is not served here\n"), host
        # The operator's own view (the 0600 control socket) keeps the whole target.
        assert status(p)["workers"][0]["current"][0]["info"] == "GET /hang?reset_token=s3cret"
    finally:
        hung.close()


# -- 7. bounded worker messages ------------------------------------------------------------------

def test_a_status_request_with_huge_targets_in_flight_does_not_kill_the_worker(fugue_proc, workdir):
    """Long URLs in flight made the stats reply exceed the channel's packet limit: EMSGSIZE was
    taken for "master gone", the worker stopped heartbeating and was killed after `timeout`."""
    p = fault_app(fugue_proc, 1, timeout=1).started()
    pid, = [r["pid"] for r in status(p)["workers"]]
    hung = []
    try:
        for i in range(80):  # 80 x 60 KB targets, and more in flight than one message lists
            s = socket.create_connection(("127.0.0.1", p.port))
            s.sendall(b"GET /hang?pad=" + str(i).encode() * 1 + b"x" * 60000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            hung.append(s)
        row = wait_for(lambda: [r for r in status(p)["workers"] if r["in_flight"] == 80], 30,
                       "80 requests in flight")[0]
        assert row["pid"] == pid and len(row["current"]) == 64 and row["current_more"] == 16, row
        assert all(len(c["info"]) < 300 and c["info"].endswith("more characters)") for c in row["current"])
        # Still heartbeating well past `timeout`: the same worker serves.
        wait_for(lambda: status(p)["workers"][0]["uptime"] > 5, 30, "the worker to outlive 5 timeouts")
        assert [r["pid"] for r in status(p)["workers"]] == [pid]
        assert "killed" not in p.log() and "no heartbeat" not in p.log()
    finally:
        for s in hung:
            s.close()
    assert p.body().startswith(f"hello from worker 1 pid {pid}")


def test_app_counters_are_bounded_per_worker(fugue_proc, workdir):
    p = fault_app(fugue_proc, 1).started()
    for i in range(300):
        assert p.body(f"/count?name=c{i}") == "counted\n"
    row, = status(p)["workers"]
    assert len(row["counters"]) == 256 and "c255" in row["counters"] and "c256" not in row["counters"]


# -- 11. the control socket under a crowd ------------------------------------------------------

def test_a_thousand_simultaneous_control_requests_all_get_their_answer(fugue_proc, workdir):
    import threading

    from faultkit import run_dir
    from fugue import control

    p = fault_app(fugue_proc, 1).started()
    path = os.path.join(run_dir(p, p.master_pid()), "control.sock")
    start = threading.Barrier(1000)
    results = []

    def ask():
        start.wait()
        try:
            results.append(control.request(path, "pid", 60)["data"]["pid"])
        except OSError as e:
            results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=ask) for _ in range(1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    errors = [r for r in results if not isinstance(r, int)]
    assert len(results) == 1000 and not errors, (len(errors), errors[:3])
    assert set(results) == {p.master_pid()}
    assert p.body().startswith("hello from worker 1")


# -- 2. app code never runs with the master's privileges ---------------------------------------

def test_an_app_module_never_sees_uid_0_when_uid_is_set(fugue_proc, world_dir):
    """`fuguectl check --app`, the pre-import of `start --app` (again at USR2) and the workers."""
    seen = os.path.join(world_dir, "seen")
    os.mkdir(seen)
    os.chmod(seen, 0o777)
    open(os.path.join(seen, "imports"), "w").close()
    os.chmod(os.path.join(seen, "imports"), 0o666)
    who = ["--app", "seen_app:Handler", "--user", "nobody", "--group", "nogroup", "--bind", "127.0.0.1:0",
           "--workers", "1"]
    check = fugue_proc(["fuguectl", "check", *who], cwd=world_dir, python=SYSTEM_PYTHON)
    assert check.wait_exit() == 0, check.log()
    p = fugue_proc(["fuguectl", "start", *who], cwd=world_dir, python=SYSTEM_PYTHON).started()
    assert json.loads(p.get("/ids")[1])["uid"] == 65534
    p.signal(signal.SIGUSR2, p.popen.pid)
    new = int(p.wait_log(r"upgrade done: new master pid (\d+) serving").group(1))
    assert new != p.popen.pid
    with open(os.path.join(seen, "imports")) as f:
        lines = [line.split() for line in f]
    # check, start's pre-import, worker 1, the new master's pre-import, its worker 1
    assert len(lines) >= 5, lines
    assert all(uid == euid == gid == "65534" for _, uid, euid, gid in lines), lines
    p.signal(signal.SIGTERM, new)
    until(lambda: gone(new), what="the master to exit")


# -- 5. routed mode: a kept-alive connection stays with its host --------------------------------

def test_a_request_naming_another_host_on_a_routed_connection_gets_421(fugue_proc, workdir):
    import http.client

    pytest.importorskip("waitress")
    pytest.importorskip("uvicorn")
    from test_router import KINDS, start_router

    p = start_router(fugue_proc, workdir, extra=KINDS)
    for host in ("alpha.test", "wsgi.test", "asgi.test"):  # http.server, waitress, uvicorn
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        try:
            for same in (host, host.upper() + ":80"):  # the same host, however spelled: served
                conn.request("GET", "/", headers={"Host": same})
                resp = conn.getresponse()
                assert resp.status == 200, (host, resp.status)
                resp.read()
            conn.request("GET", "/", headers={"Host": "beta.test"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (421, b"misdirected request: this connection was routed "
                                                      b"to another host's app\n"), host
            assert resp.getheader("Connection", "").lower() == "close", host
        finally:
            conn.close()
        code, body = http_get(p.port, headers={"Host": "beta.test"})[:2]  # a new connection: routed anew
        assert code == 200 and body.startswith("beta "), body


def test_check_warns_about_routed_apps_that_share_a_user(workdir):
    import subprocess

    from conftest import PY, ROOT

    (workdir / "apps.toml").write_text(
        'bind = [":0"]\n'
        '[apps.a]\nhostnames = ["a.test"]\nscript = "routed_app.py"\n'
        '[apps.b]\nhostnames = ["b.test"]\nscript = "routed_app.py"\n'
        '[apps.c]\nhostnames = ["c.test"]\nscript = "routed_app.py"\nuid = "nobody"\n')
    done = subprocess.run([PY, "-m", "fugue.ctl", "check", "-c", "apps.toml"], cwd=workdir, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("fugue: warning: apps a, b run as the router's user: they are not isolated from each "
                           "other (a worker of one can take another's connections); give each app its own uid\n")


# -- 10. a hostile worker and its master ---------------------------------------------------------

def test_a_worker_flooding_counters_and_status_asks_does_not_degrade_its_master(fugue_proc, workdir):
    from faultkit import settled

    p = fault_app(fugue_proc, 2).started()
    settled(p, 2)
    assert p.body("/channel?what=counter_flood,status_flood") == "sent\n"
    p.wait_log(r"worker \d \(pid \d+, generation 1\) asks for status faster than it is answered: \d+ ask\(s\) refused")
    data = status(p)
    for row in data["workers"]:
        assert len(row["counters"]) <= 256 and all(len(name) <= 100 for name in row["counters"]), len(row["counters"])
    assert len(data["counters"]) <= 512
    with open(f"/proc/{p.master_pid()}/status") as f:
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
    assert rss_kb < 100_000, rss_kb  # the flood is 80 MB of counter names; the master keeps 256 per worker
    from faultkit import ask

    assert ask(p, "reload")["ok"]  # and the master still does its job
    settled(p, 2)


# -- 12. what a worker leaves behind -----------------------------------------------------------

def test_a_workers_forked_child_does_not_keep_the_port(fugue_proc, workdir):
    from faultkit import kill

    p = fault_app(fugue_proc, 1, graceful_timeout=2).started()
    port = p.port
    child = int(p.body("/fork").split()[1])                # stays in the worker's process group
    escaped = int(p.body("/fork?setsid=1").split()[1])     # left it: cannot be told apart from a bystander
    try:
        p.signal(signal.SIGTERM, p.popen.pid)
        assert p.wait_exit() == 0
        until(lambda: gone(child), what="the worker's leftover child to be stopped")
        assert re.search(rf"listener 127\.0\.0\.1:{port} is still held by pid {escaped} \(", p.log()), p.log()
        kill(escaped)
        until(lambda: gone(escaped), what="the escaped child to die")
        again = fault_app(fugue_proc, 1, bind=str(port)).started()  # the port is free again
        assert again.body().startswith("hello from worker 1")
    finally:
        kill(child)
        kill(escaped)


# -- 8. out of descriptors or processes ------------------------------------------------------------

def limited(fugue_proc, nofile, *flags):
    from conftest import PY

    return fugue_proc(["prlimit", f"--nofile={nofile}", "--", PY, "-m", "fugue.ctl", "start", "--app", "app:Handler",
                       "--bind", "127.0.0.1:0", *flags])


def test_a_descriptor_limit_too_low_for_the_config_is_one_line_at_start(fugue_proc, workdir):
    binds = [arg for _ in range(30) for arg in ("--bind", "127.0.0.1:0")]
    p = limited(fugue_proc, 48, "--workers", "8", *binds)
    assert p.wait_exit() == 1
    out = p.log()
    assert re.fullmatch(r"fugue: the descriptor limit \(RLIMIT_NOFILE\) is 48: too low for 31 listeners and "
                        r"8 workers \(at least \d+\); raise it \(ulimit -n, systemd LimitNOFILE=\)\n", out), out
    assert p.pids() == []


def test_spawning_out_of_descriptors_is_a_worker_failure_not_the_masters_death(fugue_proc, workdir):
    from faultkit import run_dir, settled

    p = limited(fugue_proc, 64, "--workers", "2").started()
    settled(p, 2)
    before = sorted(r["pid"] for r in status(p)["workers"])
    path = os.path.join(run_dir(p, p.master_pid()), "control.sock")
    hogs = []
    try:  # silent control connections: the master holds each up to 5 s, until it runs out
        while len(hogs) < 80:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            hogs.append(s)
        wait_for(lambda: "control: cannot accept (Too many open files)" in p.log(), 15, "the master to run out")
        p.signal(signal.SIGHUP)
        p.wait_log(r"cannot spawn worker \d: .*Too many open files.*RLIMIT_NOFILE 64")
        p.wait_log(r"reload failed: .*generation 1 keeps serving")
    finally:
        for s in hogs:
            s.close()
    assert p.master_pid() == p.popen.pid and p.popen.poll() is None
    assert sorted(r["pid"] for r in settled(p, 2)["workers"]) == before
    assert p.body().startswith("hello from worker")
    p.signal(signal.SIGHUP)  # descriptors back: the next reload works
    p.wait_log(r"reload done: generation \d+ serving")


# -- 9. the router under a slowloris ---------------------------------------------------------------

@pytest.mark.parametrize("top, says", [
    ("sniff_max_conns = 100", r"sniff_max_conns \(100\) reached: closed the oldest connection still naming its "
                              r"host \d+ time"),
    ("", r"descriptor shortage: accept failed \d+ time\(s\) \(Too many open files\); the oldest"),
])
def test_idle_connections_never_lock_new_clients_out_of_the_router(fugue_proc, workdir, top, says):
    """300 connections that never name a host, at a descriptor limit of 200: below it the
    sniff_max_conns cap closes the oldest; without it (default 512) the router pauses
    accepting on EMFILE, sheds the oldest and says so once, instead of spinning."""
    from conftest import PY
    from test_router import CONFIG

    (workdir / "apps.toml").write_text(CONFIG.format(sniff_timeout=60.0, extra="", top=top))
    p = fugue_proc(["prlimit", "--nofile=200", "--", PY, "-m", "fugue.ctl", "start", "-c", "apps.toml"])
    p.wait_log(r"router serving \d+ apps", timeout=30)
    idle = []
    try:
        for _ in range(300):  # they never name a host: more than the router has descriptors for
            idle.append(socket.create_connection(("127.0.0.1", p.port), timeout=10))
        for host in ("alpha.test", "beta.test"):
            code, body = http_get(p.port, headers={"Host": host}, timeout=10)[:2]
            assert code == 200 and body.startswith(host.split(".")[0] + " "), body
        p.wait_log(says)
        assert p.count_log(r"Too many open files") <= 1
    finally:
        for s in idle:
            s.close()
