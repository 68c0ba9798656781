"""asyncio servers: a connection handler `async def handle(reader, writer)` or a
protocol factory (an asyncio.Protocol subclass; any other factory with
adapter="asyncio"), served with `asyncio.start_server(sock=...)` /
`loop.create_server(sock=...)` on each listener fugue passes in.

The worker's wake fds are readers of the same event loop (`_util.WorkerBridge`,
shared with the ASGI adapter), so master messages and signals arrive on the
loop thread, and the heartbeat is a task of that loop: a loop blocked by the
app stops it and the master replaces the worker.

Draining: the servers stop listening at once; connections in flight go on
until their handler returns (or the protocol's connection is lost). fugue
does not know the app's protocol, so it cannot tell an idle keep-alive
connection from a busy one: an app that keeps connections open should end
them itself when fugue starts to drain (`fugue.on_takedown(fn)` is called at
that moment, on the loop thread). At the graceful deadline the remaining
handlers are cancelled and their transports closed.

Counting: a connection is one request (started when accepted, finished when
closed); apps can count more with `fugue.stats.incr(name)`.
"""

import asyncio
import logging
import time

from ._util import WorkerBridge, is_async, positional_params
from .base import Adapter

log = logging.getLogger("fugue")


def _is_protocol_class(target):
    return isinstance(target, type) and issubclass(target, asyncio.BaseProtocol)


class AsyncioAdapter(Adapter):
    kind = "asyncio"

    @classmethod
    def accepts(cls, target):
        """A coroutine function of (reader, writer), or an asyncio protocol class."""
        if _is_protocol_class(target):
            return True
        if isinstance(target, type) or not callable(target) or not is_async(target):
            return False
        params = positional_params(target)
        return params is not None and len(params) == 2

    def __init__(self, target, options):
        super().__init__(target, options)
        self.handler_mode = not _is_protocol_class(target) and is_async(target)
        self.servers = []
        self.tasks = set()        # handler tasks (handler mode)
        self.transports = set()   # open transports (both modes)
        self.ctx = None
        self.loop = None
        self._done = None
        self._quick = False

    # -- counting wrappers --------------------------------------------------------

    def _handler(self):
        adapter, app = self, self.target

        async def handle(reader, writer):
            task = asyncio.current_task()
            adapter.tasks.add(task)
            transport = writer.transport
            adapter.transports.add(transport)
            stats = adapter.ctx.stats
            stats.connection_opened()
            key = ("aio", id(task))
            peer = writer.get_extra_info("peername")
            stats.request_started(f"connection from {peer}", key)
            try:
                await app(reader, writer)
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - as asyncio.start_server would log it
                log.exception("connection handler failed")
            finally:
                stats.request_finished(key)
                stats.connection_closed()
                adapter.tasks.discard(task)
                adapter.transports.discard(transport)
                if not transport.is_closing():
                    transport.close()
                adapter._maybe_done()
        return handle

    def _protocol_factory(self):
        adapter, factory = self, self.target

        def make():
            proto = factory()
            made, lost = proto.connection_made, proto.connection_lost
            state = {}

            def connection_made(transport):
                adapter.transports.add(transport)
                state["transport"] = transport
                adapter.ctx.stats.connection_opened()
                adapter.ctx.stats.request_started(None, ("aio", id(proto)))
                made(transport)

            def connection_lost(exc):
                try:
                    lost(exc)
                finally:
                    adapter.transports.discard(state.get("transport"))
                    adapter.ctx.stats.request_finished(("aio", id(proto)))
                    adapter.ctx.stats.connection_closed()
                    adapter._maybe_done()

            proto.connection_made = connection_made
            proto.connection_lost = connection_lost
            return proto
        return make

    def _stream_factory(self, handle):
        loop = self.loop

        def make():
            reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
            return asyncio.StreamReaderProtocol(reader, handle, loop=loop)
        return make

    # -- Adapter -----------------------------------------------------------------

    def run(self, ctx):
        self.ctx = ctx
        asyncio.run(self._main())

    async def _main(self):
        ctx = self.ctx
        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        bridge = WorkerBridge(ctx, on_tick=self._check_deadline)
        if self.handler_mode:
            handle = self._handler()
            self.factory = self._stream_factory(handle)
        else:
            self.factory = self._protocol_factory()
        # create_server listen()s again, and the backlog belongs to the shared socket:
        # keep fugue's (asyncio's default of 100 would shrink it for every worker).
        backlog = int(self.options.get("backlog") or 2048)
        for sock in ctx.listeners:
            sock.setblocking(False)
            self.servers.append(await self.loop.create_server(self.factory, sock=sock, backlog=backlog))
        bridge.attach()
        ctx.serving()
        try:
            await self._done.wait()
        finally:
            bridge.detach()
            self._close_servers()
            self._abort_all()

    def _maybe_done(self):
        if self._quick or (self.ctx.draining and not self.transports and not self.tasks):
            if self._done is not None:
                self._done.set()

    def _check_deadline(self):
        if self.ctx.draining:
            self._maybe_done()
            if time.monotonic() >= self.ctx.graceful_deadline:
                log.info("graceful timeout: closing %d connection(s)", len(self.transports))
                self._abort_all()
                self._done.set()

    def _close_servers(self):
        for server in self.servers:
            server.close()

    def _abort_all(self):
        for task in list(self.tasks):
            task.cancel()
        for transport in list(self.transports):
            transport.abort()

    def begin_drain(self):
        self._close_servers()
        for sock in self.ctx.listeners:
            try:
                sock.close()
            except OSError:
                pass
        self._maybe_done()

    def quick_stop(self):
        self._quick = True
        self._abort_all()
        self._maybe_done()

