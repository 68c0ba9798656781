"""Helpers shared by the adapters of this package (not an adapter, not public).

- `positional_params`, `is_async`: what `accepts()` looks at to tell a WSGI
  callable from an ASGI one from an asyncio handler from a serve(sock).
- `at_eof(fd)`: whether a wake fd that stays readable after ctx.dispatch() is
  at EOF (the master is gone), so a loop can stop watching it instead of spinning.
- `WorkerBridge`: the worker's wake fds and heartbeat on an asyncio loop.
- `refusing_new_clients(sock)`, `queued(sock)`, `SWEEP_MAX`, `close_after_sweep(servers)`:
  on a graceful stop (the master has stopped new handshakes: fds.refuse_new_clients) a
  draining worker accepts what its listeners' queue already holds before it closes them,
  so the last process to close a listener resets nothing. On a reload it does not: the
  queue is the new generation's, and it closes its listeners at once.
"""

import asyncio
import inspect
import logging
import os
import select
import socket

log = logging.getLogger("fugue")


def positional_params(fn):
    """Names of the positional parameters of `fn` as called ("*" for *args); None if unknown."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            out.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            out.append("*")
    return out


def is_async(fn):
    """A coroutine function, or an object whose __call__ is one (ASGI app instances)."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def at_eof(fd):
    """True if the socket `fd` has reached EOF (peeked, nothing consumed)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        sock.close()


class WorkerBridge:
    """The worker's side of an asyncio loop: wake fds as readers, the heartbeat as a task.

    `on_tick` (optional, a plain function) runs with every beat, on the loop;
    beats come every `interval` seconds (at most ctx.tick_interval).
    """

    def __init__(self, ctx, on_tick=None, interval=1.0):
        self.ctx = ctx
        self.on_tick = on_tick
        self.interval = interval
        self.loop = None
        self._fds = []
        self._ticker = None

    def attach(self):
        """Call from a coroutine running on the loop."""
        self.loop = asyncio.get_running_loop()
        for fd in self.ctx.wake_fds():
            self.loop.add_reader(fd, self._dispatch, fd)
            self._fds.append(fd)
        self._ticker = self.loop.create_task(self._beat())

    def _dispatch(self, fd):
        self.ctx.dispatch()
        if fd in self._fds and at_eof(fd):  # the master is gone: stop watching, or spin
            self.loop.remove_reader(fd)
            self._fds.remove(fd)

    async def _beat(self):
        interval = min(self.ctx.tick_interval, self.interval)
        while True:
            self.ctx.tick()
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:  # noqa: BLE001 - keep beating
                    log.exception("fugue: tick failed")
            await asyncio.sleep(interval)

    def detach(self):
        for fd in self._fds:
            try:
                self.loop.remove_reader(fd)
            except (ValueError, RuntimeError):
                pass
        self._fds = []
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None


# At most this many connections are swept from a listener's queue at a drain: during a
# reload new ones keep coming (and the new generation takes them), so a sweep must end.
SWEEP_MAX = 256


SO_GET_FILTER = 26  # = SO_ATTACH_FILTER


def refusing_new_clients(sock):
    """True if the master stopped new handshakes on this listener (a graceful stop of the
    whole service: fds.refuse_new_clients), so what is queued must be accepted here."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, SO_GET_FILTER, 256))
    except (OSError, ValueError, AttributeError):
        return False


def queued(sock):
    """True if a connection waits in the accept queue of the listener `sock`."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (ValueError, OSError):  # closed
        return False


async def close_after_sweep(servers, settle=0.05):
    """Close asyncio servers without dropping a connection their loop already accepted.

    On a graceful stop of the whole service (the master refuses new handshakes) what is
    queued is accepted here first; on a reload the queue is the new generation's. Then
    accepting stops, and the loop runs once more before the servers close: asyncio
    accepts in one callback and attaches the connection to its server in a task that
    runs on the next pass, and a Server.close() in between makes that task fail (3.11:
    Server._attach asserts the server is open), so the accepted socket was dropped and
    its client saw a reset. `settle` seconds more let the accepted connections get going.
    """
    socks = [sock for srv in servers for sock in (srv.sockets or ())]
    if any(refusing_new_clients(sock) for sock in socks):
        for _ in range(SWEEP_MAX):
            if not any(queued(sock) for sock in socks):
                break
            await asyncio.sleep(0)  # one loop pass: asyncio accepts on readiness
    loop = asyncio.get_running_loop()
    for sock in socks:
        loop.remove_reader(sock.fileno())  # stop accepting; the listener stays open
    for _ in range(2):  # the attach tasks of the last accepts run on the next pass
        await asyncio.sleep(0)
    for srv in servers:
        srv.close()
    await asyncio.sleep(settle)
