"""The management HTTP listener (--status-bind HOST:PORT): status as JSON and Prometheus text.

Who calls it: `Master.setup` makes one `StatusServer` when status_bind is set and
adds `.sock` to its loop with `.accept` as the reader; the control server's
`deadline()` asks ours, so slow clients and pending writes are timed by the
master's one loop. No threads: a tiny non-blocking HTTP/1.0 responder, one
request per connection.

    GET /status    the aggregate (fugue.status.collect) as JSON
    GET /metrics   the same as Prometheus text (prometheus-client's exposition)
    GET /healthz   200 while serving and not draining, else 503 (fugue.health)
    GET /livez     200: the master's loop answers

What it shows to whoever can connect: in-flight requests by path only (a query
string may carry a token) unless status_targets is on; and it answers only a Host
that is an IP address, localhost or one of status_hosts (421 otherwise), so a web
page in a browser on this machine cannot read it through DNS rebinding.

On USR2 the new master binds the same port with SO_REUSEPORT while the old one
still listens (both answer until the old one exits). A fresh master binds
without it first, so a second fugue on the same port still fails with "in use".
"""

import errno
import ipaddress
import json
import logging
import socket
import time

from .errors import FugueError
from .fds import parse_bind

log = logging.getLogger("fugue")

READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
WRITE_RETRY = 0.02
MAX_REQUEST = 16384
MAX_CLIENTS = 64
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_status_bind(spec):
    """'127.0.0.1:9000', '[::1]:9000', ':9000' -> (host or None, port); FugueError otherwise."""
    try:
        kind, addr = parse_bind(spec)
    except FugueError as e:
        raise FugueError(f"status_bind: {e}") from None
    if kind != "tcp":
        raise FugueError(f"status_bind {spec!r}: give HOST:PORT (a TCP address)")
    return addr


def bind_status(spec, share):
    """Bind the management listener; `share`: we are a new master taking over (USR2)."""
    host, port = parse_status_bind(spec)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FugueError(f"status_bind {spec}: cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if not share:  # exclusive bind first, then let our successor share it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.listen(64)
        # A new master (share) listens only once it serves (StatusServer.follow_handoff):
        # until then every check reaches the old master, whose /healthz is still true.
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FugueError(f"status_bind {spec}: port {port} already in use") from None
        raise FugueError(f"status_bind {spec}: cannot bind: {e.strerror}") from None
    sock.setblocking(False)
    return sock


class _Client:
    def __init__(self, sock, now):
        self.sock = sock
        self.buf = b""
        self.out = None
        self.deadline = now + READ_TIMEOUT


class StatusServer:
    def __init__(self, master, bind):
        self.master = master
        self.bind = bind
        share = getattr(master, "handoff", None) is not None
        self.sock = bind_status(bind, share=share)
        self.listening, self.closed = not share, False
        self.clients = {}
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            log.warning("status: /metrics needs prometheus-client (pip install 'fugue-daemon[status]')")
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("status listener on http://%s/status and /metrics", shown)

    # -- loop readers ---------------------------------------------------------------

    def accept(self):
        if not self.listening:  # a new master not serving yet: nothing to accept, and epoll
            self.master.loop.remove_reader(self.sock)  # would report the socket ready forever
            return
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next wakeup
                log.warning("status: accept failed: %s", e.strerror)
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn] = _Client(conn, time.monotonic())
            self.master.loop.add_reader(conn, lambda c=conn: self._on_read(c))

    def _on_read(self, conn):
        client = self.clients.get(conn)
        if client is None:
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        client.buf += data
        head, sep, _ = client.buf.partition(b"\r\n\r\n")
        if not sep:
            head, sep, _ = client.buf.partition(b"\n\n")
        if not sep:
            if len(client.buf) > MAX_REQUEST:
                self.master.loop.remove_reader(conn)
                self._respond(conn, 431, "text/plain", b"request too large\n")
            return
        self.master.loop.remove_reader(conn)  # one request per connection
        self._route(conn, head.decode("latin-1"))

    def _route(self, conn, head):
        lines = head.split("\n")
        parts = lines[0].split()
        if len(parts) < 2:
            self._respond(conn, 400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1]
        hosts = [line.partition(":")[2].strip() for line in lines[1:]
                 if line.partition(":")[0].strip().lower() == "host"]
        if len(hosts) > 1 or (hosts and not host_allowed(hosts[0], self._names())):
            self._respond(conn, 421, "text/plain", b"misdirected request: this Host is not served here\n")
            return
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._respond(conn, 405, "text/plain", b"only GET\n", extra={"Allow": "GET, HEAD"})
        elif path in ("/healthz", "/livez"):  # answered from the master's state at once: no worker asked
            from . import health

            code, body = (health.healthz if path == "/healthz" else health.livez)(self.master)
            self._respond(conn, code, "application/json", body, head_only)
        elif path in ("/status", "/status.json"):
            targets = getattr(self.master.cfg, "status_targets", False)
            self.master.control.fresh_status(lambda data: self._respond(
                conn, 200, "application/json",
                (json.dumps(data if targets else paths_only(data), indent=1) + "\n").encode(), head_only))
        elif path == "/metrics":
            self.master.control.fresh_status(lambda data: self._metrics(conn, data, head_only))
        elif path == "/":
            self._respond(conn, 200, "text/plain", b"fugue: /status (JSON), /metrics (Prometheus), /healthz, /livez\n", head_only)
        else:
            self._respond(conn, 404, "text/plain", b"not found: try /status, /metrics, /healthz or /livez\n", head_only)

    def _names(self):
        return {"localhost"} | {n.lower().rstrip(".") for n in getattr(self.master.cfg, "status_hosts", None) or ()}

    def _metrics(self, conn, data, head_only):
        try:
            body = metrics_text(data)
        except ImportError:
            self._respond(conn, 503, "text/plain",
                          b"/metrics needs prometheus-client: pip install 'fugue-daemon[status]'\n")
            return
        self._respond(conn, 200, PROMETHEUS_TYPE, body, head_only)

    # -- writing ----------------------------------------------------------------------

    def _respond(self, conn, code, ctype, body, head_only=False, extra=None):
        client = self.clients.get(conn)
        if client is None:
            return  # gone while its status was being gathered
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  421: "Misdirected Request",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}[code]
        headers = {"Content-Type": ctype, "Content-Length": str(len(body)), "Connection": "close",
                   "Cache-Control": "no-store", **(extra or {})}
        text = f"HTTP/1.0 {code} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        client.out = text.encode() + b"\r\n" + (b"" if head_only else body)
        client.deadline = time.monotonic() + WRITE_TIMEOUT
        self._flush(client)

    def _flush(self, client):
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client.sock)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client.sock)

    def _drop(self, conn):
        if self.clients.pop(conn, None) is not None:
            self.master.loop.remove_reader(conn)
            conn.close()

    def deadline(self):
        """Called from the master loop (via the control server): time out and retry writes."""
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.deadline <= now:
                self._drop(client.sock)
            elif client.out:
                self._flush(client)
        pending = [now + WRITE_RETRY if c.out else c.deadline for c in self.clients.values()]
        return min(pending, default=None)

    def follow_handoff(self):
        """Called every loop pass (via fugue.health): during a USR2 upgrade, one master answers.

        The new master joins the port's SO_REUSEPORT group only once its first generation
        serves; the old one leaves it once it has stepped down (it answers what it had
        accepted). So a load balancer's check never hears "starting" or "stopping" from
        a host whose service goes on through the upgrade.
        """
        m = self.master
        if not self.listening and not self.closed and m.rollout is None and not m.stopping:
            self.sock.listen(64)
            self.listening = True
            m.loop.add_reader(self.sock, self.accept)
        elif self.listening and getattr(m, "stepped_down", False):
            self.accept()
            m.loop.remove_reader(self.sock)
            self.sock.close()
            self.listening, self.closed = False, True

    def close(self):
        for conn in list(self.clients):
            self._drop(conn)
        self.sock.close()
        self.closed = True


def host_allowed(host, names):
    """True for a Host header naming an IP address (any: an address cannot be rebound to
    another host), or one of `names` (lower case, no trailing dot), with any port."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, sep, port = host.rpartition(":")
        if not sep or not port.isdigit():
            name = host
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.rstrip(".") in names


def paths_only(data):
    """The status with each in-flight request shown as method and path, without the query."""
    out = dict(data)
    out["workers"] = [dict(row, current=[dict(c, info=str(c.get("info", "")).split("?", 1)[0])
                                         for c in row.get("current") or [] if isinstance(c, dict)])
                      for row in data.get("workers", [])]
    return out


# -- Prometheus ----------------------------------------------------------------------------

def metrics_text(data):
    """The status as Prometheus text exposition (bytes); ImportError without prometheus-client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(data))
    return generate_latest(registry)


class _Collector:
    """One scrape's worth of metric families, built from a status snapshot."""

    def __init__(self, data):
        self.data = data

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.data["master"]
        yield _gauge(GaugeMetricFamily, "fugue_master_info", "the master: name and pid",
                     ["name", "pid"], [([m["name"], str(m["pid"])], 1)])
        yield GaugeMetricFamily("fugue_master_uptime_seconds", "seconds since the master started",
                                value=m["uptime"])
        yield GaugeMetricFamily("fugue_generation", "the worker generation that serves",
                                value=m["generation"])
        yield GaugeMetricFamily("fugue_workers_wanted", "workers the master keeps running",
                                value=m["workers_wanted"])
        yield GaugeMetricFamily("fugue_healthy", "1 if /healthz says 200 (serving, not draining)",
                                value=1 if m.get("healthy") else 0)
        yield GaugeMetricFamily("fugue_draining", "1 while draining (drain_delay before a stop, fuguectl drain)",
                                value=1 if m.get("draining") else 0)
        states = {"starting": 0, "ready": 0, "draining": 0, "killed": 0}
        for row in self.data["workers"]:
            states[row["state"]] = states.get(row["state"], 0) + 1
        yield _gauge(GaugeMetricFamily, "fugue_workers", "workers by state", ["state"],
                     [([state], n) for state, n in sorted(states.items())])
        labels = ["worker", "pid", "generation"]

        def per_worker(key):
            return [([str(r["id"]), str(r["pid"]), str(r["generation"])], r[key] or 0)
                    for r in self.data["workers"] if not r.get("foreign")]

        yield _gauge(CounterMetricFamily, "fugue_requests", "requests served by each worker",
                     labels, per_worker("requests"))
        yield _gauge(GaugeMetricFamily, "fugue_requests_in_flight", "requests being served now",
                     labels, per_worker("in_flight"))
        yield _gauge(GaugeMetricFamily, "fugue_connections_open", "open client connections",
                     labels, per_worker("connections"))
        yield _gauge(CounterMetricFamily, "fugue_connections", "client connections accepted",
                     labels, per_worker("connections_total"))
        yield _gauge(GaugeMetricFamily, "fugue_worker_uptime_seconds", "seconds since the worker started",
                     labels, per_worker("uptime"))
        yield _gauge(GaugeMetricFamily, "fugue_worker_heartbeat_age_seconds",
                     "seconds since the worker's last heartbeat", labels,
                     [(lbl, v) for lbl, v in per_worker("last_heartbeat")])
        restarts = {}
        for row in self.data["workers"]:
            restarts[str(row["id"])] = row["restarts"]
        yield _gauge(CounterMetricFamily, "fugue_worker_restarts",
                     "respawns of a worker slot after unexpected exits", ["worker"],
                     [([slot], n) for slot, n in sorted(restarts.items())])
        app = []
        for row in self.data["workers"]:
            for name, value in sorted((row.get("counters") or {}).items()):
                app.append(([name, str(row["id"]), str(row["pid"]), str(row["generation"])], value))
        yield _gauge(CounterMetricFamily, "fugue_app_events", "the app's fugue.stats.incr() counters",
                     ["name"] + labels, app)
        event = m.get("last_event")
        if event:
            yield _gauge(GaugeMetricFamily, "fugue_last_event_success",
                         "1 if the last start/reload/upgrade took over, 0 if it was rolled back",
                         ["what"], [([event["what"]], 1 if event["ok"] else 0)])
            yield _gauge(GaugeMetricFamily, "fugue_last_event_timestamp_seconds",
                         "when the last start/reload/upgrade finished (Unix time)",
                         ["what"], [([event["what"]], event["at"])])


def _gauge(cls, name, doc, labels, samples):
    family = cls(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family
