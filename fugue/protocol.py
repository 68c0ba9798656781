"""Pure encoding of everything that crosses a process boundary.

Channel messages (master <-> worker), control frames (fuguectl <-> master) and
the upgrade manifest (old master -> new master) are all one JSON object per
SOCK_SEQPACKET packet. Packets are bounded; anything that is not a JSON object
with a string "type" is rejected with ProtocolError, never half-parsed.
"""

import json

VERSION = 1
MAX_FRAME = 1 << 20  # one packet; status of thousands of workers fits
# What a worker may send in one packet. A SOCK_SEQPACKET socketpair refuses a packet
# above its send buffer (net.core.wmem_default, about 208 KB) with EMSGSIZE, so every
# worker message is kept well below that: lists are cut short with a count of what was
# left off (see adapters.base.Stats), texts are truncated.
WORKER_MAX = 64 * 1024
MAX_CURRENT = 64        # in-flight requests listed in one stats message
MAX_INFO = 256          # characters of one in-flight request's description
MAX_COUNTERS = 256      # app counter names per worker (fugue.stats.incr)
MAX_COUNTER_NAME = 100  # characters of one counter name
MAX_TEXT = 4000         # characters of a reason (FAILED, DRAINING)

# master -> worker
HELLO = "hello"          # + listener descriptors; worker id, generation, options
STOP = "stop"            # {"graceful": bool}
REOPEN = "reopen"        # + new log descriptor (stdout and stderr)
STATS = "stats"          # {"seq": n}: answer with STATS_REPLY
CONN = "conn"            # router -> an app's inbox: one accepted connection (fugue.inbox)
STATUS = "status"        # {"seq", "data"}: the aggregate a worker asked for (fugue.server_status)
DRAIN = "drain"          # {"on": bool}: the host drains for load balancers: answer with Connection: close
FORK = "fork"            # master -> preload mold: {"slot"} + the new worker's channel end
# worker -> master
READY = "ready"
HEARTBEAT = "hb"         # {"stats": {...}}
STATS_REPLY = "stats_reply"
FAILED = "failed"        # {"reason": "..."}: could not start; the master logs it
DRAINING = "draining"
STATUS_REQUEST = "status_request"  # {"seq"}: answer with STATUS
FORKED = "forked"        # preload mold -> master: {"slot", "pid"} (pid null and "reason": it failed)
UNSAFE = "unsafe"        # preload mold -> master: {"hazards": [...]} (threads, connections) after the import
# handoff (USR2)
MANIFEST = "manifest"    # {"version", "listeners": [...], "generation"} + descriptors
NEW_READY = "new_ready"  # new master: my workers are READY, step down
STEPPED_DOWN = "stepped_down"  # old master: pid file renamed; write yours
# The environment of a new master exec'd by USR2 (see fugue.upgrade)
ENV_UPGRADE_SOCK = "FUGUE_UPGRADE_SOCK"   # the handoff socket's path
ENV_UPGRADE_FROM = "FUGUE_UPGRADE_FROM"   # the old master's pid


class ProtocolError(Exception):
    """A frame that is not a valid message."""


def encode(kind, **fields):
    """One message as bytes for one packet."""
    fields["type"] = kind
    data = json.dumps(fields, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message {kind} too large ({len(data)} bytes)")
    return data


def clip(text, limit):
    """`text` cut to `limit` characters, saying how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


STAT_NUMBERS = ("requests", "in_flight", "connections", "connections_total", "current_more", "counters_dropped")


def clean_stats(stats):
    """A worker's stats (HEARTBEAT, STATS_REPLY) as the master keeps them: known keys only,
    numbers as ints, at most MAX_COUNTERS app counters with names of MAX_COUNTER_NAME
    characters and MAX_CURRENT in-flight entries of MAX_INFO characters, whatever the worker
    sent (its app runs there: a hostile or buggy one must not grow the master)."""
    out = {}
    for key in STAT_NUMBERS:
        value = stats.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
    counters = stats.get("counters")
    if isinstance(counters, dict):
        kept = {}
        for name, value in counters.items():
            if len(kept) >= MAX_COUNTERS:
                out["counters_dropped"] = out.get("counters_dropped", 0) + len(counters) - len(kept)
                break
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                kept[str(name)[:MAX_COUNTER_NAME]] = value
        out["counters"] = kept
    current = stats.get("current")
    if isinstance(current, list):
        out["current"] = [{"info": clip(c.get("info", ""), MAX_INFO),
                           "for": c.get("for") if isinstance(c.get("for"), (int, float)) else None}
                          for c in current[:MAX_CURRENT] if isinstance(c, dict)]
        if len(current) > MAX_CURRENT:
            out["current_more"] = out.get("current_more", 0) + len(current) - MAX_CURRENT
    for key in ("version", "status"):
        if isinstance(stats.get(key), str):
            out[key] = clip(stats[key], MAX_INFO)
    return out


def decode(data):
    """Bytes of one packet -> dict with a "type"; ProtocolError otherwise."""
    if not data:
        raise ProtocolError("empty frame")
    if len(data) > MAX_FRAME:
        raise ProtocolError("frame too large")
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    except RecursionError:  # "[[[[..." from any peer must not take a master down
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("not a message object")
    return msg


def manifest(listeners, generation, options=None):
    """The upgrade manifest: named listeners in the order their descriptors travel."""
    return encode(MANIFEST, version=VERSION, listeners=listeners, generation=generation,
                  options=options or {})


def check_manifest(msg, nfds):
    """Validate a received manifest against the number of descriptors that came with it."""
    if msg.get("type") != MANIFEST:
        raise ProtocolError(f"expected manifest, got {msg.get('type')!r}")
    if msg.get("version") != VERSION:
        raise ProtocolError(f"manifest version {msg.get('version')!r}, this fugue speaks {VERSION}")
    listeners = msg.get("listeners")
    if not isinstance(listeners, list) or len(listeners) != nfds:
        raise ProtocolError(f"manifest names {len(listeners or [])} listeners, {nfds} descriptors came")
    for item in listeners:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("manifest listener without a name")
    return listeners
