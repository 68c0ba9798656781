"""The aggregated status of a master and its workers, as plain data.

Who calls it: the control socket (fuguectl status, and a worker's
fugue.server_status() relayed by the master), the management HTTP listener
(fugue.statushttp) and fugue.server_status() in the master. It only reads the
master's public records. Counters are the workers' own (sent on request and
with heartbeats) summed here.
"""

import os
import time

from .daemon import log_trouble
from .health import health_state
from .policy import WorkerState

TOTALS = ("requests", "in_flight", "connections", "connections_total")


def collect(master):
    """Everything `fuguectl status --json` shows, from the master's records."""
    now = time.monotonic()
    wall = time.time()
    rows = []
    totals = dict.fromkeys(TOTALS, 0)
    counters = {}
    for w in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot)):
        stats = w.stats or {}
        for key in totals:
            totals[key] += _int(stats.get(key))
        own = stats.get("counters") if isinstance(stats.get("counters"), dict) else {}
        for key, value in own.items():
            counters[key] = counters.get(key, 0) + _int(value)
        rows.append({
            "id": w.slot, "pid": w.pid, "generation": w.generation, "state": w.state.value,
            "uptime": round(now - w.started, 3),
            "requests": _int(stats.get("requests")), "in_flight": _int(stats.get("in_flight")),
            "connections": _int(stats.get("connections")),
            "connections_total": _int(stats.get("connections_total")),
            "last_heartbeat": None if w.last_beat == float("inf") else round(now - w.last_beat, 3),
            "restarts": master.restarts.get(w.slot, 0),
            "counters": dict(own),
            "current": stats.get("current", []),
            "current_more": _int(stats.get("current_more")),  # in flight, not listed (protocol.MAX_CURRENT)
            "foreign": w.foreign,
            "status": stats.get("status"),  # a foreign worker's sd_notify STATUS=
            "mold": getattr(w, "mold", None),  # preload: the pid of the mold it was forked from
        })
    event = master.last_event
    return {
        "master": {
            "pid": os.getpid(), "name": master.name, "uptime": round(now - master.started, 3),
            "started": master.started_wall, "generation": master.generation,
            "pending_generation": master.rollout.generation if master.rollout else None,
            "asked": master.asks.describe() if hasattr(master, "asks") else [],
            "workers_wanted": master.target_count,
            "stopping": master.stopping,
            "draining": master.drain.describe() if hasattr(master, "drain") else None,
            "healthy": health_state(master)[0],
            "upgrade": None if master.upgrade is None else {"new_pid": master.upgrade.pid},
            "last_event": None if event is None else {
                "what": event[0], "ok": event[1], "text": event[2], "at": event[3],
                "ago": round(wall - event[3], 3)},
            "watch": None if master.watcher is None else not master.watcher.paused,
            "log_trouble": log_trouble(),  # e.g. '12 log lines lost since 10:02:03: No space left on device'
        },
        "molds": master.molds.describe() if hasattr(master, "molds") else [],
        "listeners": [lst.describe() for lst in master.listeners],
        "totals": totals,
        "counters": counters,
        "workers": rows,
        "ready_workers": sum(1 for w in master.workers.values() if w.state is WorkerState.READY),
    }


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def StatusServer(master, bind):  # noqa: N802 - a class to its caller (master.setup)
    """The management HTTP listener (--status-bind); see fugue.statushttp."""
    from .statushttp import StatusServer as cls  # only with status_bind: it may load prometheus_client

    return cls(master, bind)

