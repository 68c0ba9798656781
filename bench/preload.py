#!/usr/bin/env python3
"""Preload beside gunicorn --preload: a Django project's memory, and what a reload costs.

    python3 bench/preload.py                          # ~10 minutes on 2 cores
    python3 bench/preload.py --workers 8 --first 200 --then 2000 --reloads 3

The app: `django-admin startproject` with its admin (DEBUG off, the sqlite
database migrated), served as benchsite.wsgi:application by four servers in
the same run, one after the other, each with `workers` workers:
fugue (each worker a fresh interpreter), fugue --preload (one mold per
generation imports Django, the workers are forked from it), gunicorn and
gunicorn --preload (gunicorn's default sync workers; the master imports the app
and forks). fugue's WSGI workers run waitress (4 threads). `--only "fugue --preload --warmup"`
adds fugue --preload with `--warmup /admin/login/`: the mold makes that request once before
it forks, so what Django builds on a first request (URL resolvers, compiled templates) is
shared by the workers instead of built in each.

Memory: `first` x workers GETs of /admin/login/ (a rendered template with a
form, no query), 8 at a time, each on a new connection; then the PSS of every
process of the server (/proc/PID/smaps_rollup: pages shared after a fork are
split between the sharers, so the sum is what the server really costs); then
a further `then` x workers GETs and the PSS again. Copy-on-write sharing
erodes as requests write to pages (reference counts, caches); gc.freeze() in
the mold keeps the garbage collector from writing to every object it inherited.

Reload: `reloads` times each, with the workers serving: fugue and fugue
--preload through `fuguectl reload` (it returns once the new generation is
serving; a fugue reload loads the code now on disk), gunicorn and gunicorn
--preload through HUP, until as many new workers have run post_worker_init
(gunicorn --preload's HUP does not load new code: gunicorn issue 2449). Wall
time, and the CPU time every process of the server used from the signal until
the old workers are gone (utime + stime of the live ones plus what reaped
ones left to their parents: /proc/PID/stat fields 14-17).

Needs django, gunicorn and waitress (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # run as a script (python3 bench/preload.py) or imported as bench.*
    import contenders
    import proctree
except ModuleNotFoundError as e:
    if e.name not in ("contenders", "proctree"):
        sys.exit(f"{e.name} is not installed: pip install -e '.[bench]'")
    from bench import contenders, proctree

URL = "/admin/login/"
CONCURRENCY = 8


# -- the app ---------------------------------------------------------------------------------

def make_site(root: Path) -> Path:
    """django-admin startproject benchsite (admin included), DEBUG off, database migrated."""
    site = root / "site"
    site.mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "benchsite", str(site)],
                   check=True, timeout=120)
    with open(site / "benchsite" / "settings.py", "a") as f:
        f.write('\nDEBUG = False\nALLOWED_HOSTS = ["127.0.0.1", "localhost"]\n')
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=site, check=True, timeout=300)
    return site


# -- observing the servers -------------------------------------------------------------------

def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return 0


def memory(server) -> dict:
    """PSS (MiB) of the master, the mold (fugue --preload), the workers and all of them."""
    procs = {pid: contenders.cmdline(pid) for pid in contenders.descendants(server.master)}
    molds = [pid for pid, t in procs.items() if "fugue mold" in t]
    workers = [pid for pid in procs if pid not in molds]
    master = pss_kib(server.master)
    per = [pss_kib(pid) for pid in workers]
    mold = sum(pss_kib(pid) for pid in molds)
    return {"workers": len(per), "master": master / 1024, "mold": mold / 1024 if molds else None,
            "per worker": statistics.mean(per) / 1024 if per else 0.0,
            "total": (master + mold + sum(per)) / 1024}


def hammer(port: int, count: int) -> int:
    """`count` GETs of URL, CONCURRENCY at a time, each on a new connection; the failures."""
    def one(_):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", URL, headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return resp.status == 200 and b"Django administration" in body
        except OSError:
            return False

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        return sum(1 for ok in pool.map(one, range(count)) if not ok)


# -- the servers -------------------------------------------------------------------------------

def make(kind: str, tmp: str, site: Path, workers: int):
    path = os.path.join(tmp, kind.replace(" ", ""))
    os.mkdir(path)
    env = {}  # the --chdir (the project) is on the workers' sys.path
    app = "benchsite.wsgi:application"
    if kind.startswith("fugue"):
        flags = ["--chdir", str(site), "--ready-timeout", "120"]
        if "preload" in kind:
            flags.append("--preload")
        if "warmup" in kind:  # the mold GETs URL once before it forks: the workers share what it built
            flags += ["--warmup", URL]
        return contenders.FugueServer(path, app=app, workers=workers, options=tuple(flags), env=env)
    flags = ["--chdir", str(site), "--timeout", "120"]
    if "preload" in kind:
        flags.append("--preload")
    return contenders.GunicornServer(path, app=app, workers=workers, worker_class="sync",
                                     options=tuple(flags), env=env)


def reload_once(kind: str, server, workers: int) -> tuple:
    """(wall s, CPU s) of one reload of a serving server."""
    before_workers = set(server.worker_pids()) if kind.startswith("fugue") else set(
        proctree.children(server.master))
    cpu0 = contenders.tree_cpu_s(server.master)
    t0 = time.monotonic()
    if kind.startswith("fugue"):
        done = server.ctl("reload", timeout=180)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"fuguectl reload failed: {done.stdout}{done.stderr}")
    else:
        offset = server.log_size()
        os.kill(server.master, signal.SIGHUP)
        regex = re.compile(server.READY_RE)
        proctree.wait_for(lambda: len(regex.findall(server.log_text(offset))) >= workers, 180,
                          "gunicorn's new workers")
        wall = time.monotonic() - t0
    proctree.wait_for(lambda: not (before_workers & contenders.descendants(server.master)), 180, "old workers gone")
    return wall, contenders.tree_cpu_s(server.master) - cpu0


def run(kind: str, tmp: str, site: Path, args) -> dict:
    server = make(kind, tmp, site, args.workers)
    server.answers = lambda path=URL: proctree.http_body(server.port, URL)  # "/" is a 404 here
    row = {"server": kind}
    try:
        server.start(timeout=300)
        row["start s"] = server.boot_s
        failed = hammer(server.port, args.first * args.workers)
        row["after first"] = memory(server)
        failed += hammer(server.port, args.then * args.workers)
        row["after then"] = memory(server)
        row["failed"] = failed
        walls, cpus = [], []
        for _ in range(args.reloads):
            wall, cpu = reload_once(kind, server, args.workers)
            walls.append(wall)
            cpus.append(cpu)
            if hammer(server.port, 40):
                row["failed"] += 1
        row["reload wall"], row["reload cpu"] = walls, cpus
        print(f"  {kind:18} PSS {row['after first']['total']:.1f} -> {row['after then']['total']:.1f} MiB; "
              f"reload {statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} s CPU",
              file=sys.stderr)
    finally:
        server.close(grace=20.0)
    return row


def fmt_range(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--first", type=int, default=200, help="requests per worker before the first PSS")
    parser.add_argument("--then", type=int, default=2000, help="further requests per worker")
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=("fugue", "fugue --preload", "gunicorn",
                                                      "gunicorn --preload", "fugue --preload --warmup"))
    args = parser.parse_args(argv)
    absent = contenders.missing("django", "gunicorn", "waitress")
    if absent:
        print(f"missing Python packages: pip install {' '.join(absent)}", file=sys.stderr)
        return 2
    proctree.become_subreaper()
    kinds = args.only or ["fugue", "fugue --preload", "gunicorn", "gunicorn --preload"]
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fugue-bench-preload-") as tmp:
        site = make_site(Path(tmp))
        for kind in kinds:
            rows.append(run(kind, tmp, site, args))
    import django
    import gunicorn

    print(f"Django {django.get_version()} startproject + admin, {args.workers} workers, GET {URL}; "
          f"python {sys.version.split()[0]}, gunicorn {gunicorn.__version__}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    base = next((r for r in rows if r["server"] == "gunicorn --preload"), None)
    for phase, label in (("after first", f"after {args.first} requests per worker"),
                         ("after then", f"after a further {args.then} per worker")):
        print(f"Memory {label} (PSS, MiB)\n")
        print("| server | total | per worker | master | mold | total / gunicorn --preload |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            m = r[phase]
            ratio = f"{m['total'] / base[phase]['total']:.2f}" if base else "-"
            mold = "-" if m["mold"] is None else f"{m['mold']:.1f}"
            print(f"| {r['server']} | {m['total']:.1f} | {m['per worker']:.1f} | {m['master']:.1f} | "
                  f"{mold} | {ratio} |")
        print()
    print(f"Reload of {args.workers} Django workers ({args.reloads} each; median (min-max))\n")
    print("| server | how | wall s | CPU s | wall / gunicorn --preload |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        how = "fuguectl reload" if r["server"].startswith("fugue") else "HUP"
        ratio = (f"{statistics.median(r['reload wall']) / statistics.median(base['reload wall']):.2f}"
                 if base else "-")
        print(f"| {r['server']} | {how} | {fmt_range(r['reload wall'])} | {fmt_range(r['reload cpu'])} | "
              f"{ratio} |")
    print()
    print("| server | start s (all workers ready) | failed requests |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['start s']:.2f} | {r['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
