"""Preload, the mold's side: the interpreter that imports the app once and forks its workers.

Who calls it: `python -m fugue._mold` (exec'd by the master, see fugue.molds)
runs `main()`; `apprun.serve` in the mold calls `MoldRuntime.fork_workers`.

The mold is exec'd fresh, as a worker is, with privileges dropped and the chdir
done between fork and exec, so a reload still runs the code now on disk and no
app code runs as root. It imports the app (the garbage collector off, so no
collection punches holes into pages the workers will share), runs
`startup_check`, imports the server library, makes a WSGI app's warmup requests,
calls `gc.freeze()` and then waits on its channel for FORK requests, forking
twice for each (fugue.molds says why). The mold holds no listener, so it
accepts nothing; it exits when its generation retires (STOP or EOF).

Fork safety: a thread alive in the mold when it would fork (an error reporter or
a metrics client started at import) does not exist in the forked workers and
may hold a lock they need; a connection opened at import would be shared by
every worker. Before it forks, the mold looks for threads (Python's and native
ones, from /proc/self/task), connected sockets and files open for writing
(`fork_hazards`); if there are any it names them in one line (UNSAFE) and exits,
and the master starts that generation's workers by exec, as without preload: an
unsafe app degrades to today's behaviour instead of breaking. What cannot be
seen from outside (a lock a C library holds, a pool that caches its pid) is the
app's to handle: fugue.after_fork is where a worker opens its own.
"""

import gc
import json
import logging
import os
import random
import re
import signal
import threading

from . import protocol, workers
from .adapters.base import Stats
from .fds import recv_with_fds

log = logging.getLogger("fugue")

# Signals that mean nothing to a mold (they are for the master); a `kill -HUP 0` must not end it.
IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)


class MoldRuntime:
    """fugue's view of the mold process (worker.current there) until a worker is forked.

    What the app registers at import (after_fork and on_takedown hooks, an early
    fugue.ready()) is handed to each forked worker's own runtime.
    """

    is_mold = True
    worker_id = 0

    def fork_workers(self, target, local_options):
        """apprun.serve in the mold (the worker never imports the mold): see fork_workers."""
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
    from .apprun import APP_OWNED, run_startup_check
    from .worker import WorkerExit

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
    # Its own process group, as an exec'd worker (workers.spawn): what the app forks without
    # exec goes with it when it exits (fugue.leftovers), not with the mold's group.
    os.setpgid(0, 0)
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
    from . import apprun, worker

    fd = int(os.environ.pop(workers.ENV_CHANNEL))
    target = json.loads(os.environ.pop(workers.ENV_TARGET, "{}"))
    channel, hello, _ = worker.attach(fd)
    rt = MoldRuntime(channel, hello)
    worker.current = rt
    _setup_logging(rt)
    worker.set_title(f"fugue mold {rt.name or ''} generation {rt.generation}".replace("  ", " "))
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    apprun.run_target(rt, target)


def _setup_logging(rt):
    """As a worker's (fugue.worker._setup_logging), tagged with the mold's generation."""
    from .daemon import setup_child_logging

    setup_child_logging(rt.options, f"mold {rt.generation}", {"role": "mold", "generation": rt.generation})
