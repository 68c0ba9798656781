"""The one interface between a worker and a kind of server.

Who calls it: `fugue.worker` builds a WorkerContext, picks an Adapter class with
`pick()` and calls `adapter.run(ctx)` in the worker's main thread.

What an adapter promises:
- `run(ctx)` serves on `ctx.listeners` until the worker is told to stop, then
  returns (the worker then exits). It calls `ctx.serving()` once it really
  accepts connections (that sends READY, unless the app holds it back with
  wait_ready), and calls `ctx.tick()` at least every `ctx.tick_interval` seconds
  from its serving loop (the heartbeat: a wedged loop stops it and the master
  kills the worker after `timeout`).
- Its loop watches `ctx.wake_fds()` for readability and then calls
  `ctx.dispatch()`. That delivers master messages and signals as calls back into
  the adapter, always on the adapter's own loop thread:
    begin_drain()   stop accepting; finish in-flight work; an idle keep-alive
                    connection is not closed under a client: its next request is
                    answered with `Connection: close`; run() returns when all is
                    done or at ctx.graceful_deadline. With ctx.idle_close (the
                    stop follows drain_delay) idle keep-alive connections are
                    closed at once instead: nobody has used them since the drain.
    quick_stop()    close everything now; run() returns at once.
- While `ctx.draining or ctx.lb_draining`, HTTP responses carry `Connection:
  close` (lb_draining: drain_delay or `fuguectl drain`; the worker still accepts).
- It counts through `ctx.stats`: connection_opened/closed, request_started/finished.
- An HTTP adapter (WSGI, ASGI, http.server) calls its own app once per `warmup`
  path (`_warmup.py`) after loading it and before `ctx.serving()`; a failure is
  `ctx.fail(reason)`, which fails the worker and so the rollout.

Adapters import only this module (and their own server library).
"""

import os
import threading
import time
import traceback
import weakref

from ..protocol import MAX_COUNTER_NAME, MAX_COUNTERS, MAX_CURRENT, MAX_INFO, clip as _clip


# Routed mode: the router routes a connection by its first request's Host (or TLS SNI);
# fugue.inbox registers each routed HTTP connection here under its client address, with
# the host it was routed by (`routed_host`). A later request on the same keep-alive
# connection that names another host must not be served by this app: 421 (RFC 9110
# 15.5.20), and the client retries on a new connection, which the router routes anew.
routed_connections = weakref.WeakValueDictionary()  # (ip, port) of the client -> its socket
MISDIRECTED = b"misdirected request: this connection was routed to another host's app\n"


def misdirected(peer, host_value):
    """True if the request from `peer` (the client's (ip, port)) names, in its Host header
    value, another host than its routed connection was routed by. False outside routed mode,
    for a connection not routed by HTTP Host, and for a request without a Host."""
    try:
        sock = routed_connections.get(tuple(peer[:2])) if peer else None
    except TypeError:
        return False
    routed = getattr(sock, "routed_host", None)
    if routed is None or not host_value:
        return False
    from ..sniff import parse_host_header_value

    try:
        return parse_host_header_value(host_value) != routed
    except ValueError:
        return True


class Stats:
    """Counters of one worker; thread-safe because threaded servers update them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.connections = 0
        self.connections_total = 0
        self.counters = {}
        self.counters_dropped = 0  # increments of names past MAX_COUNTERS, not kept
        self.current = {}  # thread or task id -> what the worker is serving right now

    def connection_opened(self):
        with self._lock:
            self.connections += 1
            self.connections_total += 1

    def connection_closed(self):
        with self._lock:
            self.connections -= 1

    def request_started(self, info=None, key=None):
        with self._lock:
            self.in_flight += 1
            if info is not None:
                self.current[key if key is not None else threading.get_ident()] = (info, time.time())

    def request_finished(self, key=None):
        with self._lock:
            self.in_flight -= 1
            self.requests += 1
            self.current.pop(key if key is not None else threading.get_ident(), None)

    def incr(self, name, n=1):
        """Bounded: at most MAX_COUNTERS names of MAX_COUNTER_NAME characters per worker;
        an increment of a new name past that is counted in counters_dropped, not kept."""
        name = str(name)[:MAX_COUNTER_NAME]
        with self._lock:
            if name in self.counters or len(self.counters) < MAX_COUNTERS:
                self.counters[name] = self.counters.get(name, 0) + n
            else:
                self.counters_dropped += 1

    def snapshot(self):
        """Plain data for the master, bounded whatever the app does (see MAX_CURRENT and
        friends): the oldest MAX_CURRENT requests in flight, each described in at most
        MAX_INFO characters; `current_more` counts the ones left off."""
        with self._lock:
            now = time.time()
            current = sorted(self.current.values(), key=lambda item: item[1])
            snap = {
                "requests": self.requests, "in_flight": self.in_flight,
                "connections": self.connections, "connections_total": self.connections_total,
                "counters": dict(self.counters),
                "current": [{"info": _clip(info, MAX_INFO), "for": round(now - since, 3)}
                            for info, since in current[:MAX_CURRENT]],
            }
            if len(current) > MAX_CURRENT:
                snap["current_more"] = len(current) - MAX_CURRENT
            if self.counters_dropped:
                snap["counters_dropped"] = self.counters_dropped
            return snap


class WorkerContext:
    """What a worker gives its adapter. Implemented in fugue.worker; documented here."""

    worker_id: int
    generation: int
    listeners: list          # listening socket.socket objects, blocking
    listener_names: list     # names from the master's manifest, same order
    options: dict            # the master's options (plain data) merged with local callables
    stats: Stats
    tick_interval: float
    graceful_timeout: float
    draining: bool = False
    lb_draining: bool = False  # the host drains for load balancers: keep serving, say Connection: close
    idle_close: bool = False   # set before begin_drain(): close idle keep-alive connections at once
    graceful_deadline: float = None  # monotonic time by which a drain must end

    def wake_fds(self):
        raise NotImplementedError

    def dispatch(self):
        raise NotImplementedError

    def serving(self):
        raise NotImplementedError

    def tick(self):
        raise NotImplementedError

    def log(self, message):
        raise NotImplementedError

    def fail(self, reason):
        """The worker cannot serve (before READY): tell the master `reason` (one line) and exit 1."""
        raise NotImplementedError


class Adapter:
    """Base of every kind of server; subclasses override run() and the stop hooks."""

    kind = "base"

    def __init__(self, target, options):
        self.target = target
        self.options = options

    @classmethod
    def accepts(cls, target):
        """True if this adapter can serve `target` (used when the adapter is 'auto')."""
        return False

    def run(self, ctx):
        raise NotImplementedError

    def begin_drain(self):
        raise NotImplementedError

    def quick_stop(self):
        raise NotImplementedError


def describe_exception(exc):
    """One line: 'SyntaxError: invalid syntax (app.py, line 12)'."""
    if isinstance(exc, SyntaxError):
        where = f" ({os.path.basename(exc.filename or '?')}, line {exc.lineno})"
        return f"{type(exc).__name__}: {exc.msg}{where}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(tb):
        if "/fugue/" not in frame.filename and "runpy" not in frame.filename and "importlib" not in frame.filename:
            where = f" ({os.path.basename(frame.filename)}, line {frame.lineno})"
            break
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"
