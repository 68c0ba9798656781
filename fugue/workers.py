"""Spawning, signalling and describing worker processes.

Workers are fresh interpreters (fork + exec, never a bare fork), so a new
generation runs the code now on disk. Between fork and exec the child drops
gid then uid, chdirs, points stdout/stderr at the log, and checks that the
dropped user can read the interpreter, fugue and the app: if not, it says so
over its channel in one line and exits, instead of crash-looping on an
ImportError nobody can read.
"""

import grp
import os
import pwd
import signal
import socket
import sys

from . import protocol
from .errors import FugueError

# Set in the child so fugue.start knows it is a worker, and how to reach the master.
ENV_CHANNEL = "FUGUE_CHANNEL_FD"
ENV_WORKER_ID = "FUGUE_WORKER_ID"
ENV_GENERATION = "FUGUE_GENERATION"
ENV_TARGET = "FUGUE_TARGET"
# Never inherited by workers: they belong to the master.
MASTER_ONLY_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                   protocol.ENV_UPGRADE_SOCK, protocol.ENV_UPGRADE_FROM, "FUGUE_READY_FD")


class Identity:
    """The uid/gid workers run as, resolved once in the master (errors are FugueErrors)."""

    def __init__(self, uid=None, gid=None):
        self.uid = self.gid = None
        self.user = None
        if uid is not None:
            try:
                ent = pwd.getpwuid(uid) if isinstance(uid, int) else pwd.getpwnam(uid)
            except KeyError:
                if isinstance(uid, int):
                    ent = None
                else:
                    raise FugueError(f"unknown user {uid!r}") from None
            self.uid = ent.pw_uid if ent else uid
            self.user = ent.pw_name if ent else str(uid)
            if gid is None and ent:
                gid = ent.pw_gid
        if gid is not None:
            try:
                self.gid = gid if isinstance(gid, int) else grp.getgrnam(gid).gr_gid
            except KeyError:
                raise FugueError(f"unknown group {gid!r}") from None
        changes = (self.uid is not None and self.uid != os.getuid()) or (
            self.gid is not None and self.gid != os.getgid())
        if changes and os.geteuid() != 0:
            raise FugueError("uid/gid need fugue to be started as root "
                             f"(running as uid {os.geteuid()})")

    def describe(self):
        return self.user or (str(self.uid) if self.uid is not None else pwd.getpwuid(os.getuid()).pw_name)

    def apply(self):
        """In the child: drop gid, then supplementary groups, then uid."""
        if self.gid is not None:
            os.setgid(self.gid)
        if os.geteuid() == 0 and (self.uid is not None or self.gid is not None):
            if self.user and self.gid is not None:
                os.initgroups(self.user, self.gid)
            else:
                os.setgroups([self.gid] if self.gid is not None else [])
        if self.uid is not None:
            os.setuid(self.uid)


def python_argv():
    """The interpreter and its own flags, as this process was started (for exec)."""
    argv = [sys.executable]
    orig = list(getattr(sys, "orig_argv", []))[1:]
    # Keep interpreter options (-X, -W, -u, -O ...) that precede the script or -m.
    i = 0
    while i < len(orig) and orig[i].startswith("-") and orig[i] not in ("-m", "-c", "-"):
        argv.append(orig[i])
        if orig[i] in ("-X", "-W") and i + 1 < len(orig):
            argv.append(orig[i + 1])
            i += 1
        i += 1
    return argv


def worker_env(slot, generation, target_json=None, channel_fd=None, extra=None):
    """The environment of a worker. A foreign program (no target_json) gets only its
    id and generation from fugue, not the Python worker's channel, target and path."""
    env = {k: v for k, v in os.environ.items() if k not in MASTER_ONLY_ENV}
    env[ENV_WORKER_ID] = str(slot)
    env[ENV_GENERATION] = str(generation)
    if target_json is None:
        env.update(extra or {})
        return env
    env[ENV_CHANNEL] = str(channel_fd)
    env[ENV_TARGET] = target_json
    put_fugue_on_path(env)
    env.update(extra or {})
    return env


FUGUE_DIR = os.path.dirname(os.path.abspath(__file__))


def put_fugue_on_path(env):
    """A fresh interpreter started with `env` must import this same fugue, installed or not:
    its home goes first on PYTHONPATH (for workers, and the app masters of routed mode)."""
    home = os.path.dirname(FUGUE_DIR)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if home not in paths:
        env["PYTHONPATH"] = os.pathsep.join([home] + paths)


def _readable_paths(target):
    """Files the dropped user must be able to read for a Python worker to start."""
    paths = [os.path.join(FUGUE_DIR, "_boot.py")]
    script = target.get("script")
    if script:
        paths.append(script)
    return paths


def spawn(argv, env, identity, working_path, stdout_fd, pass_fds, child_fd,
          target=None, foreign_fds=None, loop=None, stderr_fd=None):
    """Fork and exec one worker; return its pid. Never returns in the child.

    `child_fd` (the worker's end of its channel) stays open across exec for a
    Python worker. `foreign_fds`, for a foreign command, are dup2'd to 3, 4, ...
    with LISTEN_FDS/LISTEN_PID set to the child's own pid.
    """
    pid = fork_quietly()
    if pid:
        return pid
    # Child: only exec or _exit from here on.
    status = 127
    try:
        child_signals(loop)
        # Its own process group: what the app forks without exec stays in it and is stopped
        # with it once it has exited (fugue.leftovers), instead of keeping the port.
        os.setpgid(0, 0)
        if stdout_fd is not None:
            os.dup2(stdout_fd, 1)
            os.dup2(stdout_fd, 2)
        if stderr_fd is not None:  # a foreign worker's stderr goes through the master (foreign.StderrTail)
            os.dup2(stderr_fd, 2)
        identity.apply()
        try:
            os.chdir(working_path)
        except OSError as e:
            raise _ChildError(f"cannot chdir to {working_path} as user {identity.describe()}: "
                              f"{e.strerror}") from None
        if not os.access(argv[0], os.X_OK):
            raise _ChildError(f"user {identity.describe()} cannot execute {argv[0]}: the "
                              "interpreter, fugue and the app must be readable by the workers' user")
        for path in _readable_paths(target or {}) if target is not None else ():
            if not os.access(path, os.R_OK):
                raise _ChildError(f"user {identity.describe()} cannot read {path}: the interpreter, "
                                  "fugue and the app must be readable by the workers' user")
        if foreign_fds is not None:
            # The channel stays open only until exec, to report an exec failure.
            child_fd = _place_listen_fds(foreign_fds, env, keep=child_fd)
        elif child_fd is not None:
            os.set_inheritable(child_fd, True)
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        os.execve(argv[0], argv, env)
    except _ChildError as e:
        _tell(child_fd, str(e))
        status = 126
    except OSError as e:
        _tell(child_fd, f"cannot start worker {argv[0]!r}: {e.strerror}")
    except BaseException as e:  # noqa: BLE001 - the child must always _exit
        _tell(child_fd, f"cannot start worker: {e!r}")
    finally:
        os._exit(status)


def fork_quietly():
    """fork() with every signal blocked, so none reaches the child's copy of the master's
    handlers (which would write into the master's wakeup socket and be lost); the parent's
    mask is restored at once, the child's by child_signals()."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:
        _saved_mask[0] = old
    return pid


_saved_mask = [None]


def child_signals(loop):
    """In a child of fork_quietly(): default dispositions, then the signals unblocked.

    A signal sent to the new pid meanwhile (a stop that raced the spawn) is
    delivered now, with its default action, instead of being lost.
    """
    if loop is not None:
        loop.forget_in_child()
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
                signal.SIGWINCH, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, _saved_mask[0] or ())


class _ChildError(Exception):
    pass


def _tell(fd, reason):
    if fd is None:
        try:
            os.write(2, f"fugue: {reason}\n".encode())
        except OSError:
            pass
        return
    try:
        os.write(fd, protocol.encode(protocol.FAILED, reason=reason))
    except OSError:
        pass


def _place_listen_fds(fds, env, keep):
    """dup2 the listeners to 3.. for a foreign command (sd_listen_fds convention)."""
    n = len(fds)
    # Move everything out of the way first so dup2 never clobbers a source.
    high = [os.dup(fd) for fd in fds]
    keep_high = os.dup(keep) if keep is not None else None  # close-on-exec: the program never sees it
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
    env["LISTEN_FDS"] = str(n)
    env["LISTEN_PID"] = str(os.getpid())
    return keep_high


def reaped():
    """(pid, status) of each child that has exited, without blocking, until none is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def channel_pair():
    """(master end, worker end): a SOCK_SEQPACKET pair, both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def describe_status(status):
    """waitpid status -> 'exited with status 1' / 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def signal_name(value):
    """'TERM', 'SIGTERM' or '15' -> signal number; FugueError otherwise."""
    text = str(value).upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text].value
    except KeyError:
        raise FugueError(f"unknown signal {value!r}") from None
