"""sd_notify: tell systemd (or anything listening on NOTIFY_SOCKET) what the master is doing.

The master takes NOTIFY_SOCKET out of the environment at start (workers never
inherit it) and keeps it here; a new master exec'd on USR2 gets it back.
"""

import os
import socket

_address = None


def claim():
    """Take NOTIFY_SOCKET out of the environment; remember it for this process."""
    global _address
    value = os.environ.pop("NOTIFY_SOCKET", None)
    if value:
        _address = value
    return _address


def address():
    return _address


def send(*lines):
    """Send 'KEY=value' lines; silently nothing when not under systemd."""
    if not _address:
        return False
    addr = _address
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            if addr.startswith("\0"):
                sock.connect(addr)
            else:
                from .fds import connect_unix_path

                connect_unix_path(sock, addr)
            sock.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False
