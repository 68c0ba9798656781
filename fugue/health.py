"""Health for load balancers: /healthz, /livez, drain_delay, fuguectl drain/undrain.

Who calls it: `Master` makes one `Drain` (master.drain); `Master.begin_stop`
asks `drain.hold_stop()` before a graceful stop, and `Master.step` calls
`drain.tick()` with its timers. The status listener (fugue.statushttp) answers
/healthz and /livez from `healthz(master)` and `livez(master)`; the control
socket's drain/undrain commands call `drain.set_manual()`.

What it promises:
- /healthz is 200 only while the master serves with at least one READY worker
  and is not draining; otherwise 503 with the state that says why: starting,
  draining, stopping, no_ready_worker. The body is one short JSON line: the
  state, the serving generation and the version (the serving workers'
  fugue.set_version(), else the `version` option): nothing secret.
- On TERM/QUIT or `fuguectl stop`, with drain_delay > 0, health turns 503 at
  once and everything goes on serving for drain_delay seconds (so load
  balancers and kube-proxy take the host out); then the graceful stop begins.
  A quick stop (INT, stop --quick) does not wait.
- While draining (for a stop or by `fuguectl drain`) every worker is told
  (DRAIN on its channel) and answers with `Connection: close`, so keep-alive
  clients move to other hosts.
"""

import json
import logging
import time

from . import protocol
from .policy import WorkerState

log = logging.getLogger("fugue")

MAX_VERSION = 128  # bytes of a version string shown by /healthz; longer ones are cut


def clean_version(value):
    """A version string fit for a health body: printable, bounded; None if not a string."""
    if not isinstance(value, str):
        return None
    text = "".join(c for c in value if c.isprintable())[:MAX_VERSION]
    return text or None


_inherited = {"drained": False}  # from the old master's upgrade manifest (connect_handoff)


def inherit(options):
    """New master, before Master() exists: take over the old master's `fuguectl drain`."""
    _inherited["drained"] = bool(isinstance(options, dict) and options.get("drained") is True)


class Drain:
    """The drain state of one master: manual (fuguectl drain) and/or before a stop."""

    def __init__(self, master):
        self.master = master
        # A drained host stays drained through an upgrade: only `fuguectl undrain` ends it.
        self.manual = getattr(master, "handoff", None) is not None and _inherited["drained"]
        self.stop_at = None       # monotonic time the delayed graceful stop begins
        self.released = False     # the delay is over: begin_stop goes ahead
        self.told = {}            # worker pid -> drain state it was last told

    @property
    def active(self):
        return self.manual or self.stop_at is not None

    def reason(self):
        if self.stop_at is not None:
            return "stop"
        return "manual" if self.manual else None

    def hold_stop(self):
        """Called by Master.begin_stop("graceful"): True if the stop must wait for drain_delay."""
        delay = getattr(self.master.cfg, "drain_delay", 0) or 0
        if self.released or delay <= 0:
            return False
        if self.stop_at is None:
            self.stop_at = time.monotonic() + delay
            log.info("draining for %gs before the graceful stop (drain_delay): /healthz says 503", delay)
        self.sync()
        return True

    def set_manual(self, on):
        """fuguectl drain / undrain; returns the reply text."""
        if on == self.manual:
            text = "already draining" if on else "not draining"
        else:
            self.manual = on
            text = "draining: /healthz says 503" if on else "undrained: /healthz follows the workers again"
            log.info("%s (fuguectl %s)", text, "drain" if on else "undrain")
        if self.stop_at is not None:
            text += "; the master is stopping (drain_delay)"
        self.sync()
        return text

    def tick(self):
        """Called every loop pass (Master.step): tell new workers, start a due stop; next deadline."""
        self.sync()
        status_server = getattr(self.master, "status_server", None)
        if status_server is not None:
            status_server.follow_handoff()
        if self.stop_at is None or self.released:
            return None
        now = time.monotonic()
        if now < self.stop_at:
            return self.stop_at
        self.released = True
        log.info("drain_delay over: graceful stop")
        self.master.begin_stop("graceful")
        return None

    def sync(self):
        """Send DRAIN to every live Python worker that has not heard the current state."""
        on = self.active
        master = self.master
        for pid in [p for p in self.told if p not in master.workers]:
            del self.told[pid]
        for pid, w in master.workers.items():
            if w.foreign or w.state not in (WorkerState.STARTING, WorkerState.READY):
                continue
            if self.told.get(pid, False) == on:
                continue
            if master.send(w, protocol.DRAIN, on=on):
                self.told[pid] = on

    def describe(self):
        """The status's view: None, or {"reason", "stop_in"}."""
        if not self.active:
            return None
        left = None if self.stop_at is None else max(0.0, round(self.stop_at - time.monotonic(), 3))
        return {"reason": self.reason(), "stop_in": left}


def serving_version(master):
    """The version the serving generation reports (fugue.set_version), else the version option."""
    found = {}
    for w in master.workers.values():
        if w.generation == master.generation and w.state is WorkerState.READY:
            v = clean_version((w.stats or {}).get("version"))
            if v is not None:
                found[v] = found.get(v, 0) + 1
    if found:
        return max(found, key=found.get)
    return clean_version(getattr(master.cfg, "version", None))


def health_state(master):
    """(healthy, state): the one decision /healthz and the status share."""
    drain = getattr(master, "drain", None)
    ready = sum(1 for w in master.workers.values() if w.state is WorkerState.READY)
    if master.stopping:
        return False, "stopping"
    if drain is not None and drain.active:
        return False, "draining"
    rollout = master.rollout
    if rollout is not None and rollout.initial:
        return False, "starting"
    if ready == 0:
        return False, "no_ready_worker"
    return True, "serving"


def healthz(master):
    """(HTTP status, body bytes) for GET /healthz."""
    ok, state = health_state(master)
    body = {"status": "ok" if ok else "unavailable", "state": state,
            "generation": master.generation, "version": serving_version(master)}
    return (200 if ok else 503), (json.dumps(body) + "\n").encode()


def livez(master):
    """(HTTP status, body bytes) for GET /livez: the master's loop answered, so it is alive."""
    return 200, (json.dumps({"status": "alive"}) + "\n").encode()
