"""Aggregated status: the numbers add up, everywhere they are shown.

One master with two workers and a management listener; 100 requests; then the
same totals from `fuguectl status --json`, from GET /status, from the
Prometheus text of GET /metrics (parsed by prometheus-client's own parser), and
from inside a worker (fugue.server_status()).
"""

import json
import os
import re
import socket
import subprocess

import pytest

from conftest import PY, ROOT, http_get, wait_for

from fugue.ctl import duration, render_status


def run_ctl(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([PY, "-m", "fugue.ctl"] + list(args), cwd=str(cwd), env=env, timeout=60,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def status_port(p):
    return int(p.wait_log(r"status listener on http://127\.0\.0\.1:(\d+)/status").group(1))


def test_hundred_requests_add_up_everywhere(fugue_proc, workdir):
    parser = pytest.importorskip("prometheus_client.parser")
    p = fugue_proc(["fuguectl", "start", "-w", "2", "--bind", "127.0.0.1:0",
                    "--status-bind", "127.0.0.1:0", "app.py"]).started()
    sport = status_port(p)
    pids = set()
    for _ in range(100):
        status, body, _ = p.get("/")
        assert status == 200
        pids.add(body.split()[5])
    assert len(pids) >= 1

    rc, out, err = run_ctl(["status", "--json"], workdir)
    assert rc == 0, err
    data = json.loads(out)
    assert data["totals"]["requests"] == 100
    assert sum(w["requests"] for w in data["workers"]) == 100
    assert data["totals"]["in_flight"] == 0
    assert data["totals"]["connections_total"] == 100
    assert data["master"]["pid"] == p.popen.pid
    assert [w["state"] for w in data["workers"]] == ["ready", "ready"]
    assert all(w["last_heartbeat"] is not None and w["restarts"] == 0 for w in data["workers"])

    status, body, headers = http_get(sport, "/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["totals"]["requests"] == 100

    status, text, headers = http_get(sport, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    served = [s for s in families["fugue_requests"].samples if s.name == "fugue_requests_total"]
    assert sum(s.value for s in served) == 100
    assert {s.labels["worker"] for s in served} == {"1", "2"}
    assert families["fugue_requests"].type == "counter"
    ready = [s for s in families["fugue_workers"].samples if s.labels["state"] == "ready"]
    assert ready[0].value == 2
    assert families["fugue_generation"].samples[0].value == 1
    assert families["fugue_last_event_success"].samples[0].labels == {"what": "start"}

    # The app's own counters, summed over the workers.
    for _ in range(6):
        assert p.get("/count?name=orders")[0] == 200
    rc, out, _ = run_ctl(["status", "--json"], workdir)
    data = json.loads(out)
    assert data["counters"] == {"orders": 6}
    assert data["totals"]["requests"] == 106
    status, text, _ = http_get(sport, "/metrics")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert sum(s.value for s in families["fugue_app_events"].samples
               if s.name == "fugue_app_events_total" and s.labels["name"] == "orders") == 6

    # From inside a worker (a handler thread asks; the loop thread delivers).
    inside = json.loads(p.body("/status"))
    assert inside["master"]["pid"] == p.popen.pid
    assert inside["totals"]["requests"] == 106 and inside["totals"]["in_flight"] == 1
    assert inside["counters"] == {"orders": 6}

    rc, out, err = run_ctl(["status"], workdir)
    assert rc == 0, err
    assert "requests  107 served, 0 in flight" in out
    assert "counters  orders=6" in out


def test_status_listener_errors_and_other_paths(fugue_proc, workdir):
    p = fugue_proc(["fuguectl", "start", "-w", "1", "--bind", "127.0.0.1:0",
                    "--status-bind", "127.0.0.1:0", "app.py"]).started()
    sport = status_port(p)
    assert http_get(sport, "/nope")[0] == 404
    assert http_get(sport, "/")[0] == 200
    # A client that connects and says nothing does not block anyone else.
    idle = socket.create_connection(("127.0.0.1", sport))
    try:
        with socket.create_connection(("127.0.0.1", sport)) as s:
            s.sendall(b"POST /status HTTP/1.0\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 405 ")
        assert http_get(sport, "/status")[0] == 200
    finally:
        idle.close()
    # The port is taken: a second master says so in one line before it starts.
    rc, _, err = run_ctl(["start", "--pid-file", "b.pid", "--bind", "127.0.0.1:0",
                          "--status-bind", f"127.0.0.1:{sport}", "app.py"], workdir)
    assert rc == 1
    assert f"status_bind 127.0.0.1:{sport}: port {sport} already in use" in err
    assert "Traceback" not in err


def test_status_shows_a_request_in_flight(fugue_proc, workdir):
    import threading

    p = fugue_proc(["fuguectl", "start", "-w", "1", "--bind", "127.0.0.1:0", "app.py"]).started()
    slow = threading.Thread(target=lambda: p.get("/slow?s=3"))
    slow.start()
    try:
        def serving():
            rc, out, _ = run_ctl(["status", "--json"], workdir)
            data = json.loads(out)
            return data if data["totals"]["in_flight"] == 1 else None

        data = wait_for(serving, what="a request in flight")
        current = data["workers"][0]["current"]
        assert current and current[0]["info"] == "GET /slow?s=3"
        rc, out, _ = run_ctl(["status"], workdir)
        assert re.search(r"serving now\n  worker 1: GET /slow\?s=3 \(\d+\.\ds\)", out), out
    finally:
        slow.join()


def test_render_status_table_is_readable():
    data = {
        "master": {"pid": 10, "name": "hello", "uptime": 3725.0, "generation": 2, "pending_generation": 3,
                   "workers_wanted": 2, "stopping": None, "upgrade": None, "watch": None,
                   "last_event": {"what": "reload", "ok": False, "text": "reload failed: boom", "ago": 65}},
        "listeners": [{"name": "l0", "address": "127.0.0.1:4000", "family": "inet"}],
        "totals": {"requests": 12, "in_flight": 1, "connections": 1},
        "counters": {"orders": 3},
        "ready_workers": 2,
        "workers": [{"id": 1, "pid": 11, "generation": 2, "state": "ready", "uptime": 12.5, "requests": 12,
                     "in_flight": 1, "connections": 1, "last_heartbeat": 0.25, "restarts": 3,
                     "current": [{"info": "GET /x", "for": 0.5}]}],
    }
    text = render_status(data)
    assert "master    hello, pid 10, up 1h02m" in text
    assert "generation 2 serving, generation 3 starting" in text
    assert "last      reload FAILED 1m05s ago: reload failed: boom" in text
    assert "listening 127.0.0.1:4000 (l0)" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ID"))
    assert lines[header].split() == ["ID", "PID", "GEN", "STATE", "UPTIME", "REQUESTS", "IN-FLIGHT",
                                     "CONNS", "HEARTBEAT", "RESTARTS"]
    assert lines[header + 1].split() == ["1", "11", "2", "ready", "12s", "12", "1", "1", "0.2s", "ago", "3"]
    assert "  worker 1: GET /x (0.5s)" in text


@pytest.mark.parametrize("seconds,text", [
    (None, "-"), (0.04, "0.0s"), (9.96, "10.0s"), (12.7, "12s"), (61, "1m01s"), (3600, "1h00m"),
    (90061, "1d01h"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text
