"""The router's connections before they are routed: peeked at until they name their
host (fugue.sniff), or refused (an HTTP error, then a lingering close), each with its
deadline.

Who calls it: fugue.router, which accepts a connection, hands it to `peek`, and is
called back with `on_named(conn, kind, name)` once the host is known ("http" or
"tls"); it then routes it or refuses it here. What it promises: peeking consumes
nothing (MSG_PEEK), so the worker that gets the connection reads it whole; a
connection that names no host within sniff_timeout, or sends sniff_max_bytes
without one, is closed and counted; a refused client gets its answer before the
close (no RST eating it). One thread: the router's loop.
"""

import heapq
import logging
import socket

from .sniff import NEED_MORE, SniffError, sniff

log = logging.getLogger("fugue")

LINGER = 2.0               # seconds to read what a refused client still sends before closing
REPEEK = 0.02              # re-peek interval where poll ignores SO_RCVLOWAT (Unix listeners)
_REASONS = {400: "Bad Request", 421: "Misdirected Request", 503: "Service Unavailable"}


class Conn:
    """A connection being sniffed (state "sniff") or refused and lingering ("linger")."""

    __slots__ = ("sock", "peer", "tcp", "deadline", "seen", "lowat", "watched", "state")

    def __init__(self, sock, peer, tcp, deadline):
        self.sock = sock
        self.peer = peer
        self.tcp = tcp
        self.deadline = deadline
        self.seen = -1          # bytes peeked last time
        self.lowat = False      # SO_RCVLOWAT raised
        self.watched = False    # a reader in the loop
        self.state = "sniff"



class Sniffing:
    """The connections being sniffed (oldest first) or lingering, their deadlines and counters."""

    def __init__(self, loop, system, counters, timeout, max_bytes, on_named):
        self.loop = loop
        self.system = system
        self.counters = counters           # the router's (its status shows them)
        self.timeout = timeout             # sniff_timeout
        self.max_bytes = max_bytes         # sniff_max_bytes
        self.on_named = on_named           # (conn, kind, name): the host is known
        self.conns = {}                    # fd -> Conn (sniffing or lingering)
        self.sniffing = {}                 # fd -> Conn still naming its host, oldest first
        self.timers = []                   # heap of (deadline, seq, Conn)
        self.repeek = []                   # Conns to peek again (no SO_RCVLOWAT there)
        self.seq = 0

    def deadline_of_new(self):
        return self.system.monotonic() + self.timeout

    def step(self, now):
        """Expire what is due; peek again where poll cannot wait for more bytes."""
        while self.timers and self.timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(self.timers)
            if conn.state != "done" and conn.deadline == deadline:
                self.expire(conn)
        if self.repeek:
            due, self.repeek = self.repeek, []
            for conn in due:
                if conn.state == "sniff":
                    self.peek(conn)

    def deadline(self, now):
        """When `step` has something to do next, or None."""
        due = [d for d in (self.timers[0][0] if self.timers else None, now + REPEEK if self.repeek else None)
               if d is not None]
        return min(due, default=None)

    def peek(self, conn):
        try:
            data = conn.sock.recv(self.max_bytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            self.counters["reset"] += 1
            self.close(conn)
            return
        if data == b"":
            self.counters["closed_early"] += 1
            self.close(conn)
            return
        if data is not None and len(data) == conn.seen and conn.lowat:
            # Woken with nothing new although SO_RCVLOWAT asked for more: a FIN.
            self.counters["closed_early"] += 1
            self.close(conn)
            return
        result = NEED_MORE
        if data is not None and len(data) != conn.seen:
            try:
                result = sniff(data, self.max_bytes)
            except SniffError as e:
                self.counters["too_big" if len(data) >= self.max_bytes else "bad_request"] += 1
                log.debug("closing %s: %s", _peer_text(conn.peer), e)
                if data[:1] != b"\x16" and len(data) < self.max_bytes:
                    self.refuse(conn, 400, f"{e}")
                else:
                    self.close(conn)
                return
            conn.seen = len(data)
        if result is NEED_MORE:
            self.wait_for_more(conn)
            return
        self.on_named(conn, *result)

    def wait_for_more(self, conn):
        if conn.seen > 0 and conn.tcp:
            # Peeking consumes nothing, so the socket stays readable: ask the kernel
            # to wake us only once more bytes than we have seen are there (or a FIN).
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, conn.seen + 1)
            conn.lowat = True
        if conn.seen > 0 and not conn.tcp:
            self.unwatch(conn)             # AF_UNIX poll ignores SO_RCVLOWAT
            self.repeek.append(conn)
        elif not conn.watched:
            self.loop.add_reader(conn.sock, lambda: self.peek(conn))
            conn.watched = True
        if conn.sock.fileno() not in self.conns:
            self.conns[conn.sock.fileno()] = conn
            self.sniffing[conn.sock.fileno()] = conn
            self.push_timer(conn)

    def refuse(self, conn, status, text):
        """Answer an HTTP client with an error, then linger-close (RST would eat the answer)."""
        body = (text + "\n").encode("utf-8", "replace")
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            if conn.lowat:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                conn.lowat = False
            conn.sock.recv(self.max_bytes, socket.MSG_DONTWAIT)  # what we peeked: ours now
            conn.sock.send(head + body, socket.MSG_DONTWAIT)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        self.sniffing.pop(conn.sock.fileno(), None)
        conn.state = "linger"
        conn.deadline = self.system.monotonic() + LINGER
        self.unwatch(conn)
        self.loop.add_reader(conn.sock, lambda: self.discard(conn))
        conn.watched = True
        self.conns[conn.sock.fileno()] = conn
        self.push_timer(conn)

    def discard(self, conn):
        try:
            while conn.sock.recv(65536, socket.MSG_DONTWAIT):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close(conn)

    def expire(self, conn):
        if conn.state == "sniff":
            self.counters["timed_out"] += 1
            log.debug("closing %s: no host named within %.1fs", _peer_text(conn.peer), self.timeout)
        self.close(conn)

    def push_timer(self, conn):
        self.seq += 1
        heapq.heappush(self.timers, (conn.deadline, self.seq, conn))

    def unwatch(self, conn):
        if conn.watched:
            self.loop.remove_reader(conn.sock)
            conn.watched = False

    def forget(self, conn):
        self.conns.pop(conn.sock.fileno(), None)
        self.sniffing.pop(conn.sock.fileno(), None)
        conn.state = "done"

    def close(self, conn):
        self.unwatch(conn)
        self.forget(conn)
        conn.sock.close()


def _peer_text(peer):
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "?")
