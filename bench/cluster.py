#!/usr/bin/env python3
"""Three hosts behind HAProxy: rolling deploys, rolling restarts, a crash and a cut link.

    python3 bench/cluster.py                      # fugue, then gunicorn; as root
    python3 bench/cluster.py --servers fugue --scenarios deploy,restart

The "hosts" are network namespaces on this machine (`ip netns add`), each with
a veth pair whose other end is in one bridge in the root namespace. Every
address is the benchmark's own (SUBNET.0/24 on that bridge; nothing is routed
anywhere else, nothing leaves the machine). Each host runs the same WSGI app
(bench/apps/cluster_app.py) with 2 workers: fugue (`fuguectl start --app`,
status listener, drain_delay) or gunicorn (gthread, 2 workers x 4 threads).
HAProxy (Debian's package) runs in the root namespace in front of them:

    option httpchk GET /healthz / http-check expect status 200
    default-server inter 200ms fall 1 rise 2      retries 3, option redispatch

fugue is checked on its status listener (fugue's /healthz, from the master);
gunicorn, which has no health endpoint, on the app's own /healthz. Through
HAProxy, two exact-counting loads (bench/loadgen.py) run during each scenario:
keep-alive clients and new-connection clients (a fresh TCP connection and
`Connection: close` per request). Scenarios, each on a healthy 3-host cluster:

    deploy    new code on disk host by host: fugue `fuguectl upgrade` then wait
              for /healthz to show the new version; gunicorn HUP then wait for
              the app's /healthz to show it (HUP is gunicorn's deploy)
    restart   host by host: fugue `fuguectl stop` (drain_delay: /healthz 503 at
              once, serving goes on, then the graceful stop) and start again;
              gunicorn TERM (it has no drain) and start again; each time wait
              until HAProxy has the host UP again before the next one
    kill      kill -9 of host 2's master; then a fresh start once its workers are gone
    cut       `ip link set down` of host 3's link for 2 s, then up again

Every request counts: a failure is any loadgen failure kind (HAProxy's 502/503/
504 are bad_status). HAProxy's view of each server (its stats socket, polled
every 20 ms) is marked on the timelines. Output: a table on stdout and in
bench/out/cluster.md, one picture per scenario (bench/out/cluster-*.png; --png
PATH draws the restart scenario once more, for the README), logs in bench/out/.

Everything is removed at the end, even on failure or Ctrl-C: every process in
the namespaces (`ip netns pids`), HAProxy, the namespaces, the veths and the
bridge. Names carry this run's pid (lbc<pid>...), so a run never touches
another's; namespaces left by a run that was SIGKILLed (its pid gone) are
removed at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:  # run as a script (python3 bench/cluster.py) or imported as bench.cluster
    import loadgen
    import proctree
except ImportError:
    from bench import loadgen, proctree

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "apps" / "cluster_app.py"
SUBNET = "10.217.17"          # this benchmark's own /24, on its own bridge
LB_ADDR = f"{SUBNET}.1"
LB_PORT = 8080
APP_PORT = 8000
STATUS_PORT = 9000
HOSTS = 3
WORKERS = 2
DRAIN_DELAY = 1.0             # 5 x HAProxy's inter: the check sees 503 long before the stop
SETTLE_S = 1.5                # load before and after each scenario's actions
CUT_S = 2.0
BOOT_S = 30.0
SCENARIOS = ("deploy", "restart", "kill", "cut")
PREFIX = f"lbc{os.getpid()}"


class BenchError(Exception):
    pass


def run(*argv, check=True):
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def get(addr, port, path, timeout=1.0):
    """(status, body) of one GET on a fresh connection, or (None, error)."""
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)
    finally:
        conn.close()


# -- the network -------------------------------------------------------------------------

class Network:
    """A bridge in the root namespace and one namespace per host, veth pairs between."""

    def __init__(self, hosts):
        self.bridge = f"{PREFIX}br"[:15]
        self.hosts = [{"ns": f"{PREFIX}h{i}", "outer": f"{PREFIX}v{i}"[:15], "inner": "eth0",
                       "addr": f"{SUBNET}.{10 + i}", "name": f"h{i}"} for i in range(1, hosts + 1)]
        self.made = []

    @staticmethod
    def sweep_stale():
        """Remove namespaces and links of earlier runs whose process is gone."""
        for line in run("ip", "netns", "list", check=False).splitlines():
            m = re.match(r"(lbc(\d+)h\d+)\b", line)
            if m and not proctree.alive(int(m.group(2))):
                for pid in run("ip", "netns", "pids", m.group(1), check=False).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                run("ip", "netns", "del", m.group(1), check=False)
        for line in run("ip", "-o", "link", "show", check=False).splitlines():
            m = re.match(r"\d+: (lbc(\d+)(?:br|v\d+))[@:]", line)
            if m and not proctree.alive(int(m.group(2))):
                run("ip", "link", "del", m.group(1), check=False)

    def up(self):
        taken = run("ip", "-4", "-o", "addr", "show")
        if f" {SUBNET}." in taken:
            raise BenchError(f"{SUBNET}.0/24 is already in use on this machine (another cluster.py run?)")
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        run("ip", "addr", "add", f"{LB_ADDR}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            run("ip", "netns", "add", h["ns"])
            self.made.append(("netns", h["ns"]))
            run("ip", "link", "add", h["outer"], "type", "veth", "peer", "name", h["inner"], "netns", h["ns"])
            self.made.append(("link", h["outer"]))
            run("ip", "link", "set", h["outer"], "master", self.bridge, "up")
            run("ip", "-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["inner"])
            run("ip", "-n", h["ns"], "link", "set", h["inner"], "up")
            run("ip", "-n", h["ns"], "link", "set", "lo", "up")

    def cut(self, h, up):
        run("ip", "link", "set", h["outer"], "up" if up else "down")

    def down(self):
        """Kill whatever still runs in the namespaces, then remove everything made."""
        for kind, name in reversed(self.made):
            if kind == "netns":
                for _ in range(50):
                    pids = run("ip", "netns", "pids", name, check=False).split()
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(pid), signal.SIGKILL)
                    proctree.reap_orphans()
                    time.sleep(0.05)
                run("ip", "netns", "del", name, check=False)
            else:
                run("ip", "link", "del", name, check=False)
        self.made.clear()

    def pids(self, h):
        return run("ip", "netns", "pids", h["ns"], check=False).split()


# -- the servers on each host -------------------------------------------------------------

class Host:
    """One host's server: a directory with the app and its version, logs, pid file."""

    check_port = APP_PORT

    def __init__(self, net, h, base):
        self.net, self.h = net, h
        self.dir = base / h["name"]
        self.dir.mkdir()
        shutil.copy(APP, self.dir / "cluster_app.py")
        self.set_version("v1")
        self.log = open(self.dir / "server.log", "ab")
        self.popen = None
        self.popens = []

    def set_version(self, version):
        proctree.write_atomically(self.dir / "version.txt", version + "\n")

    def spawn(self, argv, env=None):
        full = dict(os.environ, PYTHONPATH=str(ROOT), CLUSTER_HOST=self.h["name"], **(env or {}))
        full.pop("NOTIFY_SOCKET", None)
        self.popen = subprocess.Popen(["ip", "netns", "exec", self.h["ns"], *argv], cwd=self.dir, env=full,
                                      stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                      start_new_session=True)
        self.popens.append(self.popen)

    def master_pid(self):
        try:
            return int((self.dir / self.pid_name).read_text().strip())
        except (OSError, ValueError):
            return None

    def wait_gone(self):
        """Until nothing of this host's server runs (old workers included): the port is free again."""
        def gone():
            for p in self.popens:
                p.poll()
            proctree.reap_orphans(keep=[p.pid for p in self.popens])
            return not self.net.pids(self.h)
        proctree.wait_for(gone, 60, f"{self.h['name']}'s processes to exit")

    def kill9(self):
        os.kill(self.master_pid(), signal.SIGKILL)


class FugueHost(Host):
    kind = "fugue"
    check_port = STATUS_PORT
    pid_name = "fugue.pid"

    def start(self):
        self.spawn([sys.executable, "-m", "fugue.ctl", "start", "-w", str(WORKERS),
                    "--bind", f"{self.h['addr']}:{APP_PORT}", "--status-bind", f"{self.h['addr']}:{STATUS_PORT}",
                    "--drain-delay", str(DRAIN_DELAY), "--pid-file", "fugue.pid", "--tmp-path", ".",
                    "--app", "cluster_app:app"])
        proctree.wait_for(lambda: self.health()[0] == 200, BOOT_S, f"fugue on {self.h['name']} healthy")

    def health(self):
        status, body = get(self.h["addr"], STATUS_PORT, "/healthz")
        try:
            return status, json.loads(body).get("version")
        except ValueError:
            return status, None

    def ctl(self, *args):
        done = subprocess.run([sys.executable, "-m", "fugue.ctl", *args, "--pid-file", "fugue.pid",
                               "--tmp-path", "."], cwd=self.dir, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise BenchError(f"fuguectl {' '.join(args)} on {self.h['name']}: {done.stderr.strip()}")
        return done.stdout.strip()

    def deploy(self, version):
        self.set_version(version)
        self.ctl("upgrade")
        proctree.wait_for(lambda: self.health() == (200, version), BOOT_S,
                          f"{self.h['name']}'s /healthz to show {version}")

    def restart(self):
        """Returns the wall time the master began to drain (from its log line)."""
        self.ctl("stop")
        self.wait_gone()
        drained = None
        with open(self.dir / "server.log", errors="replace") as f:
            for line in f:
                if "draining for" in line and "before the graceful stop" in line:
                    drained = line
        self.start()
        if drained is None:
            return None
        stamp = time.strptime(drained[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(stamp) + int(drained[20:23]) / 1000.0


class GunicornHost(Host):
    kind = "gunicorn"
    pid_name = "gunicorn.pid"

    def start(self):
        self.spawn([sys.executable, "-m", "gunicorn", "cluster_app:app", "--chdir", str(self.dir),
                    "--bind", f"{self.h['addr']}:{APP_PORT}", "--worker-class", "gthread", "--threads", "4",
                    "--workers", str(WORKERS), "--keep-alive", "5", "--pid", "gunicorn.pid",
                    "--log-level", "warning"])
        proctree.wait_for(lambda: self.health()[0] == 200, BOOT_S, f"gunicorn on {self.h['name']} healthy")

    def health(self):
        status, body = get(self.h["addr"], APP_PORT, "/healthz")
        return status, (body.split()[1] if status == 200 and len(body.split()) > 1 else None)

    def deploy(self, version):
        self.set_version(version)
        os.kill(self.master_pid(), signal.SIGHUP)
        # Any worker may answer: the new version must be all there is (20 answers in a row).
        streak = [0]

        def all_new():
            streak[0] = streak[0] + 1 if self.health() == (200, version) else 0
            return streak[0] >= 20
        proctree.wait_for(all_new, BOOT_S, f"{self.h['name']}'s /healthz to show {version}", interval=0.01)

    def restart(self):
        """Returns the wall time TERM was sent (gunicorn stops at once: no drain)."""
        sent = time.time()
        os.kill(self.master_pid(), signal.SIGTERM)
        self.wait_gone()
        self.start()
        return sent


# -- HAProxy ---------------------------------------------------------------------------------

HAPROXY_CFG = """\
global
    maxconn 4096
    stats socket {dir}/haproxy.sock mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 3s
    timeout check 500ms
    retries 3
    option redispatch 1
    option http-keep-alive

frontend fe
    bind {lb}:{port}
    default_backend hosts

backend hosts
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
{servers}
"""


class HAProxy:
    def __init__(self, base, hosts):
        self.dir = base
        self.sock = base / "haproxy.sock"
        servers = "\n".join(f"    server {h.h['name']} {h.h['addr']}:{APP_PORT} check port {h.check_port}"
                            for h in hosts)
        self.cfg = base / "haproxy.cfg"
        self.cfg.write_text(HAPROXY_CFG.format(dir=base, lb=LB_ADDR, port=LB_PORT, servers=servers))
        self.log = open(base / "haproxy.log", "ab")
        self.popen = None
        self.names = [h.h["name"] for h in hosts]

    def start(self):
        run("haproxy", "-c", "-q", "-f", str(self.cfg))
        self.popen = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)], stdin=subprocess.DEVNULL,
                                      stdout=self.log, stderr=self.log, start_new_session=True)
        proctree.wait_for(lambda: self.states() and self.all_up(), BOOT_S, "HAProxy with every host UP")

    def states(self):
        """{server: 'UP'|'DOWN'|...} from the stats socket, or {} if it does not answer."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(self.sock))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.reader(io.StringIO(data.decode().lstrip("# ")))
        header = next(rows, [])
        if "status" not in header:
            return {}
        at = header.index("status")
        return {r[1]: r[at].split()[0] for r in rows if len(r) > at and r[0] == "hosts" and r[1] in self.names}

    def all_up(self):
        states = self.states()
        return bool(states) and all(states.get(n) == "UP" for n in self.names)

    def stop(self):
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class StateWatcher(threading.Thread):
    """Marks every HAProxy server state change on the loads' timelines."""

    def __init__(self, haproxy, loads):
        super().__init__(daemon=True)
        self.haproxy, self.loads = haproxy, loads
        self.halt = threading.Event()
        self.changes = []   # (wall time, server, state)

    def first(self, name, state, since):
        return next((t for t, n, s in self.changes if n == name and s == state and t >= since), None)

    def run(self):
        last = self.haproxy.states()
        while not self.halt.wait(0.02):
            now = self.haproxy.states()
            for name, state in sorted(now.items()):
                if last.get(name) != state:
                    self.changes.append((time.time(), name, state))
                    for load in self.loads:
                        load.mark(f"{name} {state}")
            last = now or last


# -- scenarios -------------------------------------------------------------------------------

def scenario_deploy(hosts, net, mark, notes):
    version = f"v{int(hosts[0].health()[1].lstrip('v')) + 1}"  # the same new code for every host
    for host in hosts:
        mark(f"{host.h['name']} deploy {version}")
        t0 = time.monotonic()
        host.deploy(version)
        notes.append(f"{host.h['name']}: {version} live in {time.monotonic() - t0:.2f}s")


def scenario_restart(hosts, net, mark, notes, haproxy=None, watcher=None):
    for host in hosts:
        name = host.h["name"]
        mark(f"{name} stop")
        t0, wall = time.monotonic(), time.time()
        began = host.restart()
        mark(f"{name} started")
        proctree.wait_for(haproxy.all_up, BOOT_S, "HAProxy with every host UP")
        down = watcher.first(name, "DOWN", wall - 0.05) if watcher else None
        seen = (f", HAProxy had it DOWN {1000 * (down - began):.0f} ms after it began to "
                f"{'drain' if host.kind == 'fugue' else 'stop'}") if down and began else ""
        notes.append(f"{name}: stopped, started and UP again in {time.monotonic() - t0:.2f}s{seen}")


def scenario_kill(hosts, net, mark, notes, haproxy=None):
    host = hosts[1]
    mark(f"{host.h['name']} kill -9 master")
    t0 = time.monotonic()
    host.kill9()
    proctree.wait_for(lambda: haproxy.states().get(host.h["name"]) != "UP", 30, "HAProxy to take the host out")
    notes.append(f"{host.h['name']}: HAProxy took it out {1000 * (time.monotonic() - t0):.0f} ms after the kill")
    host.wait_gone()
    notes.append(f"{host.h['name']}: its workers were gone {time.monotonic() - t0:.2f}s after the kill")
    mark(f"{host.h['name']} start")
    host.start()
    proctree.wait_for(haproxy.all_up, BOOT_S, "HAProxy with every host UP")


def scenario_cut(hosts, net, mark, notes, haproxy=None):
    host = hosts[2]
    mark(f"{host.h['name']} link down")
    t0 = time.monotonic()
    net.cut(host.h, up=False)
    proctree.wait_for(lambda: haproxy.states().get(host.h["name"]) != "UP", 30, "HAProxy to take the host out")
    notes.append(f"{host.h['name']}: HAProxy took it out {1000 * (time.monotonic() - t0):.0f} ms after the cut")
    time.sleep(CUT_S)  # the outage itself: a measured window, not a wait for a condition
    mark(f"{host.h['name']} link up")
    net.cut(host.h, up=True)
    proctree.wait_for(haproxy.all_up, BOOT_S, "HAProxy with every host UP")


def run_scenario(name, hosts, net, haproxy, keepalive_conns, fresh_conns):
    proctree.wait_for(haproxy.all_up, BOOT_S, "HAProxy with every host UP")
    loads = {"keep-alive": loadgen.Load(LB_ADDR, LB_PORT, conns=keepalive_conns, keepalive=True),
             "new connection": loadgen.Load(LB_ADDR, LB_PORT, conns=fresh_conns, keepalive=False)}
    for load in loads.values():
        load.start()
    watcher = StateWatcher(haproxy, list(loads.values()))
    watcher.start()
    notes = []

    def mark(label):
        for load in loads.values():
            load.mark(label)
    try:
        time.sleep(SETTLE_S)  # the measured window before the first action
        fn = {"deploy": scenario_deploy, "restart": scenario_restart, "kill": scenario_kill,
              "cut": scenario_cut}[name]
        if name == "deploy":
            fn(hosts, net, mark, notes)
        elif name == "restart":
            fn(hosts, net, mark, notes, haproxy=haproxy, watcher=watcher)
        else:
            fn(hosts, net, mark, notes, haproxy=haproxy)
        time.sleep(SETTLE_S)  # and after the last
    finally:
        watcher.halt.set()
        watcher.join()
        results = {k: load.stop() for k, load in loads.items()}
    return results, notes


def run_server(kind, scenarios, base, args):
    net = Network(HOSTS)
    hosts, haproxy = [], None
    net.up()
    try:
        cls = FugueHost if kind == "fugue" else GunicornHost
        hosts = [cls(net, h, base) for h in net.hosts]
        for host in hosts:
            host.start()
        haproxy = HAProxy(base, hosts)
        haproxy.start()
        out = {}
        for name in scenarios:
            print(f"{kind}: {name} ...", file=sys.stderr, flush=True)
            out[name] = run_scenario(name, hosts, net, haproxy, args.keepalive_conns, args.fresh_conns)
        return out
    finally:
        if haproxy is not None:
            haproxy.stop()
        for host in hosts:  # graceful first, so the logs end cleanly; net.down() kills the rest
            pid = host.master_pid()
            with contextlib.suppress(TypeError, ProcessLookupError):
                os.kill(pid, signal.SIGINT if kind == "fugue" else signal.SIGQUIT)
        with contextlib.suppress(TimeoutError):
            proctree.wait_for(lambda: not any(net.pids(h.h) for h in hosts), 5, "servers to exit")
        net.down()
        for host in hosts:
            for p in host.popens:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            host.log.close()
        proctree.reap_orphans()


EXPLAIN = {
    "deploy": "new code host by host; the next host once /healthz shows the new version",
    "restart": "stop and start host by host (a kernel update, a new Python)",
    "kill": "kill -9 of host 2's master, then a fresh start",
    "cut": f"host 3's link down for {CUT_S:g}s, then up",
}


def report(all_results, outdir, png):
    try:
        import plot
    except ImportError:
        from bench import plot
    rows = []
    lines = []
    for name in SCENARIOS:
        for kind, per in all_results.items():
            if name not in per:
                continue
            results, notes = per[name]
            for load_name, r in results.items():
                rows.append({"scenario": name, "server": kind, "load": load_name, "requests": r.requests,
                             "failed": r.failed, "failures": r.failures_text(),
                             "ok/s": round(r.requests_per_s)})
            lines.append(f"- {kind} {name}: " + "; ".join(notes))
    table = plot.markdown_table(rows, ["scenario", "server", "load", "requests", "failed", "failures", "ok/s"])
    pictures = []
    for name in SCENARIOS:
        series = {f"{kind} {name}, {load_name}": r
                  for kind, per in all_results.items() if name in per
                  for load_name, r in per[name][0].items()}
        if series:
            pictures.append(plot.timeline_png(str(outdir / f"cluster-{name}.png"), series,
                                              f"{name}: {EXPLAIN[name]}"))
    if png and any("restart" in per for per in all_results.values()):
        series = {f"{kind}, {load_name}": r for kind, per in all_results.items() if "restart" in per
                  for load_name, r in per["restart"][0].items()}
        plot.timeline_png(png, series, "rolling restart of 3 hosts behind HAProxy (HAProxy's view of each host marked)")
        pictures.append(png)
    text = table + "\n\n" + "\n".join(lines) + "\n"
    (outdir / "cluster.md").write_text(text)
    samples = []
    for kind, per in all_results.items():
        for name, (results, _) in per.items():
            for load_name, r in results.items():
                for k, sample in r.failure_samples.items():
                    samples.append(f"  {kind} {name} {load_name} {k}: {sample}")
    return text + ("\nfailure samples:\n" + "\n".join(samples) + "\n" if samples else ""), pictures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="fugue,gunicorn", help="fugue,gunicorn (default: both)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {','.join(SCENARIOS)}")
    parser.add_argument("--keepalive-conns", type=int, default=8)
    parser.add_argument("--fresh-conns", type=int, default=4)
    parser.add_argument("--png", help="also draw the restart scenario here (the README's picture)")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [s for s in servers if s not in ("fugue", "gunicorn")] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        parser.error(f"unknown: {', '.join(bad)}")
    if os.geteuid() != 0:
        print("cluster.py: needs root (ip netns, veth, bridge)", file=sys.stderr)
        return 2
    for tool in ("ip", "haproxy"):
        if shutil.which(tool) is None:
            print(f"cluster.py: {tool} not found (apt-get install iproute2 haproxy)", file=sys.stderr)
            return 2
    if "gunicorn" in servers:
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            print("cluster.py: gunicorn not installed (pip install gunicorn)", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through every finally: nothing is left behind
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    proctree.become_subreaper()  # a fugue master re-exec'd by an upgrade outlives its parent
    Network.sweep_stale()
    outdir = ROOT / "bench" / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    all_results = {}
    with tempfile.TemporaryDirectory(prefix="fugue-cluster-") as tmp:
        os.chmod(tmp, 0o755)
        try:
            for kind in servers:
                base = Path(tmp) / kind
                base.mkdir()
                try:
                    all_results[kind] = run_server(kind, scenarios, base, args)
                finally:
                    for f in base.rglob("*.log"):
                        shutil.copy(f, outdir / f"cluster-{kind}-{f.parent.name}-{f.name}")
        except (BenchError, TimeoutError) as e:
            print(f"cluster.py: {e}", file=sys.stderr)
            return 1
    text, pictures = report(all_results, outdir, args.png)
    print(text)
    print("pictures: " + ", ".join(pictures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
