"""A generation's life: started (HUP, fuguectl reload, a watched change, the start),
READY, promoted or rolled back; and watch mode (the watcher in the loop, the trigger) that starts one.

Who calls it: fugue.master (the wiring). What it promises: at most one
generation rolls out at a time, beside the one serving and those still draining
(`waits_for` says why a new one cannot begin yet); what is asked meanwhile waits
in `Asks`, coalesced, and is never dropped; numbers are never reused, even after
a rollback; every
outcome is logged once, recorded as `last_event` and told to the waiters
(fuguectl reload). Which workers start or stop is policy.decide's and the
pool's business: this module keeps the generations' records and says what
happened.
"""

import logging
import os
import time

from .system import SYSTEM

log = logging.getLogger("fugue")


class Rollout:
    """A generation being rolled out: by a reload, or the first one at start."""

    def __init__(self, generation, source, now, initial=False):
        self.generation = generation
        self.source = source
        self.started = now
        self.initial = initial
        self.waiters = []   # callables(ok, text), e.g. control clients
        self.note = None    # what this reload could not apply ("bind changed: needs `fuguectl upgrade`")


# How many older generations may drain at once (beside the one serving and the one rolling
# out). Draining never blocks a reload: a generation drains only while its workers still
# finish work (long polls, websockets, idle keep-alive clients), each for at most
# graceful_timeout, and most of its workers are gone at once. But each draining generation
# keeps processes and their memory, so in a long reload storm with long-lived connections
# the number is bounded: a reload waits (queued, never dropped) while this many drain,
# at most graceful_timeout + 2 s, until the oldest has ended.
MAX_DRAINING = 4

KINDS = ("reload", "upgrade")


def waits_for(kind, rolling_out, upgrading, old_master_draining, draining):
    """Why a queued reload or upgrade cannot begin yet, or None. Pure.

    Never more than one rollout and two masters at a time. A reload waits for the
    rollout or upgrade under way, or for MAX_DRAINING draining generations; an
    upgrade waits for the rollout or upgrade under way, and for the old master of
    the last upgrade to be gone (a third master)."""
    if rolling_out is not None:
        return f"generation {rolling_out.generation} is still starting"
    if upgrading:
        return "an upgrade is in progress"
    if kind == "upgrade" and old_master_draining:
        return "the old master is still draining"
    if kind == "reload" and len(draining) >= MAX_DRAINING:
        return f"{len(draining)} older generations still drain (at most {MAX_DRAINING})"
    return None


class Asked:
    """A reload or an upgrade asked for (HUP, USR2, fuguectl, a watched change), not begun."""

    def __init__(self, kind, source, now, waiter=None):
        self.kind = kind            # "reload" or "upgrade"
        self.sources = [source]     # every ask it answers (the first few and a count)
        self.count = 1
        self.since = now
        self.waiters = [waiter] if waiter else []

    def source(self):
        """'HUP', or 'HUP x20' when several asks were coalesced into this one."""
        if self.count == 1:
            return self.sources[0]
        kinds = sorted(set(self.sources))
        return f"{'+'.join(kinds)} x{self.count}"


class Asks:
    """What the operator asked for that has not begun yet: at most one reload and one
    upgrade, in the order they were first asked.

    An ask of a kind already waiting joins it (coalesces): when it begins it reads the
    code and the configuration on disk then, which is after every ask it answers, so
    the code on disk at the last HUP is what ends up serving. Nothing is dropped: each
    waiter (`fuguectl reload`) hears the outcome of the one that answered it."""

    def __init__(self):
        self.waiting = []

    def ask(self, kind, source, now, waiter=None):
        """Queue an ask; returns (the Asked, True if it joined one already waiting)."""
        for asked in self.waiting:
            if asked.kind == kind:
                asked.count += 1
                if len(asked.sources) < 16:
                    asked.sources.append(source)
                if waiter:
                    asked.waiters.append(waiter)
                return asked, True
        asked = Asked(kind, source, now, waiter)
        self.waiting.append(asked)
        return asked, False

    def head(self):
        return self.waiting[0] if self.waiting else None

    def take(self):
        return self.waiting.pop(0)

    def answer_all(self, ok, text_of):
        """Tell every waiter (`text_of(asked)`) and forget them all: the master stops or hands over."""
        waiting, self.waiting = self.waiting, []
        for asked in waiting:
            for waiter in asked.waiters:
                waiter(ok, text_of(asked))
        return waiting

    def describe(self):
        """For status: what waits, in order."""
        return [{"kind": a.kind, "source": a.source()} for a in self.waiting]


class Generations:
    """The serving generation, the one rolling out (`pending`), and the last outcome."""

    def __init__(self, first_generation=1, system=SYSTEM):
        self.serving = first_generation - 1
        self.last_number = self.serving   # numbers are never reused, even after a rollback
        self.pending = None               # Rollout
        self.last_event = None            # (what, ok, text, when) of the last start/reload/upgrade
        self.system = system

    def pending_generation(self):
        return self.pending.generation if self.pending else None

    def begin(self, source, workers, initial=False, waiter=None):
        """Number and record a new generation; the caller has checked `waits_for`."""
        gen = self.last_number = self.last_number + 1
        self.pending = Rollout(gen, source, self.system.monotonic(), initial=initial)
        if waiter:
            self.pending.waiters.append(waiter)
        if not initial:
            self.system.notify("RELOADING=1", f"STATUS=reloading: generation {gen}",
                               f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)}")
            log.info("reload (%s): starting generation %d", source, gen)
        else:
            log.info("starting generation %d: %d worker%s", gen, workers, "" if workers == 1 else "s")
        return self.pending

    def promote(self, generation, now):
        """All of the pending generation is READY: it serves. Returns (its Rollout, the outcome's text).
        The caller tells the world for a start (launcher, old master, systemd); a reload is told here."""
        rollout, self.pending = self.pending, None
        self.serving = generation
        text = f"generation {generation} serving ({now - rollout.started:.2f}s)"
        self.record("start" if rollout.initial else "reload", True, text)
        log.info("%s: %s", "started" if rollout.initial else "reload done", text)
        self._tell(rollout, True, text)
        if not rollout.initial:
            self.system.notify("READY=1", f"STATUS={text}")
        return rollout, text

    def rollback(self, reason):
        """The pending generation failed (`reason`); the serving one goes on, or at start the
        master gives up (the caller stops). Returns the Rollout rolled back."""
        rollout, self.pending = self.pending, None
        if rollout.initial:
            text = f"start failed: {reason}"
            log.error("%s", text)
            self.record("start", False, text)
        else:
            text = f"reload failed: {reason}; generation {self.serving} keeps serving"
            log.error("%s", text)
            self.record("reload", False, text)
            self.system.notify("READY=1", f"STATUS={text}")
        self._tell(rollout, False, text)
        return rollout

    def record(self, what, ok, text):
        """The last outcome, as `fuguectl status` shows it (upgrades are recorded here too)."""
        self.last_event = (what, ok, text, self.system.wall())

    def _tell(self, rollout, ok, text):
        if rollout.note:
            text = f"{text}; {rollout.note}"
        for waiter in rollout.waiters:
            waiter(ok, text)
        rollout.waiters = []


class WatchTrigger:
    """Watch mode: changed files reload once the tree has been quiet for watch_settle,
    and never during a rollout or a drain (the change waits for it to end)."""

    def __init__(self, watcher, start_dir, settle):
        self.watcher = watcher
        self.start_dir = start_dir
        self.settle = settle
        self.pending = False    # a change seen, not yet reloaded

    def take(self):
        """The watcher's reader: note what changed; True if anything did."""
        changed = self.watcher.take()
        if not changed:
            return False
        shown = ", ".join(os.path.relpath(p, self.start_dir) for p in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        log.info("changed: %s%s", shown, more)
        self.pending = True
        return True

    def due(self, blocked):
        """True if a reload should start now (the caller starts it, then calls fired)."""
        # blocked: a reload or a drain is under way; retried when it ends (promote, rollback, reap).
        # Not quiet yet: files are still changing; deadline() says when to look again.
        return self.pending and not blocked and self.watcher.quiet_for() >= self.settle

    def fired(self):
        self.pending = False

    def deadline(self, now):
        """When a pending change may be due, or None."""
        if not self.pending:
            return None
        return now + max(0.01, self.settle - self.watcher.quiet_for())


class WatchMode:
    """Watch mode in a master: the watcher (fugue.watch) read in the loop, its WatchTrigger,
    and the reload it asks for once due: `ask()`, never while `blocked()` (a rollout)."""

    def __init__(self, loop, system, ask, blocked):
        self.loop = loop
        self.system = system
        self.ask = ask
        self.blocked = blocked
        self.watcher = None     # the fugue.watch.Watcher, in watch mode
        self.trigger = None     # ... and its WatchTrigger

    def start(self, cfg, default_path, ignore):
        from .watch import Watcher  # watchfiles is an optional dependency: only in watch mode

        paths = [os.path.join(cfg.start_dir, p) for p in cfg.watch_paths] or [default_path]
        self.watcher = Watcher(paths, include=cfg.watch_include, exclude=cfg.watch_exclude,
                               settle=cfg.watch_settle, ignore_paths=ignore)
        self.watcher.start()
        self.trigger = WatchTrigger(self.watcher, cfg.start_dir, cfg.watch_settle)
        self.loop.add_reader(self.watcher.fileno(), self._on_change)

    def stop(self):
        if self.watcher is not None:
            self.loop.remove_reader(self.watcher.fileno())
            self.watcher.stop()
            self.watcher = self.trigger = None

    def _on_change(self):
        if self.trigger.take():
            self.reload()

    def timer(self):
        """A timer (it acts): a pending watched change reloads once the tree has been quiet
        for watch_settle. Returns when to look again, or None."""
        if self.trigger is None or not self.trigger.pending or self.blocked():
            return None
        self.reload()
        return self.trigger.deadline(self.system.monotonic())

    def reload(self):
        """Ask for the reload a pending change calls for, if it is due (after a rollout, too)."""
        if self.trigger is not None and self.trigger.due(blocked=self.blocked()):
            self.trigger.fired()
            self.ask()
