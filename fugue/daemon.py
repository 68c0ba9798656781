"""Daemonizing, the pid file, and the log files.

Daemonizing is an ordered list of steps (Unicorn's launcher): the launching
process forks; the child becomes the daemon through python-daemon (double
fork, setsid, umask, explicit files_preserve and signal_map); the launcher
waits on a ready pipe and exits 0 only when the master reports all workers
ready, 1 with the master's reason otherwise.
"""

import datetime
import errno
import json
import logging
import os
import signal
import sys
import time

from .errors import FugueError

log = logging.getLogger("fugue")

LOG_FORMAT = "%(asctime)s [%(process)d] [{role}] %(levelname)s %(message)s"  # role: whose line it is


# -- pid file ------------------------------------------------------------------

def read_pid(path):
    """The pid in `path`, or None if there is none; FugueError for garbage or no access.

    Never follows a symlink and never blocks on a planted FIFO; in a directory others
    can write, a pid file that belongs to another user (not root) is refused: it could
    name any process.
    """
    import stat as stat_

    from .fds import shared_dir

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise FugueError(f"pid file {path}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FugueError(f"pid file {path} is a symlink; refusing to use it") from None
        raise FugueError(f"pid file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat_.S_ISREG(st.st_mode):
            raise FugueError(f"pid file {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            try:
                others = shared_dir(os.stat(os.path.dirname(path) or "."))
            except OSError:
                others = True
            if others:
                raise FugueError(f"pid file {path} belongs to uid {st.st_uid} in a directory others "
                                 "can write; refusing to use it")
        try:
            text = os.read(fd, 64).decode("ascii", errors="replace").strip()  # garbage may be binary
        except OSError as e:
            raise FugueError(f"pid file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= 1 << 22:  # pid_max's ceiling
        raise FugueError(f"pid file {path} does not contain a pid ({text[:20]!r})")
    return int(text)


def is_fugue_master(pid):
    """True if `pid` is alive and is a fugue master (by its process title)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, not ours to read: do not take over
    return cmdline.startswith(b"fugue master")


def alive(pid):
    """True if `pid` runs (a zombie nobody reaped yet is gone: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True


def check_pid_file(path):
    """Refuse to start over a live master; take over a stale pid file (and say so)."""
    try:
        pid = read_pid(path)
    except FugueError as e:
        if "does not contain a pid" in str(e):
            log.warning("%s; replacing it", e)
            return
        raise
    if pid is None:
        return
    if pid != os.getpid() and alive(pid) and is_fugue_master(pid):
        raise FugueError(f"already running as pid {pid} (pid file {path})")
    log.warning("stale pid file %s (pid %d is %s); taking over", path, pid,
                "gone" if not alive(pid) else "not a fugue master")


def write_pid(path, pid=None):
    """Write the pid file atomically: a fresh temp file in its directory, renamed into place.

    The temp name is random and created with O_EXCL|O_NOFOLLOW (mkstemp): a name another
    user planted in a shared directory (a file, a link, a FIFO) is never opened, so the
    pid file is always ours and writing it never blocks. The result is checked to be the
    file we wrote, owned by us.
    """
    import tempfile

    pid = os.getpid() if pid is None else pid
    parent, name = os.path.split(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent or ".")
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o644)
            f.write(f"{pid}\n")
            f.flush()
            mine = os.fstat(fd)
        os.rename(tmp, path)
        tmp = None
        st = os.lstat(path)
        if (st.st_ino, st.st_dev, st.st_uid) != (mine.st_ino, mine.st_dev, os.geteuid()):
            raise FugueError(f"cannot write pid file {path}: it was replaced under us")
    except OSError as e:
        raise FugueError(f"cannot write pid file {path}: {e.strerror}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def remove_pid(path, pid=None):
    """Remove `path` only if it still names `pid` (a new master may own it now)."""
    pid = os.getpid() if pid is None else pid
    try:
        if read_pid(path) == pid:
            os.unlink(path)
    except (FugueError, OSError):
        pass


# -- logs ----------------------------------------------------------------------

def journal_stream_is(fd):
    """True if `fd` is systemd's journal stream: JOURNAL_STREAM=DEV:INODE matches fstat(fd).

    Then each line may carry its syslog priority as a `<N>` prefix (sd-daemon(3))."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def open_log(path):
    """An O_APPEND descriptor for a log file (created 0640), close-on-exec.

    The master may be root and the log's directory may be shared with the workers' user
    (logrotate set-ups often are): a log that is a symlink, not a regular file, planted
    by another user in a shared directory, or in a directory another user can write
    without the sticky bit is refused (fds.open_safely), at start, USR1 and USR2 alike.
    """
    from .fds import open_safely

    return open_safely(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640, what="log file")


class Logs:
    """The master's log (fd 1 and 2 of the master) and the workers' log descriptor.

    Reopening (USR1) opens the files anew by name and dup2s them into place, so
    logrotate's rename-then-signal works; the workers get the new descriptor
    over their channels. A refused reopen keeps every old descriptor and is counted
    (log_trouble() says so until a reopen succeeds).
    """

    refused = 0         # reopens refused since the last good one (class-wide: one per process)
    refused_since = None
    refused_reason = None

    def __init__(self, log_file, master_log_file):
        self.log_file = log_file
        self.master_log_file = master_log_file or log_file
        self.worker_fd = None
        self.error = None  # why the last reopen was refused (None: it worked)

    def open(self):
        """Open everything once, before daemonizing, so errors are shown to the user."""
        if self.log_file:
            self.worker_fd = open_log(self.log_file)
        if self.master_log_file and self.master_log_file != self.log_file:
            os.close(open_log(self.master_log_file))

    def redirect_master(self, fd=None):
        """Point the master's stdout and stderr at its log file (or at `fd`, which it closes)."""
        if fd is None:
            if not self.master_log_file:
                return
            fd = open_log(self.master_log_file)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def reopen(self):
        """USR1: reopen by name. Returns the new worker fd (or None); never raises.

        Both files are opened before either is used, so a refusal changes nothing."""
        opened = []
        try:
            if self.master_log_file:
                opened.append(open_log(self.master_log_file))
            if self.log_file:
                opened.append(open_log(self.log_file))
        except FugueError as e:
            for fd in opened:
                os.close(fd)
            cls = type(self)
            if not cls.refused:
                cls.refused_since = time.time()
            cls.refused += 1
            cls.refused_reason = str(e)
            self.error = str(e)
            log.error("cannot reopen logs: %s; keeping the old files", e)
            return None
        if self.master_log_file:
            self.redirect_master(opened.pop(0))
        if self.log_file:
            old, self.worker_fd = self.worker_fd, opened.pop(0)
            if old is not None:
                os.close(old)
        type(self).refused = 0
        self.error = None
        return self.worker_fd

    def preserve(self):
        return [self.worker_fd] if self.worker_fd is not None else []


class LogHandler(logging.Handler):
    """Log records to a descriptor (fd 2: the log file once redirected), one write(2) each.

    A full disk or an unwritable log must neither stop the process nor make it log, in a
    loop, that it cannot log: a record that cannot be written is counted and dropped, and
    the first one written after the trouble ends is preceded, once, by a line saying how
    many were lost and why. `trouble()` says it meanwhile (fuguectl status shows it).
    Unbuffered, so a failed write leaves nothing behind to be retried out of order.
    """

    def __init__(self, fd=2):
        super().__init__()
        self.fd = fd
        self.lost = 0
        self.error = None
        self.since = None

    def emit(self, record):
        try:
            data = self._line(record)
        except Exception:  # noqa: BLE001 - a bad format argument, as logging reports it
            self.handleError(record)
            return
        if self.lost:
            note = logging.LogRecord("fugue", logging.WARNING, __file__, 0,
                                     "%d log line%s lost since %s: %s", None, None)
            note.args = (self.lost, "" if self.lost == 1 else "s",
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)), self.error)
            if not self._write(self._line(note)):
                self.lost += 1
                return
            self.lost, self.error, self.since = 0, None, None
        if not self._write(data):
            self.lost += 1

    def _line(self, record):
        """The record's bytes; on the journal's stream every line starts with its priority."""
        text = self.format(record)
        if journal_stream_is(self.fd):  # checked per record: USR1 and daemonizing move fd 2
            prefix = f"<{syslog_priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return (text + "\n").encode(errors="replace")

    def _write(self, data):
        try:
            while data:
                data = data[os.write(self.fd, data):]
            return True
        except OSError as e:
            if self.error is None:
                self.error, self.since = e.strerror or str(e), time.time()
            return False

    def trouble(self):
        """'N log lines lost since ...: reason' while records are being lost, else None."""
        if not self.lost:
            return None
        return (f"{self.lost} log line{'' if self.lost == 1 else 's'} lost since "
                f"{time.strftime('%H:%M:%S', time.localtime(self.since))}: {self.error}")


def log_trouble():
    """What is wrong with this process's logs (lines lost, reopens refused), or None."""
    troubles = [handler.trouble() for handler in logging.getLogger("fugue").handlers
                if isinstance(handler, LogHandler)]
    if Logs.refused:
        troubles.append(f"{Logs.refused} log reopen{'' if Logs.refused == 1 else 's'} refused since "
                        f"{time.strftime('%H:%M:%S', time.localtime(Logs.refused_since))}: "
                        f"{Logs.refused_reason}")
    return "; ".join(t for t in troubles if t) or None


def syslog_priority(levelno):
    """sd-daemon(3)'s <N>: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, role, worker, generation, message, and the
    record's own fields (logging's `extra=`), plus the traceback as `exception`."""

    STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def __init__(self, fields):
        super().__init__()
        self.fields = dict(fields)

    def format(self, record):
        out = {"time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "pid": record.process, **self.fields,
               "message": record.getMessage()}
        if record.name != "fugue":
            out["logger"] = record.name  # waitress's and uvicorn's own lines
        for key, value in vars(record).items():
            if key not in self.STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


def level_of(verbose, log_level):
    return logging.DEBUG if verbose else getattr(logging, (log_level or "info").upper())


def make_formatter(log_format, text_format, fields):
    return JsonFormatter(fields) if log_format == "json" else logging.Formatter(text_format)


def setup_logging(verbose, log_level="info", log_format="text", role="master"):
    """The log of a master, a router ("router"), an app's master ("master NAME") or a keeper
    ("keeper"): fd 2, at `log_level` (debug if verbose), text or JSON, each line naming `role`."""
    handler = LogHandler(2)
    handler.setFormatter(make_formatter(log_format, LOG_FORMAT.replace("{role}", role), {"role": role}))
    root = logging.getLogger("fugue")
    root.handlers[:] = [handler]
    root.setLevel(level_of(verbose, log_level))
    root.propagate = False
    return handler


class _QueueDepthAtDebug(logging.Filter):
    """waitress warns "Task queue depth is N" whenever a request waits for a free thread; under
    load that is how a thread pool works, not a fault: it is a debug line."""

    def filter(self, record):
        if record.getMessage().startswith("Task queue depth"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("waitress").getEffectiveLevel() <= logging.DEBUG
        return True


def adopt_library_loggers(handler, level):
    """waitress's and uvicorn's loggers write through fugue's handler, at fugue's level."""
    for name in ("waitress", "uvicorn"):
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(level)
        lib.propagate = False
    queue = logging.getLogger("waitress.queue")
    if not any(isinstance(f, _QueueDepthAtDebug) for f in queue.filters):
        queue.addFilter(_QueueDepthAtDebug())


def setup_child_logging(options, label, fields):
    """A worker's or a mold's logging: fugue's, waitress's and uvicorn's loggers write to fd 2
    (the master's log), at log_level, text or JSON; `label` tags text lines ("worker 3")."""
    handler = LogHandler(2)  # a full disk costs log lines, said once; never the process
    handler.setFormatter(make_formatter(
        options.get("log_format"), f"%(asctime)s [%(process)d] [{label}] %(levelname)s %(message)s", fields))
    level = level_of(options.get("verbose"), options.get("log_level"))
    root = logging.getLogger("fugue")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    adopt_library_loggers(handler, level)

# -- daemonize -------------------------------------------------------------------

def daemonize(preserve, umask):
    """Fork; the parent waits on the ready pipe and exits; returns the write end in the daemon.

    Called after the listeners are bound and everything the user could get wrong
    has been checked, so the launcher's exit status tells the truth.
    """
    import daemon as pydaemon

    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        _launcher_wait(r, pid)  # never returns
    os.close(r)
    ctx = pydaemon.DaemonContext(
        working_directory="/",
        umask=umask,
        detach_process=True,
        files_preserve=list(preserve) + [w],
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
        stdin=None, stdout=None, stderr=None,
        prevent_core=False,
    )
    # python-daemon would close stdout/stderr; keep them (the log redirect replaces them).
    ctx.files_preserve.extend([0, 1, 2])
    ctx.open()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    return w


def _launcher_wait(r, child):
    chunks = []
    while True:
        try:
            data = os.read(r, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass
    text = b"".join(chunks).decode(errors="replace").strip()
    if text.startswith("ok"):
        print(f"fugue: master running as pid {text.split()[1]}", file=sys.stderr)
        os._exit(0)
    reason = text[len("error "):] if text.startswith("error ") else (
        text or "the master exited during start-up (see its log)")
    print(f"fugue: {reason}", file=sys.stderr)
    os._exit(1)


def tell_launcher(fd, ok, text):
    """Write the outcome to the launcher's ready pipe, once, and close it."""
    if fd is None:
        return None
    try:
        os.write(fd, f"{'ok' if ok else 'error'} {text}\n".encode())
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
    finally:
        os.close(fd)
    return None
