"""A generation's life as tables (fugue.rollout): start, promote, rollback, the watch trigger.

Pure: a FakeSystem clock and a fake watcher; no process. The process tests
(test_reload.py, test_watch_mode.py) are the proof; these are the spec.
"""

import pytest

from fugue.rollout import MAX_DRAINING, Asks, Generations, WatchTrigger, waits_for
from fugue.system import System


class FakeSystem(System):
    def __init__(self):
        self.now = 50.0
        self.notified = []

    def monotonic(self):
        return self.now

    def wall(self):
        return 1.7e9

    def notify(self, *fields):
        self.notified.append(fields)


class Pending:
    generation = 4


@pytest.mark.parametrize("kind, rolling_out, upgrading, old_master, draining, why", [
    ("reload", None, False, False, [], None),
    ("upgrade", None, False, False, [], None),
    ("reload", Pending, False, False, [], "generation 4 is still starting"),
    ("upgrade", Pending, True, True, [2], "generation 4 is still starting"),
    ("reload", None, True, False, [], "an upgrade is in progress"),
    ("upgrade", None, True, False, [], "an upgrade is in progress"),
    # A draining old master holds an upgrade up (never three masters), not a reload.
    ("reload", None, False, True, [], None),
    ("upgrade", None, False, True, [], "the old master is still draining"),
    # Draining generations hold no reload up, up to MAX_DRAINING of them.
    ("reload", None, False, False, [1, 2, 3], None),
    ("reload", None, False, False, [1, 2, 3, 4], "4 older generations still drain (at most 4)"),
    ("upgrade", None, False, False, [1, 2, 3, 4], None),
])
def test_waits_for(kind, rolling_out, upgrading, old_master, draining, why):
    assert MAX_DRAINING == 4
    assert waits_for(kind, rolling_out, upgrading, old_master, draining) == why


def test_asks_coalesce_by_kind_in_the_order_first_asked():
    asks = Asks()
    told = []
    first, joined = asks.ask("reload", "HUP", 1.0, lambda ok, text: told.append(("a", ok, text)))
    assert not joined
    _, joined = asks.ask("upgrade", "USR2", 1.1)
    assert not joined
    again, joined = asks.ask("reload", "fuguectl", 1.2, lambda ok, text: told.append(("b", ok, text)))
    assert joined and again is first and first.count == 2 and first.source() == "HUP+fuguectl x2"
    for _ in range(20):
        asks.ask("reload", "HUP", 1.3)
    assert first.count == 22 and len(first.sources) == 16
    assert asks.describe() == [{"kind": "reload", "source": "HUP+fuguectl x22"},
                               {"kind": "upgrade", "source": "USR2"}]
    assert asks.take() is first and asks.head().kind == "upgrade"
    assert len(first.waiters) == 2  # each hears the outcome of the one that answered it
    asks.ask("reload", "HUP", 2.0, lambda ok, text: told.append(("c", ok, text)))
    gone = asks.answer_all(False, lambda a: f"{a.kind} refused: the master is stopping")
    assert [a.kind for a in gone] == ["upgrade", "reload"] and asks.head() is None
    assert told == [("c", False, "reload refused: the master is stopping")]


def told(rollout):
    out = []
    rollout.waiters.append(lambda ok, text: out.append((ok, text)))
    return out


def test_the_start_is_promoted_without_telling_systemd_here():
    system = FakeSystem()
    gens = Generations(first_generation=1, system=system)
    rollout = gens.begin("start", workers=2, initial=True)
    assert (rollout.generation, gens.pending_generation(), gens.serving) == (1, 1, 0)
    system.now += 0.25
    done, text = gens.promote(1, system.now)
    assert done is rollout and text == "generation 1 serving (0.25s)"
    assert gens.serving == 1 and gens.pending is None
    assert gens.last_event == ("start", True, text, 1.7e9)
    assert system.notified == []  # a start is told by the master (launcher, old master, READY)


def test_a_reload_is_promoted_and_told():
    system = FakeSystem()
    gens = Generations(first_generation=5, system=system)  # a new master after an upgrade from generation 4
    assert gens.begin("start", workers=2, initial=True).generation == 5
    gens.promote(5, system.now)
    rollout = gens.begin("HUP", workers=2)
    outcome = told(rollout)
    assert rollout.generation == 6
    assert system.notified[0][:2] == ("RELOADING=1", "STATUS=reloading: generation 6")
    system.now += 1.0
    _, text = gens.promote(6, system.now)
    assert outcome == [(True, "generation 6 serving (1.00s)")]
    assert system.notified[-1] == ("READY=1", f"STATUS={text}")
    assert gens.last_event[:3] == ("reload", True, text)


def test_a_rolled_back_reload_keeps_the_serving_generation_and_never_reuses_its_number():
    system = FakeSystem()
    gens = Generations(system=system)
    gens.begin("start", workers=1, initial=True)
    gens.promote(1, system.now)
    outcome = told(gens.begin("watch", workers=1))
    rollout = gens.rollback("worker 1 (pid 9, generation 2) exited with status 1")
    text = "reload failed: worker 1 (pid 9, generation 2) exited with status 1; generation 1 keeps serving"
    assert rollout.generation == 2 and not rollout.initial
    assert outcome == [(False, text)]
    assert gens.serving == 1 and gens.pending is None
    assert gens.last_event[:3] == ("reload", False, text)
    assert system.notified[-1] == ("READY=1", f"STATUS={text}")
    assert gens.begin("HUP", workers=1).generation == 3


def test_a_failed_start_is_recorded_for_the_master_to_stop():
    system = FakeSystem()
    gens = Generations(system=system)
    outcome = told(gens.begin("start", workers=2, initial=True))
    rollout = gens.rollback("worker 2 (pid 7, generation 1) not ready after 2s")
    assert rollout.initial
    assert outcome == [(False, "start failed: worker 2 (pid 7, generation 1) not ready after 2s")]
    assert gens.last_event[:2] == ("start", False)
    assert system.notified == []  # the launcher hears it from the master's shutdown


class FakeWatcher:
    def __init__(self):
        self.changed = []
        self.quiet = 0.0

    def take(self):
        out, self.changed = self.changed, []
        return out

    def quiet_for(self):
        return self.quiet


# (quiet for, blocked) -> due now?
@pytest.mark.parametrize("quiet, blocked, due", [
    (0.0, False, False),   # still changing: wait for watch_settle
    (0.3, False, True),
    (5.0, True, False),    # a rollout or a drain: retried when it ends
])
def test_a_change_reloads_once_quiet_and_unblocked(quiet, blocked, due):
    watcher = FakeWatcher()
    trigger = WatchTrigger(watcher, "/srv", settle=0.3)
    assert not trigger.take() and not trigger.due(blocked=False)  # nothing changed
    watcher.changed = ["/srv/app.py", "/srv/lib/x.py"]
    assert trigger.take() and trigger.pending
    watcher.quiet = quiet
    assert trigger.due(blocked=blocked) is due
    if due:
        trigger.fired()
        assert not trigger.pending and trigger.deadline(100.0) is None
    else:
        assert trigger.deadline(100.0) == 100.0 + max(0.01, 0.3 - quiet)
