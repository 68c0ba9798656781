"""ASGI 3 applications, served by uvicorn on the listeners fugue passes in.

`uvicorn.Server(config).serve(sockets=ctx.listeners)` runs in this worker's
asyncio loop with uvicorn's own signal handling switched off: the worker's
Runtime owns SIGTERM/SIGINT, and its wake fds are readers of the loop (see
_util.WorkerBridge), so STOP from the master and signals arrive as begin_drain /
quick_stop on the loop thread. The heartbeat is a task of the same loop.

READY is sent when uvicorn's startup (lifespan startup included) is complete,
the `warmup` requests passed and its servers listen. A lifespan startup or
warmup failure ends the worker before READY with the exception in the reason,
which fails a reload (rollback).

Draining, fugue's policy rather than uvicorn's: uvicorn's own shutdown closes
idle keep-alive connections at once, which races a client reusing one. So a
drain first closes only the listening servers; responses started from then
on carry `Connection: close` (added by a thin ASGI wrapper; uvicorn then
closes after the response); an idle keep-alive connection stays open until
its client sends one more request or hangs up (or uvicorn's keep-alive
timeout, `timeout_keep_alive`, ends it, as it does outside a drain too).
When no connection is left, or at the graceful deadline, uvicorn's shutdown
runs (`should_exit`): remaining tasks, then lifespan shutdown.
"""

import asyncio
import contextlib
import importlib.util
import logging
import time

from . import _warmup
from ..accesslog import headers_of
from ._util import WorkerBridge, close_after_sweep, is_async, positional_params
from .base import MISDIRECTED, Adapter, misdirected

# uvicorn itself is imported where it is used, not here: `pick` imports this
# module to ask every target `accepts`, and a WSGI worker must not pay for
# uvicorn (about 45 ms of CPU and 6 MiB per worker: bench/footprint.py). A
# missing extra still fails this import, which adapters.load turns into a hint.
if importlib.util.find_spec("uvicorn") is None:  # pragma: no cover - the extra is not installed
    raise ImportError("uvicorn is not installed (No module named 'uvicorn')")

log = logging.getLogger("fugue")

# uvicorn.Config options fugue sets unless the app names its own in
# `asgi_options` (an attribute on the app object).
DEFAULTS = {"lifespan": "auto", "access_log": False, "log_config": None, "log_level": "warning",
            "server_header": False}


async def _nothing():
    pass


def is_asgi3(target):
    """A coroutine function (or object with an async __call__) of (scope, receive, send)."""
    if isinstance(target, type) or not callable(target) or not is_async(target):
        return False
    params = positional_params(target)
    return params is not None and len(params) == 3


class AsgiAdapter(Adapter):
    kind = "asgi"

    @classmethod
    def accepts(cls, target):
        return is_asgi3(target)

    def __init__(self, target, options):
        super().__init__(target, options)
        self.server = None
        self.ctx = None
        self.loop = None
        self._counted = {}       # protocol -> transport, for the connection count
        self._drained = False
        self.failure = None      # why this worker cannot serve (lifespan startup, warmup)
        self._sweep = None       # the drain's close_after_sweep task

    def _wrap_app(self):
        adapter, app = self, self.target
        close = (b"connection", b"close")
        access = getattr(self.ctx, "access", None)

        async def wrapped(scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return await app(scope, receive, send)
            stats = adapter.ctx.stats
            key = ("asgi", id(scope))
            what = scope["type"] if scope["type"] != "http" else scope.get("method", "")
            stats.request_started(f"{what} {scope.get('path', '')}", key)
            host = next((v for k, v in scope.get("headers") or () if k.lower() == b"host"), None)
            if host is not None and misdirected(scope.get("client"), host.decode("latin-1")):
                try:
                    if scope["type"] == "websocket":
                        await send({"type": "websocket.close", "code": 1008})
                    else:
                        await send({"type": "http.response.start", "status": 421, "headers": [
                            (b"content-type", b"text/plain"), (b"content-length", str(len(MISDIRECTED)).encode()),
                            close]})
                        await send({"type": "http.response.body", "body": MISDIRECTED})
                    return
                finally:
                    stats.request_finished(key)
            response = {"status": None, "headers": (), "length": 0}
            started, wall = time.monotonic(), time.time()

            async def send_closing(message):
                if message["type"] == "http.response.start":
                    response["status"], response["headers"] = message.get("status"), message.get("headers") or ()
                    if adapter.ctx.draining or adapter.ctx.lb_draining:
                        headers = list(message.get("headers") or [])
                        if not any(k.lower() == b"connection" for k, _ in headers):
                            message = dict(message, headers=headers + [close])
                elif message["type"] == "http.response.body":
                    response["length"] += len(message.get("body") or b"")
                await send(message)

            try:
                return await app(scope, receive, send_closing)
            finally:
                stats.request_finished(key)
                if access is not None and scope["type"] == "http":
                    client = scope.get("client")
                    access.request(
                        remote=client[0] if client else None, method=scope.get("method", "-"),
                        path=scope.get("path", ""), query=scope.get("query_string", b"").decode("latin-1"),
                        protocol=f"HTTP/{scope.get('http_version', '1.1')}",
                        status=response["status"] if response["status"] is not None else "-",
                        length=response["length"], started=started, wall=wall,
                        request_headers=headers_of(scope.get("headers") or ()),
                        response_headers=headers_of(response["headers"]))

        return wrapped

    def _protocol_class(self):
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        adapter = self

        class Protocol(AutoHTTPProtocol):
            def connection_made(self, transport):
                adapter._counted[self] = transport
                adapter.ctx.stats.connection_opened()
                super().connection_made(transport)

            def connection_lost(self, exc):
                try:
                    super().connection_lost(exc)
                finally:
                    if adapter._counted.pop(self, None) is not None:
                        adapter.ctx.stats.connection_closed()

        return Protocol

    def _server(self):
        import uvicorn

        adapter = self

        class Server(uvicorn.Server):
            # fugue's worker owns the signals (uvicorn >= 0.29 and older names).
            def capture_signals(self):
                return contextlib.nullcontext()

            def install_signal_handlers(self):
                pass

            async def startup(self, sockets=None):
                # Lifespan startup, then warmup, and only then listen (uvicorn's startup does
                # both lifespan and listening: its lifespan step is made a no-op the second time).
                with _warmup.logged_errors() as logged:
                    try:
                        await self.lifespan.startup()
                    except SystemExit:
                        pass
                if self.lifespan.should_exit:
                    adapter.failure = f"ASGI lifespan startup failed: {logged.describe() or 'see the log'}"
                    self.should_exit = True
                    return
                state = getattr(self.lifespan, "state", None)
                adapter.failure = await adapter._warm(state)
                if adapter.failure:
                    await self.lifespan.shutdown()
                    self.should_exit = True
                    return
                self.lifespan.startup = _nothing
                await super().startup(sockets=sockets)
                if self.started and not self.should_exit:
                    adapter._started()

        kw = dict(DEFAULTS)
        # uvicorn's own lines follow fugue's level (they go through fugue's handler, in its format)
        kw["log_level"] = "debug" if self.options.get("verbose") else (self.options.get("log_level") or "info")
        kw.update(getattr(self.target, "asgi_options", None) or {})
        if self.options.get("keep_alive"):  # the operator's --keep-alive wins over the app's own
            kw["timeout_keep_alive"] = float(self.options["keep_alive"])
        kw["http"] = self._protocol_class()
        kw.setdefault("timeout_graceful_shutdown", self.ctx.graceful_timeout)
        if self.options.get("backlog"):
            kw.setdefault("backlog", int(self.options["backlog"]))
        config = uvicorn.Config(self._wrap_app(), **kw)
        return Server(config)

    # -- Adapter -----------------------------------------------------------------

    def run(self, ctx):
        self.ctx = ctx
        self.server = self._server()
        factory = getattr(self.server.config, "get_loop_factory", None)
        with asyncio.Runner(loop_factory=factory() if factory else None) as runner:
            runner.run(self._main())
        if self.failure:
            ctx.fail(self.failure)

    async def _warm(self, state):
        paths, host = _warmup.plan(self.ctx)
        for path in paths:
            reason = await _warmup.call_asgi(self.target, path, host, state)
            if reason:
                return reason
        return None

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.bridge = WorkerBridge(self.ctx, on_tick=self._on_tick, interval=0.1)
        self.bridge.attach()
        try:
            await self.server.serve(sockets=list(self.ctx.listeners))
        finally:
            self.bridge.detach()

    def _started(self):
        self.ctx.serving()

    def _on_tick(self):
        # Connections whose protocol was swapped (a websocket upgrade) never see
        # connection_lost on ours: count them closed when their transport is.
        for proto, transport in list(self._counted.items()):
            if transport.is_closing() and proto not in self.server.server_state.connections:
                if self._counted.pop(proto, None) is not None:
                    self.ctx.stats.connection_closed()
        if not self.ctx.draining or self.server.should_exit or (self._sweep and not self._sweep.done()):
            return
        left = self.ctx.graceful_deadline - time.monotonic()
        if not self.server.server_state.connections or left <= 0:
            if left <= 0:
                log.info("graceful timeout: closing %d connection(s)",
                         len(self.server.server_state.connections))
            self.server.config.timeout_graceful_shutdown = max(0.5, left)
            self.server.should_exit = True

    def begin_drain(self):
        servers = getattr(self.server, "servers", None) or []
        # Stop accepting once what is queued is accepted; connections are left to the drain policy.
        self._sweep = self.loop.create_task(close_after_sweep(servers))
        if self.ctx.idle_close:  # uvicorn's own shutdown(): closes an idle HTTP connection,
            for proto in list(self.server.server_state.connections):  # or after its response
                cycle = getattr(proto, "cycle", False)  # websockets have none: left alone
                if cycle is None or (cycle and cycle.response_complete):
                    proto.shutdown()
        self._on_tick()

    def quick_stop(self):
        self.server.force_exit = True
        self.server.should_exit = True
        for proto in list(self.server.server_state.connections):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abort()

