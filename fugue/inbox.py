"""An app's inbox: accepted connections travel to its workers as messages.

Routed mode (fugue.router) owns the public listeners. For each app it makes a
SOCK_SEQPACKET socketpair, the inbox: the router keeps the sending end, the
app's master adopts the receiving end as its one listener (`bind =
["inbox:FD"]`) and hands it to its workers like any listener. Each routed
connection is one packet, a CONN message with the accepted descriptor attached
(SCM_RIGHTS) and {"peer": [...], "host": ...} as info.

Why a shared inbox and not the master forwarding to one worker at a time: the
kernel gives each packet to exactly one reader, as it gives each connection
of a shared listening socket to exactly one accept(). So the app master stays
out of the data path (one descriptor pass per connection, not two), a worker
busy with a request simply does not read, a reload needs nothing new (both
generations read the inbox until the old one closes its end), and a packet
queued while an app master restarts waits in the inbox like a connection in a
listen backlog.

What it promises: `Inbox` looks to an adapter like a non-blocking listening
stream socket: `accept()` returns (connection, client address) or raises
BlockingIOError, `listen()` does nothing, `type` says SOCK_STREAM (asyncio's
create_server(sock=...) checks it) and `family` AF_INET (waitress picks its
server class by it). The client address is the real one: the
descriptor is the client's TCP connection itself.
"""

import json
import os
import re
import socket
import struct

from . import protocol
from .fds import recv_with_fds

__all__ = ["Inbox", "inbox_pair", "send_connection", "take_back", "wrap_listeners"]


class Inbox(socket.socket):
    """The worker's end of an inbox, used wherever a listening socket is.

    `on_eof` (set by wrap_listeners) is called when the router has closed the
    inbox: the worker's to decide what that means (it drains).
    """

    __slots__ = ("on_eof",)

    @property
    def type(self):
        # Adapters (asyncio's create_server among them) insist on a stream
        # listener; what accept() returns is one.
        return socket.SOCK_STREAM

    @property
    def family(self):
        # What it carries: the router's TCP connections. Servers choose their
        # kind by the listener's family (waitress serves an AF_UNIX listener as
        # a Unix server, which reports every client as "localhost").
        return socket.AF_INET

    def listen(self, backlog=None):
        pass  # the router's listener has the backlog

    def getsockname(self):
        return ("0.0.0.0", 0)  # no address of its own (each connection knows its own); AF_INET-shaped

    def accept(self):
        """(connection, client address) of the next routed connection.

        Raises BlockingIOError when none is waiting (another worker may have
        taken it), as accept() on a non-blocking listener does. The connection
        is blocking unless a default timeout is set, again as accept() makes it.
        """
        while True:
            data, fds = recv_with_fds(self, 4096, 1)
            if not data and not fds:
                on_eof = getattr(self, "on_eof", None)
                if on_eof is not None:
                    on_eof()
                raise ConnectionAbortedError("the router closed the inbox")
            try:
                info = protocol.decode(data).get("info") or {}
            except protocol.ProtocolError:
                info = {}
            if not fds:
                continue  # nothing to serve in this packet
            conn = RoutedSocket(fileno=fds[0])
            for fd in fds[1:]:
                os.close(fd)
            conn.settimeout(socket.getdefaulttimeout())
            peer = info.get("peer")
            peer = tuple(peer) if isinstance(peer, list) else peer
            if info.get("via") == "http" and isinstance(info.get("host"), str) and isinstance(peer, tuple):
                from .adapters.base import routed_connections

                conn.routed_host = info["host"]  # later requests must name it too (421 otherwise)
                routed_connections[peer[:2]] = conn
            return conn, peer

    def __repr__(self):
        return f"<fugue Inbox fd={self.fileno()}>"


class RoutedSocket(socket.socket):
    """A connection from the router, with the host it was routed by (None: by TLS SNI)."""

    __slots__ = ("routed_host",)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.routed_host = None


def inbox_pair():
    """(router end, app end): the router's end is non-blocking; both close-on-exec."""
    router_end, app_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    router_end.setblocking(False)
    return router_end, app_end


def send_connection(inbox, conn_fd, info):
    """Router side: one routed connection as one packet. Raises BlockingIOError when full."""
    peer = info.get("peer")
    if (type(peer) is tuple and len(peer) == 2 and _PLAIN.fullmatch(peer[0]) and _PLAIN.fullmatch(info["host"])
            and info.get("via") in ("http", "tls") and len(info) == 3):
        # The common case without the JSON encoder: every piece is plain ASCII
        # (an IPv4 address, a host name as sniff normalised it).
        data = _CONN % (peer[0].encode(), peer[1], info["host"].encode(), info["via"].encode())
    else:
        data = json.dumps({"type": protocol.CONN, "info": info}, separators=(",", ":")).encode()
    return inbox.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", conn_fd))],
                         socket.MSG_DONTWAIT)


def take_back(app_end):
    """Router side: the connections still waiting in an inbox nobody serves, as (socket, info),
    without blocking (the app end is shared in blocking mode, so MSG_DONTWAIT)."""
    out = []
    while True:
        try:
            data, fds = recv_with_fds(app_end, 4096, 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:
            return out
        if not data and not fds:
            return out
        try:
            info = protocol.decode(data).get("info") or {}
        except protocol.ProtocolError:
            info = {}
        for fd in fds[1:]:
            os.close(fd)
        if fds:
            peer = info.get("peer")
            info["peer"] = tuple(peer) if isinstance(peer, list) else peer
            out.append((socket.socket(fileno=fds[0]), info))


_PLAIN = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_CONN = b'{"type":"conn","info":{"peer":["%s",%d],"host":"%s","via":"%s"}}'


def wrap_listeners(fds, described, on_eof=None):
    """Worker side: socket objects for the descriptors of HELLO, inboxes as Inbox.

    `described` is HELLO's list of Listener.describe() dicts, in descriptor order;
    `on_eof()` is called when the router closes an inbox.
    """
    out = []
    for i, fd in enumerate(fds):
        item = described[i] if i < len(described) and isinstance(described[i], dict) else {}
        if item.get("family") == "inbox":
            inbox = Inbox(fileno=fd)
            inbox.on_eof = on_eof
            out.append(inbox)
        else:
            out.append(socket.socket(fileno=fd))
    return out
