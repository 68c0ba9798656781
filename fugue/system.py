"""The operating system as the state machines see it: one seam that tests replace.

Who calls it: fugue.upgrade, fugue.pool, fugue.rollout, fugue.shell (the master
and the router) and fugue.appmasters, through a `System` passed in by their
owner (SYSTEM by default); the router, the keeper and preload (fugue.molds) take
PR_SET_CHILD_SUBREAPER here, each deciding what a refusal means; tests pass a subclass that records what was asked
and answers from a table (tests/test_*_table.py). What it promises: each
method does one thing to the OS and nothing else; the real one, SYSTEM, is
stateless.
"""

import os
import signal
import time

from . import notify, workers


class System:
    """The real OS: clocks, signals, sd_notify, spawning and reaping children."""

    def monotonic(self):
        return time.monotonic()

    def wall(self):
        return time.time()

    def getpid(self):
        return os.getpid()

    def kill(self, pid, signum=signal.SIGKILL):
        """Signal `pid`; one that is already gone is not an error."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def notify(self, *fields):
        """sd_notify lines to whoever supervises this master (nothing when nobody does)."""
        notify.send(*fields)

    def spawn(self, argv, env, cwd, loop, prepare=None):
        """Fork (through fork_quietly) and exec `argv` in `cwd`: a new master, an app's master.
        `prepare()` runs in the child just before exec. Returns the pid; never returns in the child."""
        pid = workers.fork_quietly()
        if pid == 0:
            try:
                workers.child_signals(loop)
                if prepare is not None:
                    prepare()
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        return pid

    def spawn_worker(self, argv, env, identity, working_path, stdout_fd, child_fd, target=None,
                     foreign_fds=None, loop=None, stderr_fd=None):
        """A worker: fork + exec with its identity and channel (fugue.workers.spawn); its pid."""
        return workers.spawn(argv, env, identity, working_path, stdout_fd, [], child_fd,
                             target=target, foreign_fds=foreign_fds, loop=loop, stderr_fd=stderr_fd)

    def reaped(self):
        """(pid, status) of each exited child, without blocking (waitpid WNOHANG)."""
        return workers.reaped()

    def become_subreaper(self):
        """PR_SET_CHILD_SUBREAPER on this process: an orphaned descendant becomes our child to
        reap, not init's. None if done, else why not (one line); the caller decides whether
        that is a warning (the router, the keeper) or fatal (preload)."""
        return _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def die_with_parent(self, signum=signal.SIGTERM):
        """PR_SET_PDEATHSIG: `signum` to this process when its parent dies (in a child before
        exec). None if done, else why not."""
        return _prctl(PR_SET_PDEATHSIG, signum)


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option, arg):
    """prctl(2) with one argument: None if done, else the error (os.strerror)."""
    import ctypes  # only routed mode, preload and the keeper call prctl: not loaded by every master

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(option, arg, 0, 0, 0) == 0:
            return None
        return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as e:  # no libc prctl (not Linux)
        return f"prctl: {e}"


SYSTEM = System()
