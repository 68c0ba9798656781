"""The master: owns the listeners, keeps the workers, replaces them and itself.

Each pass of the loop is a checklist: signals -> reap -> timers -> decide -> act -> wait.
`policy.decide` says what to do; this module does it and turns events (a
worker's READY, its exit, a signal, a control command) into state.

Generations: `generation` serves; during a reload `pending` is rolled out and
promoted only when all its workers are READY; any failure before that stops the
pending generation and the serving one goes on (rollback). At most two
generations and two masters exist at any time.
"""

import errno
import json
import logging
import os
import shutil
import signal
import time

from . import notify, policy, protocol, upgrade, workers
from .errors import FugueError, Refused
from .fds import check_private_parent, close_listeners, recv_with_fds, refuse_new_clients, send_with_fds
from .health import Drain
from .loop import Loop
from .policy import WorkerState
from .shell import PidFile

log = logging.getLogger("fugue")

# The master of this process, once set up: what fugue.generation() and
# fugue.server_status() read in the master (as worker.current in a worker).
current = None

SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGCHLD)


class Worker:
    """The master's record of one worker process."""

    def __init__(self, pid, slot, generation, channel, now, foreign=False):
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.channel = channel
        self.state = WorkerState.STARTING
        self.started = now
        self.started_wall = time.time()
        self.last_beat = now
        self.stop_deadline = None
        self.reason = None          # why it failed, as the worker said
        self.stats = {}
        self.foreign = foreign
        self.recycling = False
        self.ready_at = None        # foreign, ready_mode=stable: READY from then on
        self.notify = None          # foreign, ready_mode=notify: its NOTIFY_SOCKET

    def view(self):
        return policy.WorkerView(self.pid, self.slot, self.generation, self.state,
                                 self.started, self.last_beat, self.stop_deadline, self.ready_at)

    def __str__(self):
        return f"worker {self.slot} (pid {self.pid}, generation {self.generation})"


class Rollout:
    """A generation being rolled out: by a reload, or the first one at start."""

    def __init__(self, generation, source, now, initial=False):
        self.generation = generation
        self.source = source
        self.started = now
        self.initial = initial
        self.waiters = []   # callables(ok, text), e.g. control clients


class Master:
    def __init__(self, cfg, listeners, target, identity, logs, ready_fd=None,
                 handoff=None, first_generation=1, daemonized=False):
        self.cfg = cfg
        self.listeners = listeners
        self.target = target
        self.identity = identity
        self.logs = logs
        self.ready_fd = ready_fd
        self.handoff = handoff          # new master: its upgrade.Handoff to the old one
        self.daemonized = daemonized
        self.loop = Loop()
        self.workers = {}               # pid -> Worker
        self.target_count = cfg.workers
        self.generation = first_generation - 1
        self.last_generation = self.generation  # numbers are never reused, even after a rollback
        self.rollout = None
        self.upgrade = None
        self.failures = {}              # slot -> consecutive early deaths
        self.not_before = {}            # slot -> earliest respawn (monotonic)
        self.stopping = None            # None, "graceful" or "quick"
        self.exit_status = 0
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.last_event = None          # (what, ok, text, when) of the last reload/upgrade
        self.pid_file = PidFile(cfg.path("pid_file"))
        self.name = cfg.name or default_name(target)
        self.run_dir = None
        self.control = None
        self.watcher = None
        self.restarts = {}              # slot -> respawns after unexpected exits
        self._worker_options = self._plain_options()
        self.drain = Drain(self)        # drain_delay and fuguectl drain (fugue.health)

    # -- setup --------------------------------------------------------------------

    def _plain_options(self):
        public = self.cfg.public()
        return {k: v for k, v in public.items() if isinstance(v, (str, int, float, bool, list, type(None)))}

    def _make_run_dir(self):
        """tmp_path/fugue-<pid>: 0700, holds the control socket."""
        tmp = self.cfg.path("tmp_path")
        check_private_parent(tmp)
        sweep_stale(tmp)
        path = os.path.join(tmp, f"fugue-{os.getpid()}")
        if os.path.islink(path):  # planted in a shared tmp_path: remove the link, never follow it
            os.unlink(path)
        shutil.rmtree(path, ignore_errors=True)  # a stale one from a reused pid
        try:
            os.mkdir(path, 0o700)  # never follows a link: it fails if anything is (again) there
        except OSError as e:
            raise FugueError(f"cannot create the run directory {path}: {e.strerror}") from None
        self.run_dir = path

    def setup(self):
        """Everything that can fail before the loop starts; FugueError on failure."""
        global current
        current = self
        self._make_run_dir()
        try:
            import setproctitle

            setproctitle.setproctitle(f"fugue master {self.name}")
        except ImportError:
            pass
        if not self.handoff:
            self.pid_file.write()
        from . import control

        self.control = control.ControlServer(self, os.path.join(self.run_dir, "control.sock"))
        self.loop.add_reader(self.control.sock, self.control.accept)
        if self.handoff is not None:
            self.loop.add_reader(self.handoff.sock, self._on_handoff_message)
        if self.cfg.watch:
            self._start_watcher()
        if self.cfg.status_bind:
            from . import status

            self.status_server = status.StatusServer(self, self.cfg.status_bind)
            self.loop.add_reader(self.status_server.sock, self.status_server.accept)

    def _start_watcher(self):
        from .watch import Watcher

        paths = [os.path.join(self.cfg.start_dir, p) for p in self.cfg.watch_paths] or [self.app_dir()]
        ignore = [p for p in (self.cfg.path("log_file"), self.cfg.path("master_log_file"),
                              self.cfg.path("tmp_path"), self.pid_file.path) if p]
        self.watcher = Watcher(paths, include=self.cfg.watch_include, exclude=self.cfg.watch_exclude,
                               settle=self.cfg.watch_settle, ignore_paths=ignore)
        self.watcher.start()
        self.loop.add_reader(self.watcher.fileno(), self._on_watch)
        self.watch_pending = False

    def app_dir(self):
        if "script" in self.target:
            return os.path.dirname(self.target["script"])
        return self.cfg.start_dir

    # -- the loop -----------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns the exit status."""
        self.loop.install_signals(SIGNALS)
        self.begin_rollout("start", initial=True)
        try:
            while True:
                # Signals first: a TERM sent to the whole process group reaches the
                # workers too, and their exits must be read as part of the stop.
                for signum in self.loop.pop_signals():
                    self._refusable(lambda: self.handle_signal(signum))
                self.reap()
                if self.finished():
                    break
                deadline = self.step()
                self.loop.wait(deadline)
        finally:
            self.shutdown()
        return self.exit_status

    def step(self):
        """timers -> decide -> act, until decide has nothing more to do; returns the next deadline.

        Timers first: a due one may start a rollout (watch) that decide must see now.
        """
        timers = [self.upgrade.check_deadline(time.monotonic()) if self.upgrade else None,
                  self._watch_deadline(),
                  self.control.deadline() if self.control else None, self.drain.tick()]
        for _ in range(4):
            now = time.monotonic()
            actions, deadline = policy.decide(self.snapshot(now))
            if not actions:
                break
            for action in actions:
                self.act(action, now)
        deadlines = [d for d in [deadline] + timers if d]
        return min(deadlines, default=None)

    def snapshot(self, now):
        return policy.Snapshot(
            now=now, workers=tuple(w.view() for w in self.workers.values()),
            target=self.target_count, generation=self.generation,
            pending=self.rollout.generation if self.rollout else None,
            not_before=dict(self.not_before), stopping=self.stopping is not None,
            ready_timeout=self.cfg.ready_timeout, timeout=self.cfg.timeout,
            strategy=self.cfg.reload_strategy, batch=self.cfg.reload_batch)

    def act(self, action, now):
        if isinstance(action, policy.Spawn):
            # An earlier action of the same pass (a Kill that rolled the rollout back
            # or failed the start) can have made this spawn stale: skip it then.
            wanted = self.rollout.generation if self.rollout else self.generation
            if self.stopping or action.generation != wanted:
                return
            self.spawn_worker(action.slot, action.generation, now)
        elif isinstance(action, policy.Stop):
            w = self.workers.get(action.pid)
            if w:
                self.stop_worker(w, action.reason, now)
        elif isinstance(action, policy.Kill):
            w = self.workers.get(action.pid)
            if w:
                self.kill_worker(w, action.reason)
        elif isinstance(action, policy.Promote):
            self.promote(action.generation, now)
        elif isinstance(action, policy.Ready):
            w = self.workers.get(action.pid)
            if w:
                self.worker_ready(w, now, f"up for {self.cfg.stable_after:g}s")

    def finished(self):
        if self.stopping is None:
            return False
        if self.upgrade is not None and not self.upgrade.stepped_down:
            return False
        return not self.workers

    # -- workers ------------------------------------------------------------------

    def spawn_worker(self, slot, generation, now):
        parent, child = workers.channel_pair()
        try:
            if "command" in self.target:
                argv = list(self.target["command"])
                argv[0] = shutil.which(argv[0]) or argv[0]
                env = workers.worker_env(slot, generation)
                env["LISTEN_FDNAMES"] = ":".join(lst.name for lst in self.listeners)
                if self.cfg.ready_mode == "notify":
                    from .foreign import NotifySocket

                    uid = self.identity.uid if self.identity.uid is not None else os.getuid()
                    notify_sock = NotifySocket(slot, generation, {0, uid, os.getuid()})
                    env["NOTIFY_SOCKET"] = notify_sock.address
                pid = workers.spawn(argv, env, self.identity, self.cfg.working_path, self.logs.worker_fd,
                                    [], child.fileno(), target=None,
                                    foreign_fds=[lst.fileno() for lst in self.listeners], loop=self.loop)
            else:
                argv = workers.python_argv() + ["-m", "fugue._boot"]
                env = workers.worker_env(slot, generation, json.dumps(self.target), child.fileno())
                pid = workers.spawn(argv, env, self.identity, self.cfg.working_path, self.logs.worker_fd,
                                    [], child.fileno(), target=self.target, loop=self.loop)
        finally:
            child.close()
        w = Worker(pid, slot, generation, parent, now, foreign="command" in self.target)
        self.workers[pid] = w
        if w.foreign:
            w.last_beat = float("inf")
            if self.cfg.ready_mode == "notify":
                w.notify = notify_sock
                self.loop.add_reader(notify_sock, lambda: self.on_notify(w))
            else:
                w.ready_at = now + self.cfg.stable_after
        else:
            hello = protocol.encode(protocol.HELLO, worker_id=slot, generation=generation,
                                    name=self.name, options=self._worker_options,
                                    listeners=[lst.describe() for lst in self.listeners])
            try:
                send_with_fds(parent, hello, [lst.fileno() for lst in self.listeners])
            except OSError as e:
                log.error("%s: cannot send the listeners: %s", w, e)
        parent.setblocking(False)
        self.loop.add_reader(parent, lambda: self.on_channel(w))
        log.debug("spawned %s", w)

    def on_channel(self, w):
        """Messages from one worker; EOF is handled by the reap."""
        while True:
            try:
                data, fds = recv_with_fds(w.channel, protocol.MAX_FRAME, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.EMSGSIZE:  # dropped (and its descriptors closed); not EOF
                    log.warning("%s sent a bad message: too large, or too many descriptors", w)
                    continue
                data, fds = b"", []
            for fd in fds:  # workers send no descriptors; never leak one
                os.close(fd)
            if not data:
                self.loop.remove_reader(w.channel)
                return
            try:
                msg = protocol.decode(data)
            except protocol.ProtocolError as e:
                log.warning("%s sent a bad message: %s", w, e)
                continue
            self.handle_worker_message(w, msg)

    def handle_worker_message(self, w, msg):
        kind = msg["type"]
        now = time.monotonic()
        if kind == protocol.READY:
            self.worker_ready(w, now)
        elif kind == protocol.HEARTBEAT:
            w.last_beat = now
            if isinstance(msg.get("stats"), dict):
                w.stats.update(protocol.clean_stats(msg["stats"]))
        elif kind == protocol.FAILED:
            w.reason = str(msg.get("reason"))[:2000]
        elif kind == protocol.DRAINING:
            if w.state in policy.LIVE:
                w.recycling = True
                w.state = WorkerState.DRAINING
                w.stop_deadline = now + self.cfg.graceful_timeout + policy.KILL_MARGIN
                log.info("%s is recycling itself (%s)", w, msg.get("reason"))
        elif kind == protocol.STATS_REPLY:
            if isinstance(msg.get("stats"), dict):
                w.stats.update(protocol.clean_stats(msg["stats"]))
            if self.control is not None:
                self.control.stats_reply(w, msg)
        elif kind == protocol.STATUS_REQUEST:
            if self.control is not None:
                self.control.status_for_worker(w, msg)

    def worker_ready(self, w, now, how=None):
        """READY: a Python worker's message, a foreign one's READY=1 or its stable_after."""
        if w.state is not WorkerState.STARTING:
            return
        w.state = WorkerState.READY
        w.ready_at = None
        if not w.foreign:
            w.last_beat = now
        log.info("%s ready%s", w, f" ({how})" if how else "")

    def on_notify(self, w):
        """sd_notify datagrams from a foreign worker (ready_mode=notify)."""
        messages, dropped = w.notify.read(w.pid)
        if dropped:
            log.warning("%s: dropped %d notify message(s) not from the worker or its children", w, dropped)
        for fields, pid in messages:
            if "STATUS" in fields:
                w.stats["status"] = fields["STATUS"][:200]
            if fields.get("READY") == "1":
                self.worker_ready(w, time.monotonic(), "READY=1")
            if "ERRNO" in fields and w.state is WorkerState.STARTING:
                w.reason = f"ERRNO={fields['ERRNO']}"

    def send(self, w, kind, fds=(), **fields):
        try:
            send_with_fds(w.channel, protocol.encode(kind, **fields), list(fds))
            return True
        except OSError:
            return False

    def stop_worker(self, w, reason, now):
        """Graceful stop: the worker drains; SIGKILL after graceful_timeout."""
        if w.state not in policy.LIVE:
            return
        w.state = WorkerState.DRAINING
        w.stop_deadline = now + self.cfg.graceful_timeout + policy.KILL_MARGIN
        log.info("stopping %s: %s", w, reason)
        if w.foreign:
            self._signal(w, workers.signal_name(self.cfg.stop_signal))
        elif not self.send(w, protocol.STOP, graceful=True, reason=reason):
            self._signal(w, signal.SIGTERM)

    def kill_worker(self, w, reason):
        if w.state is WorkerState.KILLED:
            return
        log.error("killing %s: %s", w, reason)
        if w.state is WorkerState.STARTING and not w.reason:
            w.reason = reason
        was_pending = self.rollout is not None and w.generation == self.rollout.generation
        w.state = WorkerState.KILLED
        self._signal(w, signal.SIGKILL)
        if was_pending:
            self.rollback(f"{w} {reason}")

    def _signal(self, w, signum):
        try:
            os.kill(w.pid, signum)
        except ProcessLookupError:
            pass

    def reap(self):
        for pid, status in workers.reaped():
            if self.upgrade is not None and pid == self.upgrade.pid:
                self.upgrade_exited(status)
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                log.warning("reaped unknown child pid %d (%s)", pid, workers.describe_status(status))
                continue
            self.worker_exited(w, status)

    def worker_exited(self, w, status):
        self.on_channel(w)  # read what it said last (FAILED, stats)
        self.loop.remove_reader(w.channel)
        w.channel.close()
        if w.notify is not None:
            self.on_notify(w)
            self.loop.remove_reader(w.notify)
            w.notify.close()
        now = time.monotonic()
        desc = workers.describe_status(status)
        what = f"{desc}: {w.reason}" if w.reason else desc
        pending = self.rollout is not None and w.generation == self.rollout.generation
        if w.state is WorkerState.DRAINING and (status == 0 or w.recycling or self.stopping):
            log.info("%s stopped (%s)", w, desc)
            return
        if pending and w.state in policy.LIVE:
            log.error("%s %s", w, what)
            self.rollback(f"{w} {what}")
            return
        if w.state is WorkerState.KILLED:
            log.info("%s killed", w)
        elif w.state is WorkerState.DRAINING or self.stopping:
            log.info("%s stopped (%s)", w, what)
            return
        else:
            log.error("%s %s", w, what)
        if self.stopping or w.generation != self.generation:
            return
        failures = policy.next_failures(self.failures.get(w.slot, 0), now - w.started)
        self.failures[w.slot] = failures
        self.restarts[w.slot] = self.restarts.get(w.slot, 0) + 1
        delay = policy.backoff_delay(failures)
        self.not_before[w.slot] = now + delay
        log.info("respawning worker %d in %.2fs (%d consecutive failure%s)",
                 w.slot, delay, failures, "" if failures == 1 else "s")

    # -- reload: rollout, promote, rollback -------------------------------------------

    def begin_rollout(self, source, initial=False, waiter=None):
        """Start a new generation (HUP, fuguectl reload, a watched change, or the start)."""
        why = self.reload_blocker(initial)
        if why:
            raise Refused(f"reload refused: {why}")
        gen = self.last_generation = self.last_generation + 1
        now = time.monotonic()
        self.rollout = Rollout(gen, source, now, initial=initial)
        if waiter:
            self.rollout.waiters.append(waiter)
        if not initial:
            notify.send("RELOADING=1", f"STATUS=reloading: generation {gen}",
                        f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)}")
            log.info("reload (%s): starting generation %d", source, gen)
        else:
            log.info("starting generation %d: %d worker%s", gen, self.target_count,
                     "" if self.target_count == 1 else "s")
        self.failures.clear()
        self.not_before.clear()

    def reload_blocker(self, initial=False):
        """Why a new generation cannot start now, or None. Never more than two generations."""
        if self.stopping or self.drain.stop_at is not None:  # drain_delay: the stop has begun
            return "the master is stopping"
        if self.rollout is not None:
            return f"generation {self.rollout.generation} is still starting"
        if self.upgrade is not None:
            return "an upgrade is in progress"
        if not initial and self.old_master_draining():
            return "the old master is still draining"
        old = sorted({w.generation for w in self.workers.values()
                      if w.state is not WorkerState.STARTING and w.generation != self.generation})
        if old:
            return f"generation {old[0]} is still draining"
        return None

    def promote(self, generation, now):
        rollout, self.rollout = self.rollout, None
        self.generation = generation
        took = now - rollout.started
        text = f"generation {generation} serving ({took:.2f}s)"
        self.last_event = ("start" if rollout.initial else "reload", True, text, time.time())
        log.info("%s: %s", "started" if rollout.initial else "reload done", text)
        for waiter in rollout.waiters:
            waiter(True, text)
        if rollout.initial:
            self.ready_fd = self._tell_launcher(True, str(os.getpid()))
            if self.old_master_draining():
                self.handoff.tell_ready()
            else:
                if self.handoff is not None:  # the old master died while we started: the pid file is ours
                    self.pid_file.write()
                notify.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={text}")
        else:
            notify.send("READY=1", f"STATUS={text}")
        self._reload_from_watch()  # changes seen during the rollout get one more reload

    def rollback(self, reason):
        """Stop the pending generation; the serving one goes on (or, at start, give up)."""
        rollout, self.rollout = self.rollout, None
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.generation != rollout.generation:
                continue
            if w.state is WorkerState.STARTING:
                w.state = WorkerState.KILLED
                self._signal(w, signal.SIGKILL)
            elif w.state is WorkerState.READY:
                self.stop_worker(w, f"generation {rollout.generation} rolled back", now)
        if rollout.initial:
            text = f"start failed: {reason}"
            log.error("%s", text)
            self.last_event = ("start", False, text, time.time())
            # The launcher hears it from shutdown(), once nothing is left behind.
            if self.old_master_draining():  # so `fuguectl upgrade` shows why
                self.handoff.tell_failed(reason)
            for waiter in rollout.waiters:
                waiter(False, text)
            self.exit_status = 1
            self.fatal_reason = reason
            self.begin_stop("quick")
            return
        text = f"reload failed: {reason}; generation {self.generation} keeps serving"
        log.error("%s", text)
        self.last_event = ("reload", False, text, time.time())
        notify.send("READY=1", f"STATUS={text}")
        for waiter in rollout.waiters:
            waiter(False, text)
        self._reload_from_watch()

    def _tell_launcher(self, ok, text):
        from .daemon import tell_launcher

        return tell_launcher(self.ready_fd, ok, text)

    # -- watch mode -------------------------------------------------------------------

    def _on_watch(self):
        changed = self.watcher.take()
        if not changed:
            return
        shown = ", ".join(os.path.relpath(p, self.cfg.start_dir) for p in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        log.info("changed: %s%s", shown, more)
        self.watch_pending = True
        self._reload_from_watch()

    def _watch_deadline(self):
        """A pending watched change reloads once the tree has been quiet for watch_settle."""
        if self.watcher is None or not self.watch_pending or self.rollout is not None:
            return None
        self._reload_from_watch()
        if not self.watch_pending:
            return None
        return time.monotonic() + max(0.01, self.cfg.watch_settle - self.watcher.quiet_for())

    def _reload_from_watch(self):
        if self.watcher is None or not self.watch_pending:
            return
        if self.reload_blocker():
            return  # a reload or a drain is under way: retried when it ends (promote, rollback, reap)
        if self.watcher.quiet_for() < self.cfg.watch_settle:
            return  # files are still changing: _watch_deadline tries again
        self.begin_rollout("watch")
        self.watch_pending = False

    # -- upgrade: USR2 ------------------------------------------------------------------

    def begin_upgrade(self, waiter=None):
        """USR2, fuguectl upgrade: exec a new master that takes the listeners (see fugue.upgrade)."""
        # During drain_delay the stop is decided: an upgrade would undo it.
        why = upgrade.refusal(self.stopping or self.drain.stop_at is not None, self.upgrade is not None,
                              self.rollout is not None, self.old_master_draining())
        if why:
            raise Refused(why)
        self.upgrade = upgrade.begin(self.cfg, self.loop, self.pid_file, self.listeners, self.generation)
        self.upgrade.carry = lambda: {"drained": self.drain.manual}  # fuguectl drain outlives us
        if waiter:
            self.upgrade.waiters.append(waiter)
        self.loop.add_reader(self.upgrade.server, self._on_handoff_connect)

    def _on_handoff_connect(self):
        conn = self.upgrade.accept()
        if conn is not None:
            self.loop.add_reader(conn, self._on_upgrade_message)

    def _on_upgrade_message(self):
        if self.upgrade.read():
            self.step_down()

    @property
    def stepped_down(self):
        """The new master serves: this one drains and exits (and unlinks no listener)."""
        return self.upgrade is not None and self.upgrade.stepped_down

    def step_down(self):
        """The new master is ready: give it the pid file and drain our workers."""
        text = self.upgrade.step_down()
        self.last_event = ("upgrade", True, text, time.time())
        self.begin_stop("graceful", handed_over=True)

    def upgrade_exited(self, status):
        up, self.upgrade = self.upgrade, None
        text = up.exited(status)
        if text is not None:  # failed: the old master (we) goes on as if nothing happened
            self.last_event = ("upgrade", False, text, time.time())
            return
        # The new master died after we handed over: we serve again.
        self.stopping = None
        self.exit_status = 0
        # Our draining workers cannot take up serving again (they closed their listeners; a
        # STOP is never cancelled, a non-graceful one is a quick stop that cut their requests
        # off): they finish what they have and exit, and decide() fills their slots afresh.

    # new master's side ----------------------------------------------------------------

    def old_master_draining(self):
        """New master: the old master may still run (it drains), so no reload or upgrade yet."""
        return self.handoff is not None and self.handoff.old_master_draining

    def _on_handoff_message(self):
        self.handoff.read(self.loop, self.generation, starting=self.rollout is not None)

    # -- signals and commands -------------------------------------------------------------

    def handle_signal(self, signum):
        name = signal.Signals(signum).name
        if signum == signal.SIGCHLD:
            return
        log.debug("signal %s", name)
        if signum in (signal.SIGTERM, signal.SIGQUIT):
            self.begin_stop("graceful")
        elif signum == signal.SIGINT:
            self.begin_stop("quick")
        elif signum == signal.SIGHUP:
            self._refusable(lambda: self.begin_rollout("HUP"))
        elif signum == signal.SIGUSR2:
            self._refusable(self.begin_upgrade)
        elif signum == signal.SIGUSR1:
            self.reopen_logs()
        elif signum == signal.SIGTTIN:
            self.scale(self.target_count + 1)
        elif signum == signal.SIGTTOU:
            self.scale(self.target_count - 1)
        elif signum == signal.SIGWINCH:
            if self.daemonized:
                log.info("WINCH: stopping all workers; the master keeps the sockets (TTIN or HUP to resume)")
                self.scale(0)
            else:
                log.debug("WINCH ignored: not daemonized")

    def _refusable(self, fn):
        """Run a command; a refusal or failure is logged, and the master goes on serving."""
        try:
            fn()
        except Refused as e:
            log.warning("%s", e)
        except FugueError as e:
            log.error("%s", e)
        except Exception:  # noqa: BLE001 - a bug in one command must not take the service down
            log.exception("internal error (please report it); the master goes on")

    def scale(self, count):
        from .config import MAX_WORKERS

        if count > MAX_WORKERS:
            log.warning("workers: staying at %d (at most %d)", self.target_count, MAX_WORKERS)
            return
        count = max(0, count)
        if count != self.target_count:
            log.info("workers: %d -> %d", self.target_count, count)
        self.target_count = count
        for slot in list(self.not_before):
            if slot > count:
                self.not_before.pop(slot, None)

    def reopen_logs(self):
        fd = self.logs.reopen()
        log.info("reopened log files")
        for w in self.workers.values():  # without a new fd the workers still reopen their access logs
            if not w.foreign:
                self.send(w, protocol.REOPEN, fds=[fd] if fd is not None else [])

    def begin_stop(self, how, handed_over=False):
        if self.stopping == "quick" or (self.stopping == how):
            return
        if how == "graceful" and not handed_over and self.drain.hold_stop():
            return  # /healthz says 503 now; the stop begins after drain_delay
        self.stopping = how
        if not handed_over:
            notify.send("STOPPING=1")
            log.info("%s stop", how)
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
        if how == "quick":
            for w in self.workers.values():
                w.state = WorkerState.KILLED
                self._signal(w, signal.SIGKILL)

    # -- exit ------------------------------------------------------------------------------

    def shutdown(self):
        for w in list(self.workers.values()):
            self._signal(w, signal.SIGKILL)
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if self.watcher is not None:
            self.watcher.stop()
        if self.control is not None:
            self.control.close()
        close_listeners(self.listeners, unlink=not self.stepped_down)
        self.pid_file.remove(handed_over=self.stepped_down)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.loop.close()
        log.info("master exiting (status %d)", self.exit_status)
        if self.ready_fd is not None:  # last: the launcher's exit status is the final word
            self.ready_fd = self._tell_launcher(False, getattr(self, "fatal_reason", "the master stopped"))


def sweep_stale(tmp):
    """Remove what masters killed with SIGKILL left in tmp_path: run directories
    (fugue-PID) and handoff directories (fugue-upgrade-PID-*) of our uid whose pid is gone."""
    import re

    from .daemon import alive

    for name in os.listdir(tmp):
        m = re.fullmatch(r"fugue-(?:upgrade-)?(\d+)(?:-.*)?", name)
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))) and (
                st.st_uid == os.getuid() and os.path.isdir(path) and not os.path.islink(path)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by pid %s", path, m.group(1))


def default_name(target):
    """hello.py -> hello; module pkg.app -> pkg.app; a command -> its program's name."""
    if "script" in target:
        return os.path.splitext(os.path.basename(target["script"]))[0]
    if "command" in target:
        return os.path.basename(target["command"][0])
    return target.get("module") or target.get("app") or "fugue"
