"""What the master should do next: pure functions over a snapshot.

`decide(snapshot)` takes the time and a frozen view of the workers and the
rollout, and returns actions plus the next time it wants to be asked again.
The master applies the actions; nothing here touches the OS, so it is
unit-tested with plain tables (supervisor's tick(now), Einhorn's loop).
"""

import dataclasses
import enum


class WorkerState(enum.Enum):
    STARTING = "starting"    # forked; not READY yet
    READY = "ready"          # serving, heartbeating
    DRAINING = "draining"    # told to stop gracefully
    KILLED = "killed"        # SIGKILL sent; waiting for the reap


LIVE = (WorkerState.STARTING, WorkerState.READY)

# Crash backoff: the first respawn after an early death waits BACKOFF_START,
# each further consecutive early death multiplies it, up to BACKOFF_CAP. A
# worker that stayed up STABLE_AFTER seconds resets the count.
BACKOFF_START = 0.1
BACKOFF_FACTOR = 1.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0
KILL_MARGIN = 2.0  # a draining worker gets graceful_timeout plus this before SIGKILL


def backoff_delay(failures):
    """Seconds before respawning a slot after `failures` consecutive early deaths."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_START * BACKOFF_FACTOR ** (failures - 1))


def next_failures(failures, uptime):
    """The consecutive-failure count after a worker died unexpectedly after `uptime` s."""
    return 1 if uptime >= STABLE_AFTER else failures + 1


@dataclasses.dataclass(frozen=True)
class WorkerView:
    pid: int
    slot: int
    generation: int
    state: WorkerState
    started: float
    last_beat: float
    stop_deadline: float = None
    ready_at: float = None      # a foreign worker in ready_mode=stable is READY from then on


@dataclasses.dataclass(frozen=True)
class Snapshot:
    now: float
    workers: tuple
    target: int                 # how many slots should serve
    generation: int             # the generation that serves
    pending: int = None         # the generation being rolled out, if any
    not_before: dict = dataclasses.field(default_factory=dict)  # slot -> earliest respawn
    stopping: bool = False
    ready_timeout: float = 30.0
    timeout: float = 30.0
    strategy: str = "all"
    batch: int = 1


@dataclasses.dataclass(frozen=True)
class Spawn:
    slot: int
    generation: int


@dataclasses.dataclass(frozen=True)
class Stop:
    pid: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Kill:
    pid: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Promote:
    generation: int


@dataclasses.dataclass(frozen=True)
class Ready:
    """A foreign worker has stayed up for stable_after seconds: it counts as READY."""
    pid: int


def decide(s):
    """-> (actions, next_deadline or None). See the module docstring."""
    actions = []
    deadlines = []

    def due(when, action):
        if when <= s.now:
            actions.append(action)
        else:
            deadlines.append(when)

    for w in s.workers:
        if w.state is WorkerState.STARTING:
            due(w.started + s.ready_timeout,
                Kill(w.pid, f"not ready after {s.ready_timeout:g}s"))
            if w.ready_at is not None and w.ready_at < w.started + s.ready_timeout:
                due(w.ready_at, Ready(w.pid))
        elif w.state is WorkerState.READY and w.last_beat != float("inf"):  # inf: foreign, no heartbeat
            due(w.last_beat + s.timeout, Kill(w.pid, f"no heartbeat for {s.timeout:g}s"))
        elif w.state is WorkerState.DRAINING and w.stop_deadline is not None:
            due(w.stop_deadline, Kill(w.pid, "did not stop within graceful_timeout"))
    killed = {a.pid for a in actions if isinstance(a, Kill)}
    live = [w for w in s.workers if w.state in LIVE and w.pid not in killed]

    if s.stopping:
        actions.extend(Stop(w.pid, "stopping") for w in live)
        return actions, min(deadlines, default=None)

    serving = [w for w in live if w.generation == s.generation]
    if s.pending is None:
        taken = {w.slot for w in serving}
        for slot in range(1, s.target + 1):
            if slot in taken:
                continue
            when = s.not_before.get(slot, 0.0)
            if when <= s.now:
                actions.append(Spawn(slot, s.generation))
            else:
                deadlines.append(when)
        actions.extend(Stop(w.pid, "scaled down") for w in serving if w.slot > s.target)
        extra = {}
        for w in sorted(serving, key=lambda w: w.started):
            if w.slot in extra:  # two in one slot: the older one goes
                actions.append(Stop(extra[w.slot].pid, "replaced"))
            extra[w.slot] = w
        return actions, min(deadlines, default=None)

    # A rollout of generation `pending` is under way.
    new = [w for w in live if w.generation == s.pending]
    new_slots = {w.slot for w in new}
    ready_slots = {w.slot for w in new if w.state is WorkerState.READY}
    if s.strategy == "rolling":
        actions.extend(Stop(w.pid, f"replaced by generation {s.pending}")
                       for w in serving if w.slot in ready_slots)
        if not any(w.state is WorkerState.STARTING for w in new):
            missing = [slot for slot in range(1, s.target + 1) if slot not in new_slots]
            actions.extend(Spawn(slot, s.pending) for slot in missing[:s.batch])
    else:
        actions.extend(Spawn(slot, s.pending)
                       for slot in range(1, s.target + 1) if slot not in new_slots)
    if s.target > 0 and ready_slots >= set(range(1, s.target + 1)) or s.target == 0:
        actions.append(Promote(s.pending))
        actions.extend(Stop(w.pid, f"replaced by generation {s.pending}")
                       for w in serving if w.slot not in ready_slots or s.strategy != "rolling")
    return actions, min(deadlines, default=None)
