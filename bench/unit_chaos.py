#!/usr/bin/env python3
"""kill -9 of the master under systemd: fugue beside gunicorn, the same unit shape.

    python3 bench/unit_chaos.py              # needs root, systemd-nspawn, gunicorn, waitress
    python3 bench/unit_chaos.py --runs 3

The machine's own systemd 252 is booted in a container (tests/sdbox.py, the recipe of
issue 14) and each server runs as a service of the same shape: Type=notify,
KillMode=mixed, Restart=on-failure, RestartSec=1, User=www-data, 2 workers,
graceful_timeout 5 s, the same WSGI app (tests/apps/wsgi_app.py: fugue serves it with
waitress, gunicorn with gthread, 4 threads). fugue's unit is contrib/systemd/fugue@.service
as shipped; gunicorn's is that unit with gunicorn's ExecStart and no ExecReload.

Inside the container, bench/loadgen.py keeps 16 connections busy, each request on a new
connection (so a refused connect shows as connect_refused, not hidden behind a
kept-alive socket); one GET /slow?s=3 is in flight on a worker when the master (fugue:
the pid in its pid file; gunicorn: MainPID) gets SIGKILL. The load runs 1 s before the
kill and 6 s after it. Reported: requests, failed by kind, "down" (time after the kill
with no successful request, 100 ms buckets), requests delayed (answered after more than
250 ms: they waited in the listen backlog) and the slowest, the in-flight request's
outcome, the time until a fresh request is answered by a new master, and NRestarts.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from sdbox import SRC, VENV, Box, why_not  # noqa: E402

PORT = {"fugue": 8201, "gunicorn": 8202}
APP_DIR = "/srv/unit-chaos"
BEFORE_S, AFTER_S, CONNS = 1.0, 6.0, 16

DRIVER = f"""
import dataclasses, json, sys
sys.path.insert(0, "{SRC}/bench")
import loadgen
port = int(sys.argv[1])
load = loadgen.Load("127.0.0.1", port, conns={CONNS}, keepalive=False, timeout=10.0).start()
print("started", flush=True)
sys.stdin.readline()
t = load.mark("kill -9 master")
print("marked", flush=True)
sys.stdin.readline()
r = load.stop()
# as chaos.down_s: the last 100 ms bucket, cut short by stop(), is not an outage
whole = dataclasses.replace(r, timeline=r.timeline[:-1], duration=r.timeline[-1].t if r.timeline else 0.0)
down = sum(e - max(s, t) for s, e in whole.zero_ok_spans() if e > t)
print(json.dumps({{"requests": r.requests, "ok": r.ok, "failures": dict(r.failures), "down": down,
                  "max_ms": r.latency_ms(1.0), "delayed": sum(1 for x in r.latencies if x > 0.25)}}))
"""

GUNICORN_UNIT = """[Unit]
Description=gunicorn, the shape of fugue@.service
[Service]
Type=notify
NotifyAccess=main
User=www-data
Group=www-data
WorkingDirectory={dir}
ExecStart={venv}/bin/python3 -m gunicorn -w 2 -k gthread --threads 4 --graceful-timeout 5 -b 127.0.0.1:{port} wsgi_app:app
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=45
Restart=on-failure
RestartSec=1
"""


def setup(box):
    box.sh(f"mkdir -p {APP_DIR} /etc/fugue && cp {SRC}/apps/*.py {APP_DIR}/ && "
           f"cp {SRC}/contrib/systemd/fugue@.service /etc/systemd/system/", check=True)
    box.write(f"{SRC}/unit_chaos_driver.py", DRIVER)
    box.write("/etc/fugue/bench.toml",
              f'app = "wsgi_app:app"\nworking_path = "{APP_DIR}"\nbind = ["127.0.0.1:{PORT["fugue"]}"]\n'
              'pid_file = "/run/fugue/bench/fugue.pid"\ntmp_path = "/run/fugue/bench"\n'
              "workers = 2\ngraceful_timeout = 5\n")
    box.write("/etc/systemd/system/gunicorn-bench.service",
              GUNICORN_UNIT.format(dir=APP_DIR, venv=VENV, port=PORT["gunicorn"]))
    box.systemctl("daemon-reload")


def master_pid(box, kind, unit):
    if kind == "fugue":
        return int(box.run(["cat", "/run/fugue/bench/fugue.pid"]).stdout.strip())
    return int(box.show(unit, "MainPID"))


def fresh_ok(box, port):
    r = box.run(["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/"])
    return r.stdout == "200"


def run_one(box, kind):
    unit = "fugue@bench.service" if kind == "fugue" else "gunicorn-bench.service"
    port = PORT[kind]
    r = box.systemctl("start", unit, timeout=90)
    if r.returncode != 0:
        raise RuntimeError(f"{unit} did not start: {r.stderr}{box.journal(unit)[-2000:]}")
    deadline = time.monotonic() + 30
    while not fresh_ok(box, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{unit} does not answer")
        time.sleep(0.05)
    master = master_pid(box, kind, unit)
    slow = box.popen(["curl", "-sS", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://127.0.0.1:{port}/slow?s=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    load = box.popen([f"{VENV}/bin/python3", f"{SRC}/unit_chaos_driver.py", str(port)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert load.stdout.readline().strip() == "started"
    time.sleep(BEFORE_S)  # the measured window before the fault, not a wait for a condition
    load.stdin.write("kill\n")
    load.stdin.flush()
    assert load.stdout.readline().strip() == "marked"
    t0 = time.monotonic()
    box.run(["kill", "-9", str(master)], check=True)
    back = None
    while time.monotonic() - t0 < AFTER_S:
        if back is None and fresh_ok(box, port):
            try:
                now_master = master_pid(box, kind, unit)
            except ValueError:
                now_master = master
            if now_master != master:
                back = time.monotonic() - t0
        time.sleep(0.02)
    out, err = load.communicate("stop\n", timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    slow_out, slow_err = slow.communicate(timeout=60)
    result.update(kind=kind, slow="200" if slow_out == "200" else (slow_err.strip() or slow_out),
                  back=back, restarts=box.show(unit, "NRestarts"), state=box.show(unit, "ActiveState"))
    box.systemctl("stop", unit, timeout=90)
    box.systemctl("reset-failed", unit)
    return result


def row(r):
    failed = r["requests"] - r["ok"]
    kinds = " ".join(f"{k}={v}" for k, v in sorted(r["failures"].items())) or "0"
    back = "never" if r["back"] is None else f"{r['back'] * 1000:.0f} ms"
    return (f"| kill -9 of the master (systemd unit) | {r['kind']} | {r['requests']} | {failed} | {kinds} | "
            f"{r['down']:.1f} s | {r['delayed']} answered after > 250 ms (slowest {r['max_ms']:.0f} ms); "
            f"in-flight 3 s request: {r['slow']}; a new master answers after {back}; "
            f"NRestarts={r['restarts']}, unit {r['state']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--server", choices=("fugue", "gunicorn"), action="append")
    args = parser.parse_args(argv)
    reason = why_not()
    if reason:
        sys.exit(f"unit_chaos: {reason}")
    box = Box(name=f"fugue-bench-{os.getpid()}")
    try:
        box.boot()
        setup(box)
        print("| fault | server | requests | failed | failed by kind | down | outcome |")
        print("|---|---|---|---|---|---|---|")
        for _ in range(args.runs):
            for kind in args.server or ("fugue", "gunicorn"):
                print(row(run_one(box, kind)), flush=True)
    finally:
        box.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
