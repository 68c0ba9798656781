#!/usr/bin/env python3
"""Routed mode against the same app bound directly, and against nginx proxying by Host.

    python3 bench/router.py [--seconds 5] [--rounds 3] [--conns 32] [--workers 2] [--json out.json]

One run starts, side by side, on loopback:
  direct   app A and app B, each an ordinary fugue master bound to its own port
  router   fugue's router on one port with the same two apps behind it
           (python -m fugue.router -c apps.toml; A by Host a.bench, B by b.bench)
  nginx    Debian's nginx (started here with a temp config) on one port,
           proxying by server_name to the two direct masters, with upstream
           keepalive (its best case), and on a second port as nginx proxies by
           default (HTTP/1.0, a new upstream connection per request)
and drives each with wrk, Host: a.bench, in two modes:
  keep-alive   wrk's connections stay open (the router sees only the first request)
  new conn     "Connection: close": a new TCP connection for every request, so the
               router (or nginx) does its whole job each time
Cells are measured in rounds, interleaved (direct, router, nginx, direct, ...),
and the median of the rounds is reported; the ratio router/direct compares
medians of the same run. Every process shares the machine's CPUs with wrk, so
figures are for comparison within one run, not absolute capacity.

Also reported: the router's own CPU time per routed connection (from
/proc/PID/stat over the router's cells), and the wrk errors of every cell
(socket errors and non-2xx responses: must be 0).

Ports: the apps and the router bind port 0 and report theirs; only nginx needs a
port chosen in advance (bound to 0 and released: fine for a benchmark).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"

APP = '''\
import http.server, sys
import fugue

NAME = sys.argv[1]
BODY = ("hello from " + NAME + "\\n").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # one write per response: headers and body in separate writes meet Nagle

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        if self.close_connection:  # the client said Connection: close; say so too
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
server.daemon_threads = True
fugue.start(server, 0, "127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 2)
'''

APPS_TOML = '''\
bind = ["127.0.0.1:0"]
workers = {workers}

[apps.a]
hostnames = ["a.bench"]
script = "{app}"
argv = ["a", "{workers}"]

[apps.b]
hostnames = ["b.bench"]
script = "{app}"
argv = ["b", "{workers}"]
'''

NGINX_CONF = '''\
worker_processes {nginx_workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream a {{ server 127.0.0.1:{port_a}; keepalive 64; }}
    upstream b {{ server 127.0.0.1:{port_b}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} default_server;
        return 421;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name a.bench;
        location / {{ proxy_pass http://a; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name b.bench;
        location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    # nginx's default proxying: a new upstream connection (HTTP/1.0) for every request.
    server {{
        listen 127.0.0.1:{port2} default_server;
        return 421;
    }}
    server {{
        listen 127.0.0.1:{port2};
        server_name a.bench;
        location / {{ proxy_pass http://127.0.0.1:{port_a}; }}
    }}
    server {{
        listen 127.0.0.1:{port2};
        server_name b.bench;
        location / {{ proxy_pass http://127.0.0.1:{port_b}; }}
    }}
}}
'''


class Proc:
    def __init__(self, argv, cwd, name):
        self.name = name
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.log_file = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_log(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, errors="replace") as f:
                m = re.search(pattern, f.read())
            if m:
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"{self.name}: no /{pattern}/ in its log:\n{tail}")

    def stop(self):
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGINT)
                self.popen.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log_file.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(port, host):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and b"hello from" in data
    except OSError:
        return False


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port, host, seconds, conns, close):
    argv = [WRK, "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    run = subprocess.run(argv, capture_output=True, text=True)
    out = run.stdout
    if run.returncode or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed ({run.returncode}): {out[-1500:]}{run.stderr[-500:]}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {q: _ms(re.search(rf"\s{q}%\s+([\d.]+\w+)", out).group(1)) for q in ("50", "99")}
    return {"rps": rps, "errors": errors, "requests": total, "p50_ms": lat["50"], "p99_ms": lat["99"]}


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="workers per app")
    ap.add_argument("--nginx-workers", default="1", help="nginx worker_processes (1 = like the one router)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    for tool in (WRK, NGINX):
        if not os.path.exists(tool):
            raise SystemExit(f"{tool} is needed (apt-get install wrk nginx-light)")

    top = tempfile.mkdtemp(prefix="fugue-bench-router-")
    procs = []
    keep = False
    try:
        app = os.path.join(top, "bench_app.py")
        with open(app, "w") as f:
            f.write(APP)
        direct = {}
        for name in ("a", "b"):
            d = os.path.join(top, f"direct-{name}")
            os.mkdir(d)
            p = Proc([sys.executable, app, name, str(args.workers)], d, f"direct-{name}")
            procs.append(p)
            direct[name] = int(p.wait_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
            p.wait_log(r"started: generation 1 serving")
        rdir = os.path.join(top, "router")
        os.mkdir(rdir)
        with open(os.path.join(rdir, "apps.toml"), "w") as f:
            f.write(APPS_TOML.format(workers=args.workers, app=app))
        router = Proc([sys.executable, "-m", "fugue.router", "-c", "apps.toml"], rdir, "router")
        procs.append(router)
        router_port = int(router.wait_log(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        router.wait_log(r"router serving 2 apps")
        ndir = os.path.join(top, "nginx")
        os.mkdir(ndir)
        nginx_port, nginx_port2 = free_port(), free_port()
        with open(os.path.join(ndir, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(dir=ndir, port=nginx_port, port2=nginx_port2, port_a=direct["a"],
                                      port_b=direct["b"],
                                      nginx_workers=args.nginx_workers))
        nginx = Proc([NGINX, "-p", ndir, "-c", os.path.join(ndir, "nginx.conf")], ndir, "nginx")
        procs.append(nginx)
        deadline = time.monotonic() + 10
        while not http_ok(nginx_port, "a.bench"):
            if time.monotonic() > deadline or nginx.popen.poll() is not None:
                raise SystemExit("nginx did not come up: " + open(nginx.log_path).read()[-1000:])
            time.sleep(0.05)
        for port in (direct["a"], router_port, nginx_port):
            assert http_ok(port, "a.bench"), port
        assert http_ok(router_port, "b.bench") and http_ok(nginx_port, "b.bench")

        assert http_ok(nginx_port2, "a.bench") and http_ok(nginx_port2, "b.bench")
        targets = {"direct": direct["a"], "router": router_port, "nginx": nginx_port, "nginx-1.0": nginx_port2}
        results = {(t, m): [] for t in targets for m in ("keep-alive", "new conn")}
        router_cpu = []  # (cpu seconds, connections) over the router's new-conn cells
        for r in range(args.rounds):
            for mode in ("keep-alive", "new conn"):
                for target, port in targets.items():
                    before = cpu_seconds(router.popen.pid) if target == "router" else None
                    cell = wrk(port, "a.bench", args.seconds, args.conns, close=(mode == "new conn"))
                    if before is not None and mode == "new conn":
                        router_cpu.append((cpu_seconds(router.popen.pid) - before, cell["requests"]))
                    results[(target, mode)].append(cell)
                    dead = [p.name for p in procs if p.popen.poll() is not None]
                    if dead or cell["errors"]:
                        keep = True
                        print(f"  errors in this cell; dead: {dead or 'none'}; logs kept in {top}", flush=True)
                    print(f"round {r + 1} {mode:10s} {target:9s} {cell['rps']:9.0f} req/s  "
                          f"p50 {cell['p50_ms']:.2f} ms  p99 {cell['p99_ms']:.2f} ms  errors {cell['errors']}",
                          flush=True)
        mixed = {}
        for target, port in (("router", router_port), ("nginx", nginx_port)):
            mixed[target] = wrk(port, "b.bench", args.seconds, args.conns, close=True)

        def med(target, mode, key="rps"):
            return statistics.median(c[key] for c in results[(target, mode)])

        cpu = sum(c for c, _ in router_cpu)
        conns = sum(n for _, n in router_cpu)
        summary = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "nginx": subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()},
            "settings": vars(args),
            "cells": {f"{t} / {m}": {"median_rps": med(t, m), "p50_ms": med(t, m, "p50_ms"),
                                     "p99_ms": med(t, m, "p99_ms"),
                                     "errors": sum(c["errors"] for c in results[(t, m)]),
                                     "rounds": [c["rps"] for c in results[(t, m)]]}
                      for (t, m) in results},
            "ratios": {m: {"router/direct": med("router", m) / med("direct", m),
                           "router/nginx": med("router", m) / med("nginx", m),
                           "router/nginx-1.0": med("router", m) / med("nginx-1.0", m),
                           "nginx/direct": med("nginx", m) / med("direct", m)}
                       for m in ("keep-alive", "new conn")},
            "router_cpu_us_per_conn": 1e6 * cpu / conns if conns else None,
            "app_b_new_conn": {t: mixed[t]["rps"] for t in mixed},
        }
        print()
        print("| client mode | direct | router | nginx (upstream keepalive) | nginx (HTTP/1.0 upstream) "
              "| router/direct | router/nginx | router/nginx 1.0 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m in ("keep-alive", "new conn"):
            r = summary["ratios"][m]
            print(f"| {m} | {med('direct', m):.0f} | {med('router', m):.0f} | {med('nginx', m):.0f} | "
                  f"{med('nginx-1.0', m):.0f} | {r['router/direct']:.2f} | {r['router/nginx']:.2f} | "
                  f"{r['router/nginx-1.0']:.2f} |")
        print()
        print("| client mode | direct p50/p99 ms | router p50/p99 ms | nginx p50/p99 ms | nginx 1.0 p50/p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for m in ("keep-alive", "new conn"):
            print(f"| {m} | " + " | ".join(f"{med(t, m, 'p50_ms'):.2f} / {med(t, m, 'p99_ms'):.2f}"
                                           for t in targets) + " |")
        print()
        errors = sum(c["errors"] for cells in results.values() for c in cells)
        print(f"router CPU per routed connection: {summary['router_cpu_us_per_conn']:.1f} us "
              f"({conns} connections, {cpu:.2f} s CPU)")
        print(f"app b, new conn: router {mixed['router']['rps']:.0f} req/s, nginx {mixed['nginx']['rps']:.0f} req/s")
        print(f"wrk errors (socket errors + non-2xx) over all cells: {errors}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        for p in reversed(procs):
            p.stop()
        if not keep:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
