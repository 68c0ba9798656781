#!/usr/bin/env python3
"""The gunicorn half of the reload benchmark: real processes, real signals.

    python3 bench/gunicorn_side.py --hups 5 --usr2 3

Runs gunicorn (gthread, 2 workers x 4 threads, keep-alive 5 s) with the hello
app under a 32-connection keep-alive load, and for each scenario prints how
many requests failed, by kind, and how long each reload took:

    hup_storm(n)     n HUPs; each waits until every worker is of the new
                     generation and the old workers are gone
    usr2_dance(n)    n binary upgrades: USR2, wait for the new master
                     (<pidfile>.2) and its workers, then retire the old master
                     with WINCH + QUIT (the classic recipe) or TERM (what
                     gunicorn's signal docs say today)
    broken_hup()     HUP with a syntax error in the app: does the master
                     survive, and how long is the service down?

Every file (pid files, the control socket, the app copy that gets broken, the
generation file, gunicorn's log) lives in a temporary directory. Every process
started is in its own process group and is killed in a finally block; this
process makes itself a child subreaper so an orphaned new master is still ours
to reap (pid 1 on these machines does not reap orphans).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from pathlib import Path
from typing import Optional

try:  # run as a script (python3 bench/gunicorn_side.py) or imported as bench.*
    import loadgen
    import plot
    import proctree
except ImportError:
    from bench import loadgen, plot, proctree

HERE = Path(__file__).resolve().parent
APP_SOURCE = HERE / "apps" / "hello_wsgi.py"

WORKERS = 2
THREADS = 4
KEEPALIVE_S = 5
CONNS = 32

BOOT_TIMEOUT_S = 15.0
RELOAD_TIMEOUT_S = 40.0  # > gunicorn's 30 s graceful timeout: we want to see it out
SETTLE_S = 0.5           # steady-state load shown before the first and after the last event
GAP_S = 0.3              # steady-state load between two events, to keep them apart on the plot
WINCH_WAIT_S = 1.0       # how long to watch for WINCH stopping the old workers
BROKEN_CAP_S = 3.0       # how long a broken HUP may take to kill (or not) the master


@dataclasses.dataclass
class Scenario:
    """One scenario's load Result, its per-event timings and what we noticed."""

    name: str
    result: loadgen.Result
    events: list
    notes: list


class Gunicorn:
    """gunicorn instances started by one scenario, all under `workdir`.

    Called by the scenarios. Promises: start() returns only once the master
    printed its "Listening at" line for the port we chose and every worker
    answers; close() leaves no process behind, even after USR2 re-execs.
    """

    def __init__(self, workdir: str, workers: int = WORKERS, threads: int = THREADS,
                 keepalive: int = KEEPALIVE_S):
        self.dir = Path(workdir)
        self.workers, self.threads, self.keepalive = workers, threads, keepalive
        self.app_dir = self.dir / "app"
        self.app_dir.mkdir()
        self.app_path = self.app_dir / "hello_wsgi.py"
        shutil.copyfile(APP_SOURCE, self.app_path)
        self.gen_file = self.dir / "generation"
        self.pidfile = self.dir / "gunicorn.pid"
        self.log_path = self.dir / "gunicorn.log"
        self.port: Optional[int] = None
        self.master: Optional[int] = None
        self._popens: list = []
        self.set_generation("0")

    # -- control --------------------------------------------------------------

    def set_generation(self, gen) -> None:
        """Workers that import the app from now on answer "gen <gen>"."""
        proctree.write_atomically(self.gen_file, f"{gen}\n")

    def start(self, port: Optional[int] = None) -> int:
        """Start a master on `port` (default: a port probed free just now)."""
        # Reap exited masters first: gunicorn's pid file check takes a zombie
        # for a live master ("Already running on PID ...").
        self.reap()
        self.port = port or _probe_free_port()
        log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "gunicorn", "hello_wsgi:app",
                "--chdir", str(self.app_dir),
                "--bind", f"127.0.0.1:{self.port}",
                "--worker-class", "gthread", "--threads", str(self.threads),
                "--workers", str(self.workers), "--keep-alive", str(self.keepalive),
                "--pid", str(self.pidfile),
                "--control-socket", str(self.dir / "gunicorn.ctl"),
                "--log-level", "info"]
        env = dict(os.environ, HELLO_GEN_FILE=str(self.gen_file))
        log_offset = self.log_path.stat().st_size
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=env, cwd=self.dir, start_new_session=True)
        log.close()
        self._popens.append(popen)
        listening = re.compile(
            rf"Listening at: http://127\.0\.0\.1:{self.port} \({popen.pid}\)")

        def booted():
            if popen.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {popen.returncode}:\n"
                                   + self.log_tail())
            return listening.search(self.log_text(log_offset))

        proctree.wait_for(booted, BOOT_TIMEOUT_S, "gunicorn's 'Listening at' line")
        self.master = popen.pid
        proctree.wait_for(lambda: len(self.worker_pids()) == self.workers,
                          BOOT_TIMEOUT_S, f"{self.workers} workers")
        proctree.wait_for(self.answers, BOOT_TIMEOUT_S, "a first answer")
        return self.port

    def worker_pids(self, master: Optional[int] = None) -> set:
        """Live workers of `master` (default: the current master).

        A master's children are its workers plus, during a USR2, the new
        master; the latter is told apart by its pid file.
        """
        master = master or self.master
        return proctree.children(master) - {self.read_pid(".2")}

    def read_pid(self, suffix: str = "") -> Optional[int]:
        """The pid in the pid file (suffix ".2": the new master's during USR2)."""
        try:
            text = Path(str(self.pidfile) + suffix).read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def answers(self) -> Optional[str]:
        """One plain GET; the body, or None if the server did not answer."""
        return proctree.http_body(self.port)

    def break_app(self) -> None:
        """Append a syntax error to the app copy that workers import."""
        with open(self.app_path, "a", encoding="utf-8") as f:
            f.write("\ndef broken(:\n")

    def restore_app(self) -> None:
        shutil.copyfile(APP_SOURCE, self.app_path)

    def log_text(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def reap(self) -> None:
        """Collect the exit status of every master that has exited."""
        for popen in self._popens:
            popen.poll()
        proctree.reap_orphans(keep=[p.pid for p in self._popens])

    def close(self) -> list:
        """Kill every process group we started; returns pids that needed SIGKILL."""
        stubborn = []
        for popen in self._popens:
            stubborn += proctree.kill_group(popen.pid, grace=5.0, popens=[popen])
        proctree.reap_orphans()
        return stubborn

    def __enter__(self) -> "Gunicorn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _probe_free_port() -> int:
    """A port free at this instant. gunicorn cannot bind port 0 and tell us the
    port, so we probe and confirm with its "Listening at" line; if another
    process takes the port in between, gunicorn fails to bind and start()
    raises with its log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gen_is(gen):
    suffix = f" gen {gen}"
    return lambda body: body.endswith(suffix)


def _steady(load: loadgen.Load, seconds: float) -> None:
    """Let the load run undisturbed: a measurement window, not a wait."""
    time.sleep(seconds)


def _run(name: str, body) -> Scenario:
    """Common frame: temp dir, gunicorn, load; `body(g, load, events, notes)`."""
    events, notes = [], []
    with tempfile.TemporaryDirectory(prefix=f"fugue-bench-gunicorn-{name}-") as tmp, \
            Gunicorn(tmp) as g:
        g.start()
        load = loadgen.Load("127.0.0.1", g.port, conns=CONNS, track_bodies=True)
        load.start()
        try:
            _steady(load, SETTLE_S)
            body(g, load, events, notes)
            _steady(load, SETTLE_S)
        finally:
            result = load.stop()
            stubborn = g.close()
            if stubborn:
                notes.append(f"needed SIGKILL at cleanup: {stubborn}")
    return Scenario(name, result, events, notes)


# -- scenarios --------------------------------------------------------------------

def hup_storm(n: int) -> Scenario:
    """n HUPs under load, each waiting until all workers are new.

    Per event: signal -> first answer of the new generation, and
    signal -> old workers gone (and `workers` new ones alive).
    """
    def body(g: Gunicorn, load: loadgen.Load, events: list, notes: list) -> None:
        for i in range(1, n + 1):
            old = g.worker_pids()
            g.set_generation(i)
            t_signal = load.mark(f"HUP {i}")
            os.kill(g.master, signal.SIGHUP)
            first = proctree.wait_for(lambda: load.first_seen(_gen_is(i)),
                                      RELOAD_TIMEOUT_S, f"gen {i} answering")
            proctree.wait_for(lambda: not (g.worker_pids() & old)
                              and len(g.worker_pids()) == g.workers,
                              RELOAD_TIMEOUT_S, f"gen {i - 1} workers gone")
            t_done = load.elapsed()
            events.append({"event": f"HUP {i}", "first_new_answer_s": first - t_signal,
                           "old_gone_s": t_done - t_signal})
            _steady(load, GAP_S)

    return _run("hup", body)


def usr2_dance(n: int, retire: tuple = ("WINCH", "QUIT")) -> Scenario:
    """n binary upgrades under load.

    Each: USR2 to the master; wait for <pidfile>.2 (gunicorn 27 names the
    new master's pid file so), for its workers to exist and for a fresh
    connection to be answered by the new generation; send the
    `retire` signals to the old master ("WINCH", then "QUIT" once WINCH had
    WINCH_WAIT_S to stop the old workers; or just "TERM"); wait for the old
    master to be gone and for the new one to promote itself (rename .2 to
    the pid file). A new master ignores USR2 until it has promoted itself,
    so the next round cannot start earlier.
    """
    def body(g: Gunicorn, load: loadgen.Load, events: list, notes: list) -> None:
        for i in range(1, n + 1):
            old_master, old_workers = g.master, g.worker_pids()
            g.set_generation(i)
            t_signal = load.mark(f"USR2 {i}")
            os.kill(old_master, signal.SIGUSR2)
            new_master = proctree.wait_for(lambda: g.read_pid(".2"), RELOAD_TIMEOUT_S,
                                           "the new master's pid file <pidfile>.2")
            t_pidfile = load.elapsed()
            proctree.wait_for(lambda: len(g.worker_pids(new_master)) == g.workers,
                              RELOAD_TIMEOUT_S, "the new master's workers")
            # The load's kept-alive connections all stay with the old workers
            # until those close them, so the load alone never shows the new
            # generation before the retirement: verify it on fresh connections.
            proctree.wait_for(lambda: _gen_is(i)(g.answers() or ""), RELOAD_TIMEOUT_S,
                              f"gen {i} answering a fresh connection")
            event = {"event": f"USR2 {i}", "new_pidfile_s": t_pidfile - t_signal,
                     "new_gen_verified_s": load.elapsed() - t_signal}
            for name in retire:
                load.mark(f"{name} {i}")
                os.kill(old_master, getattr(signal, f"SIG{name}"))
                if name == "WINCH":
                    try:
                        proctree.wait_for(lambda: not (old_workers & g.worker_pids(old_master)),
                                          WINCH_WAIT_S, "WINCH to stop the old workers")
                        event["winch_stopped_workers"] = True
                    except TimeoutError:
                        event["winch_stopped_workers"] = False
            proctree.wait_for(lambda: not proctree.alive(old_master), RELOAD_TIMEOUT_S,
                              "the old master to exit")
            event["old_master_gone_s"] = load.elapsed() - t_signal
            first = proctree.wait_for(lambda: load.first_seen(_gen_is(i)),
                                      RELOAD_TIMEOUT_S, f"the load seeing gen {i}")
            event["first_new_answer_s"] = first - t_signal
            proctree.wait_for(lambda: g.read_pid() == new_master, RELOAD_TIMEOUT_S,
                              "the new master to promote itself (.2 -> pid file)")
            event["promoted_s"] = load.elapsed() - t_signal
            g.master = new_master
            g.reap()
            events.append(event)
            _steady(load, GAP_S)
        if any(e.get("winch_stopped_workers") is False for e in events):
            notes.append(f"WINCH did not stop the old workers (gunicorn ignores it unless "
                         f"daemonized); each round still waited {WINCH_WAIT_S} s for it")
        lags = [e["promoted_s"] - e["old_master_gone_s"] for e in events]
        notes.append(f"the new master promoted itself {_median_max(lags)} ms (median / max) "
                     f"after the old one exited: it checks getppid() once per loop turn, "
                     f"and ignores USR2 until then")

    return _run("usr2-" + "-".join(s.lower() for s in retire), body)


def broken_hup() -> Scenario:
    """HUP with a syntax error in the app; restore and restart if it kills gunicorn.

    Records whether the master survived, HUP -> master exit, HUP -> first
    failed request, the restart's boot time (our immediate restart stands in
    for an init system's), and the outage: first failed request -> first
    answer of the restarted server.
    """
    def body(g: Gunicorn, load: loadgen.Load, events: list, notes: list) -> None:
        g.break_app()
        g.set_generation("broken")
        t_signal = load.mark("HUP (broken app)")
        master = g.master
        os.kill(master, signal.SIGHUP)
        event = {"event": "HUP broken app"}
        try:
            proctree.wait_for(lambda: not proctree.alive(master), BROKEN_CAP_S,
                              "the master to exit")
            event["master_exit_s"] = load.elapsed() - t_signal
        except TimeoutError:
            event["master_exit_s"] = None
        g.restore_app()
        g.set_generation("restored")
        if event["master_exit_s"] is None:
            notes.append(f"master survived the broken HUP for {BROKEN_CAP_S} s")
            load.mark("HUP (restored app)")
            os.kill(master, signal.SIGHUP)
        else:
            notes.append("master EXITED on the broken HUP: service down until restarted")
            load.mark("restart")
            t_restart = load.elapsed()
            g.start(port=g.port)
            event["restart_boot_s"] = load.elapsed() - t_restart
        first = proctree.wait_for(lambda: load.first_seen(_gen_is("restored")),
                                  RELOAD_TIMEOUT_S, "the restored app answering")
        event["restored_answer_s"] = first - t_signal
        window = load.snapshot().failure_window()
        if window is not None:
            event["first_failure_s"] = window[0] - t_signal
            # From the first failed request to the first answer of the restored
            # server: the outage, with the fastest restart a supervisor could do.
            event["outage_s"] = first - window[0]
        events.append(event)

    return _run("broken-hup", body)


# -- report -------------------------------------------------------------------------

def _median_max(values) -> Optional[str]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f}"


def summary_row(s: Scenario) -> dict:
    """One row of the summary table for a scenario."""
    r = s.result
    first = [e.get("first_new_answer_s", e.get("restored_answer_s")) for e in s.events]
    done = [e.get("old_gone_s", e.get("old_master_gone_s")) for e in s.events]
    return {"scenario": s.name, "events": len(s.events), "requests": r.requests,
            "ok/s": f"{r.requests_per_s:.0f}", "failed": r.failed,
            "failed by kind": r.failures_text(),
            "to first new answer ms (median / max)": _median_max(first),
            "to old gone ms (median / max)": _median_max(done),
            "outcome": _outcome(s)}


def _outcome(s: Scenario) -> str:
    if s.name == "broken-hup":
        e = s.events[0]
        if e.get("master_exit_s") is None:
            return "master survived"
        outage = e.get("outage_s")
        return (f"master exited {e['master_exit_s'] * 1000:.0f} ms after HUP; down "
                + (f"{outage * 1000:.0f} ms" if outage is not None else "?")
                + " with an immediate restart")
    return f"{len(s.events)} reloads completed"


SUMMARY_COLUMNS = ["scenario", "events", "requests", "ok/s", "failed", "failed by kind",
                   "to first new answer ms (median / max)", "to old gone ms (median / max)",
                   "outcome"]


def events_table(s: Scenario) -> str:
    """One scenario's events, every timing in ms since the event's signal."""
    keys = []
    for e in s.events:
        keys += [k for k in e if k != "event" and k not in keys]
    rows = []
    for e in s.events:
        row = {"event": e["event"]}
        for k in keys:
            v = e.get(k)
            row[k.removesuffix("_s")] = (f"{v * 1000:.0f}" if isinstance(v, float)
                                         else "-" if v is None else str(v))
        rows.append(row)
    return plot.markdown_table(rows, ["event"] + [k.removesuffix("_s") for k in keys])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="gunicorn half of the reload benchmark")
    parser.add_argument("--hups", type=int, default=5)
    parser.add_argument("--usr2", type=int, default=3)
    parser.add_argument("--no-broken", dest="broken", action="store_false",
                        help="skip the broken-app HUP")
    parser.add_argument("--no-term-variant", dest="term_variant", action="store_false",
                        help="skip the USR2 + TERM variant")
    parser.add_argument("--out", default=str(HERE / "out"),
                        help="directory for the timeline PNG (default bench/out)")
    args = parser.parse_args(argv)

    proctree.become_subreaper()
    scenarios = []
    if args.hups:
        scenarios.append(hup_storm(args.hups))
    if args.usr2:
        scenarios.append(usr2_dance(args.usr2, ("WINCH", "QUIT")))
        if args.term_variant:
            scenarios.append(usr2_dance(args.usr2, ("TERM",)))
    if args.broken:
        scenarios.append(broken_hup())

    print(f"gunicorn {_gunicorn_version()}: gthread, {WORKERS} workers x {THREADS} threads, "
          f"keep-alive {KEEPALIVE_S} s; load: {CONNS} keep-alive connections\n")
    print(plot.markdown_table([summary_row(s) for s in scenarios], SUMMARY_COLUMNS))
    for s in scenarios:
        print(f"\n{s.name} (ms)\n")
        print(events_table(s))
        for note in s.notes:
            print(f"- {note}")
        for kind, sample in s.result.failure_samples.items():
            print(f"- sample {kind}: {sample}")
    png = plot.timeline_png(os.path.join(args.out, "gunicorn_reload.png"),
                            {s.name: s.result for s in scenarios},
                            "gunicorn reloads under 32 keep-alive connections")
    print(f"\ntimeline: {png}")
    return 0


def _gunicorn_version() -> str:
    import gunicorn
    return gunicorn.__version__


if __name__ == "__main__":
    sys.exit(main())
