"""Watch mode: tell the master when the application's files have changed.

The master has one selectors loop and no threads of its own, and watchfiles'
`watch()` blocks. So the blocking part lives in one helper thread whose only
job is to post settled batches of changed paths through a socketpair; the
master registers `Watcher.fileno()` as one more reader, and calls `take()`
when it is readable. Nothing the master calls waits on the thread, except
`start()` (until the watches are armed, bounded) and `stop()` (the join).

Why the thread does its own settling on top of watchfiles' debounce:
watchfiles groups events until `step` ms pass without one, or `debounce` ms
in all, so a git checkout or an rsync that takes two seconds comes out as
several groups. The thread merges groups into one pending batch and posts it
only when `settle` seconds have passed since the last relevant change; the
`yield_on_timeout` wake-ups are what let it notice the quiet. Irrelevant
changes (logs, bytecode, swap files) are filtered here rather than with
`watch_filter`: a filtered-out group is never yielded, so a log written
continuously under the watched tree would starve those wake-ups and hold a
settled batch back forever.

Must be started after daemonizing: a thread does not survive fork.
"""

import fnmatch
import logging
import math
import os
import socket
import threading
import time

from .errors import FugueError

log = logging.getLogger("fugue.watch")

# Directories whose contents never count, wherever they sit below a watched root.
IGNORED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"})

# Basename globs that never count: editor swap, lock and backup files (vim
# writes `4913` to test that it may create files), bytecode, logs.
IGNORED_NAMES = ("*.sw[a-p]", "*.swx", "*~", ".#*", "#*#", "4913", "*.py[co]", "*.log")

# watchfiles timings, in ms. STEP is also how fast the thread sees stop_event.
STEP_MS = 50
DEBOUNCE_MS = 200

# How long start() waits for the watches to be armed (a big tree takes a while
# to walk); past that it returns anyway and the thread goes on arming.
ARM_TIMEOUT = 10.0



def _import_watchfiles():
    try:
        import watchfiles
    except ImportError:
        raise FugueError("watch mode needs watchfiles: pip install watchfiles") from None
    return watchfiles


def _check_paths(paths):
    for path in paths:
        if not os.path.exists(path):
            raise FugueError(f"cannot watch {path}: no such file or directory")


def preflight(cfg):
    """What Watcher.start would refuse, said before the master binds anything (run.check_paths,
    fuguectl check): without it the refusal came after 'listening on ...'."""
    if cfg.watch:
        _import_watchfiles()
        _check_paths([os.path.join(cfg.start_dir, p) for p in cfg.watch_paths])

class Watcher:
    """Posts batches of changed files to the master's loop through `fileno()`.

    Built by the master when watch mode is on; `fuguectl watch off|on` maps to
    `pause()`/`resume()`. All methods are called from the master's thread.
    """

    def __init__(self, paths, include=("*.py",), exclude=(), settle=0.3, ignore_paths=()):
        """paths: directories or files to watch; include/exclude: fnmatch globs
        on the file's basename (a pattern containing '/' is matched against the
        path relative to the watched root; an exclude also matches any directory
        on the way there); settle: seconds the tree must be quiet before a batch
        is reported; ignore_paths: absolute paths (files or directories, e.g.
        the log files and tmp_path) whose changes are always ignored.

        A file named in `paths` counts whatever `include` says: naming it is
        asking for it.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise FugueError("watch mode needs at least one path to watch")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.settle = float(settle)
        if self.settle < 0:
            raise FugueError(f"watch settle time must be >= 0, not {settle!r}")
        self.ignore_paths = tuple(os.path.realpath(os.fspath(p)) for p in ignore_paths)
        # rust_timeout bounds how late a settled batch is posted in a quiet tree.
        self._timeout_ms = max(STEP_MS, min(int(self.settle * 1000 / 4), 250))

        self._dirs, self._files = _roots(self.paths)  # realpaths; checked again by start()
        self._lock = threading.Lock()
        self._pending = set()    # relevant changes not yet settled
        self._batches = set()    # settled, posted, not yet taken
        self._last_change = None  # monotonic time of the last relevant change
        self._paused = False
        self._stop_event = threading.Event()
        self._armed = threading.Event()
        self._failure = None
        self._thread = None
        self._reader = self._writer = None
        self._stopped = False

    # -- the master's side ---------------------------------------------------

    def start(self):
        """Start the background thread, and return once the watches are armed.

        Raises FugueError with one line if a path does not exist, watchfiles is
        missing, or the watches cannot be set up (e.g. the inotify limit).
        """
        if self._thread is not None or self._stopped:
            raise FugueError("watcher already started")
        watchfiles = _import_watchfiles()
        _check_paths(self.paths)
        self._dirs, self._files = _roots(self.paths)

        self._reader, self._writer = socket.socketpair()  # close-on-exec by default (PEP 446)
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._arm(watchfiles)
        if self._failure is not None:
            message = self._failure
            self.stop()
            raise FugueError(message)
        log.info("watching %s for %s", ", ".join(self.paths), " ".join(self.include))

    def _arm(self, watchfiles):
        """Start a watch thread with its own inotify instance; return once it is armed."""
        self._stop_event = threading.Event()
        self._armed = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(watchfiles, self._stop_event, self._armed),
            name="fugue-watch", daemon=True)
        self._thread.start()
        self._armed.wait(ARM_TIMEOUT)

    def _disarm(self):
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
            if self._thread.is_alive():
                log.warning("watch: thread did not stop in 5 s; leaving it (daemon thread)")

    def fileno(self):
        """Readable when at least one settled batch is waiting for take()."""
        if self._reader is None:
            raise RuntimeError("watcher not started")
        return self._reader.fileno()

    def take(self):
        """Non-blocking: the changed paths of all batches posted so far, sorted
        and deduplicated, or []; clears the readiness of fileno()."""
        with self._lock:
            changed = sorted(self._batches)
            self._batches.clear()
            self._drain()
        return changed

    def pause(self):
        """Watch off: changes from now on are dropped, and so is anything
        pending or posted but not taken (the user asked for no reloads)."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
            self._pending.clear()
            self._batches.clear()
            self._drain()
        # Stop watching altogether: events of the pause must not wait in watchfiles'
        # debounce buffer and surface after resume().
        self._disarm()
        log.info("watch: paused")

    @property
    def paused(self):
        """True between pause() and resume() (fuguectl watch off / on)."""
        return self._paused

    def resume(self):
        """Watch on again with a fresh watch; changes made while paused are not replayed."""
        with self._lock:
            if not self._paused or self._stopped:
                return
        import watchfiles

        self._arm(watchfiles)
        with self._lock:
            self._paused = False
        log.info("watch: resumed")

    def quiet_for(self):
        """Seconds since the last relevant change was seen (inf if none) — the
        master delays a reload while files are still changing."""
        last = self._last_change
        return math.inf if last is None else time.monotonic() - last

    def stop(self):
        """Stop the thread (within about STEP_MS) and close the fds; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._disarm()
        with self._lock:
            for sock in (self._reader, self._writer):
                if sock is not None:
                    sock.close()

    # -- relevance (pure: path in, bool out) --------------------------------

    def _watch_targets(self):
        """What watchfiles is told to watch. A single file is watched through
        its directory: editors save by renaming a new file over the old one,
        which kills an inotify watch on the file itself."""
        targets = set(self._dirs) | {os.path.dirname(f) for f in self._files}
        # A directory below another one is already covered (recursive watch).
        return sorted(t for t in targets if not any(_under(t, o) for o in targets if o != t))

    def relevant(self, path):
        """Does a change to file `path` (absolute, as watchfiles reports it) count?

        Pure (no file system access), so the rules are table-tested."""
        if path in self._files:
            return not self._ignored(path) and not _matches_any(os.path.basename(path), IGNORED_NAMES)
        rel = self._relative(path)
        if rel is None:
            return False
        *parents, name = rel.split("/")
        if not self._dirs_count(parents) or _matches_any(name, IGNORED_NAMES):
            return False
        if _glob_match(name, rel, self.exclude):
            return False
        return _glob_match(name, rel, self.include)

    def _dir_counts(self, path):
        """Could files below directory `path` count? (The rules of relevant().)"""
        rel = self._relative(path)
        return rel is not None and self._dirs_count(rel.split("/"))

    def _dirs_count(self, names):
        return not any(n in IGNORED_DIRS or _matches_any(n, self.exclude) for n in names)

    def _ignored(self, path):
        return any(_under(path, p) for p in self.ignore_paths)

    def _relative(self, path):
        """`path` relative to the innermost watched directory, with '/'; None
        if it is not strictly below one, or is under ignore_paths (a sibling
        of a watched file is seen through the file's directory, and is None)."""
        if self._ignored(path):
            return None
        root = max((d for d in self._dirs if _under(path, d) and path != d), key=len, default=None)
        return None if root is None else os.path.relpath(path, root).replace(os.sep, "/")

    # -- the thread's side -------------------------------------------------

    def _run(self, watchfiles, stop_event, armed):
        try:
            for changes in watchfiles.watch(
                    *self._watch_targets(),
                    watch_filter=None,  # see the module docstring
                    debounce=DEBOUNCE_MS, step=STEP_MS,
                    rust_timeout=self._timeout_ms, yield_on_timeout=True,
                    stop_event=stop_event, raise_interrupt=False):
                armed.set()
                relevant = {path for _, path in changes if self.relevant(path)}
                added = [path for change, path in changes if change == watchfiles.Change.added]
                self._absorb(relevant | self._files_in_new_dirs(added))
        except Exception as exc:  # noqa: BLE001 - the thread must say why it died
            message = f"watch mode failed: {_one_line(exc)}"
            if not armed.is_set():
                self._failure = message
            else:
                log.error("%s; files are no longer watched", message)
        finally:
            armed.set()

    def _files_in_new_dirs(self, added):
        """Relevant files inside directories that just appeared.

        inotify can only watch a new directory once it has seen it created, so
        a file written into it at once (git checkout of a new package, mkdir -p
        && cp, a directory moved in) is never reported. One walk of each new
        directory, when it appears, finds them; this is not polling.
        """
        found = set()
        if self._paused:
            return found
        new_dirs = [p for p in added if self._dir_counts(p) and os.path.isdir(p)]
        for top in new_dirs:
            if any(_under(top, o) and top != o for o in new_dirs):
                continue  # its parent is walked too
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if self._dir_counts(os.path.join(dirpath, d))]
                found.update(p for p in (os.path.join(dirpath, f) for f in filenames) if self.relevant(p))
        return found

    def _absorb(self, relevant):
        now = time.monotonic()
        with self._lock:
            if self._paused or self._stopped:
                return
            if relevant:
                self._pending |= relevant
                self._last_change = now
            if self._pending and now - self._last_change >= self.settle:
                self._batches |= self._pending
                self._pending.clear()
                self._post()

    def _post(self):
        try:
            self._writer.send(b"!")
        except BlockingIOError:
            pass  # a byte is already waiting: one is enough

    def _drain(self):
        if self._reader is None or self._reader.fileno() < 0:
            return
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass


def _roots(paths):
    """Split watched paths into directory roots and single files, as realpaths:
    watchfiles reports paths below the realpath it was given."""
    dirs, files = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            dirs.append(real)
        else:
            files.add(real)
    return dirs, files


def _under(path, top):
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _matches_any(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _glob_match(name, rel, patterns):
    return any(fnmatch.fnmatchcase(rel if "/" in p else name, p) for p in patterns)


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
