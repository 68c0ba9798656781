"""Preload: one interpreter per generation imports the app; the workers are forked from it.

Who calls it: the master (through the pool) starts one mold per generation with
`start_mold` when the `preload` option is on, and asks it for workers with
`Mold.fork`; `python -m fugue._mold` (exec'd like a worker) runs `main()`.

The mold is exec'd fresh, as a worker is, with privileges dropped and the chdir
done between fork and exec, so a reload still runs the code now on disk and no
app code runs as root. It imports the app, runs `startup_check`, calls
`gc.freeze()` and then waits on its channel for FORK requests. Each FORK
carries the new worker's end of its own channel (SCM_RIGHTS); the mold forks
twice (the middle child exits at once) and answers FORKED with the worker's
pid. The master is a child subreaper (PR_SET_CHILD_SUBREAPER, as pitchfork
does), so the orphaned worker becomes the master's own child: the master reaps
it, signals it and sees its exit status exactly as for an exec'd worker, and
the worker outlives its mold. The mold holds no listener, so it accepts
nothing; it exits when its generation retires (STOP or EOF on its channel).

Why a synchronous FORK/FORKED round trip: the master must know a worker's pid
before it goes back to its loop (to reap, time out and signal it), and the mold
runs nothing but this loop after the import, so it answers within one fork's
time; a mold that does not answer in FORK_TIMEOUT is killed and the generation
goes on with exec'd workers (or rolls back while it is being rolled out).

Fork safety: a thread alive in the mold when it would fork (an error reporter or
a metrics client started at import) does not exist in the forked workers and
may hold a lock they need. The mold looks for live threads (Python's and native
ones, from /proc/self/task) after the import and the startup check; if there
are any it names them in one line (UNSAFE) and exits, and the master starts
that generation's workers by exec, as without preload: an unsafe app degrades
to today's behaviour instead of breaking. Sockets and event loops created at
import cannot be detected; fugue.after_fork is where a worker opens its own.
"""

import enum
import gc
import json
import logging
import os
import random
import re
import select
import signal
import sys
import threading
import time

from . import protocol, workers
from .adapters.base import Stats
from .errors import FugueError
from .fds import read_messages, recv_with_fds, send_with_fds

log = logging.getLogger("fugue")

FORK_TIMEOUT = 10.0  # seconds a READY mold has to answer a FORK with the worker's pid

# Signals that mean nothing to a mold (they are for the master); a `kill -HUP 0` must not end it.
IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)


# -- the master's side ---------------------------------------------------------------------

class MoldState(enum.Enum):
    STARTING = "starting"    # importing the app
    READY = "ready"          # imported, frozen: forks workers on request
    UNSAFE = "unsafe"        # not fork-safe after the import (fork_hazards): the workers are exec'd
    GONE = "gone"            # exited or retired: the generation's workers are exec'd from now on


class MoldError(Exception):
    """A fork request the mold did not answer with a pid; the text says why."""


class Mold:
    """The master's record of one generation's mold."""

    def __init__(self, pid, generation, channel, now):
        self.pid = pid
        self.generation = generation
        self.channel = channel
        self.state = MoldState.STARTING
        self.started = now
        self.started_wall = time.time()
        self.ready_after = None     # seconds the import and startup check took
        self.reason = None          # why it failed, as it said
        self.hazards = []           # UNSAFE: what it found (threads, connected sockets, files)
        self.forks = 0
        self.retiring = False       # asked to stop: its exit is expected
        self.killed = False         # SIGKILL sent
        self.exited = False         # reaped

    def __str__(self):
        return f"mold (pid {self.pid}, generation {self.generation})"

    def forks_workers(self):
        """True while workers of this generation are forked from it (False: exec them)."""
        return self.state is MoldState.READY and not self.retiring

    def read(self, now):
        """Messages waiting on the channel; returns True at EOF. Called by the master's loop."""
        messages, eof = read_messages(self.channel, lambda e: log.warning("%s sent a bad message: %s", self, e))
        for msg in messages:
            self._handle(msg, now)
        return eof

    def _handle(self, msg, now):
        kind = msg["type"]
        if kind == protocol.READY and self.state is MoldState.STARTING:
            self.state = MoldState.READY
            self.ready_after = now - self.started
            log.info("%s ready: app imported and frozen in %.2fs", self, self.ready_after)
        elif kind == protocol.UNSAFE and self.state is MoldState.STARTING:
            self.state = MoldState.UNSAFE
            self.hazards = [str(t)[:200] for t in msg.get("hazards") or []][:20]
            log.warning("%s: not fork-safe after the import (%s); generation %d's workers are exec'd "
                        "instead of forked (open connections and start threads in fugue.after_fork)",
                        self, ", ".join(self.hazards), self.generation)
        elif kind == protocol.FAILED:
            self.reason = str(msg.get("reason"))[:2000]

    def fork(self, items):
        """Ask for one worker per (slot, channel end) in `items`, all at once; return {slot: pid}.

        The requests go out together and the answers are collected together, so a generation
        of N workers costs one round trip, not N (on a busy machine each round trip waits to
        be scheduled). On return each worker is already the master's child (its middle parent
        has exited). Any failure raises MoldError: the master then gives up on this mold.
        """
        for slot, child in items:
            try:
                send_with_fds(self.channel, protocol.encode(protocol.FORK, slot=slot), [child.fileno()])
            except OSError as e:
                raise MoldError(f"cannot send a fork request: {e.strerror or e}") from None
        wanted = {slot for slot, _ in items}
        pids = {}
        deadline = time.monotonic() + FORK_TIMEOUT
        while wanted - pids.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                raise MoldError(f"no answer to {len(wanted - pids.keys())} fork request(s) in {FORK_TIMEOUT:g}s")
            try:
                select.select([self.channel], [], [], left)
            except InterruptedError:
                continue
            messages, eof = read_messages(self.channel)
            for msg in messages:
                if msg["type"] == protocol.FORKED and msg.get("slot") in wanted:
                    pid = msg.get("pid")
                    if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1):
                        raise MoldError(f"fork failed: {msg.get('reason') or 'no pid'}")
                    pids[msg["slot"]] = pid
                    self.forks += 1
                else:
                    self._handle(msg, time.monotonic())
            if eof and wanted - pids.keys():
                raise MoldError("exited during a fork request" + (f": {self.reason}" if self.reason else ""))
        return pids

    def retire(self):
        """Stop it: STOP when it is waiting for requests, SIGKILL while it is still importing."""
        if self.retiring:
            return
        self.retiring = True
        if self.state is MoldState.READY:
            try:
                self.channel.send(protocol.encode(protocol.STOP, reason="retired"))
                return
            except OSError:
                pass
        self.kill()

    def kill(self):
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def describe(self):
        """The row `fuguectl status` shows."""
        return {"pid": self.pid, "generation": self.generation, "state": self.state.value,
                "forks": self.forks, "started": self.started_wall,
                "ready_after": None if self.ready_after is None else round(self.ready_after, 3),
                "hazards": list(self.hazards)}


def become_subreaper():
    """PR_SET_CHILD_SUBREAPER on this process (the master): workers forked by a mold become
    its children when their middle parent exits. FugueError if the kernel refuses."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise FugueError(f"preload needs PR_SET_CHILD_SUBREAPER (Linux 3.4+): {os.strerror(err)}")


def start_mold(generation, target, name, options, identity, working_path, log_fd, loop, now, listeners=()):
    """Fork and exec the mold of `generation`; return its Mold. Called by the master's pool.

    `listeners` (the master's) only name the Host a warmup request carries; the mold gets none.
    """
    parent, child = workers.channel_pair()
    try:
        argv = workers.python_argv() + ["-m", "fugue._mold"]
        env = workers.worker_env(0, generation, json.dumps(target), child.fileno())
        pid = workers.spawn(argv, env, identity, working_path, log_fd, [], child.fileno(),
                            target=target, loop=loop)
    finally:
        child.close()
    mold = Mold(pid, generation, parent, now)
    try:
        from .adapters._warmup import _listener_host

        parent.send(protocol.encode(protocol.HELLO, worker_id=0, generation=generation, name=name,
                                    options=options, listeners=[],
                                    warmup_host=_listener_host([lst.sock for lst in listeners])))
    except OSError as e:
        log.error("%s: cannot send its hello: %s", mold, e)
    parent.setblocking(False)
    return mold


# -- the mold's side ---------------------------------------------------------------------

class MoldRuntime:
    """fugue's view of the mold process (worker.current there) until a worker is forked.

    What the app registers at import (after_fork and on_takedown hooks, an early
    fugue.ready()) is handed to each forked worker's own runtime.
    """

    is_mold = True
    worker_id = 0

    def fork_workers(self, target, local_options):
        """worker.serve in the mold (the worker never imports the mold): see fork_workers."""
        fork_workers(self, target, local_options)

    def __init__(self, channel, hello):
        self.channel = channel
        self.generation = hello.get("generation")
        self.name = hello.get("name")
        self.options = dict(hello.get("options") or {})
        self.warmup_host = hello.get("warmup_host") or "localhost"  # as the workers' warmup will say
        self.stats = Stats()
        self._takedown = []
        self._after_fork = []
        self._ready_called = False
        self._ready_sent = False

    def app_ready(self):
        self._ready_called = True

    def on_takedown(self, fn):
        self._takedown.append(fn)

    def after_fork(self, fn):
        self._after_fork.append(fn)

    def server_status(self, timeout=2.0):
        return None

    def _send(self, kind, **fields):
        try:
            self.channel.send(protocol.encode(kind, **fields))
        except OSError:
            pass

    def fail(self, reason):
        """Tell the master why this generation cannot start, then exit 1."""
        from .worker import WorkerExit

        self._send(protocol.FAILED, reason=reason)
        log.error("mold failed: %s", reason)
        raise WorkerExit(1)


def fork_hazards(keep=()):
    """What would make forking this process unsafe, one short text each (empty: safe).

    Threads besides this one (Python's and native ones), connected sockets (a database or
    cache client, an event loop's self-pipe) and files open for writing other than in
    append mode (an SQLite database): after a fork every worker would share them. Listening
    and unconnected sockets, append-mode files (logs) and descriptors in `keep` are fine.
    """
    return live_threads() + shared_descriptors(keep)


def shared_descriptors(keep=()):
    import socket
    import stat

    found = []
    try:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    except OSError:
        return found
    for fd in fds:
        if fd <= 2 or fd in keep:
            continue
        try:
            st = os.fstat(fd)
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if stat.S_ISSOCK(st.st_mode):
            try:
                probe = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                peer = probe.getpeername()
            except OSError:
                continue  # not connected: unbound, bound or listening
            finally:
                probe.close()
            found.append(f"socket fd {fd} connected to {peer or 'an unnamed peer'}")
        elif stat.S_ISREG(st.st_mode):
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    flags = int(re.search(r"^flags:\s+([0-7]+)", f.read(), re.M).group(1), 8)
            except (OSError, AttributeError):
                continue
            if flags & os.O_ACCMODE != os.O_RDONLY and not flags & os.O_APPEND:
                found.append(f"file {where} open for writing (fd {fd})")
    return found


def live_threads():
    """Names of the threads alive in this process besides the calling one, native ones included."""
    me = threading.current_thread()
    names = [f"{t.name}" for t in threading.enumerate() if t is not me]
    known = {t.native_id for t in threading.enumerate()}
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = []
    for tid in tasks:
        if tid in known or tid == os.getpid():
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # it ended meanwhile
        names.append(f"{comm} (native thread {tid})")
    return names


def fork_workers(rt, target, local_options):
    """In the mold, from fugue.start: check, freeze, then fork a worker per FORK request.

    Returns only in a forked worker, with worker.current set to its own runtime.
    The mold itself leaves through WorkerExit (0 when retired, 1 on failure).
    """
    from .worker import APP_OWNED, WorkerExit, run_startup_check

    opts = dict(rt.options)
    opts.update({k: v for k, v in (local_options or {}).items() if k in APP_OWNED})
    run_startup_check(rt, opts.get("startup_check"))
    _warm_up(rt, _import_the_server(rt, target, opts), target, opts)
    hazards = fork_hazards(keep={rt.channel.fileno()})
    if hazards:
        rt._send(protocol.UNSAFE, hazards=hazards)
        log.warning("not forking: after the import, %s", ", ".join(hazards))
        raise WorkerExit(0)
    # gc.disable() came first thing (no collection punches holes into pages the workers
    # share); freeze moves every object to the permanent generation, so the workers'
    # collections never write to them either (bpo-31558).
    gc.freeze()
    rt.channel.settimeout(None)
    rt._send(protocol.READY, pid=os.getpid())
    rt._ready_sent = True
    while True:
        try:
            data, fds = recv_with_fds(rt.channel, protocol.MAX_FRAME, 1)
        except InterruptedError:
            continue
        except OSError:
            data, fds = b"", []
        if not data:
            raise WorkerExit(0)  # the master is gone
        try:
            msg = protocol.decode(data)
        except protocol.ProtocolError as e:
            log.warning("ignoring a bad message from the master: %s", e)
            msg = {"type": None}
        kind = msg["type"]
        if kind == protocol.FORK and len(fds) == 1:
            pid = _fork_worker(rt, fds[0], msg.get("slot"))
            if pid == 0:
                return  # we are the worker now
            os.close(fds[0])
            if pid > 0:
                rt._send(protocol.FORKED, slot=msg.get("slot"), pid=pid)
            continue
        if kind == protocol.REOPEN and fds:
            os.dup2(fds[0], 1)
            os.dup2(fds[0], 2)
        for fd in fds:
            os.close(fd)
        if kind == protocol.STOP:
            raise WorkerExit(0)


def _import_the_server(rt, target, opts):
    """Import the adapter and its server library (waitress, uvicorn) here, once, so the
    workers share those pages too instead of each importing them after the fork; the
    adapter's class, or None (the worker then says what is wrong, as without preload).

    Only the class: an adapter instance may hold a self-pipe the workers must not share.
    """
    from .adapters import KINDS, load

    name = opts.get("adapter") or "auto"
    cls = None
    for kind, _, _ in KINDS:
        if name not in ("auto", kind):
            continue
        try:
            candidate = load(kind)
        except ValueError:
            continue
        if name == kind or candidate.accepts(target):
            cls = candidate
            break
    if getattr(cls, "kind", None) == "asgi":
        try:
            import uvicorn  # noqa: F401 - imported by the adapter's run() in each worker otherwise
            import uvicorn.protocols.http.auto  # noqa: F401
        except ImportError:
            pass
    return cls


def _warm_up(rt, adapter, target, opts):
    """The warmup option, for a WSGI app: GET each path here first, so what the app builds on
    its first requests (Django's URL resolvers, compiled templates) is shared by the workers.

    Each worker still runs its own warmup before READY; a failure here fails the generation
    with the same one line. ASGI and http.server apps warm up in the workers only: that takes
    an event loop or a socket pair, which the workers must not inherit.
    """
    paths = opts.get("warmup") or []
    if not paths or getattr(adapter, "kind", None) != "wsgi":
        return
    from .adapters import _warmup

    names = opts.get("hostnames") or []
    host = names[0] if names else rt.warmup_host
    for path in paths:
        reason = _warmup.call_wsgi(target, path, host)
        if reason:
            rt.fail(reason)


def _fork_worker(rt, fd, slot):
    """Fork twice: 0 in the worker, its pid in the mold, -1 (said to the master) on failure."""
    r, w = os.pipe()
    try:
        middle = workers.fork_quietly()
    except OSError as e:
        os.close(r)
        os.close(w)
        rt._send(protocol.FORKED, slot=slot, pid=None, reason=f"fork: {e.strerror}")
        return -1
    if middle == 0:
        try:
            pid = os.fork()  # signals are still blocked here (fork_quietly)
            if pid == 0:
                os.close(r)
                os.close(w)
                _become_forked_worker(rt, fd)
                return 0
            os.write(w, str(pid).encode())
        except BaseException:  # noqa: BLE001 - the middle child must always _exit
            os._exit(1)
        os._exit(0)
    os.close(w)
    data = b""
    try:
        while True:
            chunk = os.read(r, 32)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(middle, 0)
    if not data.isdigit():
        rt._send(protocol.FORKED, slot=slot, pid=None,
                 reason=f"the middle child {workers.describe_status(status)} without a pid")
        return -1
    return int(data)


def _become_forked_worker(rt, fd):
    """In the forked worker: undo what was the mold's, then become a worker on channel `fd`."""
    from . import worker

    workers.child_signals(None)
    rt.channel.close()      # the mold's channel is the mold's alone
    gc.enable()
    random.seed()           # each worker its own sequence (os.fork reseeds random too; be explicit)
    new = worker.become_worker(*worker.attach(fd))
    worker._open_access_log(new)  # the worker's own, as its own user (the mold opened none)
    new._takedown = list(rt._takedown) + new._takedown
    new._after_fork = list(rt._after_fork) + new._after_fork
    if rt._ready_called:
        new._ready_called = new._app_ready = True


def main():
    """`python -m fugue._mold`: the mold of one generation (exec'd by the master)."""
    gc.disable()  # before the import: see fork_workers
    from . import worker

    fd = int(os.environ.pop(workers.ENV_CHANNEL))
    target = json.loads(os.environ.pop(workers.ENV_TARGET, "{}"))
    channel, hello, _ = worker.attach(fd)
    rt = MoldRuntime(channel, hello)
    worker.current = rt
    _setup_logging(rt)
    worker.set_title(f"fugue mold {rt.name or ''} generation {rt.generation}".replace("  ", " "))
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    worker.run_target(rt, target)


def _setup_logging(rt):
    """As a worker's (fugue.worker._setup_logging), tagged with the mold's generation."""
    from .daemon import LogHandler, adopt_library_loggers, level_of, make_formatter

    handler = LogHandler(2)
    handler.setFormatter(make_formatter(
        rt.options.get("log_format"), f"%(asctime)s [%(process)d] [mold {rt.generation}] %(levelname)s %(message)s",
        {"role": "mold", "generation": rt.generation}))
    level = level_of(rt.options.get("verbose"), rt.options.get("log_level"))
    root = logging.getLogger("fugue")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    adopt_library_loggers(handler, level)
