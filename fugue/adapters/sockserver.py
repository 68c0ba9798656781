"""socketserver.BaseServer (http.server included), and bare BaseRequestHandler classes.

Replaces serve_forever with one selectors loop over the listeners and the
worker's wake fds, so the worker has one wait point and heartbeats come from
the loop that accepts (a wedged loop stops them).

Draining (graceful stop): the listeners leave the selector at once; requests
in flight finish; an HTTP response sent while draining carries
`Connection: close`; an idle keep-alive connection is left open until its
client sends the next request (answered with `Connection: close`) or closes it
-- closing it under a client that may be sending at that very moment is the
keep-alive race this avoids. At the graceful deadline whatever is left is shut.
"""

import http.server
import selectors
import socket
import socketserver
import threading
import time

from . import _warmup
from ._util import SWEEP_MAX, queued, refusing_new_clients
from .base import MISDIRECTED, Adapter, misdirected


def _no_delay(sock):
    """TCP_NODELAY: http.server writes the head and the body separately, and Nagle plus the
    client's delayed ACK would hold every keep-alive response back about 40 ms."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class SocketServerAdapter(Adapter):
    kind = "socketserver"

    @classmethod
    def accepts(cls, target):
        return isinstance(target, socketserver.BaseServer)

    def __init__(self, target, options):
        super().__init__(target, options)
        self.server = target
        self._conns = set()
        self._conns_lock = threading.Lock()
        self._idle = set()  # HTTP connections whose handler waits for the next request
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._quit = False
        self._sel = None

    # -- connection bookkeeping, called from handler threads -------------------

    def _opened(self, sock):
        with self._conns_lock:
            self._conns.add(sock)
        self.ctx.stats.connection_opened()

    def _closed(self, sock):
        with self._conns_lock:
            self._conns.discard(sock)
        self.ctx.stats.connection_closed()
        if self.ctx.draining:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def _wrap_handler(self):
        """Subclass the app's handler to count, and to say Connection: close while draining."""
        adapter = self
        access = getattr(self.ctx, "access", None)
        base = self.server.RequestHandlerClass
        if getattr(base, "_fugue_wrapped", False):
            return
        if issubclass(base, http.server.BaseHTTPRequestHandler):
            class Handler(base):
                _fugue_wrapped = True

                def setup(self):
                    super().setup()
                    _no_delay(self.request)
                    adapter._opened(self.request)

                def finish(self):
                    try:
                        super().finish()
                    finally:
                        adapter._closed(self.request)

                def handle_one_request(self):
                    self._fugue_counted = False
                    adapter._idle.add(self.request)  # until parse_request: waiting for a request line
                    try:
                        super().handle_one_request()
                    finally:
                        adapter._idle.discard(self.request)
                        if self._fugue_counted:
                            adapter.ctx.stats.request_finished()
                            if access is not None:
                                self._fugue_access()

                def parse_request(self):
                    adapter._idle.discard(self.request)
                    self._fugue_started, self._fugue_wall = time.monotonic(), time.time()
                    self._fugue_status, self._fugue_sent = "-", {}
                    ok = super().parse_request()
                    self._fugue_counted = True
                    adapter.ctx.stats.request_started(f"{self.command} {self.path}")
                    if ok and misdirected(self.client_address, self.headers.get("Host")):
                        self.close_connection = True
                        self.send_response(421, "Misdirected Request")
                        self.send_header("Content-Type", "text/plain")
                        self.send_header("Content-Length", str(len(MISDIRECTED)))
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(MISDIRECTED)
                        return False
                    return ok

                def send_response_only(self, code, message=None):
                    self._fugue_status = code
                    super().send_response_only(code, message)

                def send_header(self, keyword, value):
                    if access is not None and getattr(self, "_fugue_counted", False):
                        self._fugue_sent[keyword.lower()] = str(value)
                    super().send_header(keyword, value)

                def _fugue_access(self):
                    path, _, query = (self.path or "").partition("?")
                    remote = self.client_address[0] if isinstance(self.client_address, tuple) else None
                    length = self._fugue_sent.get("content-length", "")
                    access.request(
                        remote=remote or None, method=self.command or "-", path=path, query=query,
                        protocol=self.request_version or "-", status=self._fugue_status,
                        length=int(length) if length.isdigit() else 0,
                        started=self._fugue_started, wall=self._fugue_wall,
                        request_headers={k.lower(): v for k, v in (getattr(self, "headers", None) or {}).items()},
                        response_headers=self._fugue_sent)

                def end_headers(self):
                    if (adapter.ctx.draining or adapter.ctx.lb_draining) and not self.close_connection:
                        self.send_header("Connection", "close")
                    super().end_headers()
        else:
            class Handler(base):
                _fugue_wrapped = True

                def setup(self):
                    super().setup()
                    adapter._opened(self.request)
                    adapter.ctx.stats.request_started()

                def finish(self):
                    try:
                        super().finish()
                    finally:
                        adapter.ctx.stats.request_finished()
                        adapter._closed(self.request)

        Handler.__name__ = base.__name__
        Handler.__qualname__ = base.__qualname__
        self.server.RequestHandlerClass = Handler

    # -- Adapter ------------------------------------------------------------

    def run(self, ctx):
        self.ctx = ctx
        server = self.server
        own = getattr(server, "socket", None)
        if own is not None and own not in ctx.listeners:
            own.close()  # bound by the app itself: fugue's listener replaces it
        for sock in ctx.listeners:
            sock.setblocking(False)  # several workers race for accept()
        server.socket = ctx.listeners[0] if ctx.listeners else None
        if server.socket is not None:
            server.server_address = server.socket.getsockname()
            if hasattr(server, "server_name") and isinstance(server.server_address, tuple):
                host, port = server.server_address[:2]
                server.server_name, server.server_port = host, port
        if issubclass(server.RequestHandlerClass, http.server.BaseHTTPRequestHandler):
            reason = _warmup.first_failure(ctx, lambda path, host: _warmup.call_socketserver(server, path, host))
            if reason:
                ctx.fail(reason)
        self._wrap_handler()
        sel = self._sel = selectors.DefaultSelector()
        for sock in ctx.listeners:
            sel.register(sock, selectors.EVENT_READ, sock)
        for fd in ctx.wake_fds():
            sel.register(fd, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        ctx.serving()
        try:
            while not self._quit:
                timeout = ctx.tick_interval
                if ctx.draining:
                    if not self._busy():
                        break
                    timeout = min(timeout, max(0.0, ctx.graceful_deadline - time.monotonic()))
                    if timeout == 0.0:
                        self._shut_all()
                        break
                for key, _ in sel.select(timeout):
                    if key.data is not None:
                        if ctx.draining:
                            continue
                        server.socket = key.data
                        server._handle_request_noblock()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        ctx.dispatch()
                        if ctx.master_gone and key.fileobj == ctx.channel.fileno():
                            sel.unregister(key.fileobj)  # readable at EOF forever: no busy loop
                server.service_actions()
                ctx.tick()
        finally:
            sel.close()

    def _busy(self):
        with self._conns_lock:
            return bool(self._conns) or self.ctx.stats.in_flight > 0

    def _drain_wake(self):
        try:
            while self._wake_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def begin_drain(self):
        if self._sel is None:
            return
        for sock in self.ctx.listeners:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            self.server.socket = sock
            for _ in range(SWEEP_MAX if refusing_new_clients(sock) else 0):  # a stop: not reset at close
                if not queued(sock):
                    break
                self.server._handle_request_noblock()
            sock.close()
        if self.ctx.idle_close:
            # SHUT_RD: a handler blocked on an idle connection reads EOF and ends; one that
            # has just read a request line still answers it (writes are not shut).
            for sock in list(self._idle):
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def quick_stop(self):
        self._quit = True
        self._shut_all()

    def _shut_all(self):
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

class HandlerAdapter(SocketServerAdapter):
    """A BaseRequestHandler class: served by a ThreadingTCPServer (or HTTP server) fugue makes."""

    kind = "handler"

    @classmethod
    def accepts(cls, target):
        return isinstance(target, type) and issubclass(target, socketserver.BaseRequestHandler)

    def __init__(self, target, options):
        if issubclass(target, http.server.BaseHTTPRequestHandler):
            server = http.server.ThreadingHTTPServer(("", 0), target, bind_and_activate=False)
        else:
            server = socketserver.ThreadingTCPServer(("", 0), target, bind_and_activate=False)
        server.daemon_threads = True
        super().__init__(server, options)
