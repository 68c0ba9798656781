"""Hostile and bad input: other users, misbehaving peers, planted files, slow and malformed clients.

Every test runs real masters (tests/apps/fault_app.py). A peer that misbehaves on
one of the master's sockets is a real process: a child of this test that became
`nobody`, this test itself, a new master (USR2) whose script speaks to the old
master before fugue does, or a worker whose app writes junk on its channel.
Descriptor counts come from /proc/<pid>/fd.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from conftest import APPS, PY, ROOT, SYSTEM_PYTHON, http_get
from faultkit import as_nobody, gone, load, quiet_fds, settled, status, until, worker_pids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody and plant files")


def fault_app(fugue_proc, workers=1, bind="0", cwd=None, **options):
    return fugue_proc(["fault_app.py", bind, str(workers), json.dumps(options)], cwd=cwd)


def behave(where, **behaviour):
    with open(os.path.join(where, "behaviour.json"), "w") as f:
        json.dump(behaviour, f)


@pytest.fixture
def home():
    """A directory every user can reach (pytest's own tmp is 0700), with the apps in it."""
    d = tempfile.mkdtemp(prefix="fugue-hostile-")
    os.chmod(d, 0o755)
    for name in ("app.py", "fault_app.py"):
        shutil.copy(os.path.join(APPS, name), d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def connect_seqpacket(path, payloads=(), fds=None):
    """Connect to a master's Unix socket, send things, return what comes back (text, fd count)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    try:
        sock.connect(path)
        for data in payloads:
            try:
                if fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.send(data)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            data, got, _, _ = socket.recv_fds(sock, 1 << 20, 16)
        except ConnectionResetError:
            data, got = sock.recv(1 << 20), []
        for fd in got:
            os.close(fd)
        return data.decode(errors="replace"), len(got)
    finally:
        sock.close()


# -- the handoff socket ------------------------------------------------------------------------------

def test_handoff_socket_refuses_another_uid_and_any_other_peer(fugue_proc, home):
    p = fault_app(fugue_proc, 1, cwd=home).started()
    old = p.master_pid()
    baseline = quiet_fds(old)
    behave(home, master_gate=os.path.join(home, "gate"))  # the new master waits before it connects
    p.signal(signal.SIGUSR2, old)
    new = int(p.wait_log(r"upgrade: started new master pid (\d+)").group(1))
    path, = glob.glob(os.path.join(home, "tmp", f"fugue-upgrade-{old}-*", "handoff.sock"))

    # First refusal: the private directories (0700) keep another user from even reaching it.
    got = as_nobody(lambda: connect_seqpacket(path))
    assert got.get("errno") == 13, got  # EACCES
    # Open every directory on the way and the socket itself: SO_PEERCRED still refuses.
    os.chmod(os.path.join(home, "tmp"), 0o711)
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o666)
    got = as_nobody(lambda: connect_seqpacket(path))
    assert got == {"ok": ["", 0]}, got  # closed at once: no manifest, no descriptors
    p.wait_log(r"upgrade: refused a handoff connection from pid \d+ uid 65534")
    # Our own uid, but not the new master's pid: refused as well.
    assert connect_seqpacket(path, [b'{"type": "new_ready"}']) == ("", 0)
    p.wait_log(r"upgrade: refused a handoff connection from pid %d uid 0" % os.getpid())
    # The refused connections were closed: only the handoff listener is new.
    assert quiet_fds(old) == sorted(baseline + ["socket:"])

    open(os.path.join(home, "gate"), "w").close()
    p.wait_log(r"upgrade: listeners handed to pid %d" % new)
    assert not os.path.exists(path)  # a second peer finds nothing to connect to
    p.wait_log(r"upgrade done: new master pid %d serving" % new)
    until(lambda: gone(old), what="the old master to exit")
    assert p.body().startswith("hello from worker 1")


def test_junk_from_the_new_master_and_on_the_control_socket(fugue_proc, home):
    p = fault_app(fugue_proc, 1, cwd=home, ready_timeout=2).started()
    old = p.master_pid()
    baseline = quiet_fds(old)
    with_load = load(p.port, conns=4)

    # A new master (the right pid) that sends garbage, truncated and oversized frames,
    # descriptors nobody asked for and messages of no known type, then exits.
    behave(home, handoff=["garbage", "truncated", "oversized", "fds", "valid_json_wrong_type", "exit"])
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade failed: new master pid \d+ exited with status 3.*pid %d keeps serving" % old)
    assert quiet_fds(old) == baseline

    # The same junk, and then silence: the master reads the junk as it comes, and kills the
    # silent new master at the deadline. Meanwhile it serves, and its control socket shrugs
    # off junk of every kind.
    behave(home, handoff=["garbage", "truncated", "oversized", "fds", "valid_json_wrong_type", "silent"])
    p.signal(signal.SIGUSR2, old)
    new = int(p.wait_log(r"upgrade: started new master pid (\d+)", count=2).group(1))
    p.wait_log(r"upgrade: listeners handed to pid %d" % new)
    p.wait_log(r"upgrade: bad message from the new master", count=4)
    control = os.path.join(home, "tmp", f"fugue-{old}", "control.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(control)  # and says nothing
    for payload, answer in [
            (b"\xff\xfe garbage", r"bad request: not JSON"),
            (b'{"type": "cmd", "cmd": "sta', r"bad request: not JSON"),
            (b"[" * 200000, r"bad request: not JSON: nested too deeply"),
            (b"[" * ((1 << 20) + 10), r"bad request: "),
            (b'["cmd", "status"]', r"bad request: not a message object"),
            (b'{"type": "cmd", "cmd": ["status"]}', r"unknown command \['status'\]"),
            (b'{"type": "cmd", "cmd": "scale", "workers": {"n": 1}}', r"scale: .* is not N, \+N or -N"),
            (b'{"type": "cmd", "cmd": "scale", "workers": "-5"}', r"scale: cannot go below 0 workers")]:
        try:
            text, nfds = connect_seqpacket(control, [payload])
        except OSError as e:  # a frame this big may not even be sendable: that is a refusal too
            assert payload.startswith(b"[["), e
            continue
        assert nfds == 0 and re.search(answer, json.loads(text)["text"]), (payload[:40], text)
    text, nfds = connect_seqpacket(control, [b'{"type": "cmd", "cmd": "pid"}'], fds=[0, 1, 2])
    assert json.loads(text)["data"]["pid"] == old and nfds == 0
    assert p.body().startswith("hello from worker 1")
    assert status(p, old)["master"]["upgrade"]["new_pid"] == new
    # A reload asked meanwhile waits its turn (issue 13): it runs once the upgrade has failed.
    reload = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reload.settimeout(60)
    reload.connect(control)
    reload.send(b'{"type": "cmd", "cmd": "reload"}')
    p.wait_log(r"reload \(fuguectl\) waits its turn: an upgrade is in progress")

    p.wait_log(r"upgrade: new master pid %d not ready after 12s; killing it" % new, timeout=30)
    p.wait_log(r"upgrade failed: new master pid %d killed by SIGKILL" % new)
    answer = json.loads(reload.recv(1 << 16).decode())
    reload.close()
    assert answer["ok"] and re.match(r"generation \d+ serving", answer["text"]), answer
    p.wait_log(r"control: closed a connection that sent no request")
    assert silent.recv(100) == b""  # the master gave up on the silent control client
    silent.close()
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()
    assert quiet_fds(old) == baseline
    # (no Traceback check: http.server prints one for a client the stopped load dropped mid-request)
    assert p.count_log("internal error") == 0 and p.popen.poll() is None


# -- the worker channel ----------------------------------------------------------------------------

def test_junk_from_a_worker_on_its_channel(fugue_proc, workdir):
    p = fault_app(fugue_proc, 1, timeout=3).started()
    master = p.master_pid()
    baseline = quiet_fds(master)
    pid = worker_pids(p)[0]
    what = "garbage,truncated,oversized,fds,valid_json_wrong_type,bad_fields,flood"
    assert p.body(f"/channel?what={what}") == "sent\n"
    # The master still reads this worker's channel: fresh counters come back over it.
    for _ in range(5):
        p.body()
    until(lambda: status(p)["workers"][0]["requests"] >= 6, what="counters read from the channel")
    data = settled(p, 1)
    assert data["workers"][0]["pid"] == pid  # not killed for a missing heartbeat, nor anything else
    assert p.count_log(r"worker 1 \(pid %d, generation 1\) sent a bad message" % pid) >= 3
    assert quiet_fds(master) == baseline  # the descriptors it sent were closed
    assert p.count_log("Traceback") == 0 and p.count_log("internal error") == 0


# -- files: the pid file and tmp_path --------------------------------------------------------------

def fails(p, pattern):
    status_ = p.wait_exit()
    out = p.log()
    lines = [line for line in out.splitlines() if line.startswith("fugue: ")]
    assert status_ != 0 and lines and re.search(pattern, lines[-1]), out
    assert "Traceback" not in out, out
    assert p.pids() == []
    return lines[-1]


def test_pid_file_symlink_directory_and_garbage(fugue_proc, workdir):
    target = workdir / "precious"
    target.write_text("do not touch\n")
    (workdir / "fugue.pid").symlink_to(target)
    fails(fault_app(fugue_proc), r"pid file .*fugue.pid is a symlink; refusing to use it")
    assert target.read_text() == "do not touch\n" and os.path.islink(workdir / "fugue.pid")
    os.unlink(workdir / "fugue.pid")
    (workdir / "fugue.pid").symlink_to(workdir / "dangling")
    fails(fault_app(fugue_proc), r"is a symlink; refusing")
    assert not (workdir / "dangling").exists()
    os.unlink(workdir / "fugue.pid")
    (workdir / "fugue.pid").mkdir()
    fails(fault_app(fugue_proc), r"pid file .*fugue.pid is not a regular file")
    os.rmdir(workdir / "fugue.pid")
    for garbage in (b"\x00\xff\xfe", b"-5\n", b"0\n", b"12abc\n", b"9" * 100000, b""):
        (workdir / "fugue.pid").write_bytes(garbage)
        p = fault_app(fugue_proc).started()
        assert p.master_pid() == p.popen.pid  # replaced by ours
        if garbage:
            assert re.search(r"pid file .* does not contain a pid .*; replacing it", p.log())
        p.signal(signal.SIGTERM)
        p.wait_exit()
        assert not (workdir / "fugue.pid").exists()


def test_pid_file_naming_a_live_process_that_is_not_fugue(fugue_proc, workdir):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (workdir / "fugue.pid").write_text(f"{bystander.pid}\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([PY, "-m", "fugue.ctl", "stop"], cwd=workdir, env=env, capture_output=True, text=True)
        assert done.returncode == 3 and done.stderr.strip() == (
            f"fugue: no fugue master: stale pid file fugue.pid (pid {bystander.pid} is not a fugue master)")
        p = fault_app(fugue_proc).started()
        assert f"stale pid file {workdir}/fugue.pid (pid {bystander.pid} is not a fugue master); taking over" in p.log()
        assert p.master_pid() == p.popen.pid
        assert bystander.poll() is None  # nobody signalled it
    finally:
        bystander.kill()
        bystander.wait()


def test_unreadable_pid_file(fugue_proc, world_dir):
    """As nobody (root reads anything): a pid file nobody may read is one clear error."""
    pid_file = os.path.join(world_dir, "root.pid")
    with open(pid_file, "w") as f:
        f.write("1\n")
    os.chmod(pid_file, 0o600)
    tmp = os.path.join(world_dir, "tmp")
    os.chown(tmp, 65534, 65534)
    argv = ["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "fault_app.py", "0", "1",
            json.dumps({"pid_file": pid_file})]
    fails(fugue_proc(argv, cwd=world_dir), r"pid file .*root.pid: permission denied")
    with open(pid_file) as f:
        assert f.read() == "1\n"


def test_tmp_path_that_others_could_tamper_with_is_refused(fugue_proc, workdir):
    tmp = workdir / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o777)
    fails(fault_app(fugue_proc), r"tmp_path .* is world-writable without the sticky bit; refusing")
    os.chmod(tmp, 0o1777)  # like /tmp: fine
    p = fault_app(fugue_proc).started()
    p.signal(signal.SIGTERM)
    p.wait_exit()
    os.chmod(tmp, 0o755)
    os.chown(tmp, 65534, 65534)  # owned by someone else: they could swap our directories
    fails(fault_app(fugue_proc), r"tmp_path .* is owned by uid 65534; refusing")
    other = workdir / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    shutil.rmtree(tmp)
    tmp.symlink_to(other)
    fails(fault_app(fugue_proc), r"tmp_path .* is a symlink to a directory owned by someone else")
    assert os.listdir(other) == [] and not (workdir / "fugue.pid").exists()


def test_planted_entries_in_a_shared_tmp_path_are_not_followed(fugue_proc, workdir):
    """A sticky world-writable tmp_path (like /tmp): others may plant names we use."""
    tmp = workdir / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    victim = workdir / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp / f"fugue-{dead.pid}").symlink_to(victim)           # looks like a dead master's run dir
    (tmp / f"fugue-upgrade-{dead.pid}-x").symlink_to(victim)  # and its handoff dir
    p = fault_app(fugue_proc).started()
    assert (victim / "keep").exists()  # the sweep removes directories, never what a link points to
    p.signal(signal.SIGTERM)
    p.wait_exit()
    assert (victim / "keep").exists()


# -- slow and malformed HTTP clients ---------------------------------------------------------------

def raw(port, data, shut=False, timeout=10):
    """Send raw bytes (optionally half-close), return everything the server sends back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out + b"<reset>"
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def test_slow_and_malformed_clients_never_wedge_a_worker(fugue_proc, workdir):
    p = fault_app(fugue_proc, 2, graceful_timeout=2).started()
    workers = worker_pids(p)
    port = p.port
    with_load = load(port, conns=4)
    slowloris = []
    for i in range(60):  # headers that never end
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
        slowloris.append(s)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # connect, say nothing

    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", shut=True).startswith(
        b"HTTP/1.1 200")  # half-closed after the request: still answered
    half = raw(port, b"GET / HTTP/1.1\r\nHo", shut=True)  # half a request, then EOF: closed, not held
    assert half == b"" or half.startswith(b"HTTP/1.1 "), half
    assert b"Error code: 400" in raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")  # TLS to a plain port
    assert b"Error code: 414" in raw(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert b"Error code: 431" in raw(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    many = b"".join(b"X-H%d: y\r\n" % i for i in range(200))
    assert b"Error code: 431" in raw(port, b"GET / HTTP/1.1\r\n" + many + b"\r\n")
    rst = socket.create_connection(("127.0.0.1", port))
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rst.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    rst.close()  # RST while the request is served
    for _ in range(10):
        assert http_get(port)[0] == 200

    data = settled(p, 2)
    assert sorted(r["pid"] for r in data["workers"]) == workers  # none was killed or wedged
    # A reload is not held up by them either: the old workers close what is left at graceful_timeout.
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    until(lambda: all(gone(pid) for pid in workers), what="the old workers to finish draining")
    assert "did not stop within graceful_timeout" not in p.log()
    for s in slowloris + idle:
        s.settimeout(10)
        try:
            assert s.recv(100) in (b"", )
        except ConnectionResetError:
            pass
        s.close()
    result = with_load.stop()
    assert result.failed == 0, result.failures_text()
