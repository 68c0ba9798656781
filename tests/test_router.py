"""Routed mode: several apps on one port, chosen by Host header and TLS SNI (process tests).

A real router (python -m fugue.router -c apps.toml) with real app masters and
workers; real clients: http.client with Host headers, the ssl module with
server_hostname, raw sockets for slow and hostile ones.
"""

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from conftest import PY, ROOT, wait_for
from fugue import control
from fugue.protocol import ProtocolError
from fugue.apps import parse
from fugue.errors import ConfigError

CONFIG = """\
bind = ["127.0.0.1:0"]
sniff_timeout = {sniff_timeout}
{top}
workers = 2
graceful_timeout = 5

[apps.alpha]
hostnames = ["alpha.test", "*.alpha.test"]
script = "routed_app.py"
argv = ["alpha"]

[apps.beta]
hostnames = ["beta.test"]
script = "routed_app.py"
argv = ["beta"]
workers = 1
{extra}"""

TLS_APP = """
[apps.secure]
hostnames = ["secure.test"]
script = "routed_tls.py"
argv = ["secure", "cert.pem", "key.pem"]
workers = 1
"""


def start_router(fugue_proc, workdir, sniff_timeout=5.0, extra="", top=""):
    (workdir / "apps.toml").write_text(CONFIG.format(sniff_timeout=sniff_timeout, extra=extra, top=top))
    p = fugue_proc(["fuguectl", "start", "-c", "apps.toml"])
    wait_for(lambda: serving(p), 30, "every app ready in the router's status")
    return p


def serving(p):
    """The router's status once every app's master has said READY (its control socket's
    reply, not its log), else None."""
    try:
        data = ask(p, "status", timeout=5)["data"]
    except (OSError, ProtocolError, KeyError, TypeError):
        return None  # not listening yet
    apps = (data or {}).get("apps") or {}
    return data if apps and all(a.get("state") == "ready" for a in apps.values()) else None


def ask(p, cmd, timeout=30, **fields):
    """A command on the router's control socket; the reply dict."""
    path = os.path.join(p.cwd, "tmp", f"fugue-{p.master_pid()}", "control.sock")
    return control.request(path, cmd, timeout=timeout, **fields)


def get(port, host, path="/", conn=None):
    """(status, body) of one GET with this Host header (on `conn` if given)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"Host": host})
        resp = c.getresponse()
        return resp.status, resp.read().decode()
    finally:
        if conn is None:
            c.close()


def closed_by_server(sock, within=10.0):
    """True once the server has closed `sock` (EOF or reset), waiting at most `within` s."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


# -- the configuration file (pure) ---------------------------------------------------

@pytest.mark.parametrize("doc, error", [
    ({"bind": [":0"]}, "at least one [apps.NAME]"),
    ({"apps": {"a": {"hostnames": ["a.test"], "app": "m:x"}}}, "needs bind"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": ["a.test"], "app": "m:x", "script": "a.py"}}},
     "exactly one of"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": ["a.test"]}}}, "exactly one of"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": ["x.test"], "app": "m:x"},
                               "b": {"hostnames": ["X.test."], "app": "m:y"}}}, "claimed by both"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": ["a.test"], "app": "m:x", "bind": [":1"]}}},
     "router's, not an app's"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": ["a.test"], "app": "m:x", "wrokers": 2}}},
     "unknown key"),
    ({"bind": [":0"], "apps": {"a": {"hostnames": "a.test b.test", "app": "m:x"}}}, "invalid host"),
    ({"bind": [":0"], "sniff_timeout": 0, "apps": {"a": {"hostnames": ["a"], "app": "m:x"}}},
     "sniff_timeout"),
    ({"bind": [":0"], "default_app": "zz", "apps": {"a": {"hostnames": ["a"], "app": "m:x"}}},
     "default_app"),
    ({"bind": [":0"], "apps": {"a b": {"hostnames": ["a"], "app": "m:x"}}}, "app name"),
])
def test_config_errors_name_the_problem(doc, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace(".", r"\.")):
        parse(doc, "apps.toml", "/srv")


def test_config_shared_options_are_app_defaults():
    rc = parse({"bind": ["127.0.0.1:80"], "workers": 3, "timeout": 9, "pid_file": "r.pid",
                "apps": {"a": {"hostnames": ["a.test"], "app": "m:x", "workers": 1},
                         "b": {"hostnames": ["*.b.test"], "script": "b.py", "argv": ["x"]}}},
               "apps.toml", "/srv")
    assert rc.apps["a"].options["workers"] == 1 and rc.apps["b"].options["workers"] == 3
    assert rc.apps["b"].options["timeout"] == 9.0
    assert "pid_file" in rc.apps["a"].options and rc.apps["a"].options["pid_file"] != "r.pid"
    assert rc.apps["b"].target == {"script": "/srv/b.py", "argv": ["/srv/b.py", "x"]}
    assert rc.host_table().lookup("Q.B.test.") == "b" and rc.host_table().lookup("b.test") is None
    assert rc.cfg.bind == ["127.0.0.1:80"]


def test_an_inbox_passes_connections_like_a_listener():
    from fugue.inbox import Inbox, inbox_pair, send_connection

    router_end, app_end = inbox_pair()
    inbox = Inbox(fileno=app_end.detach())
    inbox.setblocking(False)
    assert inbox.type == socket.SOCK_STREAM and inbox.family == socket.AF_INET
    with pytest.raises(BlockingIOError):
        inbox.accept()
    for peer in (("10.1.2.3", 4567), ("2001:db8::1", 443, 0, 0)):  # the plain and the JSON encoding
        client, server = socket.socketpair()
        send_connection(router_end, server.fileno(), {"peer": peer, "host": "x.test", "via": "http"})
        server.close()
        conn, got = inbox.accept()
        assert got == peer and conn.gettimeout() is None
        conn.sendall(b"hi")
        assert client.recv(2) == b"hi"
        conn.close()
        client.close()
    router_end.close()
    inbox.close()


def test_python_m_fugue_router_runs_as_documented(fugue_proc, workdir):
    """`python -m fugue.router -c apps.toml` (router.py's docstring, bench/router.py) serves,
    answers its own commands, and leaves nothing behind when stopped."""
    (workdir / "apps.toml").write_text(CONFIG.format(sniff_timeout=5.0, extra="", top=""))
    env = {"PYTHONPATH": ROOT}
    p = fugue_proc([PY, "-m", "fugue.router", "-c", "apps.toml"])

    def command(*args):
        return subprocess.run([PY, "-m", "fugue.router", "-c", "apps.toml", *args], cwd=workdir,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)

    def serving():  # the router's own status (its control socket), not its log, says when
        status = command("status")
        data = json.loads(status.stdout) if status.returncode == 0 else {}
        apps = data.get("apps") or {}
        return data if set(apps) == {"alpha", "beta"} and all(a["state"] == "ready" for a in apps.values()) else None

    data = wait_for(serving, 30, "both apps ready in python -m fugue.router -c apps.toml status")
    pid = p.master_pid()
    assert data["router"]["pid"] == pid
    port = int(data["router"]["listeners"][0]["address"].rpartition(":")[2])
    assert get(port, "alpha.test")[1].startswith("alpha worker")
    assert get(port, "beta.test")[1].startswith("beta worker")
    stop = command("stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "stopping", stop.stdout + stop.stderr
    assert p.wait_exit() == 0
    assert not os.path.exists(workdir / "fugue.pid")
    assert not os.path.exists(workdir / "tmp" / f"fugue-{pid}")
    assert "Traceback" not in p.log()


# -- routing ---------------------------------------------------------------------------

@pytest.fixture
def certs(workdir):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make a test certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=secure.test",
                    "-addext", "subjectAltName=DNS:secure.test"],
                   cwd=workdir, check=True, capture_output=True)
    return workdir / "cert.pem"


def tls_get(port, server_name, cafile):
    """The body of GET / over TLS with this SNI name, the client's (host, port), or raise."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        local = tls.getsockname()
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    return body, local


def test_two_apps_one_port_by_host_and_sni_with_the_real_client_address(fugue_proc, workdir, certs):
    p = start_router(fugue_proc, workdir, extra=TLS_APP)
    port = p.port
    for host, app in [("alpha.test", "alpha"), ("www.alpha.test", "alpha"), ("BETA.test.", "beta")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, body = get(port, host, conn=conn)
        local = conn.sock.getsockname()
        assert status == 200 and body.startswith(app + " "), (host, body)
        # The worker talks to the client itself: it sees the client's own address and port.
        assert f"peer {local[0]}:{local[1]} " in body, (local, body)
        # A keep-alive connection stays with the worker that got it.
        pid = body.split()[4]
        for _ in range(3):
            assert get(port, host, conn=conn)[1].split()[4] == pid
        conn.close()

    body, local = tls_get(port, "secure.test", certs)
    assert body.startswith("secure tls ") and f"peer {local[0]}:{local[1]} " in body, body
    assert "sni secure.test" in body
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_get(port, "unknown.test", certs)  # routed on SNI, not terminated: unknown -> closed

    status, body = get(port, "nobody.test")
    assert status == 421 and "nobody.test" in body

    data = ask(p, "status")["data"]
    counters = data["router"]["counters"]
    assert counters["unknown_host"] == 1 and counters["unknown_sni"] == 1
    assert data["apps"]["alpha"]["routed"] == 2 and data["apps"]["beta"]["routed"] == 1
    assert data["apps"]["secure"]["routed"] == 1
    assert data["apps"]["alpha"]["master"]["ready_workers"] == 2


def test_slow_and_hostile_clients_are_closed_and_counted(fugue_proc, workdir):
    (workdir / "hook.py").write_text(
        "def pick(host, sni, peer):\n    return 'beta' if host and host.startswith('hook.') else None\n")
    p = start_router(fugue_proc, workdir, sniff_timeout=2.0, top='route = "hook:pick"\ndefault_app = "alpha"')
    port = p.port
    assert get(port, "hook.alpha.test")[1].startswith("beta ")  # the hook goes first
    assert get(port, "nobody.test")[1].startswith("alpha ")     # default_app, not 421
    silent = socket.create_connection(("127.0.0.1", port))
    no_host = socket.create_connection(("127.0.0.1", port))
    no_host.sendall(b"GET / HTTP/1.1\r\nUser-Agent: slow\r\n")
    flood = socket.create_connection(("127.0.0.1", port))
    flood.sendall(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n")
    # A slow but honest client: its Host header arrives in pieces, within the deadline.
    slow_ok = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_ok.sendall(b"GET / HTTP/1.1\r\n")
    wait_for(lambda: ask(p, "status")["data"]["router"]["sniffing"] >= 3, 5, "the router to peek at them")
    slow_ok.sendall(b"Host: beta.test\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := slow_ok.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\n\r\nbeta " in answer, answer
    assert get(port, "alpha.test")[0] == 200  # others are served meanwhile
    for sock in (flood, silent, no_host):
        assert closed_by_server(sock), "the router left a slow client open"
        sock.close()
    counters = ask(p, "status")["data"]["router"]["counters"]
    assert counters["timed_out"] == 2 and counters["too_big"] == 1, counters
    assert "unknown_host" not in counters


# -- reloads, add, remove ----------------------------------------------------------------

class Load:
    """Clients on two hosts, keep-alive and new connections, counting every failure."""

    def __init__(self, port, hosts, threads_per_host=2):
        self.port = port
        self.stop = threading.Event()
        self.ok = {h: 0 for h in hosts}
        self.failures = []
        self.bodies = {h: set() for h in hosts}
        self.threads = [threading.Thread(target=self.run, args=(h, i % 2 == 0), daemon=True)
                        for h in hosts for i in range(threads_per_host)]

    def run(self, host, keep_alive):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status, body = get(self.port, host, conn=conn)
                if status != 200:
                    self.failures.append((host, status, body))
                else:
                    self.ok[host] += 1
                    words = body.split()
                    self.bodies[host].add((words[0], words[4], words[6]))  # app, pid, generation
            except Exception as e:  # noqa: BLE001 - every failure is counted
                self.failures.append((host, type(e).__name__, str(e)))
                conn = None
                continue
            if not keep_alive:
                conn.close()
                conn = None

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def test_reload_of_one_app_under_load_fails_no_request_and_leaves_the_other_alone(fugue_proc, workdir):
    p = start_router(fugue_proc, workdir)
    with Load(p.port, ["alpha.test", "beta.test"]) as load:
        wait_for(lambda: min(load.ok.values()) >= 20, 10, "traffic on both apps")
        reload = subprocess.run([sys.executable, "-m", "fugue.ctl", "reload", "-c", "apps.toml", "alpha"],
                                cwd=p.cwd, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
        assert reload.returncode == 0 and "alpha: generation 2 serving" in reload.stdout, reload
        before = dict(load.ok)
        wait_for(lambda: all(load.ok[h] >= before[h] + 20 for h in before), 10, "traffic after the reload")
        wait_for(lambda: {w["generation"] for w in
                          ask(p, "status", app="alpha")["data"]["apps"]["alpha"]["master"]["workers"]} == {2},
                 10, "alpha's generation 1 to finish draining")
        # A reload that fails (the new code breaks at import) rolls back that app alone.
        (workdir / "alpha.broken").write_text("")
        reply = ask(p, "reload", app="alpha")
        assert not reply["ok"] and "generation 2 keeps serving" in reply["text"], reply
        before = dict(load.ok)
        wait_for(lambda: all(load.ok[h] >= before[h] + 20 for h in before), 10, "traffic after the rollback")
    assert load.failures == [], load.failures[:5]
    alpha_gens = {g for _, _, g in load.bodies["alpha.test"]}
    beta = load.bodies["beta.test"]
    assert alpha_gens == {"1", "2"}, alpha_gens                # 3 never served: rolled back
    assert {g for _, _, g in beta} == {"1"} and len({pid for _, pid, _ in beta}) == 1  # untouched
    assert {a for a, _, _ in load.bodies["alpha.test"]} == {"alpha"}
    assert {a for a, _, _ in beta} == {"beta"}


def test_apps_are_added_and_removed_at_run_time(fugue_proc, workdir):
    p = start_router(fugue_proc, workdir)
    port = p.port
    spec = {"hostnames": ["gamma.test"], "script": "routed_app.py", "argv": ["gamma"], "workers": 1}
    reply = ask(p, "add", app="gamma", spec=spec)
    assert reply["ok"], reply
    assert get(port, "gamma.test")[1].startswith("gamma ")
    # USR2 of one app's master: the new master is reparented to the router, which follows it.
    old_master = ask(p, "status", app="gamma")["data"]["apps"]["gamma"]["master_pid"]
    reply = ask(p, "upgrade", app="gamma")
    assert reply["ok"], reply
    wait_for(lambda: ask(p, "status", app="gamma")["data"]["apps"]["gamma"]["master_pid"] != old_master,
             10, "the router to follow gamma's new master")
    assert get(port, "gamma.test")[1].startswith("gamma ")
    p.wait_log(rf"its old master pid {old_master} exited")
    refused = ask(p, "add", app="delta", spec={"hostnames": ["gamma.test"], "app": "m:x"})
    assert not refused["ok"] and "claimed by both" in refused["text"]
    broken = ask(p, "add", app="delta", spec={"hostnames": ["delta.test"], "app": "no_such_module:app"})
    assert not broken["ok"] and "delta" in broken["text"]
    assert get(port, "delta.test")[0] == 421

    beta_pid = int(ask(p, "status")["data"]["apps"]["beta"]["master_pid"])
    reply = ask(p, "remove", app="beta")
    assert reply["ok"], reply
    assert get(port, "beta.test")[0] == 421
    wait_for(lambda: not os.path.exists(f"/proc/{beta_pid}"), 10, "beta's master to exit")
    assert get(port, "alpha.test")[1].startswith("alpha ")
    assert set(ask(p, "status")["data"]["apps"]) == {"alpha", "gamma"}

    p.signal(15)  # the router stops gracefully, with every app
    assert p.wait_exit(20) == 0
    assert p.pids() == []


KINDS = """
[apps.wsgi]
hostnames = ["wsgi.test"]
app = "routed_kinds:wsgi_app"
workers = 1

[apps.asgi]
hostnames = ["asgi.test"]
app = "routed_kinds:asgi_app"
workers = 1

[apps.aio]
hostnames = ["aio.test"]
app = "routed_kinds:aio_handler"
workers = 1
"""


def test_every_adapter_kind_takes_routed_connections_with_the_client_address(fugue_proc, workdir):
    pytest.importorskip("waitress")
    pytest.importorskip("uvicorn")
    p = start_router(fugue_proc, workdir, extra=KINDS)
    for kind in ("wsgi", "asgi", "asyncio"):
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        conn.request("GET", "/", headers={"Host": {"asyncio": "aio.test"}.get(kind, f"{kind}.test")})
        local = conn.sock.getsockname()
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        assert resp.status == 200 and body.startswith(kind + " "), body
        assert body.rstrip().endswith(f"peer {local[0]}:{local[1]}"), (local, body)
