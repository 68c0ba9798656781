"""Routed mode: the router's supervision of its apps' masters.

Who calls it: fugue.router, whose Router is the `owner` below. What it
promises: each app has one master (an ordinary fugue master, spawned through
fork_quietly, that dies with the router) reading the app's inbox; it follows
the master's sd_notify lines (READY, RELOADING, MAINPID after a USR2 upgrade,
STATUS), restarts a master that dies after it served (with backoff; its
connections wait in the inbox), removes an app once every master of it has
exited, and asks a master things over its control socket without blocking
the router's loop.

The owner provides: `stopping` and `ready` (attributes), `app_serving(app)`
(an app's master said READY for the first time), `app_failed(app, text)` (an
app's master exited before it ever served; True if the owner gave up and
stops, False to remove the app), `rebuild_table()` (the names an app
claims changed) and `turn_away_waiting(app, why)` (nobody will read what waits
for the app: answer it).
"""

import collections
import logging
import os
import signal
import socket

from . import apps as appconf
from . import policy, protocol
from .errors import Refused
from .fds import connect_unix_path
from .foreign import NotifySocket
from .inbox import inbox_pair
from .system import SYSTEM
from .workers import describe_status, python_argv

log = logging.getLogger("fugue")

ASK_TIMEOUT = 5.0          # status from an app's master
ASK_SLOW_TIMEOUT = 600.0   # reload / upgrade: the app's master answers when it knows


class App:
    """The router's record of one app: its names, inbox, master and counters."""

    def __init__(self, spec, notify_path, now):
        self.spec = spec
        self.name = spec.name
        self.inbox, self.app_end = inbox_pair()   # the router keeps both ends: see fugue.inbox
        self.notify_path = notify_path
        self.notify = NotifySocket(path=notify_path, allowed_uids={0, os.getuid()})
        self.pid = None            # its master now
        self.old_pids = set()      # masters it replaced by USR2, still draining
        self.state = "starting"    # starting, ready, reloading, backoff, stopping, failed
        self.status_text = ""
        self.routed = 0
        self.refused = 0           # 503: the app could take no more
        self.backlog = collections.deque()
        self.started = now
        self.ever_ready = False
        self.failures = 0
        self.restarts = 0
        self.not_before = None
        self.waiters = []          # callables(ok, text): add, restart
        self.removing = None       # callables(ok, text) waiting for its removal, or None
        self.down_since = None     # monotonic time its serving master died; None while it serves
        self.turned_away = False   # down for longer than its ready_timeout: clients get 503 at once

    def ready_timeout(self):
        return float(self.spec.options.get("ready_timeout") or 30.0)

    def __str__(self):
        return f"app {self.name}" + (f" (master pid {self.pid})" if self.pid else "")

    def close(self):
        for sock in (self.inbox, self.app_end, self.notify):
            sock.close()
        for conn, _ in self.backlog:
            conn.close()
        self.backlog.clear()
        try:
            os.unlink(self.notify_path)
        except OSError:
            pass

    def status(self):
        """This app as `fuguectl status` shows it (its master's own status is added by the router)."""
        return {"hostnames": list(self.spec.hostnames), "master_pid": self.pid, "state": self.state,
                "status_text": self.status_text, "routed": self.routed, "held": len(self.backlog),
                "refused_503": self.refused, "master_restarts": self.restarts,
                "target": self.spec.target}


class AppMasters:
    """The apps, by name, and their masters."""

    def __init__(self, owner, cfg, run_dir, loop, system=SYSTEM):
        self.owner = owner
        self.cfg = cfg
        self.run_dir = run_dir
        self.loop = loop
        self.system = system
        self.apps = {}
        self.asks = {}                     # sock -> (deadline, callback)
        self.notify_seq = 0

    def __iter__(self):
        return iter(list(self.apps.values()))

    def get(self, name):
        return self.apps.get(name)

    # -- starting --------------------------------------------------------------------------

    def add(self, spec, waiter=None):
        """A new app: its inbox, its notify socket, its master."""
        self.notify_seq += 1
        app = App(spec, os.path.join(self.run_dir, f"notify-{self.notify_seq}.sock"), self.system.monotonic())
        self.apps[spec.name] = app
        self.loop.add_reader(app.notify, lambda: self.on_notify(app))
        if waiter:
            app.waiters.append(waiter)
        self.owner.rebuild_table()
        self.spawn(app)
        return app

    def spawn(self, app):
        """Start (or restart) the app's master: `python -m fugue._appboot` on the app's inbox."""
        fd = app.app_end.fileno()
        env = appconf.app_master_env(app.spec, fd, self.cfg.start_dir, app.notify_path)
        argv = python_argv() + ["-m", "fugue._appboot"]

        def prepare():  # in the child, before exec
            os.set_inheritable(fd, True)
            # If the router dies, its apps stop (their inboxes would never receive again)
            # instead of running on unseen.
            self.system.die_with_parent(signal.SIGTERM)

        app.pid = self.system.spawn(argv, env, self.cfg.start_dir, self.loop, prepare)
        app.state = "starting"
        app.started = self.system.monotonic()
        log.info("%s: starting its master", app)

    def respawn_due(self, now):
        """Restart the masters whose backoff is over; returns the next such time, or None."""
        for app in self:
            if app.state == "backoff" and app.not_before <= now:
                self.spawn(app)
        return min((app.not_before for app in self if app.state == "backoff"), default=None)

    # -- what app masters say ----------------------------------------------------------------

    def on_notify(self, app):
        """sd_notify lines from the app's master (or a new master of it, after USR2)."""
        messages, _ = app.notify.read()  # others' datagrams are dropped (SCM_CREDENTIALS)
        for fields, _ in messages:
            self.app_says(app, fields)

    def app_says(self, app, fields):
        if "STATUS" in fields:
            app.status_text = fields["STATUS"]
        mainpid = fields.get("MAINPID", "")
        if mainpid.isdigit() and int(mainpid) != app.pid and app.pid is not None:
            log.info("%s: its master is now pid %s (upgraded)", app, mainpid)
            app.old_pids.add(app.pid)
            app.pid = int(mainpid)
        if fields.get("RELOADING") == "1" and app.state == "ready":
            app.state = "reloading"
        if fields.get("READY") == "1" and app.state in ("starting", "reloading"):
            first = app.state == "starting"
            app.state = "ready"
            app.ever_ready = True
            if app.down_since is not None:
                log.info("%s serving again after %.1fs", app, self.system.monotonic() - app.down_since)
            app.down_since = None
            app.turned_away = False
            if first:
                log.info("%s ready: %s", app, app.status_text)
                for waiter in app.waiters:
                    waiter(True, f"app {app.name} serving: {app.status_text}")
                app.waiters = []
                self.owner.app_serving(app)

    # -- exits -----------------------------------------------------------------------------------

    def reaped(self, pid, status):
        """A child of the router exited: True if it was an app's master (now accounted for)."""
        app = next((a for a in self if a.pid == pid), None)
        if app is not None:
            self.master_exited(app, status)
            return True
        old = next((a for a in self if pid in a.old_pids), None)
        if old is not None:
            old.old_pids.discard(pid)
            log.info("%s: its old master pid %d exited", old, pid)
            self.maybe_remove(old)
            return True
        return False

    def master_exited(self, app, status):
        desc = describe_status(status)
        app.pid = None
        reason = app.status_text if app.status_text.startswith("start failed") else ""
        if app.removing is not None or self.owner.stopping:
            log.info("app %s: its master %s", app.name, desc)
            app.state = "stopped"
            self.maybe_remove(app)
            return
        if not app.ever_ready:
            text = f"app {app.name} failed to start: its master {desc}" + (f" ({reason})" if reason else "")
            log.error("%s", text)
            for waiter in app.waiters:
                waiter(False, text)
            app.waiters = []
            if not self.owner.app_failed(app, text):  # `add` at run time: it never served, take it away again
                app.removing = []
                self.owner.rebuild_table()
                self.maybe_remove(app)
            return
        now = self.system.monotonic()
        app.failures = policy.next_failures(app.failures, now - app.started)
        app.restarts += 1
        delay = policy.backoff_delay(app.failures)
        app.state = "backoff"
        app.not_before = now + delay
        if app.down_since is None:
            app.down_since = now
        log.error("app %s: its master %s; restarting it in %.2fs (connections wait in its inbox)",
                  app.name, desc, delay)

    # -- removing and stopping -----------------------------------------------------------------

    def begin_remove(self, name, waiter=None):
        """Mark the app as going (Refused if there is none, or it is going already); the
        caller stops routing to it, then calls stop_removed."""
        app = self.apps.get(name)
        if app is None:
            raise Refused(f"remove: no app {name!r}")
        if app.removing is not None:
            raise Refused(f"remove: app {name!r} is already being removed")
        app.removing = [waiter] if waiter else []
        return app

    def stop_removed(self, app):
        self.signal(app, signal.SIGQUIT)
        if app.state == "backoff":
            app.state = "stopped"
        self.maybe_remove(app)

    def maybe_remove(self, app):
        if app.removing is None or app.pid or app.old_pids:
            return
        if self.apps.get(app.name) is app:
            del self.apps[app.name]
        self.loop.remove_reader(app.notify)
        self.owner.turn_away_waiting(app, f"app {app.name} was removed")  # what its workers did not take
        app.close()
        log.info("app %s removed", app.name)
        for waiter in app.removing:
            waiter(True, f"app {app.name} removed")
        app.removing = []

    def signal(self, app, signum):
        """Signal the app's master and the old ones still draining."""
        for pid in [app.pid, *app.old_pids]:
            if pid:
                self.system.kill(pid, signum)

    def stop(self, how):
        """The router stops: quick at once (SIGINT); graceful once nothing waits to be routed (QUIT)."""
        for app in self:
            if how == "quick":
                self.signal(app, signal.SIGINT)
                if app.state == "backoff":
                    app.state = "stopped"
            elif app.state not in ("stopping", "stopped"):
                if app.state == "backoff":
                    app.state = "stopped"
                    continue
                app.state = "stopping"
                self.signal(app, signal.SIGQUIT)

    def running(self):
        """True while any app's master (or an old one) still runs."""
        return any(app.pid or app.old_pids for app in self)

    def close(self):
        """At the router's exit: every master is killed, every socket closed."""
        for app in self:
            self.signal(app, signal.SIGKILL)
            app.close()
        for sock in list(self.asks):
            sock.close()

    # -- asking an app's master over its control socket, without blocking the loop ---------------

    def reload(self, app, waiter):
        if app.pid is None or app.state in ("starting", "backoff"):
            waiter(False, f"app {app.name} is not serving yet ({app.state})")
            return
        self.ask(app, "reload", {}, lambda ok, text, data: waiter(ok, text), ASK_SLOW_TIMEOUT)

    def ask(self, app, cmd, fields, callback, timeout):
        """Send `cmd` to the app's master; callback(ok, text, data) with its reply, or why none came."""
        path = os.path.join(app.spec.options.get("tmp_path") or self.cfg.path("tmp_path"),
                            f"fugue-{app.pid}", "control.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            connect_unix_path(sock, path)
            sock.send(protocol.encode("cmd", cmd=cmd, **fields))
        except OSError as e:
            sock.close()
            callback(False, f"app {app.name}: its master does not answer ({e.strerror})", None)
            return
        self.asks[sock] = (self.system.monotonic() + timeout, callback)
        self.loop.add_reader(sock, lambda: self.on_answer(sock))

    def on_answer(self, sock):
        try:
            data = sock.recv(protocol.MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            msg = protocol.decode(data)
        except protocol.ProtocolError:
            self.end_ask(sock, False, "the app's master closed the connection without a reply", None)
            return
        self.end_ask(sock, bool(msg.get("ok")), str(msg.get("text")), msg.get("data"))

    def end_ask(self, sock, ok, text, data):
        entry = self.asks.pop(sock, None)
        self.loop.remove_reader(sock)
        sock.close()
        if entry:
            entry[1](ok, text, data)

    def expire_asks(self, now):
        """Give up on masters that did not answer in time; returns the next such deadline, or None."""
        for sock, (deadline, _) in list(self.asks.items()):
            if deadline <= now:
                self.end_ask(sock, False, "the app's master did not answer in time", None)
        return min((d for d, _ in self.asks.values()), default=None)


def become_subreaper(system=SYSTEM):
    # An app master upgraded by USR2 is the child of the old one; when the old
    # one exits, the new one must become ours to reap, not init's.
    why = system.become_subreaper()
    if why:
        log.warning("cannot become a child subreaper (%s); an app master upgraded by USR2 will not be reaped",
                    why)
