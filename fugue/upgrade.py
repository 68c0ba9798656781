"""The USR2 upgrade: a master replaces itself without closing a listener. Both sides, in order.

Who calls it: fugue.master (the old side, `begin` -> `Upgrade`; the new side,
`Handoff`), fugue.run (`connect`, before the new master binds anything) and
fugue.ctl (`report_failure`, a new master that fails before it is one). What it
promises: at most two masters; the old one serves until the new one's first
generation is READY, and serves on if the new one fails at any step.

The protocol (messages from fugue.protocol, over a SOCK_SEQPACKET connection):

 1. old  USR2: a 0700 directory fugue-upgrade-PID-* under tmp_path, a listening
         socket handoff.sock (0600) in it, and the new master exec'd with
         ENV_SOCK (that path) and ENV_FROM (the old pid) in its environment.
 2. new  connects; the peer must be ENV_FROM with our uid (SO_PEERCRED).
    old  the peer must be the pid it exec'd with our uid; sends the manifest
         and the listeners (SCM_RIGHTS), then removes the directory.
 3. new  starts its first generation: READY -> NEW_READY; failure -> FAILED
         with the reason, and it exits. A new master that fails before it has
         a config (bad file, target that does not import) still connects and
         sends FAILED (report_failure).
 4. old  NEW_READY: the pid file becomes .oldbin, STEPPED_DOWN, then it drains
         and exits.   new  STEPPED_DOWN: writes the pid file.
 5. new  EOF on the connection (the old master exited, or was killed): it is
         the only master; it removes what a killed old master left (its run
         directory, its .oldbin) and writes the pid file if it is not its own.

Failures on the old side: the new master exits before NEW_READY, or is not
READY within ready_timeout + 10 s (SIGKILL): the upgrade failed, with the new
master's FAILED reason if it gave one, and the old master goes on as if
nothing happened. The new master dies after STEPPED_DOWN: the old master takes
the pid file back and serves again (its draining workers finish; decide()
fills their slots).
"""

import logging
import os
import shutil
import socket
import sys
import time

from . import health, notify, protocol
from .errors import FugueError
from .fds import (Listener, bind_unix_path, connect_unix_path, peer_credentials, private_dir, read_messages,
                  recv_with_fds, send_with_fds)
from .protocol import ENV_UPGRADE_FROM as ENV_FROM
from .protocol import ENV_UPGRADE_SOCK as ENV_SOCK
from .system import SYSTEM
from .workers import describe_status

log = logging.getLogger("fugue")

__all__ = ["ENV_SOCK", "ENV_FROM", "begin", "Upgrade", "connect", "Handoff", "report_failure"]

DEADLINE_MARGIN = 10.0  # seconds a new master gets beyond ready_timeout (its own start-up, the handoff)


# -- the old master's side ------------------------------------------------------------

def begin(cfg, loop, pid_file, listeners, generation, system=SYSTEM):
    """Step 1: make the handoff socket and exec the new master; returns the Upgrade in flight.

    The caller adds `upgrade.server` to its loop with `upgrade.accept` as the
    reader. Raises OSError or FugueError, with nothing left behind.
    """
    # Named by our pid, so that the next master can sweep it if we are killed mid-upgrade.
    directory = private_dir(cfg.path("tmp_path"), f"fugue-upgrade-{system.getpid()}-")
    path = os.path.join(directory, "handoff.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        bind_unix_path(server, path)
        os.chmod(path, 0o600)
        server.listen(1)
        server.setblocking(False)
        env = dict(os.environ)
        env[ENV_SOCK] = path
        env[ENV_FROM] = str(system.getpid())
        if notify.address():
            env["NOTIFY_SOCKET"] = notify.address()
        argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv))[1:]
        pid = system.spawn(argv, env, cfg.start_dir, loop)
    except BaseException:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    now = system.monotonic()
    up = Upgrade(pid, directory, server, now, now + cfg.ready_timeout + DEADLINE_MARGIN,
                 loop=loop, pid_file=pid_file, listeners=listeners, generation=generation,
                 tmp_path=cfg.path("tmp_path"), system=system)
    system.notify("RELOADING=1", "STATUS=upgrading: new master starting",
                  f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)}")
    log.info("upgrade: started new master pid %d", pid)
    return up


class Upgrade:
    """The old master's side of one upgrade, from USR2 until the new master exits or serves.

    The master calls: accept (reader of `server`), read (reader of `conn`;
    True once the new master is READY), step_down, check_deadline, abort,
    exited. `waiters` are callables(ok, text) told the outcome (fuguectl upgrade).
    """

    def __init__(self, pid, directory, server, now, deadline, loop, pid_file, listeners, generation,
                 tmp_path, system=SYSTEM):
        self.pid = pid
        self.directory = directory
        self.server = server
        self.conn = None
        self.started = now
        self.deadline = deadline
        self.reason = None              # the new master's FAILED reason
        self.stepped_down = False       # NEW_READY came: the new master serves, we drain
        self.waiters = []
        self.carry = dict               # what the new master takes over besides the listeners
        self.loop = loop
        self.pid_file = pid_file
        self.listeners = listeners
        self.generation = generation
        self.tmp_path = tmp_path
        self.system = system

    def accept(self):
        """Step 2: hand the listeners to the new master (and to nobody else). Returns the
        connection to it when it connected now (the caller reads it: `read`), else None."""
        try:
            conn, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return None
        pid, uid, _ = peer_credentials(conn)
        if self.conn is not None or pid != self.pid or uid != os.getuid():
            log.warning("upgrade: refused a handoff connection from pid %d uid %d", pid, uid)
            conn.close()
            return None
        self.conn = conn
        manifest = protocol.manifest([lst.describe() for lst in self.listeners], self.generation,
                                     options=self.carry())
        try:
            send_with_fds(conn, manifest, [lst.fileno() for lst in self.listeners])
        except OSError as e:
            log.error("upgrade: cannot send the listeners: %s", e)
        # The connection is made: nobody else needs the path any more.
        self._remove_path()
        conn.setblocking(False)
        log.info("upgrade: listeners handed to pid %d", pid)
        return conn

    def _remove_path(self):
        if self.server is not None:
            self.loop.remove_reader(self.server)
            self.server.close()
            self.server = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def read(self):
        """What the new master said (FAILED, NEW_READY); True when it is ready and we have not stepped down."""
        messages, eof = read_messages(
            self.conn, lambda e: log.warning("upgrade: bad message from the new master: %s", e))
        ready = False
        for msg in messages:
            if msg["type"] == protocol.FAILED:
                self.reason = str(msg.get("reason"))[:2000]
            elif msg["type"] == protocol.NEW_READY and not self.stepped_down:
                ready = True
        if eof:
            self.loop.remove_reader(self.conn)
        return ready

    def step_down(self):
        """Step 4: give the new master the pid file; tell it so. Returns the outcome's text;
        the caller then drains its workers and exits."""
        self.stepped_down = True
        try:
            self.pid_file.hand_over()
        except OSError as e:
            log.warning("upgrade: cannot rename the pid file: %s", e)
        try:
            self.conn.send(protocol.encode(protocol.STEPPED_DOWN))
        except OSError:
            pass
        text = f"new master pid {self.pid} serving ({self.system.monotonic() - self.started:.2f}s)"
        log.info("upgrade done: %s; this master drains and exits", text)
        self._tell(True, text)
        return text

    def check_deadline(self, now):
        """Kill a new master that is not ready in time; returns when to check again, or None."""
        if self.stepped_down:
            return None
        if now >= self.deadline:
            log.error("upgrade: new master pid %d not ready after %.0fs; killing it",
                      self.pid, self.deadline - self.started)
            self.reason = self.reason or f"not ready after {self.deadline - self.started:.0f}s"
            self.system.kill(self.pid)
            return None
        return self.deadline

    def abort(self):
        """The old master stops before the new one is ready: the new one goes."""
        if not self.stepped_down:
            self.system.kill(self.pid)

    def exited(self, status):
        """The new master exited (reaped). Before step_down: the upgrade failed, returns its text.
        After: this master takes the pid file back and serves again, returns None."""
        desc = describe_status(status)
        if self.server is not None or not self.stepped_down:
            if self.server is not None:
                self.loop.remove_reader(self.server)
                self.server.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.conn is not None and self.reason is None:
            # Its last words (FAILED) may still be unread: the reap runs before the readers.
            for msg in read_messages(self.conn)[0]:
                if msg["type"] == protocol.FAILED:
                    self.reason = str(msg.get("reason"))[:2000]
        if self.conn is not None:
            self.loop.remove_reader(self.conn)
            self.conn.close()
        # Killed, it could not remove its own run directory: nobody else will.
        shutil.rmtree(os.path.join(self.tmp_path, f"fugue-{self.pid}"), ignore_errors=True)
        if not self.stepped_down:
            text = (f"upgrade failed: new master pid {self.pid} {desc}"
                    f"{': ' + self.reason if self.reason else ' (see the log above)'}; "
                    f"pid {self.system.getpid()} keeps serving")
            log.error("%s", text)
            self.system.notify("READY=1", f"STATUS={text}")
            self._tell(False, text)
            return text
        # The new master died after we handed over: take the service back.
        log.error("new master pid %d %s after taking over; this master (pid %d) resumes serving",
                  self.pid, desc, self.system.getpid())
        self.pid_file.take_back()
        self.system.notify("READY=1", f"MAINPID={self.system.getpid()}")
        return None

    def _tell(self, ok, text):
        for waiter in self.waiters:
            waiter(ok, text)
        self.waiters = []


# -- the new master's side -------------------------------------------------------------

def from_environment():
    """The handoff socket's path if this process is a new master exec'd by USR2, else None.
    Taken out of the environment: the workers and the next upgrade must not see it."""
    return os.environ.pop(ENV_SOCK, None)


def connect(path, pid_file, tmp_path, system=SYSTEM):
    """Step 2, new side: take the listeners from the old master over `path`.

    Returns (Handoff, listeners, first generation number). FugueError if the
    socket is not our old master's or the manifest is wrong.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    expected = int(os.environ.pop(ENV_FROM, 0) or 0)
    try:
        connect_unix_path(sock, path)
        pid, uid, _ = peer_credentials(sock)
        if uid != os.getuid() or (expected and pid != expected):
            raise FugueError(f"handoff socket {path} belongs to pid {pid} uid {uid}, not our old master")
        data, fds = recv_with_fds(sock, protocol.MAX_FRAME)
        msg = protocol.decode(data)
        items = protocol.check_manifest(msg, len(fds))
        health.inherit(msg.get("options"))  # a `fuguectl drain` outlives the upgrade
    except (OSError, protocol.ProtocolError) as e:
        sock.close()
        raise FugueError(f"upgrade: cannot take the listeners from the old master: {e}") from None
    listeners = [Listener(socket.socket(fileno=fd), item["name"], item.get("spec", item["name"]))
                 for fd, item in zip(fds, items)]
    sock.settimeout(None)
    sock.setblocking(False)
    return Handoff(sock, expected, pid_file, tmp_path, system), listeners, int(msg.get("generation") or 0) + 1


class Handoff:
    """The new master's side: its connection to the old master, until that one has gone.

    `old_pid` is the old master's pid while it may still run (draining), None
    once it has gone. The master calls: read (reader of `sock`), tell_ready
    and tell_failed (its first generation's outcome).
    """

    def __init__(self, sock, old_pid, pid_file, tmp_path, system=SYSTEM):
        self.sock = sock
        self.old_pid = old_pid
        self.pid_file = pid_file
        self.tmp_path = tmp_path
        self.system = system

    @property
    def old_master_draining(self):
        return bool(self.old_pid)

    def tell_ready(self):
        """Step 3: our first generation is READY."""
        self._send(protocol.NEW_READY)

    def tell_failed(self, reason):
        """Step 3: our first generation failed (so `fuguectl upgrade` shows why); we exit."""
        self._send(protocol.FAILED, reason=reason)

    def report(self, reason):
        """Before this process is a master (its config cannot be applied): FAILED, and nothing
        more; the caller exits."""
        try:
            self.sock.send(protocol.encode(protocol.FAILED, reason=reason))
        except OSError:
            pass

    def _send(self, kind, **fields):
        try:
            self.sock.send(protocol.encode(kind, **fields))
        except OSError:
            self._take_over("the old master is gone", starting=False)

    def read(self, loop, generation, starting):
        """Steps 4 and 5: STEPPED_DOWN, then EOF. `starting`: our first generation is not READY yet."""
        messages, eof = read_messages(self.sock)
        for msg in messages:
            if msg["type"] == protocol.STEPPED_DOWN:
                self.pid_file.write()
                self.system.notify(f"MAINPID={self.system.getpid()}", "READY=1",
                                   f"STATUS=generation {generation} serving (upgraded)")
                log.info("upgrade: took over from pid %d; pid file written", self.old_pid)
        if eof:
            loop.remove_reader(self.sock)
            if self.old_pid:
                self._take_over(f"old master pid {self.old_pid} exited", starting)

    def _take_over(self, why, starting):
        """The old master is gone: we are the only one now."""
        if self.old_pid is None:
            return
        log.info("%s", why)
        old, self.old_pid = self.old_pid, None
        self.sock.close()
        # Killed with SIGKILL, the old master left its run directory and perhaps its .oldbin.
        shutil.rmtree(os.path.join(self.tmp_path, f"fugue-{old}"), ignore_errors=True)
        self.pid_file.remove_oldbin_of(old)
        if not self.pid_file.ours() and not starting:
            self.pid_file.write()
            self.system.notify(f"MAINPID={self.system.getpid()}", "READY=1")


def report_failure(reason):
    """A new master that fails before it is a master (bad config file, an app that no longer
    imports) tells the old one why, so `fuguectl upgrade` shows the reason. Nothing if this
    process is not a new master, or the old one is gone. Called by fuguectl."""
    path = from_environment()
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(5.0)
            connect_unix_path(sock, path)
            _, fds = recv_with_fds(sock, protocol.MAX_FRAME)
            for fd in fds:
                os.close(fd)
            sock.send(protocol.encode(protocol.FAILED, reason=reason))
    except OSError:
        pass
