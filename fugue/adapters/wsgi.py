"""WSGI applications, served by waitress on the listeners fugue passes in.

Why waitress: it is pure Python (no compiler, one small dependency-free wheel),
maintained by the Pylons project, production grade, and serves on sockets it
did not bind (`create_server(app, sockets=[...])`). Its I/O loop (wasyncore) is
a plain socket map that we poll ourselves, so the worker keeps one wait point:
fugue's wake fds sit in the same map as the listeners and connections, and the
heartbeat comes from the loop that accepts. Application code runs in waitress's
task threads, as it does under `waitress-serve`. waitress will not mix Internet
and Unix listeners in one server, so there is one server per family in the
same map, sharing one pool of task threads.

Draining: the listeners leave the map and are closed at once; requests in
flight finish; every response started while draining carries `Connection:
close` (waitress then closes after flushing it); an idle keep-alive connection
is left open until its client sends one more request (answered with close) or
hangs up, so it is never closed under a client that is reusing it. At the
graceful deadline what is left is closed.
"""

import logging
import select
import socket
import time

from . import _warmup
from ..accesslog import headers_of
from ._util import SWEEP_MAX, at_eof, is_async, positional_params, queued, refusing_new_clients
from .base import MISDIRECTED, Adapter, misdirected

try:
    import waitress
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer
    from waitress.task import WSGITask
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(f"waitress is not installed ({e})") from None

log = logging.getLogger("fugue")

# waitress options fugue sets unless the app names its own in `wsgi_options`
# (an attribute on the app object: {"threads": 8, "url_scheme": "https", ...}).
DEFAULTS = {"threads": 4, "ident": "fugue"}


class _Waker:
    """One of the worker's wake fds in waitress's socket map: readable -> ctx.dispatch()."""

    accepting = False

    def __init__(self, fd, ctx, socket_map):
        self.fd = fd
        self.ctx = ctx
        self.map = socket_map

    def readable(self):
        return True

    def writable(self):
        return False

    def handle_read_event(self):
        self.ctx.dispatch()
        if at_eof(self.fd):  # the master is gone: stop polling it, or the loop would spin
            self.map.pop(self.fd, None)

    def handle_close(self):
        self.handle_read_event()

    def handle_write_event(self):
        pass

    def handle_expt_event(self):
        pass

    def handle_error(self):
        log.exception("fugue: error while dispatching a master message")

    def close(self):
        self.map.pop(self.fd, None)


class WsgiAdapter(Adapter):
    kind = "wsgi"

    @classmethod
    def accepts(cls, target):
        """A plain (not async) callable taking (environ, start_response)."""
        if isinstance(target, type) or not callable(target) or is_async(target):
            return False
        params = positional_params(target)
        if params is None or "stop" in params:  # serve(sock, stop=None) is a plain callable
            return False
        return (len(params) == 2 or (params and params[-1] == "*" and len(params) <= 3))

    def __init__(self, target, options):
        super().__init__(target, options)
        self.app = target
        self.map = {}
        self.servers = []
        self.ctx = None
        self._quit = False

    def _classes(self):
        adapter = self

        access = getattr(self.ctx, "access", None)

        class Task(WSGITask):
            def service(self):
                key = ("wsgi", id(self))
                adapter.ctx.stats.request_started(f"{self.request.command} {self.request.path}", key)
                started, wall = time.monotonic(), time.time()
                try:
                    super().service()
                finally:
                    adapter.ctx.stats.request_finished(key)
                    if access is not None:
                        self._fugue_access(started, wall)

            def _fugue_access(self, started, wall):
                req = self.request
                environ = getattr(self, "environ", None) or {}
                addr = self.channel.addr
                remote = environ.get("REMOTE_ADDR") or (addr[0] if isinstance(addr, tuple) and addr else None)
                access.request(
                    remote=remote, method=req.command, path=req.path, query=req.query,
                    protocol=f"HTTP/{req.version}", status=(self.status or "-").split(" ", 1)[0],
                    length=self.content_bytes_written, started=started, wall=wall,
                    request_headers={k.lower().replace("_", "-"): v for k, v in req.headers.items()},
                    response_headers=headers_of(self.response_headers))

            def execute(self):
                if misdirected(self.channel.addr, self.request.headers.get("HOST")):
                    self.status = "421 Misdirected Request"
                    self.response_headers.append(("Content-Type", "text/plain"))
                    self.set_close_on_finish()
                    self.content_length = len(MISDIRECTED)
                    self.complete = True  # what start_response() would have said
                    self.write(MISDIRECTED)
                    return
                super().execute()

            def build_response_header(self):
                if (adapter.ctx.draining or adapter.ctx.lb_draining) and not self.close_on_finish:
                    self.set_close_on_finish()  # adds Connection: close
                return super().build_response_header()

        class Channel(HTTPChannel):
            task_class = Task
            _fugue_counted = False

            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                self._fugue_counted = True
                adapter.ctx.stats.connection_opened()

            def del_channel(self, map=None):
                super().del_channel(map)
                if self._fugue_counted:
                    self._fugue_counted = False
                    adapter.ctx.stats.connection_closed()

        return Channel

    def run(self, ctx):
        self.ctx = ctx
        reason = _warmup.first_failure(ctx, lambda path, host: _warmup.call_wsgi(self.app, path, host))
        if reason:
            ctx.fail(reason)
        kw = dict(DEFAULTS)
        kw.update(getattr(self.app, "wsgi_options", None) or {})
        # The operator's options (--threads, --keep-alive) win over the app's own.
        if self.options.get("threads"):
            kw["threads"] = int(self.options["threads"])
        if self.options.get("keep_alive"):
            kw["channel_timeout"] = max(1, round(float(self.options["keep_alive"])))  # whole seconds
        if self.options.get("backlog"):
            kw.setdefault("backlog", int(self.options["backlog"]))
        channel = self._classes()
        # waitress refuses Internet and Unix sockets in one server ("may not be mixed"): one
        # server per family, all in the one socket map and sharing one task dispatcher (one pool
        # of `threads`), so a TCP and a Unix listener serve the same app in every worker.
        self.dispatcher = None
        for family in (False, True):
            group = [sock for sock in ctx.listeners if (sock.family == socket.AF_UNIX) == family]
            if group:
                server = waitress.create_server(self.app, map=self.map, sockets=group,
                                                _dispatcher=self.dispatcher, **kw)
                self.dispatcher = server.task_dispatcher
        if self.dispatcher is None:  # waitress would bind 0.0.0.0:8080 on its own
            raise RuntimeError("no listeners to serve on")
        self.servers = [obj for obj in self.map.values() if isinstance(obj, BaseWSGIServer)]
        for srv in self.servers:
            srv.channel_class = channel
        for fd in ctx.wake_fds():
            self.map[fd] = _Waker(fd, ctx, self.map)
        use_poll = hasattr(select, "poll")
        poll = wasyncore.poll2 if use_poll else wasyncore.poll
        ctx.serving()
        try:
            while not self._quit:
                timeout = ctx.tick_interval
                if ctx.draining:
                    if not self._busy():
                        break
                    left = ctx.graceful_deadline - time.monotonic()
                    if left <= 0:
                        log.info("graceful timeout: closing %d connection(s)", self._open_channels())
                        break
                    timeout = min(timeout, left)
                poll(timeout, self.map)
                ctx.tick()
        finally:
            self._close_all()
            self.dispatcher.shutdown(cancel_pending=True, timeout=0.5 if self._quit else 2)

    def _channels(self):
        return [ch for srv in self.servers for ch in list(srv.active_channels.values())]

    def _open_channels(self):
        return len(self._channels())

    def _busy(self):
        return bool(self._channels()) or self.ctx.stats.in_flight > 0

    def _stop_accepting(self):
        for srv in self.servers:
            if srv.accepting:
                for _ in range(SWEEP_MAX if refusing_new_clients(srv.socket) else 0):  # a stop: not reset
                    if not queued(srv.socket):
                        break
                    srv.handle_accept()
                srv.accepting = False
                srv.del_channel()
                try:
                    srv.socket.close()
                except OSError:
                    pass

    def _close_all(self):
        self._stop_accepting()
        for ch in self._channels():
            try:
                ch.handle_close()
            except Exception:  # noqa: BLE001 - closing what is left must not raise
                pass
        for srv in self.servers:
            try:
                srv.trigger.close()
            except Exception:  # noqa: BLE001
                pass

    def begin_drain(self):
        self._stop_accepting()
        if self.ctx.idle_close:
            for ch in self._channels():
                if ch.request is None and not ch.requests and not ch.total_outbufs_len:
                    # SHUT_RD, not close: bytes already queued are still read (and answered,
                    # with Connection: close); then waitress sees EOF and closes the channel.
                    try:
                        ch.socket.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass

    def quick_stop(self):
        self._quit = True

