#!/usr/bin/env python3
"""What the master costs when nothing happens, and what a worker costs to start.

    python3 bench/footprint.py                    # ~2 minutes
    python3 bench/footprint.py --idle 30 --sizes 1 4 16 64 --repeats 3

Idle: fugue (fuguectl start --app hello_wsgi:app, 2 workers) and gunicorn
(gthread, 2 workers x 4 threads), both with their default timeouts, are
started side by side and left alone. Over the same `idle` seconds we read,
for each master and each worker, the context switches of all its threads
(/proc/PID/task/*/status: voluntary + nonvoluntary; an idle process switches
out once per wake-up), then RSS and PSS (/proc/PID/smaps_rollup; PSS splits
pages shared after a fork between the sharers). If strace is installed and
may attach, a second window of the same length counts the masters' system
calls (strace -c -f -p). fugue's master wakes for signals, messages and
deadlines only: at idle those are the workers' heartbeats (every timeout/3,
at most every 10 s); gunicorn's arbiter wakes every second.

Spawn: the time from starting the server to every one of N workers being
ready, for N in `sizes`, fugue and gunicorn alternating. fugue: until its
"started: generation 1 serving" line (every worker has sent READY). gunicorn:
until N "bench: worker PID initialized" lines from a post_worker_init hook
(the app is imported in the worker and the worker is about to serve; gunicorn
has no READY of its own). fugue starts every worker as a fresh interpreter
(fork + exec + imports), gunicorn forks its own interpreter: fugue is expected
to be slower per worker. fugue's own figure (rollout start to READY of the
last worker, from that log line) is shown too, and the CPU time all the
server's processes had used when the last worker was ready (less sensitive
than wall time to whatever else runs on the machine).

Needs gunicorn and waitress (pip install gunicorn waitress); strace is
optional (apt-get install strace).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if importlib.util.find_spec("matplotlib") is None:  # bench/plot.py (the tables) imports it
    sys.exit("matplotlib is not installed: pip install matplotlib")

try:  # run as a script (python3 bench/footprint.py) or imported as bench.*
    import contenders
    import plot
    import proctree
except ModuleNotFoundError as e:
    if e.name not in ('contenders', 'plot', 'proctree'):  # a third-party module
        sys.exit(f"{e.name} is not installed: pip install {e.name}")
    from bench import contenders, plot, proctree

IDLE_S = 10.0
SETTLE_S = 2.0
SIZES = (1, 4, 16, 64)
REPEATS = 2
SPAWN_TIMEOUT_S = 180.0


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def memory_kib(pid: int) -> tuple:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def strace_counts(pids: dict, seconds: float) -> dict:
    """name -> (total syscalls, the top three "name=count") over `seconds`, for each pid.

    All tracers run at once, so every master is watched over the same window.
    None for a pid strace could not attach to.
    """
    tracers = {}
    for name, pid in pids.items():
        tracers[name] = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True, start_new_session=True)
    time.sleep(seconds)  # the measurement window itself
    out = {}
    for name, tracer in tracers.items():
        tracer.send_signal(signal.SIGINT)
        try:
            _, err = tracer.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            _, err = tracer.communicate()
        calls = {}
        for line in err.splitlines():
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
        total = re.search(r"^100\.00\s+\S+\s+\S*\s*(\d+)\s+(?:\d+\s+)?total$", err, re.M)
        if "attach: ptrace" in err or ("attached" not in err and not calls):
            out[name] = None
            continue
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:3]
        out[name] = (sum(calls.values()) if not total else int(total.group(1)),
                     " ".join(f"{k}={v}" for k, v in top) or "none")
    return out


def idle(tmp: str, seconds: float, use_strace: bool) -> tuple:
    """Both servers side by side at idle; (rows, notes)."""
    notes = []
    os.mkdir(os.path.join(tmp, "idle-fugue"))
    os.mkdir(os.path.join(tmp, "idle-gunicorn"))
    servers = {"fugue": contenders.FugueServer(os.path.join(tmp, "idle-fugue"), workers=2),
               "gunicorn": contenders.GunicornServer(os.path.join(tmp, "idle-gunicorn"),
                                                     workers=2)}
    rows = []
    try:
        for server in servers.values():
            server.start()
        time.sleep(SETTLE_S)  # let the start's own traffic (READY, first beats) pass
        procs = {}
        for name, server in servers.items():
            procs[(name, "master")] = [server.master]
            procs[(name, "worker")] = sorted(server.worker_pids())
        before = {key: [contenders.ctxt_switches(p) for p in pids] for key, pids in procs.items()}
        t0 = time.monotonic()
        time.sleep(seconds)  # the measurement window itself
        elapsed = time.monotonic() - t0
        after = {key: [contenders.ctxt_switches(p) for p in pids] for key, pids in procs.items()}
        traced = {}
        if use_strace:
            traced = strace_counts({name: s.master for name, s in servers.items()}, seconds)
        for (name, role), pids in procs.items():
            deltas = [a - b for a, b in zip(after[(name, role)], before[(name, role)])]
            mems = [memory_kib(p) for p in pids]
            row = {"server": name, "process": role if role == "master" else f"worker (x{len(pids)})",
                   "threads": "/".join(str(threads(p)) for p in pids),
                   "wake-ups/s": f"{statistics.mean(deltas) / elapsed:.2f}",
                   "RSS MiB": f"{statistics.mean(m[0] for m in mems) / 1024:.1f}",
                   "PSS MiB": f"{statistics.mean(m[1] for m in mems) / 1024:.1f}"}
            if role == "master" and use_strace:
                result = traced.get(name)
                row["syscalls/s (strace)"] = (f"{result[0] / seconds:.2f} ({result[1]})"
                                              if result else "strace could not attach")
            rows.append(row)
    finally:
        for server in servers.values():
            stubborn = server.close()
            if stubborn:
                notes.append(f"{server.name} needed SIGKILL at cleanup: {stubborn}")
    return rows, notes


def spawn(tmp: str, sizes, repeats: int, preload: bool = False) -> tuple:
    """Time to N ready workers, fugue and gunicorn (and fugue --preload) alternating; (rows, notes)."""
    notes = []
    names = ("fugue", "gunicorn") + (("fugue --preload",) if preload else ())
    times = {(name, n): [] for n in sizes for name in names}
    cpu = {(name, n): [] for n in sizes for name in names}
    reported = {n: [] for n in sizes}
    run = 0
    for r in range(repeats):
        for n in sizes:
            shift = (r + sizes.index(n)) % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                run += 1
                path = os.path.join(tmp, f"spawn-{run}-{name.replace(' --', '-')}-{n}")
                os.mkdir(path)
                if name.startswith("fugue"):
                    # ready_timeout: 64 interpreters on 2 shared cores must not hit the default 30 s
                    server = contenders.FugueServer(path, workers=n, options=(
                        "--ready-timeout", "150", *(("--preload",) if "preload" in name else ())))
                else:
                    server = contenders.GunicornServer(path, workers=n,
                                                       options=("--timeout", "150"))
                try:
                    server.start(timeout=SPAWN_TIMEOUT_S)
                    times[(name, n)].append(server.boot_s)
                    cpu[(name, n)].append(contenders.tree_cpu_s(server.master))
                    if name == "fugue":
                        reported[n].append(server.reported_s)
                    print(f"  spawn {name:8} N={n:<3} {server.boot_s:6.2f} s", file=sys.stderr)
                finally:
                    # 64 workers draining on 2 busy cores may take more than 5 s
                    stubborn = server.close(grace=20.0)
                    if stubborn:
                        notes.append(f"{name} N={n}: {len(stubborn)} processes needed "
                                     f"SIGKILL at cleanup (20 s after SIGTERM)")
    rows = []

    def fmt(values):
        if not values:
            return None
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    for n in sizes:
        f, g = times[("fugue", n)], times[("gunicorn", n)]
        rows.append({"workers": n, "fugue s": fmt(f), "fugue's own figure s": fmt(reported[n]),
                     "gunicorn s": fmt(g),
                     "fugue / gunicorn": f"{statistics.median(f) / statistics.median(g):.2f}",
                     "CPU s fugue": fmt(cpu[("fugue", n)]),
                     "CPU s gunicorn": fmt(cpu[("gunicorn", n)])})
        if preload:
            p = times[("fugue --preload", n)]
            rows[-1].update({"fugue --preload s": fmt(p),
                             "preload / gunicorn": f"{statistics.median(p) / statistics.median(g):.2f}",
                             "CPU s fugue --preload": fmt(cpu[("fugue --preload", n)])})
    first, last = sizes[0], sizes[-1]
    if last > first:
        for name in names:
            per = ((statistics.median(times[(name, last)]) - statistics.median(times[(name, first)]))
                   / (last - first))
            per_cpu = ((statistics.median(cpu[(name, last)])
                        - statistics.median(cpu[(name, first)])) / (last - first))
            notes.append(f"{name}: {per * 1000:.0f} ms and {per_cpu * 1000:.0f} ms of CPU per "
                         f"extra worker (N={first} -> N={last}, medians)")
    return rows, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=IDLE_S, help="idle window, seconds")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--no-strace", dest="strace", action="store_false")
    parser.add_argument("--no-spawn", dest="spawn", action="store_false")
    parser.add_argument("--no-idle", dest="idle_run", action="store_false")
    parser.add_argument("--preload", action="store_true", help="spawn fugue --preload too")
    args = parser.parse_args(argv)
    absent = contenders.missing("gunicorn", "waitress")
    if absent:
        print(f"missing Python packages: pip install {' '.join(absent)}", file=sys.stderr)
        return 2
    use_strace = args.strace and shutil.which("strace") is not None
    proctree.become_subreaper()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fugue-bench-footprint-") as tmp:
        idle_rows, notes = idle(tmp, args.idle, use_strace) if args.idle_run else ([], [])
        spawn_rows, spawn_notes = (spawn(tmp, args.sizes, args.repeats, args.preload) if args.spawn
                                   else ([], []))
    import gunicorn

    print(f"Idle over {args.idle:g} s (after {SETTLE_S:g} s settling), both servers with "
          f"2 workers and default timeouts; python {sys.version.split()[0]}, "
          f"gunicorn {gunicorn.__version__}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    columns = ["server", "process", "threads", "wake-ups/s", "RSS MiB", "PSS MiB"]
    if use_strace:
        columns.append("syscalls/s (strace)")
    print(plot.markdown_table(idle_rows, columns))
    if not use_strace:
        print("- strace not used (apt-get install strace to count system calls too)")
    if spawn_rows:
        print(f"\nTime from start to N workers ready (hello_wsgi; fugue: waitress adapter, "
              f"gunicorn: gthread), {args.repeats} run(s) each, median (min-max)\n")
        columns = ["workers", "fugue s", "fugue's own figure s", "gunicorn s", "fugue / gunicorn",
                   "CPU s fugue", "CPU s gunicorn"]
        if args.preload:
            columns += ["fugue --preload s", "preload / gunicorn", "CPU s fugue --preload"]
        print(plot.markdown_table(spawn_rows, columns))
    for note in notes + spawn_notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
