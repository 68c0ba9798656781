"""Core daemon: serving, respawn, scaling, signals (process tests)."""

import os
import re
import signal

from conftest import wait_for


def test_workers_answer_with_distinct_pids(fugue_proc):
    p = fugue_proc(["app.py", "0", "3"]).started()
    bodies = set()
    wait_for(lambda: bodies.add(p.body()) or len({b.split()[5] for b in bodies}) == 3,
             what="answers from 3 distinct pids")
    ids = {re.search(r"worker (\d)", b).group(1) for b in bodies}
    assert ids == {"1", "2", "3"}


def test_kill9_worker_slot_comes_back(fugue_proc):
    p = fugue_proc(["app.py", "0", "2"]).started()
    m = p.wait_log(r"worker 1 \(pid (\d+), generation 1\) ready")
    victim = int(m.group(1))
    os.kill(victim, signal.SIGKILL)
    p.wait_log(r"worker 1 \(pid \d+, generation 1\) killed by SIGKILL|worker 1 .* killed by SIGKILL")
    assert p.body().startswith("hello")  # the other keeps answering
    m = p.wait_log(r"worker 1 \(pid (\d+), generation 1\) ready", count=2)
    assert int(m.group(1)) != victim
