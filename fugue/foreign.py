"""Foreign workers: any program, in any language, as a worker.

Who calls it: the master, when its target is {"command": [...]}. The program
gets the listeners at fd 3.. with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES
(workers.spawn), FUGUE_WORKER_ID and FUGUE_GENERATION, and is READY either
after `stable_after` seconds up (policy.decide, from the worker's ready_at) or,
with ready_mode=notify, when it says READY=1 on its own NOTIFY_SOCKET: the
sd_notify protocol, so a program that supports systemd's Type=notify works
unchanged.

Each worker gets its own datagram socket, so a message needs no pid to be
attributed. The socket is in the abstract namespace ("@fugue-..."), which
sd_notify implementations accept, because a path in the master's 0700 run
directory would be out of reach of workers that run as another user; instead
the kernel's SCM_CREDENTIALS on every datagram (SO_PASSCRED) must name the
workers' uid or root, and the sender's pid must be the worker's own or one of its
descendants (systemd's NotifyAccess=main|all): anyone can read the abstract name
from /proc/net/unix, and a forged READY=1 would declare serving a generation that
never listened. A sender that has exited before the master reads its datagram
cannot be placed and is dropped too: notify from the worker itself (or `exec`).
"""

import os
import secrets
import socket
import struct

from .fds import bind_unix_path

_UCRED = struct.Struct("3i")  # pid, uid, gid
MAX_DATAGRAM = 4096


class NotifySocket:
    """One foreign worker's NOTIFY_SOCKET, read in the master's loop (also the router's
    socket for each app's master)."""

    def __init__(self, slot=None, generation=None, allowed_uids=(), path=None):
        """`path`: bind this file (mode 0600), for a reader in a private directory
        (the router reading its app masters), instead of an abstract name."""
        self.address = path or f"@fugue-{os.getpid()}-{slot}-{generation}-{secrets.token_hex(4)}"
        self.allowed = set(allowed_uids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if path:
                bind_unix_path(self.sock, path)
                os.chmod(path, 0o600)
            else:
                self.sock.bind("\0" + self.address[1:])
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def fileno(self):
        return self.sock.fileno()

    def read(self, main_pid=None):
        """[(fields dict, sender pid)] of the datagrams waiting; others' are dropped.

        Returns (messages, dropped) where dropped counts datagrams from a uid
        that may not speak for this worker, or from a process that is neither
        `main_pid` (the worker) nor one of its descendants. No `main_pid`: any
        process of an allowed uid (a socket in a private directory: the router's).
        """
        messages, dropped = [], 0
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            creds = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    creds = _UCRED.unpack(payload[:_UCRED.size])
            if creds is None or creds[1] not in self.allowed or (
                    main_pid is not None and not descends_from(creds[0], main_pid)):
                dropped += 1
                continue
            messages.append((parse(data), creds[0]))
        return messages, dropped

    def close(self):
        self.sock.close()


def descends_from(pid, ancestor):
    """True if `pid` is `ancestor` or, through its parents in /proc, a descendant of it."""
    for _ in range(256):  # deeper than any real tree; a loop here would be a kernel bug
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def parse(data):
    """b'READY=1\\nSTATUS=warming up' -> {"READY": "1", "STATUS": "warming up"}."""
    out = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            out[key.strip()] = value
    return out


class StderrTail:
    """A foreign worker's stderr, through the master: written on to the log unchanged, and its
    last line kept, so a program that dies before READY is reported with its own last words
    ("exited with status 1: last stderr line: Error: Cannot find module 'express'").

    The worker's stderr is the write end of a pipe; the master reads the other end in its
    loop (non-blocking) for the worker's life. Its stdout goes to the log directly."""

    MAX_LINE = 500

    def __init__(self, log_fd):
        self.log_fd = log_fd
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.partial = b""
        self.last = None

    def fileno(self):
        return self.read_fd

    def child_started(self):
        """The worker has its copy: ours of the write end goes, so EOF means it is gone."""
        os.close(self.write_fd)
        self.write_fd = None

    def read(self):
        """Everything that is there now: passed on to the log; the last line remembered."""
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            self._write_on(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()[-self.MAX_LINE:]
            for line in reversed(lines):
                if line.strip():
                    self.last = line.strip()[-self.MAX_LINE:].decode(errors="replace")
                    break

    def _write_on(self, data):
        fd = self.log_fd if self.log_fd is not None else 2
        while data:
            try:
                data = data[os.write(fd, data):]
            except InterruptedError:
                continue
            except OSError:
                return

    def last_line(self):
        if self.partial.strip():
            return self.partial.strip().decode(errors="replace")
        return self.last

    def close(self):
        for fd in (self.read_fd, self.write_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = None
