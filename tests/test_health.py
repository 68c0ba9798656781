"""Health for load balancers: /healthz, /livez, drain_delay, fuguectl drain/undrain.

Real masters with a status listener; real HTTP clients. Each state /healthz
names is reached by a real event: a first generation that is not ready yet
(starting), fuguectl drain and a TERM with drain_delay (draining), a slow
request that holds a graceful stop (stopping), `fuguectl scale 0` (no READY
worker). A keep-alive client sees `Connection: close` only while draining.
"""

import http.client
import json
import os
import shutil
import signal

import pytest

from conftest import PY, http_get, wait_for
from test_status import run_ctl, status_port


def health(sport, method="GET", path="/healthz"):
    conn = http.client.HTTPConnection("127.0.0.1", sport, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, (json.loads(body) if body else None), dict(resp.getheaders())
    finally:
        conn.close()


def start(fugue_proc, *extra, wait=True):
    p = fugue_proc(["fuguectl", "start", "-w", "2", "--bind", "127.0.0.1:0",
                    "--status-bind", "127.0.0.1:0", *extra, "app.py"])
    sport = status_port(p)
    if wait:
        p.started()
    return p, sport


def write_behaviour(workdir, **fields):
    (workdir / "behaviour.json").write_text(json.dumps(fields))


def test_healthz_serving_head_livez_and_scale_to_zero(fugue_proc, workdir):
    p, sport = start(fugue_proc, "--version", "from-option")
    status, body, headers = health(sport)
    assert status == 200 and headers["Content-Type"] == "application/json"
    # the app's fugue.set_version() wins over the version option
    assert body == {"status": "ok", "state": "serving", "generation": 1, "version": "v1"}
    status, body, headers = health(sport, "HEAD")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 0
    assert health(sport, path="/livez")[:2] == (200, {"status": "alive"})
    assert health(sport, "HEAD", "/livez")[0] == 200
    assert run_ctl(["scale", "0"], workdir)[0] == 0
    wait_for(lambda: health(sport)[0] == 503, 15, "503 with no worker")
    assert health(sport)[1]["state"] == "no_ready_worker"
    assert health(sport, path="/livez")[0] == 200
    assert run_ctl(["scale", "2"], workdir)[0] == 0
    wait_for(lambda: health(sport)[0] == 200, 15, "200 again")


def test_version_option_when_the_app_sets_none(fugue_proc, workdir):
    (workdir / "app.py").write_text((workdir / "app.py").read_text().replace(
        "fugue.set_version(VERSION)", "pass"))
    p, sport = start(fugue_proc, "--version", "release-7")
    assert health(sport)[1]["version"] == "release-7"


def test_healthz_is_503_while_the_first_generation_starts(fugue_proc, workdir):
    write_behaviour(workdir, never_ready=True)
    p, sport = start(fugue_proc, "--ready-timeout", "120", wait=False)
    p.wait_log(r"starting generation 1")
    status, body, _ = health(sport)
    assert (status, body["state"], body["status"]) == (503, "starting", "unavailable")
    assert health(sport, path="/livez")[0] == 200


def test_fuguectl_drain_and_undrain(fugue_proc, workdir):
    p, sport = start(fugue_proc)
    keep = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    keep.request("GET", "/")
    resp = keep.getresponse()
    resp.read()
    assert resp.getheader("Connection") is None  # kept alive

    rc, out, err = run_ctl(["drain"], workdir)
    assert rc == 0, err
    assert "draining" in out
    status, body, _ = health(sport)
    assert (status, body["state"]) == (503, "draining")
    # Still serving; the workers were told over their channel: Connection: close.
    wait_for(lambda: http_get(p.port, "/")[2].get("Connection") == "close", 15, "Connection: close")
    keep.request("GET", "/")
    resp = keep.getresponse()
    assert resp.status == 200 and resp.read().startswith(b"hello")
    assert resp.getheader("Connection") == "close"
    keep.close()
    rc, out, _ = run_ctl(["status", "--json"], workdir)
    data = json.loads(out)["master"]
    assert data["draining"] == {"reason": "manual", "stop_in": None} and data["healthy"] is False
    assert "draining (fuguectl drain)" in run_ctl(["status"], workdir)[1]
    _, metrics, _ = http_get(sport, "/metrics")
    assert "fugue_draining 1.0" in metrics and "fugue_healthy 0.0" in metrics

    rc, out, err = run_ctl(["undrain"], workdir)
    assert rc == 0, err
    assert health(sport)[0] == 200
    wait_for(lambda: http_get(p.port, "/")[2].get("Connection") is None, 15, "keep-alive again")
    _, metrics, _ = http_get(sport, "/metrics")
    assert "fugue_draining 0.0" in metrics and "fugue_healthy 1.0" in metrics


def test_a_drain_outlives_an_upgrade(fugue_proc, workdir):
    p, sport = start(fugue_proc)
    assert run_ctl(["drain"], workdir)[0] == 0
    old = p.master_pid()
    rc, out, err = run_ctl(["upgrade"], workdir)
    assert rc == 0, err
    assert p.master_pid() != old
    assert old == p.popen.pid
    wait_for(lambda: p.popen.poll() is not None, 30, "the old master gone")
    # status_bind 127.0.0.1:0: the new master has a port of its own; its answer: still drained
    sport = int(p.wait_log(r"status listener on http://127\.0\.0\.1:(\d+)/status", count=2).group(1))
    status, body, _ = health(sport)
    assert (status, body["state"]) == (503, "draining")
    assert http_get(p.port, "/")[2].get("Connection") == "close"
    assert json.loads(run_ctl(["status", "--json"], workdir)[1])["master"]["draining"]["reason"] == "manual"
    assert run_ctl(["undrain"], workdir)[0] == 0
    assert health(sport)[0] == 200


def test_drain_delay_keeps_serving_while_health_says_503(fugue_proc, workdir):
    p, sport = start(fugue_proc, "--drain-delay", "600")
    p.signal(signal.SIGTERM)
    p.wait_log(r"draining for 600s before the graceful stop")
    status, body, _ = health(sport)
    assert (status, body["state"]) == (503, "draining")
    for _ in range(20):  # everything goes on serving, new connections included
        status, text, headers = http_get(p.port, "/")
        assert status == 200 and text.startswith("hello")
    wait_for(lambda: http_get(p.port, "/")[2].get("Connection") == "close", 15, "Connection: close")
    rc, out, _ = run_ctl(["status", "--json"], workdir)
    drain = json.loads(out)["master"]["draining"]
    assert drain["reason"] == "stop" and 0 < drain["stop_in"] <= 600
    assert p.popen.poll() is None
    # The stop has begun: a reload or an upgrade now would undo it.
    rc, _, err = run_ctl(["upgrade"], workdir)
    assert rc == 1 and "upgrade refused: the master is stopping" in err
    rc, _, err = run_ctl(["reload"], workdir)
    assert rc == 1 and "the master is stopping" in err
    # A quick stop does not wait for the drain.
    p.signal(signal.SIGINT)
    assert p.wait_exit() == 0


def test_fuguectl_stop_with_drain_delay_then_stops(fugue_proc, workdir):
    p, sport = start(fugue_proc, "--drain-delay", "1")
    rc, out, err = run_ctl(["stop"], workdir)
    assert rc == 0, err
    assert p.wait_exit() == 0
    log = p.log()
    assert "draining for 1s before the graceful stop" in log
    assert log.index("drain_delay over: graceful stop") < log.index("graceful stop\n")


def test_healthz_is_503_while_stopping(fugue_proc, workdir):
    import threading

    p, sport = start(fugue_proc, "-w", "1", "--graceful-timeout", "120")
    def hold():  # ended by the teardown's kill: its error is expected
        try:
            http_get(p.port, "/slow?s=600", timeout=30)
        except OSError:
            pass

    slow = threading.Thread(target=hold, daemon=True)
    slow.start()
    wait_for(lambda: json.loads(run_ctl(["status", "--json"], workdir)[1])["totals"]["in_flight"] == 1,
             15, "the slow request in flight")
    p.signal(signal.SIGTERM)
    p.wait_log(r"graceful stop")
    status, body, _ = health(sport)
    assert (status, body["state"]) == (503, "stopping")
    assert health(sport, path="/livez")[0] == 200


def test_version_changes_after_a_reload(fugue_proc, workdir):
    p, sport = start(fugue_proc)
    assert health(sport)[1] == {"status": "ok", "state": "serving", "generation": 1, "version": "v1"}
    write_behaviour(workdir, version="v2")
    rc, out, err = run_ctl(["reload"], workdir)
    assert rc == 0, err
    assert health(sport)[1] == {"status": "ok", "state": "serving", "generation": 2, "version": "v2"}


def test_health_answers_during_a_reload_and_an_upgrade(fugue_proc, workdir):
    p, sport = start(fugue_proc, "--ready-timeout", "300")
    write_behaviour(workdir, never_ready=True, version="v2")

    def pending():
        return json.loads(run_ctl(["status", "--json"], workdir)[1])["master"]["pending_generation"]

    p.signal(signal.SIGHUP)
    wait_for(lambda: pending() == 2, 15, "generation 2 starting")
    for _ in range(10):
        status, body, _ = health(sport)
        assert (status, body["generation"], body["version"]) == (200, 1, "v1")
    assert pending() == 2  # all those answers came while the reload was under way
    p.signal(signal.SIGINT)
    p.wait_exit()

    # An upgrade whose new master never gets ready: every check still reaches the old
    # master (the new one joins the port only once it serves), so no 503 "starting".
    write_behaviour(workdir)
    p, sport = start(fugue_proc, "--ready-timeout", "300")
    write_behaviour(workdir, never_ready=True, version="v2")
    old = p.master_pid()
    p.signal(signal.SIGUSR2, old)
    p.wait_log(r"upgrade: listeners handed to pid")
    for _ in range(40):
        status, body, _ = health(sport)
        assert (status, body["state"], body["version"]) == (200, "serving", "v1")
    assert health(sport, path="/livez")[0] == 200
    assert "accept failed" not in p.log()  # the waiting new master does not spin on its unlistened socket


@pytest.mark.parametrize("app", ["app.py", "wsgi_app.py", "asgi_app.py"])
def test_a_stop_after_drain_delay_closes_idle_connections(fugue_proc, workdir, app):
    # A load balancer keeps idle connections to a host it took out (HAProxy does), unused:
    # after drain_delay they are closed, so the stop does not wait graceful_timeout for them.
    options = {"drain_delay": 0.5, "graceful_timeout": 600, "keep_alive": 600}  # no idle timeout either
    if app == "app.py":
        del options["keep_alive"]  # http.server has none
    p = fugue_proc([app, "0", "1", json.dumps(options)]).started()
    idle = http.client.HTTPConnection("127.0.0.1", p.port, timeout=60)
    idle.request("GET", "/")
    resp = idle.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") != "close"
    resp.read()
    p.signal(signal.SIGTERM)
    p.wait_log(r"drain_delay over: graceful stop")
    assert p.wait_exit() == 0  # not after graceful_timeout (600 s)
    assert idle.sock.recv(1) == b""  # closed by the server, nothing sent on it
    idle.close()


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="needs root and unshare")
def test_drain_delay_through_the_pid1_keeper(fugue_proc, workdir):
    # As in a Kubernetes pod: fuguectl is PID 1 (the keeper), the kubelet's TERM goes to it,
    # and it is the master's drain_delay that keeps serving while /healthz says 503.
    p = fugue_proc(["unshare", "--pid", "--fork", "--mount-proc", PY, "-m", "fugue.ctl", "start",
                    "-w", "1", "--bind", "127.0.0.1:0", "--status-bind", "127.0.0.1:0",
                    "--drain-delay", "600", "app.py"]).started()
    sport = status_port(p)
    p.wait_log(r"\[keeper\] INFO master pid \d+ started")
    assert health(sport)[0] == 200
    keeper = wait_for(lambda: _first_child(p.popen.pid), 15, "PID 1 of the namespace")
    os.kill(keeper, signal.SIGTERM)
    p.wait_log(r"draining for 600s before the graceful stop")
    status, body, _ = health(sport)
    assert (status, body["state"]) == (503, "draining")
    assert http_get(p.port, "/")[0] == 200
    os.kill(keeper, signal.SIGINT)
    assert p.wait_exit() == 0


def _first_child(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    return int(children[0]) if children else None
