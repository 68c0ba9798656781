"""Anything else: a plain callable `serve(sock)` or `serve(sock, *, stop)`.

`serve` is called once per listener, each in its own thread, with a socket
object for that listener (a duplicate of fugue's descriptor). The worker's main
thread keeps the wait point: it dispatches master messages and signals and
sends the heartbeat (so a wedged `serve` is not detected by the heartbeat:
that is the price of running arbitrary blocking code).

How `serve` learns to stop (graceful stop / reload):
- `sock.accept()` raises OSError(EBADF) once the worker drains (on a graceful
  stop of the service, once nothing is left in the listener's queue), as on a
  closed socket, so the usual `while True: conn, _ = sock.accept()` loop ends.
- A `stop` parameter (any callable with one gets it by keyword) is a
  threading.Event set when the drain begins; `stop.fileno()` becomes readable
  then, for serve loops that select() on the listener themselves.
After `serve` returns, fugue waits for the connections it accepted to be
closed and for the non-daemon threads `serve` started, until the graceful
deadline, then the worker exits. fugue cannot see the app's protocol, so an
idle keep-alive connection is the app's to end (it sees `stop`).

READY: when `serve` first calls `sock.accept()`, or once it has run for half
a second (for apps that hand the descriptor to another library); with the
wait_ready option the app says it with `fugue.ready()`.

Counting: a connection accepted through `sock.accept()` is one request, open
until closed. In routed mode the socket is the app's inbox, which accept()
reads like a listener.
"""

import errno
import inspect
import logging
import os
import selectors
import socket
import sys
import threading
import time
import traceback

from ._util import at_eof, refusing_new_clients
from .base import Adapter

log = logging.getLogger("fugue")

READY_AFTER = 0.5


class Stop(threading.Event):
    """Set when the worker starts to drain; `fileno()` is readable from then on."""

    def __init__(self):
        super().__init__()
        self._r, self._w = os.pipe()

    def set(self):
        if not self.is_set():
            super().set()
            try:
                os.write(self._w, b"\0")
            except OSError:
                pass

    def fileno(self):
        return self._r


class _Conn(socket.socket):
    """An accepted connection that tells the adapter when it is closed."""

    __slots__ = ["_fugue_adapter"]

    def _real_close(self, *args):
        adapter, self._fugue_adapter = getattr(self, "_fugue_adapter", None), None
        if adapter is not None:
            adapter._conn_closed(self)
        super()._real_close(*args)


class _Listener(socket.socket):
    """The socket `serve` gets: accept() stops at the drain.

    The descriptor stays non-blocking (its open file is shared with every worker
    and the master, and several workers race for each connection); the blocking
    mode and timeout the app sets are kept here and honoured by accept().
    """

    __slots__ = ["_fugue_adapter", "_fugue_timeout"]

    def settimeout(self, value):
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._fugue_timeout = None if value is None else float(value)

    def gettimeout(self):
        return self._fugue_timeout

    def setblocking(self, flag):
        self._fugue_timeout = None if flag else 0.0

    def getblocking(self):
        return self._fugue_timeout != 0.0

    def accept(self):
        adapter = self._fugue_adapter
        adapter._app_accepts()
        timeout = self._fugue_timeout
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            if adapter.stop.is_set() and not adapter.sweeping(self):
                self.close()  # a reload: what is queued is the new generation's
                raise OSError(errno.EBADF, "fugue is draining: this worker accepts no more connections")
            try:
                fd, addr = self._accept()
            except (BlockingIOError, InterruptedError):
                # Nothing waiting, or another worker took it. Draining, what was queued has
                # been taken (not left to be reset when the last copy closes): stop here.
                if adapter.stop.is_set():
                    self.close()
                    raise OSError(errno.EBADF, "fugue is draining: this worker accepts no more connections")
            except OSError:
                if adapter.stop.is_set():
                    raise OSError(errno.EBADF, "fugue is draining: this worker accepts no more connections")
                raise
            else:
                conn = socket.socket(self.family, self.type, self.proto, fileno=fd)
                if timeout is None and socket.getdefaulttimeout() is None:
                    conn.setblocking(True)
                return adapter._counted(conn, addr), addr
            left = None if deadline is None else deadline - time.monotonic()
            if timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no connection waiting")
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            adapter._wait_accept(self, left)


class CallableAdapter(Adapter):
    kind = "callable"

    @classmethod
    def accepts(cls, target):
        """A plain callable with exactly one required positional parameter (the socket)."""
        if isinstance(target, type) or not callable(target):
            return False
        if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None)):
            return False
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return False
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        return len(required) == 1 and len(positional) <= 1 + ("stop" in sig.parameters)

    def __init__(self, target, options):
        super().__init__(target, options)
        self.stop = Stop()
        self.ctx = None
        self.threads = []
        self.listening = []  # our _Listener copies: closed by accept() once drained, or at the end
        self._sweep = None   # a graceful stop (sweep the queue) or a reload (do not); known at the drain
        self.failed = None
        self._quit = False
        self._accepting = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- called from the app's threads ---------------------------------------------

    def _app_accepts(self):
        if not self._accepting:
            self._accepting = True
            self._poke()

    def _wait_accept(self, listener, timeout):
        with selectors.DefaultSelector() as sel:
            try:
                sel.register(listener, selectors.EVENT_READ)
            except (ValueError, OSError):
                return False  # closed by the drain meanwhile: accept() says EBADF
            sel.register(self.stop.fileno(), selectors.EVENT_READ)
            ready = sel.select(timeout)
        return bool(ready)

    def _counted(self, sock, addr):
        conn = _Conn(sock.family, sock.type, sock.proto, fileno=sock.detach())
        conn._fugue_adapter = self
        self.ctx.stats.connection_opened()
        self.ctx.stats.request_started(f"connection from {addr}", ("plain", id(conn)))
        return conn

    def _conn_closed(self, conn):
        self.ctx.stats.request_finished(("plain", id(conn)))
        self.ctx.stats.connection_closed()
        self._poke()

    def _poke(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    @staticmethod
    def _drain(sock):
        try:
            while sock.recv(256):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    # -- Adapter -------------------------------------------------------------------

    def _call(self, listener):
        try:
            sig = inspect.signature(self.target)
            if "stop" in sig.parameters:
                self.target(listener, stop=self.stop)
            else:
                self.target(listener)
        except BaseException as e:  # noqa: BLE001 - reported to the worker's main thread
            if not self.stop.is_set():
                traceback.print_exc()
                self.failed = self.failed or f"{type(e).__name__}: {e}"
        finally:
            self._poke()

    def run(self, ctx):
        self.ctx = ctx
        started = time.monotonic()
        for sock, name in zip(ctx.listeners, ctx.listener_names or [None] * len(ctx.listeners)):
            mine = _Listener(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
            socket.socket.setblocking(mine, False)
            mine._fugue_adapter = self
            mine._fugue_timeout = None
            self.listening.append(mine)
            sock.close()
            t = threading.Thread(target=self._call, args=(mine,), name=f"fugue-serve-{name or 'l'}",
                                 daemon=True)
            self.threads.append(t)
        sel = selectors.DefaultSelector()
        wake = list(ctx.wake_fds())
        for fd in wake:
            sel.register(fd, selectors.EVENT_READ, "ctx")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for t in self.threads:
            t.start()
        ready = False
        try:
            while not self._quit:
                if not ctx.draining and not any(t.is_alive() for t in self.threads):
                    self._serve_returned(ready)
                    break
                if not ready and (self._accepting or time.monotonic() - started >= READY_AFTER):
                    ready = True
                    ctx.serving()
                timeout = ctx.tick_interval if ready else max(0.01, started + READY_AFTER - time.monotonic())
                if ctx.draining:
                    if not self._busy():
                        break
                    left = ctx.graceful_deadline - time.monotonic()
                    if left <= 0:
                        log.info("graceful timeout: %d connection(s) still open", ctx.stats.connections)
                        break
                    timeout = min(timeout, left, 0.1)
                for key, _ in sel.select(min(timeout, ctx.tick_interval)):
                    if key.data == "wake":
                        self._drain(self._wake_r)
                        continue
                    ctx.dispatch()
                    if key.fd in wake and at_eof(key.fd):  # the master is gone: or we would spin
                        sel.unregister(key.fd)
                        wake.remove(key.fd)
                ctx.tick()
        finally:
            sel.close()
            for listener in self.listening:
                listener.close()

    def _serve_returned(self, ready):
        if self.failed:
            log.error("serve() failed: %s", self.failed)
            fail = getattr(self.ctx, "fail", None)
            if not ready and fail is not None:
                fail(f"serve() failed: {self.failed}")
            sys.stdout.flush()
            raise SystemExit(1)
        log.info("serve() returned: the worker exits")

    def _busy(self):
        if any(t.is_alive() for t in self.threads):
            return True
        if self.ctx.stats.connections > 0:
            return True
        me = threading.current_thread()
        main = threading.main_thread()
        return any(t.is_alive() and not t.daemon and t not in (me, main) for t in threading.enumerate())

    def sweeping(self, listener):
        """Draining on a graceful stop: accept() takes what is queued before it says EBADF."""
        if self._sweep is None:
            self._sweep = refusing_new_clients(listener)
        return self._sweep

    def begin_drain(self):
        self.stop.set()  # accept() says EBADF (on a stop: once the queue is empty) and closes

    def quick_stop(self):
        self._quit = True
        self.stop.set()

