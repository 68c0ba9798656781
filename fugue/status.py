"""The aggregated status of a master and its workers, as plain data.

Who calls it: the control socket (fuguectl status), the management HTTP
listener, and workers asking through fugue.server_status(). Counters are the
workers' own (sent on request and with heartbeats) summed here.
"""

import os
import time

from .policy import WorkerState


def collect(master):
    now = time.monotonic()
    wall = time.time()
    rows = []
    totals = {"requests": 0, "in_flight": 0, "connections": 0}
    counters = {}
    for w in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot)):
        stats = w.stats or {}
        for key in totals:
            totals[key] += int(stats.get(key) or 0)
        for key, value in (stats.get("counters") or {}).items():
            counters[key] = counters.get(key, 0) + value
        rows.append({
            "id": w.slot, "pid": w.pid, "generation": w.generation, "state": w.state.value,
            "uptime": round(now - w.started, 3),
            "requests": stats.get("requests", 0), "in_flight": stats.get("in_flight", 0),
            "connections": stats.get("connections", 0),
            "last_heartbeat": None if w.last_beat == float("inf") else round(now - w.last_beat, 3),
            "restarts": master.restarts.get(w.slot, 0),
            "current": stats.get("current", []),
            "foreign": w.foreign,
        })
    event = master.last_event
    return {
        "master": {
            "pid": os.getpid(), "name": master.name, "uptime": round(now - master.started, 3),
            "started": master.started_wall, "generation": master.generation,
            "pending_generation": master.rollout.generation if master.rollout else None,
            "workers_wanted": master.target_count,
            "stopping": master.stopping,
            "upgrade": None if master.upgrade is None else {"new_pid": master.upgrade.pid},
            "last_event": None if event is None else {
                "what": event[0], "ok": event[1], "text": event[2], "at": event[3],
                "ago": round(wall - event[3], 3)},
            "watch": None if master.watcher is None else not getattr(master.watcher, "paused", False),
        },
        "listeners": [lst.describe() for lst in master.listeners],
        "totals": totals,
        "counters": counters,
        "workers": rows,
        "ready_workers": sum(1 for w in master.workers.values() if w.state is WorkerState.READY),
    }
