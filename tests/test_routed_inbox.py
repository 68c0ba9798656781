"""Routed mode never leaves a client hanging: a connection waiting in an app's inbox is
answered 503 (HTTP) when the app cannot be started again within its ready_timeout, or
when the app is removed; and while it stays down, new clients get 503 at once."""

import os
import signal
import socket

from conftest import wait_for
from test_router import ask, get

CONFIG = """\
bind = ["127.0.0.1:0"]
workers = 1
graceful_timeout = 5

[apps.alpha]
hostnames = ["alpha.test"]
script = "routed_app.py"
argv = ["alpha"]
ready_timeout = 2

[apps.beta]
hostnames = ["beta.test"]
script = "routed_app.py"
argv = ["beta"]
ready_timeout = 60
"""


def start(fugue_proc, workdir):
    (workdir / "apps.toml").write_text(CONFIG)
    p = fugue_proc(["fuguectl", "start", "-c", "apps.toml"])
    p.wait_log(r"router serving \d+ apps", timeout=30)
    return p


def send_get(port, host):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return sock


def answer(sock):
    """The whole answer until the server closes (b'' if it hangs up without one)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def break_and_kill(p, workdir, name):
    """Broken code on disk, then its master dies: the router cannot restart it."""
    (workdir / f"{name}.broken").write_text("")
    pid = int(ask(p, "status")["data"]["apps"][name]["master_pid"])
    os.kill(pid, signal.SIGKILL)
    p.wait_log(rf"app {name}: its master killed by SIGKILL")
    return pid


def test_waiting_clients_get_503_when_the_app_cannot_start_within_ready_timeout(fugue_proc, workdir):
    p = start(fugue_proc, workdir)
    port = p.port
    assert get(port, "alpha.test")[0] == 200
    break_and_kill(p, workdir, "alpha")
    waiting = send_get(port, "alpha.test")   # goes into alpha's inbox: nobody reads it
    data = answer(waiting)
    assert data.startswith(b"HTTP/1.1 503 ") and b"app alpha is not running" in data, data
    p.wait_log(r"app alpha: not serving again within ready_timeout 2s")
    # While it stays down, a new client is answered at once; beta is untouched.
    assert answer(send_get(port, "alpha.test")).startswith(b"HTTP/1.1 503 ")
    assert get(port, "beta.test")[0] == 200
    # Fixed on disk, the router's next restart serves again.
    (workdir / "alpha.broken").unlink()
    wait_for(lambda: get(port, "alpha.test")[0] == 200, 30, "alpha serving again")


def test_removing_an_app_answers_the_clients_waiting_in_its_inbox(fugue_proc, workdir):
    p = start(fugue_proc, workdir)
    port = p.port
    assert get(port, "beta.test")[0] == 200
    routed = ask(p, "status")["data"]["apps"]["beta"]["routed"]
    break_and_kill(p, workdir, "beta")
    waiting = send_get(port, "beta.test")
    wait_for(lambda: ask(p, "status")["data"]["apps"]["beta"]["routed"] > routed, 10,
             "the connection to be in beta's inbox")
    reply = ask(p, "remove", app="beta")
    assert reply["ok"], reply
    data = answer(waiting)
    assert data.startswith(b"HTTP/1.1 503 ") and b"app beta was removed" in data, data
