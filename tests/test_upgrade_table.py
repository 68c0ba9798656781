"""The USR2 upgrade's transitions as tables (fugue.upgrade), without a second master.

The spec, step by step: every failure at every step of both sides. The OS is a
FakeSystem (no fork, no kill, a clock the test moves); the sockets, the pid
files and the directories are real (a tmp_path), so what is checked is what a
real master would see. The process tests (test_faults.py, test_reload.py) are
the proof that the real thing behaves so.
"""

import os
import signal
import socket
import threading

import pytest

from fugue import protocol, upgrade
from fugue.errors import FugueError
from fugue.fds import Listener, connect_unix_path, read_messages, recv_with_fds
from fugue.shell import PidFile
from fugue.system import System

OLD_PID_FILE = "fugue.pid"


class FakeSystem(System):
    """Records what the state machine asked of the OS; `spawn` "starts" `child`."""

    def __init__(self, child=None):
        self.now = 1000.0
        self.child = os.getpid() if child is None else child
        self.killed = []
        self.notified = []
        self.spawned = []

    def monotonic(self):
        return self.now

    def wall(self):
        return 1.7e9

    def kill(self, pid, signum=signal.SIGKILL):
        self.killed.append((pid, signum))

    def notify(self, *fields):
        self.notified.append(fields)

    def spawn(self, argv, env, cwd, loop, prepare=None):
        self.spawned.append((argv, env, cwd))
        return self.child


class FakeLoop:
    def __init__(self):
        self.readers = {}

    def add_reader(self, fileobj, callback):
        self.readers[fileobj] = callback

    def remove_reader(self, fileobj):
        self.readers.pop(fileobj, None)


class Cfg:
    ready_timeout = 60.0

    def __init__(self, tmp):
        self.tmp = tmp
        self.start_dir = tmp

    def path(self, name):
        assert name == "tmp_path"
        return self.tmp


@pytest.fixture
def old(tmp_path):
    """An old master's upgrade in flight: (Upgrade, FakeSystem, PidFile, told outcomes)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    pid_file = PidFile(str(tmp_path / OLD_PID_FILE))
    pid_file.write()
    listener = socket.create_server(("127.0.0.1", 0))
    system = FakeSystem()
    up = upgrade.begin(Cfg(str(tmp)), FakeLoop(), pid_file, [Listener(listener, "http", "127.0.0.1:0")], 7,
                       system=system)
    told = []
    up.waiters.append(lambda ok, text: told.append((ok, text)))
    yield up, system, pid_file, told
    listener.close()
    if up.server is not None:
        up.server.close()
    if up.conn is not None:
        up.conn.close()


def connect_as_new_master(up):
    """The new master's first step: connect, be accepted, receive the manifest. Returns
    (our end, the manifest, the descriptors)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connect_unix_path(sock, os.path.join(up.directory, "handoff.sock"))
    assert up.accept() is up.conn
    data, fds = recv_with_fds(sock, protocol.MAX_FRAME)
    sock.setblocking(False)
    return sock, protocol.decode(data), fds


EXITED_1 = 1 << 8


# -- the old master's side ----------------------------------------------------------------

def test_begin_execs_the_same_command_with_the_handoff_in_its_environment(old):
    up, system, _, _ = old
    [(argv, env, cwd)] = system.spawned
    assert env[upgrade.ENV_SOCK] == os.path.join(up.directory, "handoff.sock")
    assert env[upgrade.ENV_FROM] == str(os.getpid())
    assert os.stat(up.directory).st_mode & 0o777 == 0o700
    assert os.stat(env[upgrade.ENV_SOCK]).st_mode & 0o777 == 0o600
    assert system.notified[0][:2] == ("RELOADING=1", "STATUS=upgrading: new master starting")
    assert up.deadline == system.now + Cfg.ready_timeout + upgrade.DEADLINE_MARGIN


def test_accept_hands_the_listeners_and_removes_the_path(old):
    up, _, _, _ = old
    sock, manifest, fds = connect_as_new_master(up)
    assert protocol.check_manifest(manifest, len(fds))[0]["name"] == "http"
    assert manifest["generation"] == 7
    assert not os.path.exists(up.directory) and up.server is None  # nobody else can connect now
    for fd in fds:
        os.close(fd)
    sock.close()


def test_a_connection_from_another_process_is_refused(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    system = FakeSystem(child=1)  # we are not the process it started
    up = upgrade.begin(Cfg(str(tmp)), FakeLoop(), PidFile(str(tmp_path / "x.pid")), [], 1, system=system)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connect_unix_path(sock, os.path.join(up.directory, "handoff.sock"))
    assert up.accept() is None and up.conn is None
    assert sock.recv(100) == b""  # closed, nothing sent
    assert os.path.exists(up.directory)  # still waiting for the real one
    sock.close()
    up.exited(0)


# What the new master says, then how it ends -> the outcome the old master reports.
# (messages sent before it exits, exit status, the text the waiters are told)
FAILURES = [
    ([], EXITED_1, "upgrade failed: new master pid {pid} exited with status 1 (see the log above); "
                   "pid {pid} keeps serving"),
    ([("failed", "config.toml: unknown key wrokers")], EXITED_1,
     "upgrade failed: new master pid {pid} exited with status 1: config.toml: unknown key wrokers; "
     "pid {pid} keeps serving"),
    ([("failed", "worker 1 exited with status 1: ImportError")], signal.SIGKILL,
     "upgrade failed: new master pid {pid} killed by SIGKILL: worker 1 exited with status 1: ImportError; "
     "pid {pid} keeps serving"),
]


@pytest.mark.parametrize("connect, said, status, text", [(False, *FAILURES[0])] + [(True, *row) for row in FAILURES],
                         ids=["before connecting", "after the handoff", "said why", "killed, said why"])
def test_a_new_master_that_dies_before_ready_fails_the_upgrade(old, connect, said, status, text):
    up, system, pid_file, told = old
    sock = None
    if connect:
        sock, _, fds = connect_as_new_master(up)
        for fd in fds:
            os.close(fd)
        for kind, reason in said:
            sock.send(protocol.encode(protocol.FAILED, reason=reason))
        sock.close()  # its last words are read at the reap (the reap runs before the readers)
    expected = text.format(pid=os.getpid())
    assert up.exited(status) == expected
    assert told == [(False, expected)]
    assert system.notified[-1] == ("READY=1", f"STATUS={expected}")
    assert pid_file.ours() and not os.path.exists(pid_file.oldbin)  # nothing was handed over
    assert not os.path.exists(up.directory)


def test_new_ready_steps_down_hands_the_pid_file_and_tells_the_new_master(old):
    up, system, pid_file, told = old
    sock, _, fds = connect_as_new_master(up)
    for fd in fds:
        os.close(fd)
    assert up.read() is False  # nothing said yet
    sock.send(protocol.encode(protocol.NEW_READY))
    assert up.read() is True
    system.now += 1.5
    text = up.step_down()
    assert text == f"new master pid {os.getpid()} serving (1.50s)"
    assert told == [(True, text)]
    assert not os.path.exists(pid_file.path) and os.path.exists(pid_file.oldbin)
    assert [m["type"] for m in read_messages(sock)[0]] == [protocol.STEPPED_DOWN]
    sock.send(protocol.encode(protocol.NEW_READY))
    assert up.read() is False  # a second NEW_READY changes nothing
    assert up.check_deadline(system.now + 1e6) is None  # no deadline once it serves
    up.abort()
    assert system.killed == []  # a stop after stepping down leaves the new master alone
    sock.close()


def test_a_new_master_that_dies_after_taking_over_gives_the_service_back(old):
    up, system, pid_file, told = old
    sock, _, fds = connect_as_new_master(up)
    for fd in fds:
        os.close(fd)
    sock.send(protocol.encode(protocol.NEW_READY))
    assert up.read()
    up.step_down()
    sock.close()
    assert up.exited(signal.SIGKILL) is None  # not a failed upgrade: we resume serving
    assert pid_file.ours() and not os.path.exists(pid_file.oldbin)
    assert system.notified[-1] == ("READY=1", f"MAINPID={os.getpid()}")


def test_a_new_master_not_ready_in_time_is_killed_and_the_upgrade_fails(old):
    up, system, _, told = old
    assert up.check_deadline(system.now) == up.deadline and system.killed == []
    system.now = up.deadline
    assert up.check_deadline(system.now) is None
    assert system.killed == [(os.getpid(), signal.SIGKILL)]
    text = up.exited(signal.SIGKILL)
    assert text.startswith(f"upgrade failed: new master pid {os.getpid()} killed by SIGKILL: not ready after 70s;")
    assert told == [(False, text)]


def test_a_stop_during_the_upgrade_kills_the_new_master(old):
    up, system, _, _ = old
    up.abort()
    assert system.killed == [(os.getpid(), signal.SIGKILL)]


# -- the new master's side ----------------------------------------------------------------

@pytest.fixture
def new(tmp_path):
    """A new master's handoff to an old master (our peer end): (Handoff, peer, FakeSystem, PidFile)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setblocking(False)
    system = FakeSystem()
    pid_file = PidFile(str(tmp_path / OLD_PID_FILE))
    handoff = upgrade.Handoff(mine, 4242, pid_file, str(tmp), system=system)
    yield handoff, peer, system, pid_file
    peer.close()
    mine.close()


def test_ready_and_failed_are_told_to_the_old_master(new):
    handoff, peer, _, _ = new
    peer.setblocking(False)
    handoff.tell_ready()
    handoff.tell_failed("worker 1 exited with status 1")
    got = read_messages(peer)[0]
    assert [m["type"] for m in got] == [protocol.NEW_READY, protocol.FAILED]
    assert got[1]["reason"] == "worker 1 exited with status 1"


def test_stepped_down_writes_our_pid_file(new):
    handoff, peer, system, pid_file = new
    peer.send(protocol.encode(protocol.STEPPED_DOWN))
    handoff.read(FakeLoop(), 8, starting=False)
    assert pid_file.ours()
    assert system.notified == [(f"MAINPID={os.getpid()}", "READY=1", "STATUS=generation 8 serving (upgraded)")]
    assert handoff.old_master_draining


@pytest.mark.parametrize("starting", [True, False])
def test_the_old_master_gone_leaves_us_the_only_one(new, starting):
    handoff, peer, system, pid_file = new
    left = os.path.join(handoff.tmp_path, "fugue-4242")
    os.mkdir(left)  # what a killed old master leaves behind
    with open(pid_file.oldbin, "w") as f:
        f.write("4242\n")
    peer.close()  # EOF
    handoff.read(FakeLoop(), 8, starting=starting)
    assert not handoff.old_master_draining and handoff.old_pid is None
    assert not os.path.exists(left) and not os.path.exists(pid_file.oldbin)
    # While our first generation starts, the pid file waits for it (promote writes it).
    assert pid_file.ours() is (not starting)
    assert (system.notified == [(f"MAINPID={os.getpid()}", "READY=1")]) is (not starting)


def test_telling_a_gone_old_master_takes_over(new):
    handoff, peer, _, pid_file = new
    peer.close()
    handoff.tell_ready()  # EPIPE: it is gone
    assert handoff.old_pid is None and pid_file.ours()


def test_connect_takes_the_listeners_from_our_old_master(old, monkeypatch):
    up, _, pid_file, _ = old
    monkeypatch.setenv(upgrade.ENV_FROM, str(os.getpid()))
    accepter = threading.Thread(target=lambda: _accept_when_connected(up))
    accepter.start()
    handoff, listeners, first = upgrade.connect(os.path.join(up.directory, "handoff.sock"), pid_file,
                                                up.tmp_path, system=FakeSystem())
    accepter.join(10)
    assert first == 8 and [lst.name for lst in listeners] == ["http"]
    assert handoff.old_pid == os.getpid() and upgrade.ENV_FROM not in os.environ
    assert listeners[0].sock.getsockname() == up.listeners[0].sock.getsockname()
    for lst in listeners:
        lst.sock.close()
    handoff.sock.close()


def _accept_when_connected(up):
    import select

    select.select([up.server], [], [], 10)
    up.accept()


def test_connect_refuses_a_socket_that_is_not_our_old_masters(old, monkeypatch):
    up, _, pid_file, _ = old
    monkeypatch.setenv(upgrade.ENV_FROM, "1")  # we expect pid 1; the socket is ours
    with pytest.raises(FugueError, match=r"belongs to pid \d+ uid \d+, not our old master"):
        upgrade.connect(os.path.join(up.directory, "handoff.sock"), pid_file, up.tmp_path)


def test_a_new_master_that_fails_before_it_is_one_reports_why(old, monkeypatch):
    up, system, _, told = old
    monkeypatch.setenv(upgrade.ENV_SOCK, os.path.join(up.directory, "handoff.sock"))
    accepter = threading.Thread(target=lambda: _accept_when_connected(up))
    accepter.start()
    upgrade.report_failure("config.toml: unknown key wrokers")
    accepter.join(10)
    assert upgrade.ENV_SOCK not in os.environ
    text = up.exited(EXITED_1)
    assert text.endswith("exited with status 1: config.toml: unknown key wrokers; "
                         f"pid {os.getpid()} keeps serving")


def test_report_failure_outside_an_upgrade_does_nothing(monkeypatch):
    monkeypatch.delenv(upgrade.ENV_SOCK, raising=False)
    upgrade.report_failure("anything")  # no socket to report to: returns quietly
