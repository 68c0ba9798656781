#!/usr/bin/env python3
"""Is fugue in the data path? Requests/s of one app under fugue, bound directly, and under gunicorn.

    python3 bench/overhead.py                 # ~3.5 minutes
    python3 bench/overhead.py --rounds 5 --seconds 10 --only wsgi
    python3 bench/overhead.py --access-log    # + fugue's and gunicorn's access logs on

For each kind of app (WSGI: bench/apps/hello_wsgi.py, ASGI:
bench/apps/hello_asgi.py) every contender is started once, with the same
number of workers, and then measured with wrk (fixed duration, fixed
connection count, keep-alive) in `rounds` rounds, the order of the
contenders rotating from round to round so that none always runs first or
right after a noisy neighbour:

    WSGI  fugue (waitress, 4 threads)        bare waitress x N on one socket
          gunicorn gthread (4 threads)
    ASGI  fugue (uvicorn)                    bare uvicorn x N on one socket
          gunicorn + UvicornWorker           uvicorn --workers N

"bare" is bench/bare_serve.py: the very server fugue's adapter runs, with
fugue's settings, forked N times on one pre-bound socket, with no master at
all. fugue's master only hands the sockets over and is not in the data path,
so fugue / bare should be 1.00; what is left is the worker side of fugue
(its per-request counters, its adapter hooks).

The load generator and the servers share the machine's cores, and other
work may run beside them: absolute requests/s mean little, so the table
reports, per round, fugue's rate divided by each contender's in the same
round, as a median with the spread (min-max) over the rounds. It also reports
the CPU time the server's processes (master and workers: its whole process
group, from /proc) spent per request: less sensitive to the neighbours than
requests/s, though not immune (shared caches, frequency); and the CPU time and
wake-ups of the master process alone over all its runs (fugue's master should
do nothing while requests flow: the sum over every run is the proof). wrk opens
its connections at once and keeps them, and the kernel hands them to whichever
worker is awake: "busiest worker's CPU share" (median; 0.50 is an even split
between 2 workers, 1.00 one worker doing everything) says how lopsided that
was, which moves requests/s more than anything the servers do differently.

Needs wrk (apt-get install wrk), gunicorn, waitress and uvicorn
(pip install gunicorn waitress uvicorn); says so and exits 2 if one is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if importlib.util.find_spec("matplotlib") is None:  # bench/plot.py (the tables) imports it
    sys.exit("matplotlib is not installed: pip install matplotlib")

try:  # run as a script (python3 bench/overhead.py) or imported as bench.*
    import contenders
    import plot
    import proctree
except ModuleNotFoundError as e:
    if e.name not in ('contenders', 'plot', 'proctree'):  # a third-party module
        sys.exit(f"{e.name} is not installed: pip install {e.name}")
    from bench import contenders, plot, proctree

WORKERS = 2
CONNS = 32
WRK_THREADS = 1
SECONDS = 3
ROUNDS = 8
WARMUP_S = 1


def wrk(port: int, seconds: int, conns: int, threads: int = WRK_THREADS) -> dict:
    """Run wrk once against 127.0.0.1:port; requests/s, errors and latency quantiles."""
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--latency",
            f"http://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out}{done.stderr}")
    result = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1)),
              "errors": 0, "non2xx": 0}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        result["errors"] = sum(int(n) for n in errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        result["non2xx"] = int(non2xx.group(1))
    for quantile in ("50", "99"):
        match = re.search(rf"^\s+{quantile}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        if match:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
            result[f"p{quantile}_ms"] = float(match.group(1)) * scale
    return result


def measure_once(server, seconds: int, conns: int) -> dict:
    """One wrk run, plus the server's CPU time per request over it (all its processes),
    and what its master (the process we started: fugue's master, gunicorn's
    arbiter, uvicorn's supervisor, bare_serve's waiting parent) did meanwhile."""
    cpu_before = contenders.tree_cpu_s(server.master)
    master_cpu, master_ctxt = (contenders.process_cpu_s(server.master),
                               contenders.ctxt_switches(server.master))
    others = proctree.group(server.master) - {server.master}
    others_before = {pid: contenders.process_cpu_s(pid) for pid in others}
    t0 = time.monotonic()
    result = wrk(server.port, seconds, conns)
    result["elapsed"] = time.monotonic() - t0
    # wrk opens its connections at once and keeps them: whichever worker is
    # awake may accept most of them, and then carries most of the load.
    spent = [contenders.process_cpu_s(pid) - before for pid, before in others_before.items()]
    result["busiest_share"] = max(spent) / sum(spent) if sum(spent) > 0 else None
    cpu = contenders.tree_cpu_s(server.master) - cpu_before
    result["cpu_us"] = cpu / max(result["requests"], 1) * 1e6
    result["master_cpu_s"] = contenders.process_cpu_s(server.master) - master_cpu
    result["master_wakeups"] = contenders.ctxt_switches(server.master) - master_ctxt
    return result


def contenders_for(kind: str, tmp: str, workers: int, access_log: bool = False) -> list:
    """(label, server) pairs for one kind of app, each in its own directory; fugue first.

    access_log: also fugue and gunicorn each writing its access log (default format) to a
    file, so the cost of the log is measured beside gunicorn's in the same run."""
    def sub(name):
        path = os.path.join(tmp, f"{kind}-{name}")
        os.mkdir(path)
        return path

    def logged(name):
        return ("--access-logfile", os.path.join(sub(name), "access.log"))

    if kind == "wsgi":
        out = [
            ("fugue (waitress)", contenders.FugueServer(sub("fugue"), "hello_wsgi:app", workers)),
            ("bare waitress", contenders.BareServer(sub("bare"), "wsgi", "hello_wsgi:app", workers)),
            ("gunicorn gthread", contenders.GunicornServer(sub("gunicorn"), "hello_wsgi:app",
                                                           workers, "gthread", threads=4)),
        ]
        if access_log:
            out += [
                ("fugue (waitress) + access log", contenders.FugueServer(
                    sub("fugue-log"), "hello_wsgi:app", workers, options=logged("fugue-log-file"))),
                ("gunicorn gthread + access log", contenders.GunicornServer(
                    sub("gunicorn-log"), "hello_wsgi:app", workers, "gthread", threads=4,
                    options=logged("gunicorn-log-file"))),
            ]
        return out
    out = [
        ("fugue (uvicorn)", contenders.FugueServer(sub("fugue"), "hello_asgi:app", workers)),
        ("bare uvicorn", contenders.BareServer(sub("bare"), "asgi", "hello_asgi:app", workers)),
    ]
    if access_log:
        out.append(("fugue (uvicorn) + access log", contenders.FugueServer(
            sub("fugue-log"), "hello_asgi:app", workers, options=logged("fugue-log-file"))))
    worker_class = contenders.uvicorn_worker_class()
    if worker_class:
        out.append((f"gunicorn {worker_class.split('.')[0]}.UvicornWorker",
                    contenders.GunicornServer(sub("gunicorn"), "hello_asgi:app", workers,
                                              worker_class)))
        if access_log:
            out.append((f"gunicorn {worker_class.split('.')[0]}.UvicornWorker + access log",
                        contenders.GunicornServer(sub("gunicorn-log"), "hello_asgi:app", workers,
                                                  worker_class, options=logged("gunicorn-log-file"))))
    out.append(("uvicorn --workers", contenders.UvicornMulti(sub("uvicorn"), "hello_asgi:app",
                                                             workers)))
    return out


def measure(kind: str, workers: int, rounds: int, seconds: int, conns: int,
            access_log: bool = False) -> tuple:
    """Start every contender of `kind`, run the rotating rounds; (rows, notes)."""
    notes = []
    with tempfile.TemporaryDirectory(prefix=f"fugue-bench-overhead-{kind}-") as tmp:
        pairs = contenders_for(kind, tmp, workers, access_log)
        if kind == "asgi" and not any("UvicornWorker" in label for label, _ in pairs):
            notes.append("no gunicorn worker class for uvicorn is installed "
                         "(pip install uvicorn-worker): ASGI is compared with "
                         "uvicorn --workers only")
        samples = {label: [] for label, _ in pairs}
        try:
            for label, server in pairs:
                server.start()
                wrk(server.port, WARMUP_S, conns)  # first requests: imports, caches
            for r in range(rounds):
                order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
                for label, server in order:
                    samples[label].append(measure_once(server, seconds, conns))
                    print(f"  {kind} round {r + 1}: {label:<28} "
                          f"{samples[label][-1]['rps']:8.0f} req/s", file=sys.stderr)
        finally:
            for _, server in pairs:
                stubborn = server.close()
                if stubborn:
                    notes.append(f"{server.name} needed SIGKILL at cleanup: {stubborn}")
    fugue_label = pairs[0][0]
    rows = []
    for label, _ in pairs:
        rps = [s["rps"] for s in samples[label]]
        ratios = [f["rps"] / s["rps"] for f, s in zip(samples[fugue_label], samples[label])]
        cpu = [s["cpu_us"] for s in samples[label]]
        cpu_ratios = [f["cpu_us"] / s["cpu_us"] for f, s in zip(samples[fugue_label],
                                                                samples[label])]
        shares = [s["busiest_share"] for s in samples[label] if s["busiest_share"] is not None]
        p50 = [s["p50_ms"] for s in samples[label] if "p50_ms" in s]
        p99 = [s["p99_ms"] for s in samples[label] if "p99_ms" in s]
        rows.append({
            "app": kind.upper(), "server": label,
            "req/s median (min-max)": f"{statistics.median(rps):.0f} "
                                      f"({min(rps):.0f}-{max(rps):.0f})",
            "fugue / this, median (min-max)": f"{statistics.median(ratios):.2f} "
                                              f"({min(ratios):.2f}-{max(ratios):.2f})",
            "server CPU us/req median": f"{statistics.median(cpu):.0f}",
            "CPU fugue / this, median (min-max)": f"{statistics.median(cpu_ratios):.2f} "
                                                  f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})",
            "p50 / p99 ms": (f"{statistics.median(p50):.1f} / {statistics.median(p99):.1f}"
                             if p50 and p99 else None),
            "busiest worker's CPU share": f"{statistics.median(shares):.2f}" if shares else None,
            "master under load: CPU ms, wake-ups/s": (
                f"{sum(s['master_cpu_s'] for s in samples[label]) * 1000:.0f}, "
                f"{sum(s['master_wakeups'] for s in samples[label]) / sum(s['elapsed'] for s in samples[label]):.1f}"),
            "errors": sum(s["errors"] + s["non2xx"] for s in samples[label]),
        })
    return rows, notes


COLUMNS = ["app", "server", "req/s median (min-max)", "fugue / this, median (min-max)",
           "server CPU us/req median", "CPU fugue / this, median (min-max)",
           "p50 / p99 ms", "busiest worker's CPU share", "master under load: CPU ms, wake-ups/s",
           "errors"]


def check_tools() -> list:
    problems = []
    if shutil.which("wrk") is None:
        problems.append("wrk is not installed: apt-get install wrk")
    absent = contenders.missing("gunicorn", "waitress", "uvicorn")
    if absent:
        problems.append(f"missing Python packages: pip install {' '.join(absent)}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seconds", type=int, default=SECONDS,
                        help="wrk duration per run (whole seconds)")
    parser.add_argument("--conns", type=int, default=CONNS, help="wrk connections")
    parser.add_argument("--only", choices=("wsgi", "asgi"), help="one kind of app only")
    parser.add_argument("--access-log", action="store_true",
                        help="also fugue and gunicorn writing their access logs to a file")
    args = parser.parse_args(argv)
    problems = check_tools()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    proctree.become_subreaper()
    load_before = os.getloadavg()[0]
    rows, notes = [], []
    for kind in ([args.only] if args.only else ["wsgi", "asgi"]):
        kind_rows, kind_notes = measure(kind, args.workers, args.rounds, args.seconds, args.conns,
                                        args.access_log)
        rows += kind_rows
        notes += kind_notes
    import gunicorn
    import uvicorn
    import waitress  # noqa: F401
    from importlib.metadata import version

    print(f"{args.workers} workers each; wrk -t{WRK_THREADS} -c{args.conns} -d{args.seconds}s, "
          f"{args.rounds} rounds in rotating order; {os.cpu_count()} CPUs shared by wrk and "
          f"the servers (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after); "
          f"python {sys.version.split()[0]}, gunicorn {gunicorn.__version__}, "
          f"uvicorn {uvicorn.__version__}, waitress {version('waitress')}\n")
    print(plot.markdown_table(rows, COLUMNS))
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
