#!/usr/bin/env python3
"""Reload (HUP) and upgrade (USR2) under load: fugue and gunicorn, in one run.

    python3 bench/reload.py                          # the full run (a few minutes)
    python3 bench/reload.py --hups 10 --usr2 5       # quicker
    python3 bench/reload.py --no-gunicorn            # fugue only

fugue serves bench/apps/hello_fugue.py (http.server ThreadingHTTPServer,
HTTP/1.1 keep-alive, 2 workers, started with `python3 -m fugue.ctl start -v`),
gunicorn serves bench/apps/hello_wsgi.py through bench/gunicorn_side.py
(gthread, 2 workers x 4 threads). Both answer "hello from pid P gen G", and
both take the same load: loadgen.Load with 32 keep-alive connections, which
counts every request exactly once, as a success or as one failure kind.

Scenarios, each on a fresh server under its own load:

    HUP x N        fugue: HUP, wait for the new generation to answer the load,
                   for fugue's "reload done" line, for the old workers to be
                   gone (/proc) and for the master to log their exit
                   gunicorn: gunicorn_side.hup_storm(N)
    USR2 x N       fugue: USR2, wait for the new master's generation to answer
                   the load, for the old master and its workers to be gone
                   (/proc) and for the new master to log "old master pid ...
                   exited" (it refuses the next USR2 before that)
                   gunicorn: the USR2 + WINCH + QUIT dance, and USR2 + TERM
    broken HUP     a syntax error appended to the app, HUP: fugue must log
                   "reload failed" and keep the old generation serving; then
                   the app is restored and a HUP must go through.
                   gunicorn: gunicorn_side.broken_hup() (its master exits)
    broken USR2    the same with USR2 (fugue only: the new master fails on
                   the script, the old one keeps serving)

Times are measured from the signal: "new gen serving" is the load's first
answer from the new generation, "old gone" is when /proc shows the old workers
(HUP) or the old master and its workers (USR2) gone. Nothing waits by sleeping
except the steady-state windows that keep events apart on the timeline.

Output: a markdown table on stdout, bench/out/reload.md (the table, every
event's timings, notes), bench/out/reload_*.png (timelines: requests/s and
failures/s, events marked) and bench/out/reload-fugue-*.log (fugue's verbose
logs, kept for looking into any failure). Every process started is in its own
process group and is killed in a finally block; this process is a child
subreaper, so masters orphaned by USR2 are still ours to reap.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

try:  # run as a script (python3 bench/reload.py) or imported as bench.reload
    import gunicorn_side
    import loadgen
    import plot
    import proctree
except ImportError:
    from bench import gunicorn_side, loadgen, plot, proctree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP_SOURCE = HERE / "apps" / "hello_fugue.py"

WORKERS = 2
CONNS = gunicorn_side.CONNS          # the same load on both sides
SETTLE_S = gunicorn_side.SETTLE_S
GAP_S = gunicorn_side.GAP_S
BOOT_TIMEOUT_S = 20.0
RELOAD_TIMEOUT_S = 40.0              # > fugue's 30 s graceful_timeout: see it out


class BenchError(Exception):
    """The benchmark could not go on (fugue refused, failed or hung)."""


# -- fugue's log --------------------------------------------------------------------

_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[(\d+)\] \[([^\]]+)\] (\w+) (.*)$")


class FugueLog:
    """fugue's log (master, workers and later masters all write to it), read as it grows.

    Lines are (wall time, pid, who, level, text); wall times come from the
    log's own timestamps, so an event's time does not depend on when we read it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""
        self.lines: list = []

    def poll(self) -> int:
        """Read what was appended; returns the number of lines read so far."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return len(self.lines)
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            m = _LOG_LINE.match(raw.decode("utf-8", "replace"))
            if m:
                wall = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                self.lines.append((wall, int(m[2]), m[3], m[4], m[5]))
        return len(self.lines)

    def find(self, pattern: str, start: int = 0, pid: Optional[int] = None):
        """(wall, match) of the first line from index `start` matching `pattern`
        (logged by `pid` if given), or None."""
        self.poll()
        rx = re.compile(pattern)
        for wall, line_pid, _, _, text in self.lines[start:]:
            if pid is not None and line_pid != pid:
                continue
            m = rx.search(text)
            if m:
                return wall, m
        return None

    def tail(self, start: int = 0, lines: int = 30) -> str:
        self.poll()
        return "\n".join(f"[{pid}] [{who}] {level} {text}"
                         for _, pid, who, level, text in self.lines[start:][-lines:])


# -- fugue ------------------------------------------------------------------------------

class Fugue:
    """One fugue master (and the masters its USR2s exec), all under `workdir`.

    Called by the fugue scenarios. Promises: start() returns once the master
    logged "started: generation N serving" and a plain GET is answered; every
    event method returns only when the switch is complete (or raises
    BenchError); close() leaves no process behind.
    """

    def __init__(self, workdir: str, workers: int = WORKERS, flags: tuple = ()):
        self.dir = Path(workdir)
        self.workers = workers
        self.flags = list(flags)
        self.app_dir = self.dir / "app"
        self.app_dir.mkdir()
        self.app_path = self.app_dir / APP_SOURCE.name
        shutil.copyfile(APP_SOURCE, self.app_path)
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(mode=0o700)
        self.pidfile = self.dir / "fugue.pid"
        self.log_path = self.dir / "fugue.log"
        self.log = FugueLog(self.log_path)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.port: Optional[int] = None
        self.master: Optional[int] = None
        self.generation: Optional[int] = None
        self._popens: list = []

    # -- start, stop, control -------------------------------------------------------

    def start(self) -> int:
        argv = [sys.executable, "-m", "fugue.ctl", "start", "--bind", "127.0.0.1:0",
                "--workers", str(self.workers), "--pid-file", str(self.pidfile),
                "--tmp-path", str(self.tmp), "--verbose", *self.flags, str(self.app_path)]
        with open(self.log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._popens.append(popen)

        def started():
            if popen.poll() is not None:
                raise BenchError(f"fugue exited with {popen.returncode}:\n{self.log.tail()}")
            return self.log.find(r"started: generation (\d+) serving", pid=popen.pid)

        _, m = proctree.wait_for(started, BOOT_TIMEOUT_S, "fugue's 'started' line")
        self.master, self.generation = popen.pid, int(m[1])
        _, m = self.log.find(r"listening on 127\.0\.0\.1:(\d+)", pid=popen.pid)
        self.port = int(m[1])
        proctree.wait_for(lambda: gunicorn_side._gen_is(self.generation)(self.answers() or ""),
                          BOOT_TIMEOUT_S, "a first answer")
        return self.port

    def answers(self) -> Optional[str]:
        """One plain GET on a fresh connection; the body, or None."""
        return proctree.http_body(self.port)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """fuguectl ARGS against this master."""
        return subprocess.run(
            [sys.executable, "-m", "fugue.ctl", *args, "--pid-file", str(self.pidfile),
             "--tmp-path", str(self.tmp)],
            cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=30)

    def status(self) -> dict:
        """`fuguectl status --json`."""
        done = self.ctl("status", "--json")
        if done.returncode:
            raise BenchError(f"fuguectl status failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def worker_pids(self, master: Optional[int] = None) -> set:
        """Live workers of `master` (default: the current one): its children in /proc, but
        for a preload mold (also its child, but it serves nothing)."""
        return {pid for pid in proctree.children(master or self.master) if not _is_mold(pid)}

    def steady_workers(self) -> set:
        """The current master's workers once there are exactly `workers` of them."""
        def steady():
            pids = self.worker_pids()
            return pids if len(pids) == self.workers else None
        return proctree.wait_for(steady, RELOAD_TIMEOUT_S,
                                 f"{self.workers} workers of master {self.master}")

    def break_app(self) -> None:
        """Append a syntax error to the app copy that workers and new masters run."""
        with open(self.app_path, "a", encoding="utf-8") as f:
            f.write("\ndef broken(:\n")

    def restore_app(self) -> None:
        shutil.copyfile(APP_SOURCE, self.app_path)

    def reap(self) -> None:
        for popen in self._popens:
            popen.poll()
        proctree.reap_orphans(keep=[p.pid for p in self._popens])

    def close(self) -> list:
        """Stop the master, then kill every process group we started; returns
        the pids that needed SIGKILL."""
        master = self.master
        if master is not None and proctree.alive(master):
            # A graceful stop first (TERM to the master alone), so that the log
            # ends with the master's own account and not with its workers
            # dying of the process-group TERM under it.
            os.kill(master, signal.SIGTERM)
            try:
                proctree.wait_for(lambda: (self.reap(), not proctree.alive(master))[1],
                                  10.0, f"master {master} to stop", interval=0.02)
            except TimeoutError:
                pass
        stubborn = []
        for popen in self._popens:
            stubborn += proctree.kill_group(popen.pid, grace=5.0, popens=[popen])
        proctree.reap_orphans()
        return stubborn

    def __enter__(self) -> "Fugue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- events ---------------------------------------------------------------------

    def _signal(self, load: loadgen.Load, signum: int, label: str):
        """Send `signum` to the master; (load time, wall time, first log index)."""
        start = self.log.poll()
        t_signal = load.mark(label)
        wall = time.time()
        os.kill(self.master, signum)
        return t_signal, wall, start

    def hup(self, load: loadgen.Load, label: str) -> dict:
        """HUP; returns the event's timings once the old generation is gone."""
        old_gen, old_workers, master = self.generation, self.steady_workers(), self.master
        t_signal, wall, start = self._signal(load, signal.SIGHUP, label)
        newer = _gen_above(old_gen)
        exits = [rf"\(pid {pid}, generation {old_gen}\) (stopped|killed)" for pid in old_workers]
        seen = _watch({
            "promoted": lambda: self._logged(r"reload done: generation (\d+) serving", start,
                                             master, wall, t_signal),
            "first_new_answer": lambda: load.first_seen(newer),
            "old_gone": lambda: (load.elapsed() if not any(map(proctree.alive, old_workers))
                                 else None),
            "master_saw_exits": lambda: self._logged_all(exits, start, master, wall, t_signal),
        }, fail=lambda: self._failed(start, r"reload (failed|refused)", label),
            timeout=RELOAD_TIMEOUT_S, what=f"{label} to complete")
        self.generation = int(seen["promoted"][1][1])
        return _event(label, t_signal, seen)

    def usr2(self, load: loadgen.Load, label: str) -> dict:
        """USR2; returns the event's timings once the old master and workers are gone."""
        old_master, old_gen = self.master, self.generation
        old_workers = self.steady_workers()
        t_signal, wall, start = self._signal(load, signal.SIGUSR2, label)
        newer = _gen_above(old_gen)
        spawned = proctree.wait_for(
            lambda: self.log.find(r"upgrade: started new master pid (\d+)", start, old_master)
            or self._failed(start, r"upgrade (failed|refused)", label),
            RELOAD_TIMEOUT_S, "the new master to be started")
        new_master = int(spawned[1][1])
        seen = _watch({
            "new_master_ready": lambda: self._logged(r"started: generation (\d+) serving", start,
                                                     new_master, wall, t_signal),
            "promoted": lambda: self._logged(r"upgrade done: new master pid \d+ serving", start,
                                             old_master, wall, t_signal),
            "first_new_answer": lambda: load.first_seen(newer),
            "old_gone": lambda: (load.elapsed() if not proctree.alive(old_master)
                                 and not any(map(proctree.alive, old_workers)) else None),
            "new_master_saw_exit": lambda: self._logged(
                rf"old master pid {old_master} exited", start, new_master, wall, t_signal),
            "pid_file": lambda: (load.elapsed() if _read_pid(self.pidfile) == new_master
                                 else None),
        }, fail=lambda: self._failed(start, r"upgrade (failed|refused)", label),
            timeout=RELOAD_TIMEOUT_S, what=f"{label} to complete")
        self.master, self.generation = new_master, int(seen["new_master_ready"][1][1])
        self.reap()
        return _event(label, t_signal, seen)

    def broken(self, load: loadgen.Load, how: str) -> tuple:
        """A broken deploy by `how` ("HUP" or "USR2"), then the fix by the same means.

        Returns (rollback event, restore event, fuguectl's last_event text).
        """
        master, gen, workers = self.master, self.generation, self.steady_workers()
        self.break_app()
        label = f"{how} (broken app)"
        t_signal, wall, start = self._signal(
            load, signal.SIGHUP if how == "HUP" else signal.SIGUSR2, label)
        pattern = (r"reload failed: (.*)" if how == "HUP" else r"upgrade failed: (.*)")
        seen = _watch({
            "rolled_back": lambda: self._logged(pattern, start, master, wall, t_signal),
            # the broken workers (HUP) or the broken new master (USR2) gone,
            # the old ones untouched
            "broken_gone": lambda: (load.elapsed() if self.worker_pids() == workers else None),
        }, fail=lambda: self._failed(start, r"reload done|upgrade done|refused", label),
            timeout=RELOAD_TIMEOUT_S, what=f"{label} to roll back")
        if not proctree.alive(master) or _read_pid(self.pidfile) != master:
            raise BenchError(f"{label}: master {master} did not survive:\n{self.log.tail(start)}")
        last = self.status()["master"]["last_event"]
        rollback = _event(label, t_signal, seen)
        rollback["reason"] = seen["rolled_back"][1][1]
        still = self.answers() or ""
        if not gunicorn_side._gen_is(gen)(still):
            raise BenchError(f"{label}: after the rollback a fresh GET got {still!r}, "
                             f"not generation {gen}")
        _steady(GAP_S)
        self.restore_app()
        fix = (self.hup if how == "HUP" else self.usr2)(load, f"{how} (restored app)")
        return rollback, fix, f"{last['what']} {'ok' if last['ok'] else 'FAILED'}: {last['text']}"

    # -- helpers for the watches ------------------------------------------------------

    def _logged(self, pattern, start, pid, wall, t_signal):
        """(load time of the log line, match) once `pid` logged `pattern`, else None."""
        found = self.log.find(pattern, start, pid)
        return None if found is None else (t_signal + found[0] - wall, found[1])

    def _logged_all(self, patterns, start, pid, wall, t_signal):
        found = [self._logged(p, start, pid, wall, t_signal) for p in patterns]
        return None if None in found else max(found, key=lambda f: f[0])

    def _failed(self, start, pattern, label):
        found = self.log.find(pattern, start)
        if found is not None:
            raise BenchError(f"{label}: fugue logged {found[1].group(0)!r}:\n"
                             f"{self.log.tail(start)}")
        return None


def _is_mold(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
        return data.startswith(b"fugue mold") or b"fugue._mold" in data
    except OSError:
        return False


def _gen_above(gen: int) -> Callable[[str], bool]:
    rx = re.compile(r" gen (\d+)$")

    def newer(body: str) -> bool:
        m = rx.search(body)
        return m is not None and int(m[1]) > gen
    return newer


def _read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _watch(conditions: dict, fail: Callable[[], None], timeout: float, what: str) -> dict:
    """Poll every condition until all have held; {name: what it returned first}.

    A condition returns None (not yet), a load time (float), or a tuple whose
    first item is a load time. All are polled in one loop, so each one's time
    is its own, not the time the previous wait ended. `fail` raises to abort.
    """
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while True:
        for name, condition in conditions.items():
            if name not in seen:
                value = condition()
                if value is not None:
                    seen[name] = value
        if len(seen) == len(conditions):
            return seen
        fail()
        if time.monotonic() >= deadline:
            missing = ", ".join(n for n in conditions if n not in seen)
            raise TimeoutError(f"timed out after {timeout} s waiting for {what} ({missing})")
        time.sleep(proctree.POLL_S)


def _event(label: str, t_signal: float, seen: dict) -> dict:
    """An event dict as gunicorn_side writes them: seconds since the signal."""
    event = {"event": label}
    for name, value in seen.items():
        t = value[0] if isinstance(value, tuple) else value
        event[f"{name}_s"] = t - t_signal
    return event


def _steady(seconds: float) -> None:
    """Let the load run undisturbed: a measurement window, not a wait."""
    time.sleep(seconds)


# -- fugue scenarios ----------------------------------------------------------------------

def _run_fugue(name: str, body, out_dir: Path, flags: tuple = ()) -> gunicorn_side.Scenario:
    """Common frame: temp dir, fugue, load; `body(f, load, events, notes)`.

    fugue's log is kept as out_dir/reload-fugue-NAME.log whatever happens.
    """
    events, notes = [], []
    aborted = None
    with tempfile.TemporaryDirectory(prefix=f"fugue-bench-reload-{name}-") as tmp:
        f = Fugue(tmp, flags=flags)
        load = None
        try:
            f.start()
            load = loadgen.Load("127.0.0.1", f.port, conns=CONNS, track_bodies=True)
            load.start()
            load_wall0 = time.time() - load.elapsed()
            _steady(SETTLE_S)
            try:
                body(f, load, events, notes)
                _steady(SETTLE_S)
                status = f.status()
                gens = sorted({w["generation"] for w in status["workers"]})
                notes.append(f"fuguectl status at the end: master pid {status['master']['pid']}, "
                             f"{status['ready_workers']} ready workers of generation(s) {gens}")
            except (BenchError, TimeoutError) as e:
                # Reported in the table; the other scenarios still run.
                aborted = str(e).splitlines()[0]
                notes.append(f"ABORTED: {e}")
        finally:
            result = load.stop() if load is not None else None
            stubborn = f.close()
            if stubborn:
                notes.append(f"needed SIGKILL at cleanup: {stubborn}")
            out_dir.mkdir(parents=True, exist_ok=True)
            log_copy = out_dir / f"reload-fugue-{name}.log"
            if f.log_path.exists():
                shutil.copyfile(f.log_path, log_copy)
    scenario = gunicorn_side.Scenario(name, result, events, notes)
    scenario.aborted = aborted
    scenario.log_copy = log_copy
    scenario.load_wall0 = load_wall0
    return scenario


def fugue_hups(n: int, out_dir: Path, flags: tuple = ()) -> gunicorn_side.Scenario:
    def body(f: Fugue, load: loadgen.Load, events: list, notes: list) -> None:
        for i in range(1, n + 1):
            events.append(f.hup(load, f"HUP {i}"))
            _steady(GAP_S)
    return _run_fugue("hup" + "".join(flags).replace("--", "-"), body, out_dir, flags)


def fugue_usr2s(n: int, out_dir: Path) -> gunicorn_side.Scenario:
    def body(f: Fugue, load: loadgen.Load, events: list, notes: list) -> None:
        for i in range(1, n + 1):
            events.append(f.usr2(load, f"USR2 {i}"))
            _steady(GAP_S)
    return _run_fugue("usr2", body, out_dir)


def fugue_broken(how: str, out_dir: Path) -> gunicorn_side.Scenario:
    def body(f: Fugue, load: loadgen.Load, events: list, notes: list) -> None:
        rollback, fix, last = f.broken(load, how)
        events += [rollback, fix]
        notes.append(f"rolled back: {rollback['reason']}")
        notes.append(f"fuguectl status right after: {last}")
    return _run_fugue(f"broken-{how.lower()}", body, out_dir)


# -- report -------------------------------------------------------------------------------

COLUMNS = ["scenario", "server", "events", "requests", "req/s", "failed", "failed by kind",
           "signal → new gen serving, ms (median / max)",
           "signal → old gone, ms (median / max)", "outcome"]


def _median_max(values) -> Optional[str]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f}"


def row(scenario: str, server: str, s: gunicorn_side.Scenario) -> dict:
    """One line of the summary table.

    gunicorn's broken HUP: "new gen serving" is its signal -> the restarted
    server's first answer (gunicorn_side restarts it at once). fugue's broken
    deploys: the times are those of the fixing HUP or USR2, from its own signal.
    """
    r = s.result
    timed = [e for e in s.events if "rolled_back_s" not in e]
    first = [e.get("first_new_answer_s", e.get("restored_answer_s")) for e in timed]
    gone = [e.get("old_gone_s", e.get("old_master_gone_s")) for e in timed]
    if getattr(s, "aborted", None):
        outcome = f"ABORTED after {len(s.events)} events: {s.aborted}"
    elif server == "gunicorn":
        outcome = gunicorn_side._outcome(s)
    elif "rolled_back_s" in s.events[0]:
        how = s.events[0]["event"].split()[0]
        outcome = (f"broken {how} rolled back {s.events[0]['rolled_back_s'] * 1000:.0f} ms "
                   f"after the signal, the master and the old generation serving throughout; "
                   f"times: the fixed app's {how}")
    else:
        outcome = f"{len(s.events)} completed"
    return {"scenario": scenario, "server": server, "events": len(s.events),
            "requests": r.requests, "req/s": f"{r.requests_per_s:.0f}", "failed": r.failed,
            "failed by kind": r.failures_text(),
            COLUMNS[7]: _median_max(first), COLUMNS[8]: _median_max(gone), "outcome": outcome}


def _failing_buckets(s: gunicorn_side.Scenario):
    """(bucket, the last mark before its end or None) for every bucket with failures."""
    for bucket in s.result.timeline:
        if bucket.failed:
            before = [m for m in s.result.marks if m[0] <= bucket.t + loadgen.BUCKET_S]
            yield bucket, (before[-1] if before else None)


def failure_report(s: gunicorn_side.Scenario) -> list:
    """Where a scenario's failures happened: grouped by the kind of signal
    they followed ("QUIT" for "QUIT 1".."QUIT 20")."""
    groups: dict = {}
    for bucket, mark in _failing_buckets(s):
        kind = re.sub(r" \d+$", "", mark[1]) if mark else "(before any event)"
        g = groups.setdefault(kind, {"failures": collections.Counter(), "events": set(),
                                     "after": []})
        g["failures"].update(bucket.failures)
        if mark:
            g["events"].add(mark[1])
            g["after"].append(bucket.t - mark[0])
    sent = collections.Counter(re.sub(r" \d+$", "", label) for _, label in s.result.marks)
    lines = []
    for kind, g in groups.items():
        failed = sum(g["failures"].values())
        kinds = " ".join(f"{k}={v}" for k, v in sorted(g["failures"].items()))
        span = (f", {max(0.0, min(g['after'])):.1f}-{max(g['after']) + loadgen.BUCKET_S:.1f} s "
                f"after it" if g["after"] else "")
        lines.append(f"{failed} failed after {kind} ({kinds}): after {len(g['events'])} of the "
                     f"{sent[kind]} {kind} signals{span}")
    return lines


def fugue_failure_evidence(s: gunicorn_side.Scenario) -> list:
    """For a fugue scenario that lost requests: each failing bucket, the event
    before it, a sample of the failure, and fugue's log lines around it."""
    log = FugueLog(s.log_copy)
    log.poll()
    lines = []
    for bucket, mark in _failing_buckets(s):
        where = (f"{max(0.0, bucket.t - mark[0]):.2f}-{bucket.t + loadgen.BUCKET_S - mark[0]:.2f} s "
                 f"after {mark[1]}" if mark else "before any event")
        kinds = " ".join(f"{k}={v}" for k, v in sorted(bucket.failures.items()))
        lines.append(f"failures in [{bucket.t:.1f}, {bucket.t + loadgen.BUCKET_S:.1f}) s "
                     f"({where}): {kinds}")
        lo = s.load_wall0 + bucket.t - 1.0
        hi = s.load_wall0 + bucket.t + loadgen.BUCKET_S + 0.5
        for wall, pid, who, level, text in log.lines:
            if lo <= wall <= hi:
                lines.append(f"    {wall - s.load_wall0:7.3f} s [{pid}] [{who}] {level} {text}")
    for kind, sample in s.result.failure_samples.items():
        lines.append(f"sample {kind} (first at {s.result.failure_first_seen[kind]:.3f} s): {sample}")
    return lines


def _for_picture(result: loadgen.Result) -> loadgen.Result:
    """The result with only some marks labelled when there are many: every
    mark keeps its line, rounds 1, 10, 20... keep their label."""
    numbered = [re.search(r" (\d+)$", label) for _, label in result.marks]
    rounds = {int(m[1]) for m in numbered if m}
    if len(rounds) <= 12:
        return result
    step = 10 if len(rounds) > 30 else 5
    marks = [(t, label if m is None or int(m[1]) == 1 or int(m[1]) % step == 0 else "")
             for (t, label), m in zip(result.marks, numbered)]
    return dataclasses.replace(result, marks=marks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hups", type=int, default=50, help="HUPs per server (default 50)")
    parser.add_argument("--usr2", type=int, default=20, help="fugue USR2s (default 20)")
    parser.add_argument("--gunicorn-hups", type=int, default=None,
                        help="gunicorn HUPs (default: --hups)")
    parser.add_argument("--gunicorn-usr2", type=int, default=None,
                        help="gunicorn USR2 dances, per variant (default: --usr2)")
    parser.add_argument("--no-gunicorn", dest="gunicorn", action="store_false")
    parser.add_argument("--no-broken", dest="broken", action="store_false")
    parser.add_argument("--preload", action="store_true",
                        help="also HUP fugue --preload (a mold per generation, workers forked from it)")
    parser.add_argument("--out", default=str(HERE / "out"), help="output directory")
    args = parser.parse_args(argv)
    g_hups = args.hups if args.gunicorn_hups is None else args.gunicorn_hups
    g_usr2 = args.usr2 if args.gunicorn_usr2 is None else args.gunicorn_usr2
    out = Path(args.out)

    proctree.become_subreaper()
    commit = _fugue_commit()  # before the run: others may commit while it goes on
    t0 = time.monotonic()
    runs = []   # (scenario label, server, Scenario), in table order
    # fugue and gunicorn alternate, so that whatever else loads the machine
    # weighs on both halves alike.
    if args.hups:
        runs.append((f"HUP x{args.hups}", "fugue", fugue_hups(args.hups, out)))
    if args.gunicorn and g_hups:
        runs.append((f"HUP x{g_hups}", "gunicorn", gunicorn_side.hup_storm(g_hups)))
    if args.preload and args.hups:
        runs.append((f"HUP x{args.hups}", "fugue --preload", fugue_hups(args.hups, out, ("--preload",))))
    if args.usr2:
        runs.append((f"USR2 x{args.usr2}", "fugue", fugue_usr2s(args.usr2, out)))
    if args.gunicorn and g_usr2:
        runs.append((f"USR2 + WINCH + QUIT x{g_usr2}", "gunicorn",
                     gunicorn_side.usr2_dance(g_usr2, ("WINCH", "QUIT"))))
        runs.append((f"USR2 + TERM x{g_usr2}", "gunicorn",
                     gunicorn_side.usr2_dance(g_usr2, ("TERM",))))
    if args.broken:
        runs.append(("broken HUP", "fugue", fugue_broken("HUP", out)))
        if args.gunicorn:
            runs.append(("broken HUP", "gunicorn", gunicorn_side.broken_hup()))
        runs.append(("broken USR2", "fugue", fugue_broken("USR2", out)))
    took = time.monotonic() - t0

    head = (f"fugue {_version('fugue')} at {commit} (http.server ThreadingHTTPServer, {WORKERS} workers) and "
            f"gunicorn {_version('gunicorn')} (gthread, {gunicorn_side.WORKERS} workers x "
            f"{gunicorn_side.THREADS} threads, keep-alive {gunicorn_side.KEEPALIVE_S} s); "
            f"load: {CONNS} keep-alive connections; {os.cpu_count()} CPUs; "
            f"run took {took:.0f} s")
    table = plot.markdown_table([row(label, server, s) for label, server, s in runs], COLUMNS)
    print(head + "\n\n" + table)

    details = [head, "", table]
    for label, server, s in runs:
        details += ["", f"## {label}: {server} (ms since the signal)", "",
                    gunicorn_side.events_table(s)]
        details += [f"- {note}" for note in s.notes]
        details += [f"- sample {k}: {v}" for k, v in s.result.failure_samples.items()]
        details += [f"- {line}" for line in failure_report(s)]
        if server.startswith("fugue") and s.result.failed:
            evidence = fugue_failure_evidence(s)
            details += ["", "fugue lost requests; where, and its log around each:", "", "```"]
            details += evidence + ["```"]
            print(f"\nfugue LOST REQUESTS in {label}:\n" + "\n".join(evidence))
        if getattr(s, "aborted", None):
            print(f"\nfugue {label} ABORTED: {s.aborted}")
    pngs = _pictures(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reload.md").write_text("\n".join(details) + "\n")
    print(f"\ndetails: {out / 'reload.md'}\ntimelines: {', '.join(map(str, pngs))}\n"
          f"fugue logs: {out}/reload-fugue-*.log")
    fugue_bad = sum(s.result.failed + bool(getattr(s, "aborted", None))
                    for _, server, s in runs if server.startswith("fugue"))
    return 1 if fugue_bad else 0


def _pictures(runs: list, out: Path) -> list:
    """One PNG per kind of scenario, fugue above gunicorn on a shared time axis."""
    groups: dict = {}
    for label, server, s in runs:
        kind = label.split(" x")[0].split(" +")[0].split(",")[0]
        groups.setdefault(kind, {})[f"{server}: {label}"] = _for_picture(s.result)
    pngs = []
    for kind, series in groups.items():
        slug = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")
        pngs.append(plot.timeline_png(str(out / f"reload_{slug}.png"), series,
                                      f"{kind} under {CONNS} keep-alive connections"))
    return pngs


def _fugue_commit() -> str:
    """The commit of fugue/ this run used, "+" if fugue/ had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    return commit + ("+" if git("status", "--porcelain", "--", "fugue").strip() else "")


def _version(module: str) -> str:
    if module == "fugue":  # not imported here: the bench only talks to it from outside
        m = re.search(r'__version__ = "([^"]+)"', (ROOT / "fugue" / "__init__.py").read_text())
        return m[1] if m else "?"
    return getattr(__import__(module), "__version__", "?")


if __name__ == "__main__":
    sys.exit(main())
