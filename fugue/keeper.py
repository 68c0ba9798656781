"""The keeper: a tiny stable parent, the main process under systemd and as PID 1.

Who calls it: `run.run_master`, when the process fuguectl (or fugue.start) runs in
is the one a service manager watches: NOTIFY_SOCKET or INVOCATION_ID is set (systemd)
or it is PID 1 (a container), and it stays in the foreground. Instead of becoming the
master it keeps the listeners, starts the master as its child and stays, so the pid
systemd or the container runtime knows lives as long as the service:

    keeper (MainPID / PID 1: listeners, subreaper, relays sd_notify)
      └── master ──> workers          (the master exactly as without a keeper)
            └── new master (USR2)     (the handoff as always; the keeper adopts it)

What it promises:
- It never accepts on the listeners; it holds duplicates so that they stay open while
  no master lives (connections wait in the backlog), and closes them when it stops.
- Every master is fugue's ordinary master: it adopts the listeners as LISTEN_FDS, writes
  the pid file (so `kill -USR2 $(cat fugue.pid)` and every fuguectl command talk to the
  master, as before), upgrades itself with the usual handoff, rollback and two-master limit.
- Masters report to the keeper's own notify socket (in a 0700 directory under tmp_path,
  same uid only): MAINPID= tells it which master is current and is not passed on; READY,
  STATUS, RELOADING and STOPPING of the current master go to systemd, so MainPID stays
  the keeper.
- TERM, INT, QUIT, HUP, USR1, USR2, TTIN, TTOU and WINCH go to the current master.
- A master that dies without stopping (kill -9, a crash) is replaced at once; the dead
  master's workers see their channel close, finish what they are serving and exit.
- It is a subreaper: orphans (workers of a dead master, a new master whose parent
  retired) come to it and are reaped with a debug line.
- It exits when the current master exits after a stop, once every child is gone, with
  the master's status; a master that fails before it was ever ready ends it too.

Why a stable parent and not re-exec in place or the fd store: see fugue(7), UNDER A
SERVICE MANAGER.
"""

import json
import logging
import os
import shutil
import signal
import socket
import sys

from . import notify
from .errors import FugueError
from .fds import bind_unix_path, close_listeners
from .loop import Loop
from .protocol import ENV_UPGRADE_SOCK
from .shell import make_run_dir
from .system import SYSTEM
from .workers import _place_listen_fds, child_signals, describe_status, fork_quietly, reaped

log = logging.getLogger("fugue")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
KEPT_ENV = "FUGUE_KEPT"  # set in the masters a keeper starts: they never keep again


def wanted(cfg, upgrading):
    """True if this process should be a keeper rather than the master.

    Not in a master a keeper started, a new master of an upgrade, a daemon, or an app
    master of the router (routed mode: the router supervises those; its NOTIFY_SOCKET
    is the router's)."""
    from .apps import ENV_APP

    if os.environ.pop(KEPT_ENV, None) is not None or upgrading or cfg.daemonize or ENV_APP in os.environ:
        return False
    return os.getpid() == 1 or bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))


def restore_specs(listeners):
    """In a master a keeper started: give the adopted listeners (LISTEN_FDS, fd:N) back
    the specs the keeper bound them from. Called before wanted(), which takes the variable."""
    try:
        specs = json.loads(os.environ.get(KEPT_ENV) or "null")
    except ValueError:
        return
    if isinstance(specs, list) and len(specs) == len(listeners) and all(isinstance(x, str) for x in specs):
        for lst, spec in zip(listeners, specs):
            lst.spec = spec


def run(cfg, listeners, unlink):
    """Keep `listeners` and a master on them until the service stops; the exit status."""
    keeper = Keeper(cfg, listeners, unlink)
    try:
        return keeper.run()
    finally:
        keeper.close()


class Keeper:
    def __init__(self, cfg, listeners, unlink):
        self.cfg = cfg
        self.listeners = listeners
        self.unlink = unlink          # Unix socket paths we bound (not systemd's) go when we stop
        self.pid_file = cfg.path("pid_file")
        self.master = None            # the current master's pid
        self.stopping = None          # the stop signal forwarded, or "master" if the master stopped
        self.ready = False            # the current master has said READY=1
        self.status = 0
        self.loop = None
        self.sock = None
        self.dir = None

    # -- setup ----------------------------------------------------------------------------

    def run(self):
        from . import daemon

        daemon.setup_logging(self.cfg.verbose, self.cfg.log_level, self.cfg.log_format, role="keeper")
        why = SYSTEM.become_subreaper()
        if why:
            log.warning("cannot become a child subreaper (%s): orphans of a master will not be reaped here", why)
        notify.claim()  # systemd's socket is ours; the masters get the keeper's
        # A run directory as a master's (tmp_path/fugue-PID, 0700, made safely; swept the
        # same way when a killed keeper left it behind).
        self.dir = path = make_run_dir(self.cfg.path("tmp_path"))
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            bind_unix_path(self.sock, os.path.join(path, "notify.sock"))  # a deep tmp_path too
        except OSError as e:
            raise FugueError(f"keeper: cannot make its notify socket in {path}: {e.strerror or e}") from None
        self.sock.setblocking(False)
        self.loop = Loop()
        self.loop.install_signals(FORWARDED + (signal.SIGCHLD,))
        self.loop.add_reader(self.sock, self.on_notify)
        try:
            import setproctitle

            setproctitle.setproctitle(f"fugue keeper {self.cfg.name or ''}".rstrip())
        except ImportError:
            pass
        self.spawn_master()
        while True:
            for signum in self.loop.pop_signals():
                self.handle_signal(signum)
            self.reap()
            if self.master is None and self.stopping is not None and not _has_children():
                break
            self.loop.wait(None)
        log.info("keeper exiting (status %d)", self.status)
        return self.status

    def close(self):
        if self.loop is not None:
            self.loop.close()
        if self.sock is not None:
            self.sock.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        close_listeners(self.listeners, unlink=self.unlink)
        self.listeners = []

    # -- the master -----------------------------------------------------------------------

    def spawn_master(self):
        argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv))[1:]
        env = dict(os.environ)
        # What the user wrote for each listener: the master matches its bind against these
        # (an upgrade that follows a changed bind keeps them) as if it had bound them itself.
        env[KEPT_ENV] = json.dumps([str(lst.spec) for lst in self.listeners])
        env["NOTIFY_SOCKET"] = os.path.join(self.dir, "notify.sock")  # getsockname() may be relative
        env["LISTEN_FDNAMES"] = ":".join(lst.name for lst in self.listeners)
        fds = [lst.fileno() for lst in self.listeners]
        pid = fork_quietly()
        if pid == 0:
            try:
                child_signals(self.loop)
                _place_listen_fds(fds, env, None)
                os.execve(argv[0], argv, env)
            except BaseException as e:  # noqa: BLE001 - the child must end here, whatever happened
                try:
                    os.write(2, f"fugue: keeper: cannot start the master: {e}\n".encode())
                finally:
                    os._exit(1)
        self.master = pid
        self.ready = False
        log.info("master pid %d started", pid)

    def reap(self):
        for pid, status in reaped():
            if pid != self.master:
                log.debug("reaped pid %d (%s)", pid, describe_status(status))
                continue
            self.master_exited(pid, status)

    def master_exited(self, pid, status):
        self.master = None
        # A new master that took over wrote the pid file before it told us MAINPID=: if
        # its message is still in the socket, or was never sent, the pid file says.
        self.on_notify()
        successor = self._successor(pid)
        ready = successor is not None  # a new master writes the pid file once it serves
        successor = successor or self._orphaned_master()
        if successor:
            log.info("master pid %d %s; pid %d is the master now", pid, describe_status(status),
                     successor)
            self.master, self.ready = successor, ready
            return
        code = os.waitstatus_to_exitcode(status)
        if self.stopping is not None or code == 0:
            self.stopping = self.stopping or "master"
            self.status = code if code >= 0 else 128 - code
            log.info("master pid %d %s; stopping", pid, describe_status(status))
            self._close_listeners()
            return
        if not self.ready:
            # At the first start, or a replacement that cannot start either (the code on disk
            # is broken now): starting it again and again would only spin. The service manager
            # decides (Restart=, RestartSec=).
            self.stopping = "master"
            self.status = code if code > 0 else 1
            log.error("master pid %d %s before it was ready; giving up", pid, describe_status(status))
            notify.send(f"STATUS=master {describe_status(status)} before it was ready")
            self._close_listeners()
            return
        log.error("master pid %d %s; starting a new master now (the listeners stay open)",
                  pid, describe_status(status))
        notify.send(f"STATUS=master pid {pid} {describe_status(status)}; starting a new master")
        from .daemon import remove_pid

        remove_pid(self.pid_file, pid)  # its pid file is not stale to us: we saw it die
        self.spawn_master()

    def _successor(self, dead):
        from .daemon import read_pid

        try:
            pid = read_pid(self.pid_file)
        except FugueError:
            return None
        if pid and pid != dead and _alive(pid):
            return pid
        return None

    def _orphaned_master(self):
        """A new master (USR2) whose parent just died is our child now: it goes on with the
        listeners it was handed, or fails; it is the master either way, not a second one."""
        for child in _children():
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    title = f.read()
                with open(f"/proc/{child}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            # Before its title is set, a new master is known by the handoff path it was given.
            upgrading = any(v.startswith(ENV_UPGRADE_SOCK.encode() + b"=") for v in environ)
            if _alive(child) and (title.startswith(b"fugue master") or upgrading):
                return child
        return None

    def _close_listeners(self):
        # The master closed its copies; ours must go too, or a stopped service would
        # still complete connections that nobody will ever serve.
        close_listeners(self.listeners, unlink=self.unlink)
        self.listeners = []

    # -- signals and notifications -------------------------------------------------------

    def handle_signal(self, signum):
        if signum == signal.SIGCHLD:
            return
        if signum in STOPS and self.stopping is None:
            self.stopping = signum
            # The master closes its listeners first when it stops; our copies must not
            # keep accepting connections into a backlog that nobody will serve.
            self._close_listeners()
        if self.master is None:
            return
        try:
            os.kill(self.master, signum)
        except ProcessLookupError:
            pass

    def on_notify(self):
        """Read every datagram waiting on the keeper's notify socket; relay the current master's."""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sender = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(cdata) >= 12:
                    pid, uid = int.from_bytes(cdata[:4], "little"), int.from_bytes(cdata[4:8], "little")
                    if uid in (os.geteuid(), 0):
                        sender = pid
            if sender is None:
                continue
            self._relay(sender, data.decode(errors="replace").split("\n"))

    def _relay(self, sender, lines):
        out = []
        for line in lines:
            key, _, value = line.partition("=")
            if key == "MAINPID":
                if value.isdigit() and int(value) == sender and int(value) != self.master:
                    if self.master is not None:
                        log.info("pid %d is the master now (was %d)", sender, self.master)
                    self.master, self.ready = sender, False
            elif sender == self.master and line:
                out.append(line)
        if sender != self.master or not out:
            return
        if "READY=1" in out:
            self.ready = True
            out.append(f"MAINPID={os.getpid()}")
        if "STOPPING=1" in out and self.stopping is None:
            self.stopping = "master"
            self._close_listeners()
        notify.send(*out)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _children():
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def _has_children():
    return bool(_children())
