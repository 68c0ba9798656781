"""The master: owns the listeners, keeps the workers, replaces them and itself.

Who calls it: fugue.run (run_master: Master(...), setup(), run()), and the
control socket and the management listener with the commands below. What it
promises: one loop pass (fugue.shell) is a checklist, signals -> reap ->
timers -> decide -> act -> wait; `policy.decide` says what to do, and every
event (a worker's READY or exit, a signal, a command) becomes a call on one
of the state machines, each in its own file:

- fugue.pool     the workers in their slots: spawn, channels, stop, kill, backoff;
- fugue.rollout  the generations: one serves, one may roll out; promote, rollback;
                 and the watch trigger;
- fugue.upgrade  USR2, both sides: this master replacing itself, or replacing another.

This module is the wiring between them: what one returns, it hands to the
next. Generations: `gens.serving` serves; during a reload `gens.pending` is
rolled out and promoted only when all its workers are READY; any failure
before that stops the pending generation and the serving one goes on
(rollback). One rollout at a time; older generations may still drain (at most
rollout.MAX_DRAINING); reloads and upgrades asked meanwhile wait their turn in
`asks` (fugue.rollout.Asks). At most two masters exist at any time.
"""

import logging
import os
import signal

from . import policy, protocol, reconfig, upgrade
from .control import ControlServer
from .errors import ConfigError, FugueError, Refused
from .fds import close_listeners, refuse_new_clients
from .health import Drain
from .leftovers import listener_inodes, name_listener_holders
from .pool import Pool
from .rollout import Asks, Generations, WatchMode, waits_for
from .shell import Shell
from .status import StatusServer
from .system import SYSTEM
from .workers import describe_status

log = logging.getLogger("fugue")

# The master of this process, once set up: what fugue.generation() and
# fugue.server_status() read in the master (as worker.current in a worker).
current = None

SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGCHLD)


class Master(Shell):
    SIGNALS = SIGNALS
    Control = ControlServer
    role = "master"

    def __init__(self, cfg, listeners, target, identity, logs, ready_fd=None,
                 handoff=None, first_generation=1, daemonized=False, system=SYSTEM):
        super().__init__(cfg, listeners, logs, ready_fd=ready_fd, daemonized=daemonized, system=system)
        self.target = target
        self.identity = identity
        self.handoff = handoff          # new master: its upgrade.Handoff to the old one
        self.name = cfg.name or default_name(target)
        self.pool = Pool(cfg, target, identity, logs, listeners, self.loop, self.name,
                         on_request=self._worker_request, system=system)
        self.listener_inodes = listener_inodes(listeners)  # who still holds them at exit is named
        self.gens = Generations(first_generation, system=system)
        self.asks = Asks()              # reloads and upgrades asked for, not begun yet
        self.upgrade = None             # old master: the upgrade.Upgrade in flight
        self.watching = WatchMode(self.loop, system, lambda: self.refusable(lambda: self.ask("reload", "watch")),
                                  blocked=lambda: self.gens.pending is not None)
        self.status_server = None       # the management HTTP listener (status_bind)
        self.drain = Drain(self)        # drain_delay and fuguectl drain (fugue.health)
        self.started = system.monotonic()
        self.started_wall = system.wall()

    # -- what fugue.status, fugue.health and fugue.control read ---------------------

    @property
    def watcher(self):
        return self.watching.watcher

    @property
    def workers(self):
        return self.pool.workers

    @property
    def target_count(self):
        return self.pool.target_count

    @property
    def restarts(self):
        return self.pool.restarts

    @property
    def molds(self):
        return self.pool.molds

    @property
    def generation(self):
        return self.gens.serving

    @property
    def rollout(self):
        return self.gens.pending

    @property
    def last_event(self):
        return self.gens.last_event

    def send(self, w, kind, fds=(), **fields):
        return self.pool.send(w, kind, fds, **fields)

    # -- setup --------------------------------------------------------------------

    def setup(self):
        """Everything that can fail before the loop starts; FugueError on failure."""
        global current
        current = self
        self.setup_shell(f"fugue master {self.name}", write_pid=not self.handoff)
        if self.handoff is not None:
            self.loop.add_reader(self.handoff.sock, self._on_handoff_message)
        if self.cfg.watch:
            self._start_watcher()
        self.pool.molds.setup()  # preload: the master becomes a child subreaper
        if self.cfg.status_bind:
            self.status_server = StatusServer(self, self.cfg.status_bind)
            self.loop.add_reader(self.status_server.sock, self.status_server.accept)

    def _start_watcher(self):
        ignore = [p for p in (self.cfg.path("log_file"), self.cfg.path("master_log_file"),
                              self.cfg.path("tmp_path"), self.pid_file.path) if p]
        self.watching.start(self.cfg, self.app_dir(), ignore)

    def app_dir(self):
        if "script" in self.target:
            return os.path.dirname(self.target["script"])
        return self.cfg.start_dir

    # -- the loop (see Shell.run) -------------------------------------------------------

    def begin(self):
        self.begin_rollout("start", initial=True)

    def step(self):
        """timers -> decide -> act, until decide has nothing more to do; returns the next deadline.

        Timers first: a due one may start a rollout (watch) that decide must see now; and
        first of all what was asked and can begin now (a rollout that ended frees the way).
        """
        timers = [self.upgrade.check_deadline(self.system.monotonic()) if self.upgrade else None,
                  self.watching.timer(), self.pool.molds.deadline(self.system.monotonic()),
                  self.control.deadline() if self.control else None, self.drain.tick(),
                  self.pool.leftovers.tick(self.system.monotonic())]
        for _ in range(4):
            self.begin_asked()  # a promotion or rollback of the pass before may free the way
            now = self.system.monotonic()
            actions, deadline = policy.decide(self.snapshot(now))
            if not actions:
                break
            for action in actions:
                self.act(action, now)
            pending = self.gens.pending_generation()
            self.pool.fork_queued(now, None if self.stopping else (pending or self.gens.serving),
                                  pending, self.rollback)
        deadlines = [d for d in [deadline] + timers if d]
        return min(deadlines, default=None)

    def snapshot(self, now):
        return policy.Snapshot(
            now=now, workers=self.pool.views(),
            target=self.pool.target_count, generation=self.gens.serving,
            pending=self.gens.pending_generation(),
            not_before=dict(self.pool.not_before), stopping=self.stopping is not None,
            ready_timeout=self.cfg.ready_timeout, timeout=self.cfg.timeout,
            strategy=self.cfg.reload_strategy, batch=self.cfg.reload_batch)

    def act(self, action, now):
        if isinstance(action, policy.Spawn):
            # An earlier action of the same pass (a Kill that rolled the rollout back
            # or failed the start) can have made this spawn stale: skip it then.
            wanted = self.gens.pending.generation if self.gens.pending else self.gens.serving
            if self.stopping or action.generation != wanted:
                return
            try:
                self.pool.spawn(action.slot, action.generation, now)
            except OSError as e:  # out of descriptors or processes: that worker's failure
                failure = self.pool.spawn_failed(action.slot, action.generation, now, e)
                if action.generation == self.gens.pending_generation():
                    self.rollback(failure)
        elif isinstance(action, policy.Stop):
            w = self.pool.get(action.pid)
            if w:
                self.pool.stop(w, action.reason, now)
        elif isinstance(action, policy.Kill):
            w = self.pool.get(action.pid)
            if w:
                self.kill_worker(w, action.reason)
        elif isinstance(action, policy.Promote):
            self.promote(action.generation, now)
        elif isinstance(action, policy.Ready):
            w = self.pool.get(action.pid)
            if w:
                self.pool.ready(w, now, f"up for {self.cfg.stable_after:g}s")

    def finished(self):
        if self.stopping is None:
            return False
        if self.upgrade is not None and not self.upgrade.stepped_down:
            return False
        return not self.pool.workers

    # -- workers: what the pool reports ---------------------------------------------------

    def _worker_request(self, w, msg):
        """A worker's message for the control socket: counters it was asked for, or its
        own fugue.server_status() request."""
        if self.control is None:
            return
        if msg["type"] == protocol.STATS_REPLY:
            self.control.stats_reply(w, msg)
        else:
            self.control.status_for_worker(w, msg)

    def kill_worker(self, w, reason):
        if self.pool.kill(w, reason) and w.generation == self.gens.pending_generation():
            self.rollback(f"{w} {reason}")

    def reap(self):
        for pid, status in self.system.reaped():
            if self.upgrade is not None and pid == self.upgrade.pid:
                self.upgrade_exited(status)
                continue
            if self.pool.molds.reaped(pid, status, self.gens.pending_generation(), self.rollback):
                continue
            w = self.pool.pop(pid)
            if w is None:
                log.warning("reaped unknown child pid %d (%s)", pid, describe_status(status))
                continue
            failure = self.pool.exited(w, status, pending=self.gens.pending_generation(),
                                       serving=self.gens.serving, stopping=self.stopping)
            if failure:
                self.rollback(failure)

    # -- reload: rollout, promote, rollback -------------------------------------------

    def begin_rollout(self, source, initial=False, waiter=None):
        """The first generation, at start (a reload is asked for: `ask`)."""
        rollout = self.gens.begin(source, self.pool.target_count, initial=initial, waiter=waiter)
        self.pool.forget_backoff()
        self.pool.molds.start(rollout.generation, rollout.started)

    # -- what the operator asks for: queued, coalesced, begun in turn ---------------------

    def ask(self, kind, source, waiter=None):
        """HUP, USR2, fuguectl reload/upgrade, a watched change: never refused for being
        early. It waits its turn behind the rollout or upgrade under way (joining one of
        its kind already waiting) and begins as soon as it can; the waiter hears its outcome."""
        if self.stop_decided():
            raise Refused(f"{kind} refused: the master is stopping")
        asked, joined = self.asks.ask(kind, source, self.system.monotonic(), waiter)
        why = self.waits_for(kind)
        if joined:
            log.info("%s (%s) joins the %s already waiting (%s)", kind, source, kind, why or "next")
        elif why:
            log.info("%s (%s) waits its turn: %s", kind, source, why)
        self.begin_asked()

    def stop_decided(self):
        """Stopping, or about to (drain_delay: /healthz says 503 until the stop begins)."""
        return self.stopping is not None or self.drain.stop_at is not None

    def waits_for(self, kind):
        return waits_for(kind, self.gens.pending, self.upgrade is not None, self.old_master_draining(),
                         self.pool.draining_generations(self.gens.serving))

    def begin_asked(self):
        """Begin what was asked first, if nothing it must wait for is under way."""
        while self.asks.head() is not None and not self.stop_decided():
            if self.waits_for(self.asks.head().kind):
                return
            asked = self.asks.take()
            if asked.kind == "reload":
                self.begin_reload(asked)
            else:
                self.begin_upgrade(asked)

    def begin_reload(self, asked):
        """A new generation, with the code and the configuration on disk now."""
        try:
            fresh = reconfig.reread(self.cfg, self.pool.target)
        except (ConfigError, FugueError) as e:
            text = f"reload refused: {e}; generation {self.gens.serving} keeps serving"
            log.error("%s", text)
            self.gens.record("reload", False, text)
            for waiter in asked.waiters:
                waiter(False, text)
            return
        note = fresh.upgrade_note()
        if note:
            log.warning("reload: %s", note)
        self.apply_config(fresh)
        rollout = self.gens.begin(asked.source(), self.pool.target_count)
        rollout.waiters.extend(asked.waiters)
        rollout.note = note
        self.pool.forget_backoff()
        self.pool.molds.start(rollout.generation, rollout.started)

    def apply_script_options(self, generation):
        """The new generation's code may give fugue.start other options (script mode): applied
        as it takes over; what needs an upgrade is named with the reload's outcome."""
        said = next((w.script_options for w in self.pool.workers.values()
                     if w.generation == generation and w.script_options is not None), None)
        try:
            fresh = reconfig.script_changes(self.cfg, self.pool.target, said)
        except (ConfigError, FugueError) as e:
            log.error("reload: the script's new options are not valid, kept the old ones: %s", e)
            return
        if fresh is None:
            return
        note = fresh.upgrade_note()
        if note:
            note = f"the script's {note}"
            log.warning("reload: %s", note)
            rollout = self.gens.pending
            rollout.note = f"{rollout.note}; {note}" if rollout.note else note
        self.apply_config(fresh)

    def apply_config(self, fresh):
        """What the config file and flags now say, as far as a new generation carries it."""
        if not fresh.applied:
            return
        log.info("reload: %s", ", ".join(
            f"{k} -> {v!r}" if k != "target" else f"target -> {v}" for k, v in fresh.applied.items()))
        watch_changed = any(k.startswith("watch") for k in fresh.applied)
        self.cfg = fresh.cfg
        self.pool.reconfigure(fresh.cfg, fresh.target)
        self.target = fresh.target
        if "workers" in fresh.applied:
            self.pool.scale(fresh.cfg.workers)
        if watch_changed:
            self.watching.stop()
            if self.cfg.watch:
                self._start_watcher()

    def promote(self, generation, now):
        if not self.gens.pending.initial:
            self.apply_script_options(generation)
        rollout, text = self.gens.promote(generation, now)
        self.pool.molds.retire(keep=generation)
        if rollout.initial:
            self.tell_launcher(True, str(os.getpid()))
            if self.old_master_draining():
                self.handoff.tell_ready()
            else:
                if self.handoff is not None:  # the old master died while we started: the pid file is ours
                    self.pid_file.write()
                self.system.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={text}")
        self.watching.reload()  # changes seen during the rollout get one more reload

    def rollback(self, reason):
        """Stop the pending generation; the serving one goes on (or, at start, give up)."""
        gen = self.gens.pending.generation
        self.pool.molds.retire(keep=self.gens.serving)
        self.pool.stop_generation(gen, f"generation {gen} rolled back", self.system.monotonic())
        rollout = self.gens.rollback(reason)
        if not rollout.initial:
            self.watching.reload()
            return
        # The launcher hears it from shutdown(), once nothing is left behind.
        if self.old_master_draining():  # so `fuguectl upgrade` shows why
            self.handoff.tell_failed(reason)
        self.exit_status = 1
        self.fatal_reason = reason
        self.begin_stop("quick")

    # -- upgrade: USR2 (fugue.upgrade) ----------------------------------------------------

    def begin_upgrade(self, asked):
        """A queued USR2 or fuguectl upgrade begins: exec a new master that takes the listeners."""
        try:
            self.upgrade = upgrade.begin(self.cfg, self.loop, self.pid_file, self.listeners, self.gens.serving,
                                         system=self.system)
        except (OSError, FugueError) as e:
            text = f"upgrade failed: {e}; pid {os.getpid()} keeps serving"
            log.error("%s", text)
            self.gens.record("upgrade", False, text)
            for waiter in asked.waiters:
                waiter(False, text)
            return
        self.upgrade.carry = lambda: {"drained": self.drain.manual}  # fuguectl drain outlives us
        self.upgrade.waiters.extend(asked.waiters)
        self.loop.add_reader(self.upgrade.server, self._on_handoff_connect)

    def _on_handoff_connect(self):
        conn = self.upgrade.accept()
        if conn is not None:
            self.loop.add_reader(conn, self._on_upgrade_message)

    def _on_upgrade_message(self):
        if self.upgrade.read():
            self.step_down()

    def handed_over(self):
        """The new master serves: this one drains and exits (and unlinks no listener)."""
        return self.upgrade is not None and self.upgrade.stepped_down

    def step_down(self):
        """The new master is ready: give it the pid file and drain our workers. What was
        asked meanwhile is the new master's now: passed on as the signal it would have been."""
        text = self.upgrade.step_down()
        self.gens.record("upgrade", True, text)
        new = self.upgrade.pid
        for asked in self.asks.answer_all(True, lambda a: f"{a.kind} passed on to the new master pid {new}"):
            self.system.kill(new, signal.SIGHUP if asked.kind == "reload" else signal.SIGUSR2)
            log.info("%s (%s) passed on to the new master pid %d", asked.kind, asked.source(), new)
        self.begin_stop("graceful", handed_over=True)

    def upgrade_exited(self, status):
        up, self.upgrade = self.upgrade, None
        text = up.exited(status)
        if text is not None:  # failed: this master goes on as if nothing happened
            self.gens.record("upgrade", False, text)
            return
        # The new master died after we handed over: we serve again.
        self.stopping = None
        self.exit_status = 0
        # Our draining workers cannot take up serving again (they closed their listeners; a
        # STOP is never cancelled, a non-graceful one is a quick stop that cut their requests
        # off): they finish what they have and exit, and decide() fills their slots afresh.

    def old_master_draining(self):
        """New master: the old master may still run (it drains), so no reload or upgrade yet."""
        return self.handoff is not None and self.handoff.old_master_draining

    def _on_handoff_message(self):
        self.handoff.read(self.loop, self.gens.serving, starting=self.gens.pending is not None and self.gens.pending.initial)
        if not self.old_master_draining():
            reconfig.unlink_dropped()  # the socket files of Unix listeners bind no longer names

    # -- signals and commands (SIGNAL_COMMANDS in fugue.shell) ------------------------------

    def on_reload(self):
        self.refusable(lambda: self.ask("reload", "HUP"))

    def on_upgrade(self):
        self.refusable(lambda: self.ask("upgrade", "USR2"))

    def on_reopen_logs(self):
        self.reopen_logs()

    def on_more_workers(self):
        self.scale(self.pool.target_count + 1)

    def on_fewer_workers(self):
        self.scale(self.pool.target_count - 1)

    def on_winch(self):
        if self.daemonized:
            log.info("WINCH: stopping all workers; the master keeps the sockets (TTIN or HUP to resume)")
            self.scale(0)
        else:
            log.debug("WINCH ignored: not daemonized")

    def scale(self, count):
        self.pool.scale(count)

    def reopen_logs(self):
        """USR1, fuguectl reopen-logs: None if done, else why it was refused (old files kept)."""
        fd = self.logs.reopen()
        if self.logs.error:
            return self.logs.error
        log.info("reopened log files")
        self.pool.reopen_logs(fd)
        return None

    def hold_stop(self, how, handed_over):
        # /healthz says 503 now; the stop begins after drain_delay (fugue.health)
        return how == "graceful" and not handed_over and self.drain.hold_stop()

    def stop_children(self, how, handed_over):
        """Shell.begin_stop: no new client, a pending new master goes; a quick stop kills the
        workers now (a graceful one drains them: policy.decide stops them)."""
        if not handed_over:
            # No new client from now on, and our copy of the listeners goes first (each worker
            # sweeps what is queued and closes its own as it drains): a new client is refused,
            # never queued in the backlog and reset at exit. After an upgrade (handed_over) the
            # new master serves on them: nothing to refuse or close.
            if how == "graceful":
                refuse_new_clients(self.listeners)
            close_listeners(self.listeners, unlink=True)
            self.listeners = []
        if self.upgrade is not None:
            self.upgrade.abort()
        if not handed_over:
            self.asks.answer_all(False, lambda a: f"{a.kind} refused: the master is stopping")
        self.pool.molds.retire()  # no generation's workers are spawned again
        if how == "quick":
            self.pool.kill_all()

    # -- exit (see Shell.shutdown) ------------------------------------------------------------

    def release(self):
        self.pool.shutdown()
        if not self.handed_over():  # nobody should hold the listeners now: say who does
            name_listener_holders(self.listener_inodes)
        self.watching.stop()


def default_name(target):
    """hello.py -> hello; module pkg.app -> pkg.app; a command -> its program's name."""
    if "script" in target:
        return os.path.splitext(os.path.basename(target["script"]))[0]
    if "command" in target:
        return os.path.basename(target["command"][0])
    return target.get("module") or target.get("app") or "fugue"
