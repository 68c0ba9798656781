"""Resource limits the master runs into: descriptors (RLIMIT_NOFILE) and processes (RLIMIT_NPROC).

Who calls it: run.run_master checks, before anything starts, that the descriptor limit
leaves room for the listeners and two generations of workers (raising the soft limit
to the hard one first, as gunicorn and most servers do); the master describes a failed
spawn (EMFILE, ENFILE, EAGAIN from fork) with the limit it hit, so its one log line
says what to raise. A failed spawn is a worker failure (backoff, rollback), never the
master's death.
"""

import errno
import resource

from .errors import FugueError

# Descriptors of the master itself: stdio, the log and the workers' log, the loop's epoll
# and wakeup pair, the control socket and its clients, the status listener, the watcher,
# the upgrade socket, the pid file and the temp files it writes, Python's own.
MASTER_BASE = 32
PER_WORKER = 3  # its channel (a foreign worker's notify socket and stderr pipe); twice during a reload


def needed_descriptors(listeners, workers):
    return MASTER_BASE + listeners + 2 * PER_WORKER * workers


def check_descriptor_limit(listeners, workers):
    """Raise the soft RLIMIT_NOFILE to the hard one if short; FugueError (one line) if the
    hard limit is still too low for `listeners` and two generations of `workers`."""
    need = needed_descriptors(listeners, workers)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard == resource.RLIM_INFINITY or hard > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft < need:
            raise FugueError(f"the descriptor limit (RLIMIT_NOFILE) is {soft}: too low for {listeners} listener"
                             f"{'' if listeners == 1 else 's'} and {workers} worker{'' if workers == 1 else 's'} "
                             f"(at least {need}); raise it (ulimit -n, systemd LimitNOFILE=)")


def describe_spawn_error(e):
    """'Too many open files (RLIMIT_NOFILE 64)' and the like, for a failed spawn."""
    text = e.strerror or str(e)
    if e.errno in (errno.EMFILE, errno.ENFILE):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"{text} (RLIMIT_NOFILE {soft})"
    if e.errno == errno.EAGAIN:
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        return f"fork: {text} (RLIMIT_NPROC {'unlimited' if soft == resource.RLIM_INFINITY else soft})"
    return text
