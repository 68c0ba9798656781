"""WSGI with mixed listeners: TCP (IPv4 and IPv6) and Unix listeners together serve one WSGI app in
every worker (waitress alone refuses to mix them), through a reload; and when a server library
fails inside a worker, the master's line says why (the exception, not only "status 1")."""

import re
import signal
import socket

import pytest

from conftest import http_get

APP = """
import os
import fugue

def app(environ, start_response):
    body = f"wsgi generation {fugue.generation()} pid {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def has_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_tcp_ipv6_and_unix_listeners_serve_one_wsgi_app(fugue_proc, workdir):
    (workdir / "mixed.py").write_text(APP)
    binds = ["-b", "127.0.0.1:0", "-b", "unix:app.sock", "-b", "127.0.0.1:0", "-b", "unix:other.sock"]
    if has_ipv6():
        binds += ["-b", "[::1]:0"]
    check = fugue_proc(["fuguectl", "check", *binds, "mixed:app"])
    assert check.wait_exit() == 0, check.log()
    p = fugue_proc(["fuguectl", "start", "-w", "2", *binds, "mixed:app"]).started()
    log = p.log()
    ports = [(m.group(1).strip("[]"), int(m.group(2)))
             for m in re.finditer(r"listening on (\[[^\]]*\]|[\d.]+):(\d+)", log)]
    assert len(ports) == (3 if has_ipv6() else 2), log

    def answers(generation):
        for host, port in ports:
            status, body, _ = http_get(port, host=host)
            assert (status, f"wsgi generation {generation}") == (200, body.split(" pid")[0]), (host, port)
        for name in ("app.sock", "other.sock"):
            status, body, _ = http_get(0, unix=str(workdir / name))
            assert (status, f"wsgi generation {generation}") == (200, body.split(" pid")[0]), name
        return True

    assert answers(1)
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 2 serving")
    p.wait_log(r"generation 1\) stopped", count=2)  # until then an old worker may still accept
    assert answers(2)
    assert "may not be mixed" not in p.log()
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0


def test_a_failing_server_library_is_named_in_the_masters_line(fugue_proc, workdir):
    (workdir / "badopts.py").write_text(APP + "\napp.wsgi_options = {'no_such_adjustment': 1}\n")
    p = fugue_proc(["fuguectl", "start", "-w", "1", "-b", "127.0.0.1:0", "badopts:app"])
    assert p.wait_exit() != 0
    assert re.search(r"exited with status 1: the wsgi adapter failed: ValueError: "
                     r"Unknown adjustment 'no_such_adjustment'", p.log()), p.log()[-3000:]
