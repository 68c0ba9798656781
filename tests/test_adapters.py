"""Adapters: WSGI (waitress), ASGI (uvicorn), asyncio, plain callable (process tests),
and how fugue picks one from what it is given (table-driven)."""

import asyncio
import collections
import functools
import http.client
import http.server
import json
import os
import re
import signal
import socket
import socketserver
import threading
import time

import pytest

from conftest import wait_for
from fugue import control
from fugue.adapters import pick
from fugue.adapters.base import Stats, WorkerContext


class Load:
    """A few keep-alive HTTP clients in threads; every request that does not get a
    200 answer is a failure (no retries: a dropped keep-alive connection counts)."""

    def __init__(self, port, clients=4, path="/"):
        self.port = port
        self.path = path
        self.ok = 0
        self.failures = []
        self.seen = collections.Counter()   # "generation N version V" -> answers
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        while not self.stopping.is_set():
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200:
                    raise AssertionError(f"status {resp.status}: {body[:200]}")
            except Exception as e:  # noqa: BLE001 - every kind of failure is counted
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                continue
            m = re.search(r"generation (\d+) version (\S+)", body)
            with self.lock:
                self.ok += 1
                self.seen[m.group(0) if m else body.strip()] += 1
        conn.close()

    def count(self, text):
        with self.lock:
            return sum(n for key, n in self.seen.items() if text in key)

    def wait(self, cond, what, timeout=20):
        wait_for(lambda: cond(self), timeout, what)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(20)
        return self


def control_path(p):
    return os.path.join(p.cwd, "tmp", f"fugue-{p.master_pid()}", "control.sock")


def status(p):
    reply = control.request(control_path(p), "status", timeout=10)
    assert reply["ok"], reply
    return reply["data"]


def hup_under_load(p, workdir, kind):
    """Reload generation 1 -> 2 while clients hammer it; no request may fail."""
    assert f"version v1 {kind}" in p.body()
    load = Load(p.port)
    try:
        load.wait(lambda ld: ld.ok >= 30, "answers from generation 1")
        (workdir / "behaviour.json").write_text(json.dumps({"version": "v2"}))
        p.signal(signal.SIGHUP)
        p.wait_log(r"reload done: generation 2 serving")
        p.wait_log(r"generation 1\) stopped", count=2)
        before = load.count("generation 2")
        load.wait(lambda ld: ld.count("generation 2") >= before + 30, "answers from generation 2")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.count("generation 1 version v1") > 0 and load.count("generation 2 version v2") > 0
    return load


# -- which adapter for what --------------------------------------------------------


def wsgi_app(environ, start_response):
    return []


class WsgiObject:
    def __call__(self, environ, start_response):
        return []


async def asgi_app(scope, receive, send):
    pass


class AsgiObject:
    async def __call__(self, scope, receive, send):
        pass


async def handler(reader, writer):
    pass


class Proto(asyncio.Protocol):
    pass


def serve(sock):
    pass


def serve_stop(sock, *, stop):
    pass


def serve_stop_default(sock, stop=None):
    pass


class Handler(socketserver.BaseRequestHandler):
    pass


@pytest.mark.parametrize("target, kind", [
    (wsgi_app, "wsgi"),
    (WsgiObject(), "wsgi"),
    (functools.partial(wsgi_app), "wsgi"),
    (asgi_app, "asgi"),
    (AsgiObject(), "asgi"),
    (handler, "asyncio"),
    (Proto, "asyncio"),
    (serve, "callable"),
    (serve_stop, "callable"),
    (serve_stop_default, "callable"),
    (Handler, "handler"),
    (http.server.BaseHTTPRequestHandler, "handler"),
    (socketserver.TCPServer(("", 0), Handler, bind_and_activate=False), "socketserver"),
])
def test_pick_by_type(target, kind):
    assert pick(target, {}).kind == kind


@pytest.mark.parametrize("target", [lambda: None, lambda a, b, c, d: None, 42, "module:app", object()])
def test_pick_refuses_what_it_cannot_serve(target):
    with pytest.raises(ValueError, match="fugue cannot serve"):
        pick(target, {})


def test_adapter_option_overrides_the_guess():
    def factory():  # a zero-argument protocol factory is only known by name
        return Proto()

    assert pick(factory, {"adapter": "asyncio"}).kind == "asyncio"
    assert pick(wsgi_app, {"adapter": "callable"}).kind == "callable"
    with pytest.raises(ValueError, match="unknown adapter"):
        pick(wsgi_app, {"adapter": "nope"})


# -- process tests -------------------------------------------------------------------


@pytest.mark.parametrize("app, kind", [
    ("wsgi_app.py", "wsgi"), ("asgi_app.py", "asgi"), ("aio_app.py", "asyncio"), ("plain_app.py", "plain"),
    ("plain_simple_app.py", "plain"),
])
def test_adapter_serves_and_reloads_under_load(fugue_proc, workdir, app, kind):
    p = fugue_proc([app, "0", "2"]).started()
    hup_under_load(p, workdir, kind)
    data = status(p)
    assert data["totals"]["requests"] > 0 and data["totals"]["connections"] >= 0
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


@pytest.mark.parametrize("app", ["wsgi_app.py", "asgi_app.py", "aio_app.py", "plain_app.py",
                                 "plain_simple_app.py"])
def test_graceful_stop_finishes_a_slow_request(fugue_proc, app):
    p = fugue_proc([app, "0", "1"]).started()
    out = {}

    def slow():
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=15)
        conn.request("GET", "/slow?s=1.5")
        resp = conn.getresponse()
        out["answer"] = (resp.status, resp.read().decode(), resp.getheader("Connection"))

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: status(p)["totals"]["in_flight"] >= 1, what="the slow request in flight")
    p.signal(signal.SIGTERM)
    p.wait_log(r"stopping worker 1")
    t.join(20)
    status_code, body, connection = out["answer"]
    assert status_code == 200 and "hello" in body
    assert (connection or "").lower() == "close"  # said while draining: do not reuse me
    assert p.wait_exit() == 0


def test_asgi_lifespan_failure_rolls_back(fugue_proc, workdir):
    p = fugue_proc(["asgi_app.py", "0", "1"]).started()
    assert "lifespan=True" in p.body()
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2", "lifespan_fails": True}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: .*generation 1 keeps serving")
    assert "version v1" in p.body()


def test_wsgi_import_error_rolls_back(fugue_proc, workdir):
    p = fugue_proc(["wsgi_app.py", "0", "1"]).started()
    (workdir / "behaviour.json").write_text(json.dumps({"version": "v2", "raise_at_import": True}))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed: .*broken at import on purpose.*generation 1 keeps serving")
    assert "version v1" in p.body()


# -- serving and draining, in process (no master) -------------------------------------


class FakeContext(WorkerContext):
    """A WorkerContext without a master: `post(fn)` runs fn on the adapter's loop
    through ctx.dispatch(), the way the worker delivers the master's STOP."""

    def __init__(self, listener):
        self.worker_id, self.generation = 1, 1
        self.listeners, self.listener_names = [listener], ["l0"]
        self.options, self.stats = {}, Stats()
        self.tick_interval, self.graceful_timeout = 0.2, 5.0
        self.draining, self.graceful_deadline = False, None
        self.ready = threading.Event()
        self.inbox = collections.deque()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)

    def wake_fds(self):
        return [self._r.fileno()]

    def dispatch(self):
        try:
            while self._r.recv(64):
                pass
        except BlockingIOError:
            pass
        while self.inbox:
            self.inbox.popleft()()

    def serving(self):
        self.ready.set()

    def tick(self):
        pass

    def log(self, message):
        pass

    def post(self, fn):
        self.inbox.append(fn)
        self._w.send(b"\0")


def _greet(kind):
    return f"hello from {kind}\n".encode()


def routed_wsgi(environ, start_response):
    start_response("200 OK", [("Content-Length", "16")])
    return [_greet("wsgi")]


async def routed_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"16")]})
    await send({"type": "http.response.body", "body": _greet("asgi")})


async def routed_handler(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\nConnection: close\r\n\r\n" + _greet("asyncio"))
    await writer.drain()
    writer.close()


class RoutedProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\nConnection: close\r\n\r\n"
                             + _greet("asyncio"))
        self.transport.close()


def routed_serve(sock, *, stop):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\n" + _greet("plain"))


@pytest.mark.parametrize("app, kind", [
    (routed_wsgi, "wsgi"), (routed_asgi, "asgi"), (routed_handler, "asyncio"), (RoutedProtocol, "asyncio"),
    (routed_serve, "plain"),
])
def test_connection_is_served_then_drained(app, kind):
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()  # the callable adapter takes the descriptor over
    ctx = FakeContext(listener)
    adapter = pick(app, {})
    runner = threading.Thread(target=adapter.run, args=(ctx,), daemon=True)
    runner.start()
    try:
        assert ctx.ready.wait(10)
        client = socket.create_connection(address, timeout=10)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"hello from" not in reply:
            chunk = client.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and _greet(kind) in reply
        client.close()

        def drain():
            ctx.draining = True
            ctx.graceful_deadline = time.monotonic() + ctx.graceful_timeout
            adapter.begin_drain()

        ctx.post(drain)
        runner.join(10)
        assert not runner.is_alive(), "run() did not return after the drain"
        assert ctx.stats.requests >= 1 and ctx.stats.in_flight == 0
    finally:
        listener.close()


def test_pick_names_the_extra_an_unloadable_adapter_needs(monkeypatch):
    # `pip install .` then a Flask app: it said "fugue cannot serve a Flask: give ... a WSGI app"
    import sys

    for name in ("waitress", "uvicorn"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    for name in ("fugue.adapters.wsgi", "fugue.adapters.asgi"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ValueError) as info:
        pick(wsgi_app, {})
    text = str(info.value)
    assert text.startswith("fugue cannot serve a function with the adapters it can load; ")
    assert "the wsgi adapter cannot be loaded: " in text and "(pip install 'fugue-daemon[wsgi]')" in text
    assert "(pip install 'fugue-daemon[asgi]')" in text


def test_an_asyncio_drain_answers_what_its_loop_accepted_last():
    """A reload closes a worker's asyncio servers (ASGI, asyncio adapters). asyncio accepts in
    one loop pass and attaches the connection to its server in a task on the next; a close in
    between dropped the accepted connections unanswered (their clients were reset when the old
    worker exited: ConnectionResetError right after 'reload done' under load)."""
    from fugue.adapters._util import close_after_sweep

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.close()

    async def drain_right_after_accepting():
        listener = socket.create_server(("127.0.0.1", 0))
        kept = listener.dup()  # the master's copy: the listener outlives this worker's close
        server = await asyncio.get_running_loop().create_server(Answer, sock=listener)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(20)]
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0)  # pass 1: the connections are seen ready
        await asyncio.sleep(0)  # pass 2: accepted; their attach tasks would run on pass 3
        await close_after_sweep([server])
        answered = 0
        for c in clients:
            c.settimeout(5)
            answered += c.recv(100).startswith(b"HTTP/1.1 200")
            c.close()
        kept.close()
        return answered

    assert asyncio.run(drain_right_after_accepting()) == 20
