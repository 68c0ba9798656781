"""Inside a worker: receive the listeners, become the worker (Runtime: the channel,
signals, drain, recycling, stats); loading and running the app is fugue.apprun.

Who calls it: `python -m fugue._boot` (exec'd by the master) runs apprun.main(),
which calls `attach` and `become_worker`; with preload, a worker forked from its
generation's mold (fugue.mold) calls them too and goes on in apprun.serve.
It has already dropped privileges and chdir'd (done between fork and exec), so
no application code ever runs as root. The channel to the master is a
SOCK_SEQPACKET socket: HELLO (with the listeners) arrives first, then STOP,
REOPEN, STATS, CONN. EOF on it means the master is gone: drain and exit.
"""

import errno
import itertools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from . import protocol
from .adapters.base import Stats, WorkerContext, describe_exception  # noqa: F401 - ctl imports it here
from .fds import recv_with_fds

log = logging.getLogger("fugue")

# The one runtime of this process, or None in the master and outside fugue.
current = None


class WorkerExit(SystemExit):
    pass


class _RecyclingStats(Stats):
    """Stats that call `wake()` once, on the request that reaches max_requests."""

    def __init__(self, limit, wake):
        super().__init__()
        self._limit = limit
        self._wake_loop = wake
        self._woken = False

    def request_finished(self, key=None):
        super().request_finished(key)
        if self.requests >= self._limit and not self._woken:
            self._woken = True
            self._wake_loop()


class Runtime(WorkerContext):
    """The worker side of the channel; the adapter's view of fugue."""

    is_mold = False

    def __init__(self, channel, hello, listeners):
        self.channel = channel
        self.worker_id = hello["worker_id"]
        self.generation = hello["generation"]
        self.options = dict(hello.get("options") or {})
        self.listener_names = [item["name"] for item in hello.get("listeners", [])]
        self.listeners = listeners
        self.stats = Stats()
        timeout = float(self.options.get("timeout") or 30.0)
        self.tick_interval = max(0.05, min(timeout / 3.0, 10.0))
        self.graceful_timeout = float(self.options.get("graceful_timeout") or 30.0)
        self.draining = False
        self.lb_draining = False
        self.lb_since = None
        self.idle_close = False
        self.version = None
        self.graceful_deadline = None
        self.adapter = None
        self.access = None  # the AccessLog, when the access_log option is set
        self.master_gone = False
        self._next_beat = 0.0
        self._serving = False
        self._ready_sent = False
        self._app_ready = not self.options.get("wait_ready")
        self._ready_called = False  # fugue.ready() may come (from a thread) before fugue.start
        self._takedown = []
        self._after_fork = []
        self._pending_stop = None
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self.channel.setblocking(False)
        self._max_requests = int(self.options.get("max_requests") or 0)
        if self._max_requests:
            import random

            self._max_requests += random.randint(0, int(self.options.get("max_requests_jitter") or 0))
            # Requests finish on handler threads: the one that reaches the limit wakes the loop,
            # which recycles at once rather than at the next heartbeat (up to 10 s later).
            self.stats = _RecyclingStats(self._max_requests, self._wake)
        self._max_memory = int(self.options.get("max_memory") or 0)
        self._status_seq = itertools.count(1)
        self._status_waiting = {}  # seq -> [threading.Event, data]: server_status() callers

    # -- what adapters call -------------------------------------------------

    def wake_fds(self):
        return [self.channel.fileno(), self._sig_r.fileno()]

    def serving(self):
        self._serving = True
        self._maybe_ready()

    def tick(self):
        now = time.monotonic()
        self._recycle_if_due(memory=False)
        if now < self._next_beat or self.master_gone:
            return
        self._next_beat = now + self.tick_interval
        self._send(protocol.HEARTBEAT, stats=self._small_stats())
        self._recycle_if_due(memory=True)

    def log(self, message):
        log.info(message)

    def dispatch(self):
        """Deliver signals and master messages to the adapter (on the adapter's thread)."""
        self.dispatch_thread = threading.get_ident()  # server_status() must know who reads the channel
        try:
            while self._sig_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._recycle_if_due(memory=False)
        if self._pending_stop:
            kind, self._pending_stop = self._pending_stop, None
            self._stop(kind)
        while not self.master_gone:
            try:
                data, fds = recv_with_fds(self.channel, protocol.MAX_FRAME, 4)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, fds = b"", []
            if not data:
                self.master_gone = True
                self._stop("graceful", "the master is gone")
                break
            try:
                msg = protocol.decode(data)
            except protocol.ProtocolError as e:
                for fd in fds:
                    os.close(fd)
                log.warning("ignoring a bad message from the master: %s", e)
                continue
            self._handle(msg, fds)

    # -- app-facing (fugue.ready, fugue.on_takedown, fugue.stats) -----------

    def app_ready(self):
        self._app_ready = self._ready_called = True
        self._maybe_ready()

    def on_takedown(self, fn):
        self._takedown.append(fn)

    def after_fork(self, fn):
        self._after_fork.append(fn)

    def run_after_fork(self):
        """fugue.after_fork hooks, once, in this worker before it serves (forked or exec'd).

        A hook that raises fails the worker: it is where connections are opened, and a
        worker without its database is not ready.
        """
        hooks, self._after_fork = self._after_fork, []
        for fn in hooks:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the reason goes to the master
                self.fail(f"after_fork hook {getattr(fn, '__qualname__', fn)!r} failed: "
                          f"{describe_exception(e)}")

    def server_status(self, timeout=2.0):
        """fugue.server_status(): the master's aggregate, or None if it does not answer in time.

        Asked on the channel (STATUS_REQUEST), answered there (STATUS) once every
        worker has sent fresh counters. The channel is read by the adapter's loop
        thread: asked from that thread, this reads the channel itself until the
        answer comes; from any other thread (a handler thread of a threading
        server), it waits on an Event that the loop thread sets.
        """
        seq = next(self._status_seq)
        slot = [threading.Event(), None]
        self._status_waiting[seq] = slot
        try:
            self._send(protocol.STATUS_REQUEST, seq=seq)
            if self.master_gone:
                return None
            deadline = time.monotonic() + timeout
            reader = getattr(self, "dispatch_thread", None) or threading.main_thread().ident
            if threading.get_ident() != reader:
                slot[0].wait(timeout)
                return slot[1]
            # We are the loop thread: nobody else reads the channel while we wait here.
            while not slot[0].is_set() and not self.master_gone:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                select.select([self.channel], [], [], left)
                self.dispatch()  # delivers our answer, and anything else that came meanwhile
            return slot[1]
        finally:
            self._status_waiting.pop(seq, None)

    # -- internals ----------------------------------------------------------

    def _maybe_ready(self):
        if self._serving and self._app_ready and not self._ready_sent:
            self._ready_sent = True
            # What this code's fugue.start asks for: the master applies a changed script.
            self._send(protocol.READY, pid=os.getpid(), script=getattr(self, "script_options", None))
            self.tick()

    def _recycle_if_due(self, memory):
        if self.draining or self.master_gone:
            return
        why = self._should_recycle(memory)
        if why:
            self.begin_drain(why)

    def _should_recycle(self, memory=True):
        """Why this worker should recycle itself now (max_requests, max_memory), or None."""
        if self._max_requests and self.stats.requests >= self._max_requests:
            return f"served {self.stats.requests} requests, max_requests {self._max_requests}"
        if self._max_memory and memory:
            try:
                with open(f"/proc/{os.getpid()}/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                return None
            if rss > self._max_memory:
                return f"RSS {rss >> 20} MB > max_memory {self._max_memory >> 20} MB"
        return None

    def _wake(self):
        try:
            self._sig_w.send(b"\0")
        except OSError:
            pass

    def begin_drain(self, why):
        """Recycle ourselves: the master refills the slot once we exit."""
        self._send(protocol.DRAINING, reason=why)
        self._stop("graceful", why)

    def _small_stats(self):
        snap = self.stats.snapshot()
        snap.pop("current", None)
        if self.version is not None:
            snap["version"] = self.version
        return snap

    def set_version(self, text):
        """fugue.set_version(): /healthz shows it; heard by the master with the next heartbeat, now if READY."""
        from .health import clean_version

        self.version = clean_version(str(text))
        if self._ready_sent:
            self._send(protocol.HEARTBEAT, stats=self._small_stats())

    def _handle(self, msg, fds):
        kind = msg["type"]
        if kind == protocol.STOP:
            self._stop("graceful" if msg.get("graceful", True) else "quick", msg.get("reason"))
        elif kind == protocol.REOPEN:
            if fds:
                os.dup2(fds[0], 1)
                os.dup2(fds[0], 2)
            if self.access is not None:
                self.access.reopen()
        elif kind == protocol.STATS:
            snap = self.stats.snapshot()
            self._send(protocol.STATS_REPLY, seq=msg.get("seq"), stats=snap)
        elif kind == protocol.DRAIN:
            on = bool(msg.get("on"))
            if on and not self.lb_draining:
                self.lb_since = time.monotonic()
            self.lb_draining = on
        elif kind == protocol.STATUS:  # the answer to server_status(): wake whoever asked
            seq = msg.get("seq")
            slot = self._status_waiting.get(seq) if isinstance(seq, int) else None  # the master may lie
            if slot is not None:
                slot[1] = msg.get("data")
                slot[0].set()
        for fd in fds:
            os.close(fd)

    def _stop(self, kind, why=None):
        if kind == "quick":
            if self.adapter is not None:
                self.adapter.quick_stop()
            return
        if self.draining:
            return
        self.draining = True
        now = time.monotonic()
        self.graceful_deadline = now + self.graceful_timeout
        # A stop after drain_delay: every request since the drain began was answered with
        # Connection: close, so what is still open and idle has not been used since, and load
        # balancers had drain_delay to stop using it (HAProxy keeps idle connections to a host
        # it marked down, unused, and would hold the stop until graceful_timeout). Half the
        # delay as the floor: the master counts from before DRAIN reached us.
        delay = float(self.options.get("drain_delay") or 0)
        self.idle_close = bool(self.lb_draining and delay > 0 and now - self.lb_since >= delay / 2)
        if why:
            log.info("draining: %s", why)
        for fn in self._takedown:
            try:
                fn()
            except Exception:  # noqa: BLE001 - an app callback must not wedge the drain
                log.exception("on_takedown callback failed")
        if self.adapter is not None:
            self.adapter.begin_drain()

    def _on_signal(self, signum, frame):
        self._pending_stop = "quick" if signum == signal.SIGINT else "graceful"
        try:
            self._sig_w.send(b"\0")
        except OSError:
            pass

    def _send(self, kind, **fields):
        """One message to the master, never above protocol.WORKER_MAX (the stats are bounded at
        their source, a reason is clipped; anything still too big is dropped and said once).

        Only EOF-like errors (EPIPE, ECONNRESET, ENOTCONN) mean the master is gone: any other
        error costs this one message, never the worker's heartbeat and so its life."""
        if self.master_gone:
            return
        for key in ("reason", "status"):
            if isinstance(fields.get(key), str):
                fields[key] = protocol.clip(fields[key], protocol.MAX_TEXT)
        try:
            data = protocol.encode(kind, **fields)
            if len(data) > protocol.WORKER_MAX:
                raise protocol.ProtocolError(f"{len(data)} bytes")
            self.channel.send(data)
        except (BlockingIOError, InterruptedError):
            pass  # the master is not reading; a heartbeat will follow
        except (BrokenPipeError, ConnectionResetError):
            self.master_gone = True
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.EBADF):
                self.master_gone = True
            else:
                self._unsent(kind, e.strerror or str(e))
        except protocol.ProtocolError as e:
            self._unsent(kind, f"too large ({e})")

    def _unsent(self, kind, why):
        said = self.__dict__.setdefault("_unsent_said", set())
        if kind not in said:  # once per kind of message: a loop must not fill the log
            said.add(kind)
            log.warning("could not send %s to the master: %s; the worker goes on", kind, why)

    def fail(self, reason):
        """Tell the master why this worker cannot start, then exit 1."""
        self._send(protocol.FAILED, reason=reason)
        log.error("worker failed to start: %s", reason)
        raise WorkerExit(1)


def _setup_logging(rt):
    """fugue's, waitress's and uvicorn's loggers: fd 2 (the master's log), at log_level, text or JSON."""
    from .daemon import setup_child_logging

    setup_child_logging(rt.options, f"worker {rt.worker_id}",
                        {"role": "worker", "worker": rt.worker_id, "generation": rt.generation})


def _open_access_log(rt):
    """The access_log option: this worker's AccessLog (ctx.access), opened as the worker's user."""
    from .accesslog import AccessLog
    from .errors import FugueError

    target = rt.options.get("access_log")
    if not target:
        return
    access = AccessLog(target, rt.options.get("access_log_format"), rt.options.get("log_format") == "json",
                       {"role": "worker", "worker": rt.worker_id, "generation": rt.generation})
    try:
        access.open()
    except FugueError as e:
        rt.fail(f"access log: {e}")
    rt.access = access


def _router_gone():
    # EOF on an inbox: the router is gone and nothing will arrive again. The inbox
    # stays readable at EOF, so an adapter would spin on it: drain the worker as if
    # its master had gone (its master is going too: it dies with the router).
    rt = current
    if rt is not None and not rt.draining:
        rt._stop("graceful", "the router closed the inbox")


def attach(fd):
    """The channel on descriptor `fd` and the master's HELLO -> (channel, hello, listeners).

    Exits 1 if no HELLO comes: there is no master to tell.
    """
    channel = socket.socket(fileno=fd)
    channel.set_inheritable(False)
    channel.settimeout(30)
    try:
        data, fds = recv_with_fds(channel, protocol.MAX_FRAME)
        hello = protocol.decode(data)
    except (OSError, protocol.ProtocolError) as e:
        print(f"fugue worker: no hello from the master: {e}", file=sys.stderr)
        os._exit(1)
    from .inbox import wrap_listeners  # routed mode: an app's inbox reads like a listener

    return channel, hello, wrap_listeners(fds, hello.get("listeners") or [], on_eof=_router_gone)


def become_worker(channel, hello, listeners):
    """Make this process worker `hello["worker_id"]`: the runtime, logging, title, signals."""
    global current
    rt = Runtime(channel, hello, listeners)
    current = rt
    _setup_logging(rt)
    set_title(f"fugue worker {rt.worker_id} {hello.get('name') or ''}".rstrip())
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        signal.signal(sig, rt._on_signal)
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return rt


def set_title(title):
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
