"""The worker pool: the slots 1..N, the worker process in each, and its channel.

Who calls it: fugue.master (the wiring), which asks policy.decide what to do
and tells the pool to do it. What it promises: it spawns (fork + exec through
fugue.workers), reads the channels, marks READY, stops, kills, and does the
bookkeeping of exits (backoff before a slot is filled again, restarts). It
never decides a rollout: a worker exit or kill that matters to one is
returned to the caller, who rolls back. Every OS call goes through `system`
(fugue.system), so the transitions can be driven from a table.
"""

import errno
import json
import logging
import os
import shutil
import signal
import time

from . import policy, protocol, workers
from .config import MAX_WORKERS
from .fds import recv_with_fds, send_with_fds
from .foreign import NotifySocket, StderrTail
from .leftovers import Leftovers
from .molds import Molds
from .policy import WorkerState
from .system import SYSTEM

log = logging.getLogger("fugue")


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
        self.stderr = None          # foreign: its stderr through the master (foreign.StderrTail)
        self.script_options = None  # what its code's fugue.start asked for (READY), if it said
        self.mold = None            # preload: the pid of the mold it was forked from

    def view(self):
        return policy.WorkerView(self.pid, self.slot, self.generation, self.state,
                                 self.started, self.last_beat, self.stop_deadline, self.ready_at)

    def __str__(self):
        return f"worker {self.slot} (pid {self.pid}, generation {self.generation})"


class Pool:
    """The workers of one master, by pid, and the per-slot backoff.

    `on_request(w, msg)` gets the messages that are the control socket's
    business (STATS_REPLY, STATUS_REQUEST).
    """

    def __init__(self, cfg, target, identity, logs, listeners, loop, name, on_request, system=SYSTEM):
        self.cfg = cfg
        self.target = target
        self.identity = identity
        self.logs = logs
        self.listeners = listeners
        self.loop = loop
        self.name = name
        self.on_request = on_request
        self.system = system
        self.workers = {}               # pid -> Worker
        self.target_count = cfg.workers
        self.failures = {}              # slot -> consecutive early deaths
        self.not_before = {}            # slot -> earliest respawn (monotonic)
        self.restarts = {}              # slot -> respawns after unexpected exits
        self.leftovers = Leftovers(cfg.graceful_timeout)  # exited workers' process groups (fugue.leftovers)
        self.molds = None               # preload (fugue.molds), made by reconfigure
        self.reconfigure(cfg, target)

    def reconfigure(self, cfg, target):
        """The options and target the next workers get (a reload read them again)."""
        self.cfg = cfg
        self.target = target
        self.leftovers.grace = cfg.graceful_timeout
        public = cfg.public()
        self.worker_options = {k: v for k, v in public.items()
                               if isinstance(v, (str, int, float, bool, list, type(None)))}
        if self.molds is None:
            self.molds = Molds(cfg, target, self.name, self.worker_options, self.identity, self.logs,
                               self.listeners, self.loop)
        else:
            self.molds.reconfigure(cfg, target, self.worker_options)

    def views(self):
        return tuple(w.view() for w in self.workers.values())

    def get(self, pid):
        return self.workers.get(pid)

    # -- spawning ----------------------------------------------------------------------

    def spawn(self, slot, generation, now):
        """Fork and exec the worker of `slot` for `generation`; send it HELLO and the listeners.

        With preload the generation's mold takes the spawn instead (None is returned): it is
        forked by `fork_queued` at the end of the pass, or held until the mold is ready.
        """
        if self.molds.take_spawn(slot, generation):
            return None
        parent, child = workers.channel_pair()
        notify_sock = tail = None
        try:
            if "command" in self.target:
                argv = list(self.target["command"])
                argv[0] = shutil.which(argv[0]) or argv[0]
                env = workers.worker_env(slot, generation)
                env["LISTEN_FDNAMES"] = ":".join(lst.name for lst in self.listeners)
                if self.cfg.ready_mode == "notify":
                    uid = self.identity.uid if self.identity.uid is not None else os.getuid()
                    notify_sock = NotifySocket(slot, generation, {0, uid, os.getuid()})
                    env["NOTIFY_SOCKET"] = notify_sock.address
                tail = StderrTail(self.logs.worker_fd)
                try:
                    pid = self.system.spawn_worker(argv, env, self.identity, self.cfg.working_path,
                                                   self.logs.worker_fd, child.fileno(), target=None,
                                                   foreign_fds=[lst.fileno() for lst in self.listeners],
                                                   loop=self.loop, stderr_fd=tail.write_fd)
                except BaseException:
                    tail.close()
                    raise
                tail.child_started()
            else:
                argv = workers.python_argv() + ["-m", "fugue._boot"]
                env = workers.worker_env(slot, generation, json.dumps(self.target), child.fileno())
                pid = self.system.spawn_worker(argv, env, self.identity, self.cfg.working_path,
                                               self.logs.worker_fd, child.fileno(), target=self.target,
                                               loop=self.loop)
        except OSError:  # EMFILE, ENFILE, EAGAIN from fork: the caller's worker failure (spawn_failed)
            parent.close()
            if notify_sock is not None:
                notify_sock.close()
            raise
        finally:
            child.close()
        return self.add(pid, slot, generation, parent, now, notify_sock=notify_sock, stderr_tail=tail)

    def fork_queued(self, now, wanted, pending, rollback):
        """End of a decide pass: fork the spawns the molds took, one round trip per mold
        (fugue.molds.Molds.fork_queued says what `wanted`, `pending` and `rollback` are)."""
        self.molds.fork_queued(now, wanted, lambda pid, slot, generation, parent, now, mold: self.add(
            pid, slot, generation, parent, now, forked_from=mold), self.spawn, rollback, pending)

    def add(self, pid, slot, generation, parent, now, forked_from=None, notify_sock=None, stderr_tail=None):
        """Record a worker just spawned (or forked from a mold), send it HELLO and the listeners,
        read its channel."""
        w = Worker(pid, slot, generation, parent, now, foreign="command" in self.target)
        w.mold = forked_from
        if w.foreign:
            w.stderr = stderr_tail
            self.loop.add_reader(stderr_tail, lambda: self._on_stderr(w))
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
                                    name=self.name, options=self.worker_options,
                                    listeners=[lst.describe() for lst in self.listeners])
            try:
                send_with_fds(parent, hello, [lst.fileno() for lst in self.listeners])
            except OSError as e:
                log.error("%s: cannot send the listeners: %s", w, e)
        parent.setblocking(False)
        self.loop.add_reader(parent, lambda: self.on_channel(w))
        log.debug("spawned %s%s", w, f" (forked from mold pid {forked_from})" if forked_from else "")
        return w

    # -- what workers say ----------------------------------------------------------------

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
            self.handle_message(w, msg)

    def handle_message(self, w, msg):
        kind = msg["type"]
        now = self.system.monotonic()
        if kind == protocol.READY:
            if isinstance(msg.get("script"), dict):
                w.script_options = msg["script"]
            self.ready(w, now)
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
            self.on_request(w, msg)
        elif kind == protocol.STATUS_REQUEST:
            self.on_request(w, msg)

    def ready(self, w, now, how=None):
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
                self.ready(w, self.system.monotonic(), "READY=1")
            if "ERRNO" in fields and w.state is WorkerState.STARTING:
                w.reason = f"ERRNO={fields['ERRNO']}"

    # -- telling workers -------------------------------------------------------------------

    def send(self, w, kind, fds=(), **fields):
        """One message on the worker's channel; False if it could not be sent."""
        try:
            send_with_fds(w.channel, protocol.encode(kind, **fields), list(fds))
            return True
        except OSError:
            return False

    def stop(self, w, reason, now):
        """Graceful stop: the worker drains; SIGKILL after graceful_timeout."""
        if w.state not in policy.LIVE:
            return
        w.state = WorkerState.DRAINING
        w.stop_deadline = now + self.cfg.graceful_timeout + policy.KILL_MARGIN
        log.info("stopping %s: %s", w, reason)
        if w.foreign:
            self.signal(w, workers.signal_name(self.cfg.stop_signal))
        elif not self.send(w, protocol.STOP, graceful=True, reason=reason):
            self.signal(w, signal.SIGTERM)

    def kill(self, w, reason):
        """SIGKILL (a hung or late worker); True if it was not killed already."""
        if w.state is WorkerState.KILLED:
            return False
        log.error("killing %s: %s", w, reason)
        if w.state is WorkerState.STARTING and not w.reason:
            w.reason = reason
        w.state = WorkerState.KILLED
        self.signal(w, signal.SIGKILL)
        return True

    def signal(self, w, signum):
        self.system.kill(w.pid, signum)

    def stop_generation(self, generation, why, now):
        """A rollback: the generation's starting workers are killed, its ready ones drain."""
        for w in list(self.workers.values()):
            if w.generation != generation:
                continue
            if w.state is WorkerState.STARTING:
                w.state = WorkerState.KILLED
                self.signal(w, signal.SIGKILL)
            elif w.state is WorkerState.READY:
                self.stop(w, why, now)

    def kill_all(self):
        """Quick stop: every worker is killed now."""
        for w in self.workers.values():
            w.state = WorkerState.KILLED
            self.signal(w, signal.SIGKILL)

    def reopen_logs(self, fd):
        """USR1: the workers get the new log descriptor (they cannot open the file themselves);
        without one (fd None) they still reopen their access logs."""
        for w in self.workers.values():
            if not w.foreign:
                self.send(w, protocol.REOPEN, fds=[fd] if fd is not None else [])
        self.molds.reopen_logs(fd)

    # -- counts and backoff ------------------------------------------------------------------

    def scale(self, count):
        """TTIN, TTOU, WINCH, fuguectl scale: the number of slots."""
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

    def forget_backoff(self):
        """A new generation starts with no failures counted against its slots."""
        self.failures.clear()
        self.not_before.clear()

    def draining_generations(self, serving):
        """Generations other than `serving` whose workers were READY and still run (draining)."""
        return sorted({w.generation for w in self.workers.values()
                       if w.state is not WorkerState.STARTING and w.generation != serving})

    # -- exits ---------------------------------------------------------------------------------

    def pop(self, pid):
        """The reaped worker `pid`, no longer in the pool; None if it is not one of ours."""
        return self.workers.pop(pid, None)

    def _on_stderr(self, w):
        if not w.stderr.read():  # EOF (the program and its children closed it)
            self.loop.remove_reader(w.stderr)

    def exited(self, w, status, pending, serving, stopping):
        """Bookkeeping of a reaped worker. Returns the failure ('worker 2 (pid ..) exited
        with status 1: reason') if it was a live worker of the `pending` generation (the
        caller rolls back), else None; a serving worker's slot is refilled after a backoff."""
        self.leftovers.worker_exited(w.pid, self.system.monotonic())  # what it forked goes too
        self.on_channel(w)  # read what it said last (FAILED, stats)
        self.loop.remove_reader(w.channel)
        w.channel.close()
        if w.notify is not None:
            self.on_notify(w)
            self.loop.remove_reader(w.notify)
            w.notify.close()
        if w.stderr is not None:
            w.stderr.read()
            self.loop.remove_reader(w.stderr)
            last = w.stderr.last_line()
            w.stderr.close()
            if last and w.state is WorkerState.STARTING and not w.reason:
                w.reason = f"last stderr line: {last}"
        now = self.system.monotonic()
        desc = workers.describe_status(status)
        what = f"{desc}: {w.reason}" if w.reason else desc
        if w.state is WorkerState.DRAINING and (status == 0 or w.recycling or stopping):
            log.info("%s stopped (%s)", w, desc)
            return None
        if w.generation == pending and w.state in policy.LIVE:
            log.error("%s %s", w, what)
            return f"{w} {what}"
        if w.state is WorkerState.KILLED:
            log.info("%s killed", w)
        elif w.state is WorkerState.DRAINING or stopping:
            log.info("%s stopped (%s)", w, what)
            return None
        else:
            log.error("%s %s", w, what)
        if stopping or w.generation != serving:
            return None
        failures = policy.next_failures(self.failures.get(w.slot, 0), now - w.started)
        self.failures[w.slot] = failures
        self.restarts[w.slot] = self.restarts.get(w.slot, 0) + 1
        delay = policy.backoff_delay(failures)
        self.not_before[w.slot] = now + delay
        log.info("respawning worker %d in %.2fs (%d consecutive failure%s)",
                 w.slot, delay, failures, "" if failures == 1 else "s")
        return None

    def spawn_failed(self, slot, generation, now, error):
        """A spawn the system refused (Pool.spawn raised OSError): one line naming the limit,
        and the slot backs off as after an early death. Returns the failure text; the caller
        rolls back if `generation` is the pending one."""
        from .limits import describe_spawn_error

        text = f"cannot spawn worker {slot}: {describe_spawn_error(error)}"
        log.error("%s (generation %d)", text, generation)
        failures = policy.next_failures(self.failures.get(slot, 0), 0.0)
        self.failures[slot] = failures
        self.not_before[slot] = now + policy.backoff_delay(failures)
        return text

    def shutdown(self):
        """At the master's exit: kill what is left and wait for it (nothing outlives the master),
        and what the workers left in their process groups (TERM, KILL after graceful_timeout)."""
        for w in list(self.workers.values()):
            self.signal(w, signal.SIGKILL)
        for pid in list(self.workers) + self.molds.kill_all():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.leftovers.worker_exited(pid, self.system.monotonic())
        self.leftovers.finish()
