"""Listening sockets and descriptor passing.

Binds or adopts listeners (TCP v4/v6, Unix, systemd LISTEN_FDS), and moves
descriptors over Unix sockets with SCM_RIGHTS. Every descriptor we create or
receive is close-on-exec (Python's default, and MSG_CMSG_CLOEXEC on receive:
`socket.recv_fds` ignores its flags on 3.11).
"""

import array
import errno
import os
import socket
import stat
import struct

from .errors import FugueError

SD_LISTEN_FDS_START = 3
MAX_FDS = 64
UNIX_PATH_MAX = 107


class Listener:
    """A named listening socket and how to describe it to a peer."""

    def __init__(self, sock, name, spec):
        self.sock = sock
        self.name = name
        self.spec = spec  # what the user wrote, or "fd:N"

    def describe(self):
        fam = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}.get(
            self.sock.family, str(self.sock.family))
        if self.sock.type == socket.SOCK_SEQPACKET:  # routed mode: workers wrap it as fugue.inbox.Inbox
            return {"name": self.name, "family": "inbox", "address": "inbox", "spec": self.spec}
        return {"name": self.name, "family": fam, "address": address_text(self.sock), "spec": self.spec}

    def fileno(self):
        return self.sock.fileno()


def address_text(sock):
    """host:port, [v6]:port or unix:path of a bound socket."""
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        return "unix:" + (addr if isinstance(addr, str) else addr.decode(errors="replace"))
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def parse_bind(spec):
    """'127.0.0.1:4000', '[::1]:4000', ':4000', '4000', 'unix:/p', 'fd:3' -> (kind, address)."""
    if not isinstance(spec, str) or not spec:
        raise FugueError(f"bad bind address {spec!r}")
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise FugueError(f"bad bind address {spec!r}: empty path")
        return "unix", path
    if spec.startswith("/") or spec.startswith("./"):
        return "unix", spec
    if spec.startswith("fd:") or spec.startswith("fd://"):
        num = spec.split(":", 1)[1].lstrip("/")
        if not num.isdigit():
            raise FugueError(f"bad bind address {spec!r}: fd needs a number")
        return "fd", int(num)
    if spec.startswith("inbox:"):  # routed mode: an app's inbox, inherited from the router
        num = spec[len("inbox:"):]
        if not num.isdigit():
            raise FugueError(f"bad bind address {spec!r}: inbox needs a descriptor number")
        return "inbox", int(num)
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "", spec
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise FugueError(f"bad bind address {spec!r}: port must be a number from 0 to 65535")
    return "tcp", (host or None, int(port))


def bind_tcp(host, port, backlog):
    """Bind host:port (None = all interfaces, dual-stack where possible)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FugueError(f"cannot resolve {host!r}: {e.strerror}") from None
    if host is None:
        # All interfaces: prefer one dual-stack IPv6 socket, as gunicorn's "[::]" does.
        infos.sort(key=lambda i: i[0] != socket.AF_INET6)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host is None else 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        shown = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise FugueError(f"port {port} already in use ({shown})") from None
        if e.errno == errno.EACCES:
            raise FugueError(f"permission denied binding {shown}: ports below 1024 need root "
                             "or CAP_NET_BIND_SERVICE") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise FugueError(f"cannot bind {shown}: address not available on this machine") from None
        raise FugueError(f"cannot bind {shown}: {e.strerror}") from None
    return sock


def bind_unix(path, backlog):
    """Bind a Unix socket; a stale socket file (nobody listening) is replaced."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise FugueError(f"unix socket path too long ({len(os.fsencode(path))} bytes, "
                         f"at most {UNIX_PATH_MAX}): {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FugueError(f"cannot bind unix:{path}: directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FugueError(f"cannot bind unix:{path}: a file that is not a socket is in the way")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        except OSError as e:
            raise FugueError(f"cannot bind unix:{path}: {e.strerror}") from None
        else:
            raise FugueError(f"unix:{path} is in use: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise FugueError(f"cannot bind unix:{path}: {e.strerror}") from None
    return sock


def adopt_fd(fd):
    """A listening socket we inherited (LISTEN_FDS or fd:N); it must be a listening stream."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise FugueError(f"fd {fd} is not a usable socket: {e.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise FugueError(f"fd {fd} is not a listening stream socket")
    sock.set_inheritable(False)
    return sock


def adopt_inbox(fd):
    """Routed mode: the app end of an inbox (fugue.inbox), inherited from the router."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise FugueError(f"inbox fd {fd} is not a usable socket: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise FugueError(f"inbox fd {fd} is not a Unix SOCK_SEQPACKET socket")
    sock.set_inheritable(False)
    return sock


def systemd_listeners():
    """Listeners passed by systemd socket activation, or [] if none are for us.

    The variables are removed so that nothing we exec inherits them by accident.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    names = names.split(":") if names else []
    out = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out.append(Listener(adopt_fd(fd), name, f"fd:{fd}"))
    return out


def open_listeners(binds, backlog):
    """Bind every spec in `binds`; on any error, close what was bound and raise."""
    out = []
    try:
        for i, spec in enumerate(binds):
            kind, addr = parse_bind(spec)
            if kind == "tcp":
                sock = bind_tcp(addr[0], addr[1], backlog)
            elif kind == "unix":
                sock = bind_unix(addr, backlog)
            elif kind == "inbox":
                sock = adopt_inbox(addr)
            else:
                sock = adopt_fd(addr)
            out.append(Listener(sock, f"l{i}", spec))
    except BaseException:
        close_listeners(out)
        raise
    return out


# A classic BPF socket filter that drops TCP segments with SYN set and ACK clear (new
# connection attempts) and lets everything else through. The filter sees the TCP header
# at offset 0; byte 13 holds the flags (ACK 0x10, SYN 0x02).
_DROP_SYN = [
    (0x30, 0, 0, 13),           # ldb [13]
    (0x54, 0, 0, 0x12),         # and #(SYN|ACK)
    (0x15, 0, 1, 0x02),         # jeq #SYN, drop, pass
    (0x06, 0, 0, 0),            # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),   # ret #-1: pass
]
SO_ATTACH_FILTER = 26


def refuse_new_clients(listeners):
    """Graceful stop: make our own TCP listeners take no new handshake, at once, in every
    process that holds them, while what the kernel already queued stays to be accepted.

    Closing the listeners is not enough under load: whichever process closes the last copy
    resets the connections that completed their handshake since its last accept(). With
    the filter, a SYN arriving from now on is dropped; the workers accept what is queued
    (their drain sweeps it) and close; the client's SYN retransmission then finds no
    listener and is refused. Adopted sockets (fd:N, systemd's) are left alone: they outlive
    this master and would keep the filter. Returns how many listeners got it.
    """
    import ctypes

    prog = b"".join(struct.pack("HBBI", *ins) for ins in _DROP_SYN)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(buf))
    done = 0
    for lst in listeners:
        if lst.sock.family not in (socket.AF_INET, socket.AF_INET6) or str(lst.spec).startswith("fd:"):
            continue
        try:
            lst.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            done += 1
        except OSError:
            pass  # no BPF: closing alone still refuses, with a small reset window at the end
    return done


def close_listeners(listeners, unlink=False):
    for lst in listeners:
        path = None
        # An adopted socket (fd:N, systemd's LISTEN_FDS) belongs to whoever bound it: a
        # socket unit must still be there for the next activation.
        if unlink and lst.sock.family == socket.AF_UNIX and not str(lst.spec).startswith("fd:"):
            try:
                path = lst.sock.getsockname()
            except OSError:
                path = None
        lst.sock.close()
        if path and isinstance(path, str) and not path.startswith("\0"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _via_directory(op, sock, path):
    """bind/connect a Unix socket whose path may exceed sun_path (107 bytes).

    A deep tmp_path is legitimate, so a long path is reached relative to its
    directory (chdir there, use the base name, chdir back). The master is
    single-threaded, so the working directory is ours to borrow for a moment.
    """
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return op(path)
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(os.path.dirname(path))
        return op(os.path.basename(path))
    finally:
        os.fchdir(here)
        os.close(here)


def bind_unix_path(sock, path):
    return _via_directory(sock.bind, sock, path)


def connect_unix_path(sock, path):
    return _via_directory(sock.connect, sock, path)


def send_with_fds(sock, data, fds):
    """One packet with descriptors attached (SCM_RIGHTS)."""
    if not fds:
        return sock.send(data)
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def recv_with_fds(sock, bufsize, maxfds=MAX_FDS, flags=0):
    """(data, [fds]) from one packet; fds arrive close-on-exec. Truncated control data closes them.

    `flags` are added to recvmsg's (MSG_DONTWAIT, on a socket shared in blocking mode)."""
    data, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * 4),
                                           socket.MSG_CMSG_CLOEXEC | flags)
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    fds = list(fds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "truncated message or descriptors")
    return data, fds


def read_messages(sock, on_bad=None):
    """Every message waiting on a non-blocking SOCK_SEQPACKET socket: (messages, eof).

    A frame that is not a valid message goes to `on_bad(error)` and is skipped.
    Descriptors are not expected here: received without room for them, the kernel
    closes any a peer attached.
    """
    from . import protocol

    messages = []
    while True:
        try:
            data = sock.recv(protocol.MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return messages, False
        except OSError:
            return messages, True
        if not data:
            return messages, True
        try:
            messages.append(protocol.decode(data))
        except protocol.ProtocolError as e:
            if on_bad is not None:
                on_bad(e)


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def private_dir(parent, prefix):
    """A fresh 0700 directory under `parent`, which must be safe to create it in
    (see check_private_parent)."""
    import tempfile

    check_private_parent(parent)
    try:
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as e:
        raise FugueError(f"tmp_path {parent} is not writable: {e.strerror}") from None


def check_private_parent(parent):
    """Refuse a tmp_path that is a symlink to someone else's directory, is not a
    directory, is owned by another user, or is writable by others without the
    sticky bit (someone could swap our directories under us)."""
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        raise FugueError(f"tmp_path {parent} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(parent)
        st = os.stat(real)
        if st.st_uid not in (0, os.getuid()):
            raise FugueError(f"tmp_path {parent} is a symlink to a directory owned by someone else")
    if not stat.S_ISDIR(st.st_mode):
        raise FugueError(f"tmp_path {parent} is not a directory")
    if st.st_uid not in (0, os.getuid()):  # its owner may rename or replace anything in it
        raise FugueError(f"tmp_path {parent} is owned by uid {st.st_uid}; refusing "
                         "(use a directory of your own, or a sticky one like /tmp owned by root)")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise FugueError(f"tmp_path {parent} is world-writable without the sticky bit; refusing")


def others_can_write(st):
    """True if someone other than us and root may add, rename or remove entries of the
    directory whose stat is `st`, and the sticky bit does not stop them (it keeps them
    off entries they do not own)."""
    if st.st_mode & stat.S_ISVTX:
        return False
    return (st.st_uid not in (0, os.geteuid())  # its owner can chmod it at will
            or bool(st.st_mode & stat.S_IWOTH)
            or bool(st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid())))


def shared_dir(st):
    """True if others may write the directory at all (sticky or not): names in it may be
    planted by another user, so nothing found there is trusted as ours."""
    return (st.st_uid not in (0, os.geteuid()) or bool(st.st_mode & stat.S_IWOTH)
            or bool(st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid())))


def open_safely(path, flags, mode=0o600, what="file"):
    """Open `path` as a regular file without following a symlink, without blocking on a
    planted FIFO, and only in a directory no other user can rearrange under us.

    Returns a close-on-exec descriptor; FugueError (one line) otherwise. The directory is
    opened first and the file relative to it, so the directory checked is the one used.
    """
    parent, name = os.path.split(path)
    parent = parent or "."
    where = what + " directory"
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FugueError(f"{where} {parent} does not exist") from None
    except NotADirectoryError:
        raise FugueError(f"{where} {parent} is not a directory") from None
    except OSError as e:
        raise FugueError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        if others_can_write(os.fstat(dfd)):
            raise FugueError(f"{what} {path}: its directory is writable by another user without the "
                             "sticky bit; refusing (they could swap the file for a link)")
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as e:
            try:  # O_CREAT on another user's link in a sticky directory fails EACCES, not ELOOP
                link = stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode)
            except OSError:
                link = False
            if e.errno == errno.ELOOP or link:
                raise FugueError(f"{what} {path} is a symlink; refusing to follow it") from None
            if e.errno == errno.ENXIO:  # a FIFO nobody reads
                raise FugueError(f"{what} {path} is not a regular file; refusing") from None
            raise FugueError(f"cannot open {what} {path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FugueError(f"{what} {path} is not a regular file; refusing")
        if st.st_uid not in (0, os.geteuid()) and shared_dir(os.fstat(dfd)):
            os.close(fd)  # planted in a shared (sticky) directory by its owner
            raise FugueError(f"{what} {path} belongs to uid {st.st_uid} in a directory others can "
                             "write; refusing")
        os.set_blocking(fd, True)
        return fd
    finally:
        os.close(dfd)
