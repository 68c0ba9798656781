"""Preload, the master's side: one mold per generation, and the workers it forks.

Who calls it: the master's wiring, through `Molds` (spawn, the end of each
decide pass, reap, a rollout's start, promote, rollback, stop, USR1, status,
shutdown), when the `preload` option is on. The mold process itself is
fugue.mold; this module never imports it (nor the worker side).

A generation's mold is exec'd like a worker (`start_mold`); once it says READY
the master asks it for workers with FORK messages, each carrying the new
worker's end of its own channel (SCM_RIGHTS). The mold forks twice (the middle
child exits at once) and answers FORKED with the worker's pid. The master is a
child subreaper (PR_SET_CHILD_SUBREAPER, as Shopify's pitchfork does), so the
orphaned worker is the master's own child: the master reaps it, signals it and
sees its exit status exactly as for an exec'd worker, and the worker outlives
its mold.

Why a synchronous FORK/FORKED round trip: the master must know a worker's pid
before it goes back to its loop (to reap, time out and signal it), and the mold
runs nothing but its fork loop after the import, so it answers within a fork's
time. All the spawns of one decide pass go out as one batch and are answered
together: one round trip per pass, not per worker (on a busy machine each
round trip waits to be scheduled). A mold that does not answer within
FORK_TIMEOUT is killed; its generation rolls back while it is being rolled
out, and is exec'd from then on otherwise.
"""

import enum
import json
import logging
import os
import select
import signal
import time

from . import protocol, workers
from .errors import FugueError
from .fds import read_messages, send_with_fds
from .system import SYSTEM

log = logging.getLogger("fugue")

FORK_TIMEOUT = 10.0  # seconds a READY mold has to answer a batch of FORKs with the workers' pids


class MoldState(enum.Enum):
    STARTING = "starting"    # importing the app
    READY = "ready"          # imported, frozen: forks workers on request
    UNSAFE = "unsafe"        # not fork-safe after the import (fork_hazards): the workers are exec'd
    GONE = "gone"            # exited or retired: the generation's workers are exec'd from now on


class MoldError(Exception):
    """A fork request the mold did not answer with a pid; the text says why."""


class Mold:
    """The master's record of one generation's mold."""

    def __init__(self, pid, generation, channel, now):
        self.pid = pid
        self.generation = generation
        self.channel = channel
        self.state = MoldState.STARTING
        self.started = now
        self.started_wall = time.time()
        self.ready_after = None     # seconds the import and startup check took
        self.reason = None          # why it failed, as it said
        self.hazards = []           # UNSAFE: what it found (threads, connected sockets, files)
        self.forks = 0
        self.retiring = False       # asked to stop: its exit is expected
        self.killed = False         # SIGKILL sent
        self.exited = False         # reaped

    def __str__(self):
        return f"mold (pid {self.pid}, generation {self.generation})"

    def forks_workers(self):
        """True while workers of this generation are forked from it (False: exec them)."""
        return self.state is MoldState.READY and not self.retiring

    def read(self, now):
        """Messages waiting on the channel; returns True at EOF. Called by the master's loop."""
        messages, eof = read_messages(self.channel, lambda e: log.warning("%s sent a bad message: %s", self, e))
        for msg in messages:
            self._handle(msg, now)
        return eof

    def _handle(self, msg, now):
        kind = msg["type"]
        if kind == protocol.READY and self.state is MoldState.STARTING:
            self.state = MoldState.READY
            self.ready_after = now - self.started
            log.info("%s ready: app imported and frozen in %.2fs", self, self.ready_after)
        elif kind == protocol.UNSAFE and self.state is MoldState.STARTING:
            self.state = MoldState.UNSAFE
            self.hazards = [str(t)[:200] for t in msg.get("hazards") or []][:20]
            log.warning("%s: not fork-safe after the import (%s); generation %d's workers are exec'd "
                        "instead of forked (open connections and start threads in fugue.after_fork)",
                        self, ", ".join(self.hazards), self.generation)
        elif kind == protocol.FAILED:
            self.reason = str(msg.get("reason"))[:2000]

    def fork(self, items):
        """Ask for one worker per (slot, channel end) in `items`, all at once; return {slot: pid}.

        The requests go out together and the answers are collected together, so a generation
        of N workers costs one round trip, not N (on a busy machine each round trip waits to
        be scheduled). On return each worker is already the master's child (its middle parent
        has exited). Any failure raises MoldError: the master then gives up on this mold.
        """
        for slot, child in items:
            try:
                send_with_fds(self.channel, protocol.encode(protocol.FORK, slot=slot), [child.fileno()])
            except OSError as e:
                raise MoldError(f"cannot send a fork request: {e.strerror or e}") from None
        wanted = {slot for slot, _ in items}
        pids = {}
        deadline = time.monotonic() + FORK_TIMEOUT
        while wanted - pids.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                raise MoldError(f"no answer to {len(wanted - pids.keys())} fork request(s) in {FORK_TIMEOUT:g}s")
            try:
                select.select([self.channel], [], [], left)
            except InterruptedError:
                continue
            messages, eof = read_messages(self.channel)
            for msg in messages:
                if msg["type"] == protocol.FORKED and msg.get("slot") in wanted:
                    pid = msg.get("pid")
                    if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1):
                        raise MoldError(f"fork failed: {msg.get('reason') or 'no pid'}")
                    pids[msg["slot"]] = pid
                    self.forks += 1
                else:
                    self._handle(msg, time.monotonic())
            if eof and wanted - pids.keys():
                raise MoldError("exited during a fork request" + (f": {self.reason}" if self.reason else ""))
        return pids

    def retire(self):
        """Stop it: STOP when it is waiting for requests, SIGKILL while it is still importing."""
        if self.retiring:
            return
        self.retiring = True
        if self.state is MoldState.READY:
            try:
                self.channel.send(protocol.encode(protocol.STOP, reason="retired"))
                return
            except OSError:
                pass
        self.kill()

    def kill(self):
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def describe(self):
        """The row `fuguectl status` shows."""
        return {"pid": self.pid, "generation": self.generation, "state": self.state.value,
                "forks": self.forks, "started": self.started_wall,
                "ready_after": None if self.ready_after is None else round(self.ready_after, 3),
                "hazards": list(self.hazards)}


class Molds:
    """The master's molds, by generation: what the pool and the rollout ask about preload.

    Who calls it: the master's wiring (spawn, each decide pass, reap, rollout start,
    promote, rollback, stop, USR1, status, shutdown). What it promises: a generation's
    workers are forked from its mold once the mold is READY (`queue` + `fork_queued`, one
    round trip per pass), exec'd when it is UNSAFE or GONE, and held back while it imports;
    a mold that fails before READY during its generation's rollout calls `rollback(reason)`.
    """

    def __init__(self, cfg, target, name, options, identity, logs, listeners, loop):
        self.cfg = cfg
        self.target = target
        self.name = name
        self.options = options
        self.identity = identity
        self.logs = logs
        self.listeners = listeners
        self.loop = loop
        self.by_generation = {}     # generation -> Mold
        self.queue = []             # (slot, generation) to fork at the end of this pass

    def reconfigure(self, cfg, target, options):
        """A reload read the options again: the next generation's mold gets them."""
        was = self.enabled
        self.cfg, self.target, self.options = cfg, target, options
        if self.enabled and not was:
            become_subreaper()

    @property
    def enabled(self):
        return bool(self.cfg.preload) and "command" not in self.target

    def setup(self):
        if self.enabled:
            become_subreaper()
        elif self.cfg.preload:
            log.info("preload does not apply to a foreign program: each worker is started by exec")

    def start(self, generation, now):
        """A new generation's mold (the rollout's start)."""
        if not self.enabled:
            return
        mold = start_mold(generation, self.target, self.name, self.options, self.identity,
                          self.cfg.working_path, self.logs.worker_fd, self.loop, now, self.listeners)
        self.by_generation[generation] = mold
        self.loop.add_reader(mold.channel, lambda: self._readable(mold))
        log.info("started %s: importing the app", mold)

    def _readable(self, mold):
        if mold.read(time.monotonic()):
            self.loop.remove_reader(mold.channel)

    def take_spawn(self, slot, generation):
        """True if the mold of `generation` takes this spawn (queued, or held until it is READY);
        False: exec the worker as without preload."""
        mold = self.by_generation.get(generation)
        if mold is None:
            return False
        if mold.state is MoldState.STARTING:
            return True  # decide() asks again once the mold's READY has woken the loop
        if mold.forks_workers():
            self.queue.append((slot, generation))
            return True
        return False

    def fork_queued(self, now, wanted, add_worker, spawn, rollback, pending):
        """Fork what take_spawn queued, one batch per generation.

        `wanted` is the generation spawns are for now (a queued one for another was made stale
        by the same pass); `add_worker(pid, slot, generation, parent, now, mold_pid)` records a
        forked worker; `spawn(slot, generation, now)` execs one; `pending` is the generation
        being rolled out (a mold failing for it rolls it back through `rollback`).
        """
        queue, self.queue = self.queue, []
        for generation in sorted({g for _, g in queue}):
            slots = [slot for slot, g in queue if g == generation]
            mold = self.by_generation.get(generation)
            if generation != wanted or mold is None:
                continue
            if not mold.forks_workers():
                for slot in slots:
                    spawn(slot, generation, now)
                continue
            pairs = [(slot,) + workers.channel_pair() for slot in slots]
            try:
                pids = mold.fork([(slot, child) for slot, _, child in pairs])
            except MoldError as e:
                for _, parent, _ in pairs:
                    parent.close()
                self.failed(mold, str(e), rollback if generation == pending else None)
                if generation != pending:  # the serving generation goes on with exec'd workers
                    for slot in slots:
                        spawn(slot, generation, now)
                continue
            finally:
                for _, _, child in pairs:
                    child.close()
            for slot, parent, _ in pairs:
                add_worker(pids[slot], slot, generation, parent, now, mold.pid)

    def failed(self, mold, reason, rollback=None):
        """A READY mold that cannot fork: kill it; its generation rolls back, or is exec'd from now on."""
        log.error("%s: %s; killing it", mold, reason)
        mold.reason = mold.reason or reason
        mold.state = MoldState.GONE
        mold.kill()
        if rollback is not None:
            rollback(f"{mold} {reason}")

    def reaped(self, pid, status, pending, rollback):
        """True if `pid` was a mold (its exit handled: a rollback if it failed its rollout)."""
        mold = next((m for m in self.by_generation.values() if m.pid == pid and not m.exited), None)
        if mold is None:
            return False
        mold.read(time.monotonic())  # its last words (FAILED, UNSAFE)
        self.loop.remove_reader(mold.channel)
        mold.channel.close()
        mold.exited = True
        desc = workers.describe_status(status)
        if mold.retiring:
            log.info("%s retired (%s)", mold, desc)
            del self.by_generation[mold.generation]
            return True
        if mold.state is MoldState.UNSAFE:
            return True  # kept: it says the generation is exec'd, and why
        what = f"{desc}: {mold.reason}" if mold.reason else desc
        if mold.state is MoldState.STARTING and mold.generation == pending:
            log.error("%s %s", mold, what)
            del self.by_generation[mold.generation]
            rollback(f"{mold} {what}")
            return True
        if mold.state is not MoldState.GONE:
            log.error("%s %s; generation %d's workers are exec'd from now on", mold, what, mold.generation)
        mold.state = MoldState.GONE
        return True

    def retire(self, keep=None):
        """Stop every mold but generation `keep`'s (a retired generation's workers are never respawned)."""
        for generation, mold in list(self.by_generation.items()):
            if generation == keep:
                continue
            if mold.exited:
                del self.by_generation[generation]
            else:
                mold.retire()

    def deadline(self, now):
        """Kill a mold still importing after ready_timeout (its exit rolls the generation back);
        the next time one is due."""
        deadlines = []
        for mold in self.by_generation.values():
            if mold.state is not MoldState.STARTING or mold.retiring or mold.killed:
                continue
            due = mold.started + self.cfg.ready_timeout
            if now >= due:
                mold.reason = mold.reason or f"not ready after {self.cfg.ready_timeout:g}s"
                log.error("%s not ready after %gs; killing it", mold, self.cfg.ready_timeout)
                mold.kill()
            else:
                deadlines.append(due)
        return min(deadlines, default=None)

    def reopen_logs(self, fd):
        """USR1: the molds' stderr is what the workers forked from now on inherit."""
        if fd is None:
            return
        for mold in self.by_generation.values():
            if mold.forks_workers():
                try:
                    send_with_fds(mold.channel, protocol.encode(protocol.REOPEN), [fd])
                except OSError:
                    pass

    def kill_all(self):
        """Shutdown: SIGKILL every mold still alive; their pids, for the caller to wait on."""
        alive = [m for m in self.by_generation.values() if not m.exited]
        for mold in alive:
            mold.kill()
        return [m.pid for m in alive]

    def describe(self):
        return [m.describe() for _, m in sorted(self.by_generation.items())]


def become_subreaper():
    """PR_SET_CHILD_SUBREAPER on this process (the master): workers forked by a mold become
    its children when their middle parent exits. FugueError if the kernel refuses."""
    why = SYSTEM.become_subreaper()
    if why:
        raise FugueError(f"preload needs PR_SET_CHILD_SUBREAPER (Linux 3.4+): {why}")


def start_mold(generation, target, name, options, identity, working_path, log_fd, loop, now, listeners=()):
    """Fork and exec the mold of `generation`; return its Mold. Called by the master's pool.

    `listeners` (the master's) only name the Host a warmup request carries; the mold gets none.
    """
    parent, child = workers.channel_pair()
    try:
        argv = workers.python_argv() + ["-m", "fugue._mold"]
        env = workers.worker_env(0, generation, json.dumps(target), child.fileno())
        pid = workers.spawn(argv, env, identity, working_path, log_fd, [], child.fileno(),
                            target=target, loop=loop)
    finally:
        child.close()
    mold = Mold(pid, generation, parent, now)
    try:
        from .adapters._warmup import _listener_host

        parent.send(protocol.encode(protocol.HELLO, worker_id=0, generation=generation, name=name,
                                    options=options, listeners=[],
                                    warmup_host=_listener_host([lst.sock for lst in listeners])))
    except OSError as e:
        log.error("%s: cannot send its hello: %s", mold, e)
    parent.setblocking(False)
    return mold
