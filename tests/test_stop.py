"""Graceful stop refuses what it will not serve: every process closes its copy of the
listeners first, so a client that connects during the drain is refused at once, never
accepted by the kernel and reset when the last copy closes. In-flight requests finish."""

import errno
import json
import signal
import socket
import threading

import pytest

from conftest import http_get, wait_for


def probe(port):
    """One new client: 'refused', 'served' or 'reset-...' (accepted, then cut off without an answer)."""
    sock = socket.socket()
    sock.settimeout(40)
    try:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused"
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = sock.recv(64)
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                return "reset-" + errno.errorcode[e.errno]
            raise
        return "served" if data.startswith(b"HTTP/1.") else "reset-eof"
    finally:
        sock.close()


class Load:
    """Keep-alive clients in threads, going until stopped; counts what they saw."""

    def __init__(self, port, clients=3):
        self.port = port
        self.stopping = threading.Event()
        self.seen = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self):
        while not self.stopping.is_set():
            outcome = probe(self.port)
            with self.lock:
                self.seen.append(outcome)
            if outcome == "refused":
                self.stopping.wait(0.002)  # pacing, so refusals do not spin a core

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        return self.seen


APPS = ["app.py", "wsgi_app.py", "asgi_app.py", "plain_app.py"]


@pytest.mark.parametrize("app", APPS)
def test_clients_arriving_during_a_graceful_stop_are_refused_never_reset(fugue_proc, app):
    p = fugue_proc([app, "0", "2", json.dumps({"graceful_timeout": 20})]).started()
    port = p.port
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=http_get(port, "/slow?s=2.5", timeout=30)))
    t.start()
    load = Load(port)
    wait_for(lambda: load.seen.count("served") >= 5, what="load served before the stop")
    p.signal(signal.SIGTERM)
    p.wait_log(r"graceful stop")
    # While the slow request drains, every new client must be refused.
    wait_for(lambda: load.seen.count("refused") >= 20, what="clients refused during the drain")
    t.join(30)
    seen = load.stop()
    assert slow["r"][0] == 200, slow
    resets = [x for x in seen if x.startswith("reset")]
    assert not resets, (resets, seen.count("served"), seen.count("refused"))
    assert p.wait_exit() == 0
