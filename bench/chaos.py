#!/usr/bin/env python3
"""Faults under load: fugue beside gunicorn, requests lost by kind.

    python3 bench/chaos.py                      # every fault, both servers, ~4 minutes
    python3 bench/chaos.py --only kill9-worker hup-broken --server fugue

Each row is one fault injected into a freshly started server (2 workers,
timeout 5 s, graceful_timeout 5 s; fugue: fuguectl start --app chaos_wsgi:app,
waitress; gunicorn: gthread, 4 threads, keep-alive 5 s) while loadgen keeps 16
keep-alive connections busy and counts every request exactly once: ok, or
failed by kind (connect_refused, reset, eof_before_response, ...). The load
runs from before the fault until the server has recovered (or the scenario's
cap has passed) plus a short settle. "down" is the time with no successful
request at all after the fault (loadgen's 100 ms buckets): where it is not 0
the service was down.

Faults (the app is bench/apps/chaos_wsgi.py: hello_wsgi plus /hang and
CHAOS_IGNORE_TERM):

    kill9-worker    SIGKILL a random worker, wait for its slot to be ready again; x5
    kill9-master    SIGKILL the master: do the workers exit, does the port stay
                    half-served (open, nobody accepting: a fresh request 1 s
                    after the kill tells)? then restart on the same port and
                    pid file, as a supervisor would
    hup-broken      syntax error in the app, then HUP
    usr2-broken     syntax error in the app, then USR2 (binary upgrade)
    hup-storm       5 storms of 20 HUPs in 1 s, a new generation number (code)
                    before each HUP; after each, wait until one generation serves
                    with the right worker count: is it the code of the last HUP?
    ttin-ttou       10 TTIN (one worker more each), wait; 10 TTOU, wait
    hung-worker     SIGSTOP a worker (a process blocked for good, heartbeat and
                    all): the master must kill it after `timeout`
    ignore-term     every worker sets SIGTERM to SIG_IGN, then HUP: are the old
                    workers stopped, and how long does it take?
    stuck-request   one request stuck forever in app code (GET /hang), then HUP:
                    the old worker must be killed after graceful_timeout
    nofile-hup      the master's descriptor limit lowered (prlimit --pid) to what it
                    has open, then HUP: a spawn fails with EMFILE. Then the limit is
                    restored and HUP sent again (issue 12 item 8)
    router-slowloris (fugue only: gunicorn has no router) the routed-mode router
                    (one app, chaos_wsgi, as default_app) at a descriptor limit of
                    1024, 1100 connections that never send a byte; then the load
                    and a fresh request: are new clients served, how much CPU does
                    the router burn, how many log lines? (issue 12 item 9)
    status-scrape   (fugue only: a gunicorn worker has no status to report) two
                    requests with 110 KB URLs in flight per worker, then
                    `fuguectl status` x3: the stats reply once exceeded the
                    channel's packet limit and the worker was killed after
                    `timeout` with everything it had in flight (issue 12 item 7)
    stop-under-load one request stuck, then TERM (graceful stop): while it drains,
                    4 clients open fresh connections; each is refused, answered, or
                    accepted and then reset / left without an answer (the bug)

Needs gunicorn and waitress (pip install gunicorn waitress).
"""

from __future__ import annotations

import argparse
import importlib.util
import dataclasses
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

if importlib.util.find_spec("matplotlib") is None:  # bench/plot.py (the tables) imports it
    sys.exit("matplotlib is not installed: pip install matplotlib")

try:  # run as a script (python3 bench/chaos.py) or imported as bench.*
    import contenders
    import loadgen
    import plot
    import proctree
except ModuleNotFoundError as e:
    if e.name not in ('contenders', 'loadgen', 'plot', 'proctree'):  # a third-party module
        sys.exit(f"{e.name} is not installed: pip install {e.name}")
    from bench import contenders, loadgen, plot, proctree

WORKERS = 2
CONNS = 16
TIMEOUT_S = 5            # the servers' worker timeout (no heartbeat -> SIGKILL)
GRACEFUL_S = 5           # the servers' graceful timeout (draining -> SIGKILL)
CLIENT_TIMEOUT_S = 10.0  # loadgen gives up on a request after this long
SETTLE_S = 0.5
KILLS = 5
STORM = 20
STORM_RUNS = 5
SCALE = 10
CAP_S = 30.0             # longest a scenario waits for a recovery
PROBERS = 4              # stop-under-load: clients opening fresh connections during the drain


@dataclasses.dataclass
class Outcome:
    server: str
    fault: str
    result: loadgen.Result
    outcome: str
    notes: list


def within(condition: Callable, cap: float, interval: float = 0.02):
    """condition()'s first truthy value within `cap` seconds, else None."""
    try:
        return proctree.wait_for(condition, cap, "condition", interval=interval)
    except TimeoutError:
        return None


def make_server(kind: str, workdir: str, env: Optional[dict] = None):
    flags = ("--timeout", str(TIMEOUT_S), "--graceful-timeout", str(GRACEFUL_S))
    if kind.startswith("fugue"):
        if kind == "fugue-preload":  # a mold per generation; workers are forked from it
            flags += ("--preload",)
        return contenders.FugueServer(workdir, "chaos_wsgi:app", WORKERS, options=flags, env=env)
    return contenders.GunicornServer(workdir, "chaos_wsgi:app", WORKERS, "gthread", threads=4,
                                     options=flags, env=env)


def all_ready(server, count: int, exclude=()) -> bool:
    """`count` live workers, every one of them ready, none of them in `exclude`."""
    pids = server.worker_pids()
    return len(pids) == count and not (pids & set(exclude)) and pids <= server.ready_pids()


def ms(seconds: Optional[float]) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


# -- faults: each gets (kind, server, load, notes) and returns the outcome text ----------

def fresh_request(port: int, timeout: float) -> str:
    """One GET on a new connection: 'answered', 'refused', or what went wrong."""
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"connect failed ({e.__class__.__name__})"
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = conn.recv(100)
        return "answered" if data.startswith(b"HTTP/1.1 200") else (
            "closed without an answer" if not data else f"got {data[:20]!r}")
    except socket.timeout:
        return f"ACCEPTED, NO ANSWER in {timeout:g} s (half-served)"
    except OSError as e:
        return f"reset ({e.__class__.__name__})"
    finally:
        conn.close()


def kill9_worker(kind, s, load, notes) -> str:
    back = []
    for i in range(1, KILLS + 1):
        victim = random.choice(sorted(s.worker_pids()))
        t = load.mark(f"kill -9 worker {i}")
        os.kill(victim, signal.SIGKILL)
        ok = within(lambda: not proctree.alive(victim) and all_ready(s, s.workers, [victim]),
                    CAP_S)
        back.append(load.elapsed() - t if ok else None)
        time.sleep(0.3)  # steady load between two kills
    restored = [b for b in back if b is not None]
    text = f"{len(restored)}/{KILLS} slots back"
    if restored:
        text += f", ready again after {ms(statistics.median(restored))} (median)"
    return text


def kill9_master(kind, s, load, notes) -> str:
    master, workers = s.master, s.worker_pids()
    t = load.mark("kill -9 master")
    os.kill(master, signal.SIGKILL)
    # A fresh client 1 s later, while orphaned workers may still be around:
    # served, refused, or accepted by the kernel and left unanswered (the
    # port is half-served: the listener is open but nobody accepts). It runs
    # beside the wait for the workers' exit, which it must not delay.
    probe = []
    prober = threading.Timer(1.0, lambda: probe.append(fresh_request(s.port, timeout=2.0)))
    prober.start()
    gone = within(lambda: not any(proctree.alive(w) for w in workers), CAP_S)
    t_gone = load.elapsed() - t if gone else None
    prober.join()
    probe = probe[0] if probe else "?"
    refused = within(lambda: contenders.connect_refused(s.port), 2.0)
    parts = [f"workers exited after {ms(t_gone)}" if gone
             else f"{sum(proctree.alive(w) for w in workers)} workers still alive after {CAP_S:g} s",
             f"a fresh request 1 s after the kill: {probe}"]
    if gone and refused:
        parts.append("then port closed (refused)")
    elif gone:
        parts.append("PORT HALF-SERVED after the workers exited: accepts, nobody serves")
    s.reap()
    load.mark("restart")
    t_restart = load.elapsed()
    try:
        s.start(port=s.port)
        parts.append(f"restart on the stale pid file: serving after {ms(load.elapsed() - t_restart)}")
    except (RuntimeError, TimeoutError) as e:
        parts.append(f"RESTART FAILED: {str(e).splitlines()[0]}")
        notes.append(s.log_tail(5))
    return "; ".join(parts)


def hup_broken(kind, s, load, notes) -> str:
    offset = s.log_size()
    master = s.master
    s.break_app()
    s.set_generation("broken")
    t = load.mark("HUP (broken app)")
    os.kill(master, signal.SIGHUP)
    if kind.startswith("fugue"):
        failed = within(lambda: "reload failed" in s.log_text(offset), CAP_S)
        text = (f"rolled back after {ms(load.elapsed() - t)}" if failed
                else "no rollback seen")
    else:
        died = within(lambda: not proctree.alive(master), 5.0)
        text = (f"MASTER EXITED after {ms(load.elapsed() - t)}: service down" if died
                else "master survived 5 s")
    s.restore_app()
    time.sleep(1.0)  # observe what the load sees after the outcome
    alive = proctree.alive(master)
    answers = s.answers()
    if kind.startswith("fugue") or alive:
        text += "; old workers serving" if answers and answers.endswith("gen 0") else (
            f"; answers {answers!r}")
    return text


def usr2_broken(kind, s, load, notes) -> str:
    offset = s.log_size()
    master = s.master
    s.break_app()
    s.set_generation("broken")
    t = load.mark("USR2 (broken app)")
    os.kill(master, signal.SIGUSR2)
    if kind.startswith("fugue"):
        failed = within(lambda: "upgrade failed" in s.log_text(offset), CAP_S)
        text = (f"upgrade failed after {ms(load.elapsed() - t)}, old master goes on" if failed
                else "no outcome seen")
    else:
        new = within(lambda: s.read_pid(".2"), 5.0)
        if new:
            gone = within(lambda: not proctree.alive(new), CAP_S)
            text = (f"new master {'exited' if gone else 'still alive'} after "
                    f"{ms(load.elapsed() - t)}")
        else:
            text = "no new master seen (no <pidfile>.2)"
    s.restore_app()
    time.sleep(1.0)  # observe what the load sees after the outcome
    if not proctree.alive(master):
        return text + "; OLD MASTER DEAD: service down"
    answers = s.answers()
    left = s.worker_pids(master)
    return text + (f"; old master and {len(left)} workers serving"
                   if answers and answers.endswith("gen 0") else f"; answers {answers!r}")


def hup_storm(kind, s, load, notes) -> str:
    """STORM_RUNS storms of STORM HUPs in 1 s each, a new code (generation number) before
    each HUP; after each storm, wait until one generation serves with all its workers and
    see whose code it is: the last HUP's, or an earlier one's (a HUP lost)."""
    offset = s.log_size()
    load.mark(f"{STORM_RUNS} storms of {STORM} HUPs")
    runs = []
    for run in range(STORM_RUNS):
        t = load.elapsed()
        last = (run + 1) * STORM
        for i in range(run * STORM + 1, last + 1):
            s.set_generation(i)
            os.kill(s.master, signal.SIGHUP)
            time.sleep(1.0 / STORM)
        if kind.startswith("fugue"):
            def settled():
                st = s.status()
                if not st or st["master"]["pending_generation"] is not None or st["master"].get("asked"):
                    return None
                gens = {w["generation"] for w in st["workers"] if w["state"] != "draining"}
                states = {w["state"] for w in st["workers"]}
                return (st if len(st["workers"]) == s.workers and states == {"ready"}
                        and gens == {st["master"]["generation"]} else None)
            ok = within(settled, CAP_S, interval=0.2)
        else:
            # gunicorn: settled when exactly N workers live, all initialized, the last
            # code answers, and that stays so for 1 s
            def stable():
                if not all_ready(s, s.workers) or not (s.answers() or "").endswith(f"gen {last}"):
                    return None
                pids = s.worker_pids()
                time.sleep(1.0)
                return pids == s.worker_pids()
            ok = within(stable, CAP_S, interval=0.2)
        code = (s.answers() or "?").rsplit(" ", 1)[-1]
        took = load.elapsed() - t - (1.0 if kind != "fugue" else 0.0)  # gunicorn's: less the 1 s stable check
        runs.append((bool(ok), code == str(last), took, f"{int(code) - run * STORM}"
                     if code.isdigit() else code))
    log = s.log_text(offset)
    on_last = sum(1 for settled_, last_, _, _ in runs if settled_ and last_)
    took = "/".join(f"{took * 1000:.0f}" for _, _, took, _ in runs)
    codes = ", ".join(code for _, _, _, code in runs)
    if kind.startswith("fugue"):
        extra = (f"{len(re.findall(r'reload done', log))} reloads done, "
                 f"{len(re.findall(r'joins the reload already waiting', log))} HUPs coalesced, "
                 f"{len(re.findall(r'refused', log))} refused")
    else:
        extra = f"{len(re.findall(r'Booting worker', log))} workers booted"
    return (f"ended on the code of the last HUP in {on_last} of {STORM_RUNS} storms (HUP {codes} of "
            f"{STORM}); settled {took} ms after each storm began; {extra}")


def stop_under_load(kind, s, load, notes) -> str:
    """TERM (graceful stop) with one request stuck, so the drain lasts graceful_timeout;
    meanwhile PROBERS clients open fresh connections: refused, or accepted and then reset
    (or left without an answer)?"""
    hang = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    hang.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)  # let a worker pick it up
    seen = []
    lock = threading.Lock()
    done = threading.Event()

    def probe():
        while not done.is_set():
            outcome = fresh_request(s.port, GRACEFUL_S + 10.0)
            with lock:
                seen.append(outcome)
            if outcome == "refused":
                done.wait(0.002)

    t = load.mark("TERM (graceful stop, one request stuck)")
    os.kill(s.master, signal.SIGTERM)
    probers = [threading.Thread(target=probe, daemon=True) for _ in range(PROBERS)]
    for p in probers:
        p.start()
    gone = within(lambda: not proctree.alive(s.master), GRACEFUL_S + 15.0, interval=0.05)
    t_gone = load.elapsed() - t if gone else None
    done.set()
    for p in probers:
        p.join(GRACEFUL_S + 15.0)
    hang.close()
    counts = {}
    for outcome in seen:
        key = outcome.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    bad = sum(n for k, n in counts.items() if k not in ("refused", "answered"))
    return (f"{len(seen)} new connections during the stop: {text}; "
            f"{'NONE' if not bad else bad} accepted and not answered; master gone after {ms(t_gone)}")


def ttin_ttou(kind, s, load, notes) -> str:
    n = s.workers
    offset = s.log_size()
    t = load.mark(f"{SCALE} x TTIN")
    for _ in range(SCALE):
        os.kill(s.master, signal.SIGTTIN)
        time.sleep(0.05)
    up = within(lambda: all_ready(s, n + SCALE), CAP_S)
    t_up = load.elapsed() - t if up else None
    time.sleep(0.5)
    t = load.mark(f"{SCALE} x TTOU")
    for _ in range(SCALE):
        os.kill(s.master, signal.SIGTTOU)
        time.sleep(0.05)
    down = within(lambda: len(s.worker_pids()) == n, CAP_S)
    t_down = load.elapsed() - t if down else None
    # What the master says it handled: POSIX coalesces a signal sent again
    # before the first was delivered, so a busy master may see fewer.
    log = s.log_text(offset)
    if kind.startswith("fugue"):
        moves = [(int(a), int(b)) for a, b in re.findall(r"workers: (\d+) -> (\d+)", log)]
        ins, outs = sum(b > a for a, b in moves), sum(b < a for a, b in moves)
    else:
        ins = len(re.findall(r"Handling signal: ttin", log))
        outs = len(re.findall(r"Handling signal: ttou", log))
    return (f"{n} -> {n + SCALE} ready in {ms(t_up)}"
            + ("" if up else f" ({len(s.worker_pids())} reached)")
            + f"; back to {n} in {ms(t_down)}"
            + ("" if down else f" ({len(s.worker_pids())} left)")
            + f"; the master handled {ins}/{SCALE} TTIN, {outs}/{SCALE} TTOU")


def hung_worker(kind, s, load, notes) -> str:
    victim = random.choice(sorted(s.worker_pids()))
    t = load.mark("SIGSTOP worker")
    os.kill(victim, signal.SIGSTOP)
    killed = within(lambda: not proctree.alive(victim), CAP_S)
    t_killed = load.elapsed() - t if killed else None
    back = within(lambda: all_ready(s, s.workers, [victim]), CAP_S)
    if not killed:
        os.kill(victim, signal.SIGKILL)
        return f"NOT KILLED after {CAP_S:g} s (timeout {TIMEOUT_S} s)"
    return (f"killed after {ms(t_killed)} (timeout {TIMEOUT_S} s); "
            f"slot ready again after {ms(load.elapsed() - t) if back else 'never'}")


def _hup_and_wait_old_gone(s, load, label, cap) -> tuple:
    old = s.worker_pids()
    s.set_generation(1)
    t = load.mark(label)
    os.kill(s.master, signal.SIGHUP)
    gone = within(lambda: not any(proctree.alive(w) for w in old), cap)
    t_gone = load.elapsed() - t if gone else None
    new = within(lambda: all_ready(s, s.workers, old), 5.0)
    return t_gone, old, bool(new)


def ignore_term(kind, s, load, notes) -> str:
    cap = GRACEFUL_S + 15.0
    t_gone, old, new = _hup_and_wait_old_gone(s, load, "HUP (workers ignore TERM)", cap)
    alive = [w for w in old if proctree.alive(w)]
    if t_gone is None:
        text = (f"OLD WORKERS NOT STOPPED: {len(alive)} of {len(old)} still alive "
                f"{cap:g} s after HUP")
        answers = s.answers()
        text += f" (a fresh request got {answers!r})" if answers else ""
        return text
    return (f"old workers gone after {ms(t_gone)} (graceful_timeout {GRACEFUL_S} s)"
            + ("" if new else "; new generation NOT ready"))


def stuck_request(kind, s, load, notes) -> str:
    hang = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    hang.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)  # let a worker pick it up
    try:
        t_gone, old, new = _hup_and_wait_old_gone(s, load, "HUP (one request stuck)",
                                                  GRACEFUL_S + 15.0)
        hang.settimeout(1.0)
        try:
            data = hang.recv(100)
            stuck = "closed" if not data else f"answered {data[:20]!r}"
        except socket.timeout:
            stuck = "still open"
        except OSError as e:
            stuck = f"reset ({e.__class__.__name__})"
    finally:
        hang.close()
    if t_gone is None:
        return f"OLD WORKER NOT STOPPED after {GRACEFUL_S + 15:g} s; the stuck request: {stuck}"
    return (f"old workers gone after {ms(t_gone)} (graceful_timeout {GRACEFUL_S} s); "
            f"the stuck request: {stuck}" + ("" if new else "; new generation NOT ready"))


def nofile_hup(kind, s, load, notes) -> str:
    import subprocess

    master = s.master
    before = s.worker_pids()
    limit = open(f"/proc/{master}/limits").read()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limit).groups()
    open_now = len(os.listdir(f"/proc/{master}/fd"))
    subprocess.run(["prlimit", "--pid", str(master), f"--nofile={open_now}:{hard}"], check=True)
    load.mark(f"HUP at RLIMIT_NOFILE {open_now} (all in use)")
    os.kill(master, signal.SIGHUP)
    time.sleep(3.0)  # a reload, or its failure, takes well under that
    alive_1 = proctree.alive(master)
    serving_1 = fresh_request(s.port, 2.0)
    if alive_1:
        subprocess.run(["prlimit", "--pid", str(master), f"--nofile={soft}:{hard}"], check=True)
        load.mark("limit restored, HUP")
        os.kill(master, signal.SIGHUP)
        renewed = within(lambda: s.worker_pids() and not (s.worker_pids() & before)
                         and all_ready(s, s.workers), CAP_S)
    else:
        renewed = None
    return (f"at the limit: master {'alive' if alive_1 else 'EXITED'}, a fresh request: {serving_1}; "
            + (f"limit restored: HUP {'done' if renewed else 'NOT done'}" if alive_1 else "service down"))


class RouterServer(contenders.FugueServer):
    """fuguectl start -c apps.toml: the router, one app (chaos_wsgi) that takes every host."""

    def start(self, port: Optional[int] = None, timeout: float = 60.0) -> int:
        offset = self.log_size()
        conf = self.dir / "apps.toml"
        conf.write_text(f'bind = ["127.0.0.1:0"]\nsniff_timeout = 60\nworkers = {self.workers}\n'
                        f'pid_file = "{self.pidfile}"\ntmp_path = "{self.tmp_path}"\ndefault_app = "a"\n'
                        f'[apps.a]\nhostnames = ["a.bench"]\napp = "chaos_wsgi:app"\n'
                        f'working_path = "{self.app_dir}"\n')
        popen = self._popen(["prlimit", "--nofile=1024", "--", sys.executable, "-m", "fugue.ctl", "start",
                             "-c", str(conf)])
        self._wait_log(popen, offset, r"router serving \d+ apps?", 1, timeout, "'router serving' line")
        self.master = popen.pid
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_text(offset)).group(1))
        proctree.wait_for(self.answers, 60, "a first answer")
        return self.port


def router_slowloris(kind, s, load, notes) -> str:
    idle = []
    try:
        t = load.mark("1100 idle connections")
        for _ in range(1100):
            try:
                idle.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
            except OSError:
                break
        cpu0, lines0 = _cpu(s.master), s.log_text().count("Too many open files")
        time.sleep(5.0)
        cpu = _cpu(s.master) - cpu0
        lines = s.log_text().count("Too many open files") - lines0
        fresh = fresh_request(s.port, 5.0)
        del t
    finally:
        for c in idle:
            c.close()
    return (f"{len(idle)} idle connections open; over the next 5 s the router used {cpu:.1f} s of CPU and "
            f"wrote {lines} 'Too many open files' lines; a fresh request: {fresh}")


def _cpu(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_scrape(kind, s, load, notes) -> str:
    before = s.worker_pids()
    hung = []
    try:
        for i in range(2 * WORKERS):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            c.sendall(b"GET /hang/" + b"x" * 110_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            hung.append(c)
        time.sleep(0.5)  # let the workers take them
        load.mark("fuguectl status x3")
        answered = sum(1 for _ in range(3) if s.status() is not None)
        # Past the heartbeat timeout: a worker that took the failed reply for "master gone" is dead by now.
        time.sleep(TIMEOUT_S + 2)
        after = s.worker_pids()
        alive = [c for c in hung if _still_open(c)]
    finally:
        for c in hung:
            c.close()
    lost = len(before - after)
    return (f"{answered}/3 status answered; {lost} of {len(before)} workers killed; "
            f"{len(alive)}/{len(hung)} long requests still in flight")


def _still_open(conn) -> bool:
    conn.setblocking(False)
    try:
        return conn.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


FUGUE_ONLY = {"status-scrape", "router-slowloris"}

FAULTS = {
    "kill9-worker": (f"kill -9 of a worker (x{KILLS})", kill9_worker, None),
    "kill9-master": ("kill -9 of the master", kill9_master, None),
    "hup-broken": ("HUP with broken code", hup_broken, None),
    "usr2-broken": ("USR2 with broken code", usr2_broken, None),
    "hup-storm": (f"HUP storm ({STORM} in 1 s, x{STORM_RUNS})", hup_storm, None),
    "ttin-ttou": (f"TTIN x{SCALE}, then TTOU x{SCALE}", ttin_ttou, None),
    "hung-worker": ("worker blocked for good (SIGSTOP)", hung_worker, None),
    "ignore-term": ("workers ignore SIGTERM, then HUP", ignore_term, {"CHAOS_IGNORE_TERM": "1"}),
    "stuck-request": ("request stuck forever in a worker, then HUP", stuck_request, None),
    "nofile-hup": ("HUP with every descriptor in use", nofile_hup, None),
    "status-scrape": ("status asked with 110 KB URLs in flight", status_scrape, None),
    "router-slowloris": ("1100 idle connections on the router", router_slowloris, None),
    "stop-under-load": ("graceful stop (TERM) under load, one request stuck", stop_under_load, None),
}


def run_fault(name: str, kind: str) -> Outcome:
    label, fn, env = FAULTS[name]
    notes = []
    with tempfile.TemporaryDirectory(prefix=f"fugue-bench-chaos-{kind}-") as tmp:
        server = (RouterServer(tmp, "chaos_wsgi:app", WORKERS) if name == "router-slowloris"
                  else make_server(kind, tmp, env))
        load = None
        try:
            server.start()
            load = loadgen.Load("127.0.0.1", server.port, conns=CONNS, track_bodies=True,
                                timeout=CLIENT_TIMEOUT_S)
            load.start()
            time.sleep(SETTLE_S)  # steady load before the fault
            try:
                text = fn(kind, server, load, notes)
            except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the rest
                text = f"BENCHMARK ERROR: {type(e).__name__}: {e}"
                notes.append(server.log_tail(10))
            time.sleep(SETTLE_S)  # steady load after the recovery
        finally:
            result = load.stop() if load is not None else None
            stubborn = server.close()
            if stubborn:
                notes.append(f"needed SIGKILL at cleanup: {stubborn}")
    return Outcome(kind, label, result, text, notes)


def down_s(result: loadgen.Result) -> float:
    """Seconds with no successful request after the first mark.

    The last 100 ms bucket is cut short by stop() and left out: an empty
    sliver there is the end of the measurement, not an outage.
    """
    if not result.marks:
        return 0.0
    first = result.marks[0][0]
    whole = dataclasses.replace(result, timeline=result.timeline[:-1],
                                duration=result.timeline[-1].t if result.timeline else 0.0)
    return sum(end - max(start, first) for start, end in whole.zero_ok_spans()
               if end > first)


def row(o: Outcome) -> dict:
    r = o.result
    down = down_s(r)
    return {"fault": o.fault, "server": o.server, "requests": r.requests, "failed": r.failed,
            "failed by kind": r.failures_text(),
            "down": "0" if down == 0 else f"service down {down:.1f} s",
            "outcome": o.outcome}


COLUMNS = ["fault", "server", "requests", "failed", "failed by kind", "down", "outcome"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), help="these faults only")
    parser.add_argument("--server", choices=("fugue", "fugue-preload", "gunicorn"), help="one server only")
    parser.add_argument("--preload", action="store_true", help="also fugue --preload (fugue-preload)")
    parser.add_argument("--seed", type=int, default=8, help="which workers get killed")
    parser.add_argument("--out", help="also draw the load timelines into this PNG")
    args = parser.parse_args(argv)
    absent = contenders.missing("gunicorn", "waitress")
    if absent:
        print(f"missing Python packages: pip install {' '.join(absent)}", file=sys.stderr)
        return 2
    random.seed(args.seed)
    proctree.become_subreaper()
    kinds = [args.server] if args.server else ["fugue", "gunicorn"] + (["fugue-preload"] if args.preload else [])
    outcomes = []
    for name in args.only or list(FAULTS):
        for kind in kinds:
            if kind != "fugue" and name in FUGUE_ONLY:
                continue
            o = run_fault(name, kind)
            print(f"  {o.fault:<45} {kind:<9} failed {o.result.failed:<5} {o.outcome}",
                  file=sys.stderr)
            outcomes.append(o)
    import gunicorn

    print(f"{WORKERS} workers, timeout {TIMEOUT_S} s, graceful_timeout {GRACEFUL_S} s; load: "
          f"{CONNS} keep-alive connections (loadgen, client timeout {CLIENT_TIMEOUT_S:g} s); "
          f"fugue (waitress, 4 threads) vs gunicorn {gunicorn.__version__} (gthread, 4 threads); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(plot.markdown_table([row(o) for o in outcomes], COLUMNS))
    for o in outcomes:
        for note in o.notes:
            print(f"- {o.server} / {o.fault}: {note}")
        for kind, sample in o.result.failure_samples.items():
            print(f"- {o.server} / {o.fault}: sample {kind}: {sample}")
    if args.out:
        png = plot.timeline_png(args.out, {f"{o.server}: {o.fault}": o.result for o in outcomes},
                                "faults under 16 keep-alive connections")
        print(f"\ntimeline: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
