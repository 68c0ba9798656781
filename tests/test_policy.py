"""policy.decide: plain tables in, actions out. No processes, no mocks."""

import pytest

from fugue.policy import (BACKOFF_CAP, Kill, Promote, Snapshot, Spawn, Stop, WorkerState,
                          WorkerView, backoff_delay, decide, next_failures)

S, R, D, K = WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING, WorkerState.KILLED


def w(pid, slot, gen, state=R, started=0.0, beat=None, stop=None):
    return WorkerView(pid, slot, gen, state, started, started if beat is None else beat, stop)


def snap(workers, now=1.0, target=2, generation=1, **kw):
    return Snapshot(now=now, workers=tuple(workers), target=target, generation=generation, **kw)


@pytest.mark.parametrize("name, snapshot, expected", [
    ("empty start spawns every slot",
     snap([], generation=0, pending=1), [Spawn(1, 1), Spawn(2, 1)]),
    ("steady state does nothing",
     snap([w(10, 1, 1), w(11, 2, 1)]), []),
    ("a missing slot is refilled",
     snap([w(10, 1, 1)]), [Spawn(2, 1)]),
    ("backoff delays the refill",
     snap([w(10, 1, 1)], not_before={2: 5.0}), []),
    ("a draining worker does not hold its slot",
     snap([w(10, 1, 1), w(11, 2, 1, D, stop=99)]), [Spawn(2, 1)]),
    ("scale down stops the highest slots",
     snap([w(10, 1, 1), w(11, 2, 1), w(12, 3, 1)], target=1), [Stop(11, "scaled down"), Stop(12, "scaled down")]),
    ("not ready in time is killed, and its slot refilled at once",
     snap([w(10, 1, 1, S, started=0.0)], now=31.0, target=1), [Kill(10, "not ready after 30s"), Spawn(1, 1)]),
    ("no heartbeat is killed, and its slot refilled at once",
     snap([w(10, 1, 1, R, beat=0.0)], now=30.5, target=1), [Kill(10, "no heartbeat for 30s"), Spawn(1, 1)]),
    ("a drain past its deadline is killed",
     snap([w(10, 1, 1), w(9, 1, 1, D, stop=2.0)], now=3.0, target=1),
     [Kill(9, "did not stop within graceful_timeout")]),
    ("stopping stops every live worker and spawns nothing",
     snap([w(10, 1, 1), w(11, 2, 1, S)], stopping=True), [Stop(10, "stopping"), Stop(11, "stopping")]),
    ("reload (all): the whole new generation first",
     snap([w(10, 1, 1), w(11, 2, 1)], pending=2), [Spawn(1, 2), Spawn(2, 2)]),
    ("reload (all): nothing retires while one new worker is starting",
     snap([w(10, 1, 1), w(11, 2, 1), w(20, 1, 2), w(21, 2, 2, S)], pending=2), []),
    ("reload (all): all ready -> promote, retire the old generation",
     snap([w(10, 1, 1), w(11, 2, 1), w(20, 1, 2), w(21, 2, 2)], pending=2),
     [Promote(2), Stop(10, "replaced by generation 2"), Stop(11, "replaced by generation 2")]),
    ("reload (rolling): one at a time",
     snap([w(10, 1, 1), w(11, 2, 1)], pending=2, strategy="rolling"), [Spawn(1, 2)]),
    ("reload (rolling): a ready replacement retires its slot and the next one starts",
     snap([w(10, 1, 1), w(11, 2, 1), w(20, 1, 2)], pending=2, strategy="rolling"),
     [Stop(10, "replaced by generation 2"), Spawn(2, 2)]),
    ("reload (rolling): batches of two",
     snap([w(10, 1, 1), w(11, 2, 1), w(12, 3, 1)], target=3, pending=2, strategy="rolling", batch=2),
     [Spawn(1, 2), Spawn(2, 2)]),
    ("reload (rolling): last one ready -> promote",
     snap([w(11, 2, 1), w(20, 1, 2), w(21, 2, 2)], pending=2, strategy="rolling"),
     [Stop(11, "replaced by generation 2"), Promote(2)]),
])
def test_decide(name, snapshot, expected):
    actions, _ = decide(snapshot)
    assert actions == expected, name


def test_next_deadline_is_the_earliest():
    s = snap([w(10, 1, 1, S, started=0.0), w(11, 2, 1, R, beat=0.5)], now=1.0, timeout=10.0,
             ready_timeout=5.0)
    actions, deadline = decide(s)
    assert actions == [] and deadline == 5.0
    s = snap([w(10, 1, 1)], now=1.0, target=2, not_before={2: 1.25}, timeout=10.0)
    assert decide(s) == ([], 1.25)


def test_idle_master_has_no_deadline_with_foreign_workers():
    inf = float("inf")
    s = snap([w(10, 1, 1, R, beat=inf), w(11, 2, 1, R, beat=inf)])
    assert decide(s) == ([], None)


@pytest.mark.parametrize("failures, delay", [(0, 0.0), (1, 0.1), (2, 0.15), (3, 0.225), (40, BACKOFF_CAP)])
def test_backoff(failures, delay):
    assert backoff_delay(failures) == pytest.approx(delay)


@pytest.mark.parametrize("failures, uptime, after", [(0, 0.1, 1), (4, 0.1, 5), (4, 10.0, 1), (4, 3600, 1)])
def test_failures_reset_once_a_worker_stayed_up(failures, uptime, after):
    assert next_failures(failures, uptime) == after
