"""Routed mode: several apps on one port, by Host header and TLS SNI, without a proxy.

    python -m fugue.router -c apps.toml          (fuguectl start -c apps.toml)

Who calls it: fugue.routed (start), which builds a Router, calls setup() and
run(). What it promises: the router owns the public listeners, the pid file
and the control socket (fugue.shell, as a master does) and routes; supervising
the apps' masters is fugue.appmasters.

Processes:

    router (owns the public listeners, pid file, control socket; a subreaper)
     ├── master of app A  (an ordinary fugue master; its one listener is A's inbox)
     │    └── workers      (read A's inbox like a listener: fugue.inbox.Inbox)
     └── master of app B ...

The router accepts each connection, peeks at its first bytes (MSG_PEEK: it
never consumes one: fugue.sniffing) until `fugue.sniff` names the host, and sends the
connection itself over the app's inbox (SCM_RIGHTS) to whichever of that
app's workers reads it first. The worker talks to the client directly: its
real address, no extra hop for the bytes, and a keep-alive connection stays
with the worker that got it. A reload of app A is A's master's business
(its own HUP, rollout and rollback); B never notices.

A connection that names no host within `sniff_timeout`, or sends
`sniff_max_bytes` without one, is closed (slowloris); an unknown host gets
`421 Misdirected Request` (HTTP) or is closed (TLS); both are counted.

One selectors loop, no threads (fugue.shell): signals -> reap -> expire ->
wait. App masters report READY / RELOADING / MAINPID on a per-app notify
socket (sd_notify lines), so the router knows when an app is serving and
follows a USR2 upgrade of an app's master (the new master is reparented to the
router, a subreaper).
"""

import collections
import errno
import logging
import os
import signal
import socket
import sys

from . import apps as appconf
from .appmasters import AppMasters, become_subreaper
from .errors import FugueError
from .fds import close_listeners
from .inbox import send_connection, take_back
from .routecontrol import RouterControl
from .shell import Shell
from .sniff import HostTable
from .sniffing import Conn, Sniffing
from .system import SYSTEM
from .workers import describe_status

log = logging.getLogger("fugue")

SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGCHLD)
ACCEPT_BATCH = 64          # accepts per wakeup, so one busy listener cannot starve the rest
ACCEPT_PAUSE = 0.1         # out of descriptors, nothing to shed: stop accepting this long, not spin
SHORTAGE_REPORT = 10.0     # at most one log line per this many seconds about shortages
BACKLOG_RETRY = 0.005      # an app's inbox was full: try again this soon
_MISS = object()


class Router(Shell):
    """The router process: listeners, sniffing, routing, and the owner of the AppMasters."""

    SIGNALS = SIGNALS
    Control = RouterControl
    role = "router"
    stopped_text = "stopped"

    def __init__(self, rc, listeners, logs, hook=None, ready_fd=None, daemonized=False, system=SYSTEM):
        super().__init__(rc.cfg, listeners, logs, ready_fd=ready_fd, daemonized=daemonized, system=system)
        self.rc = rc
        self.masters = AppMasters(self, self.cfg, None, self.loop, system=system)
        self.apps = self.masters.apps      # name -> appmasters.App
        self.table = rc.host_table()
        self.lookup = {}
        self.max_sniffing = rc.router["sniff_max_conns"]
        self.default_app = rc.router["default_app"]
        self.hook = hook                   # the route option, loaded: (host, sni, peer) -> app name
        self.accept_paused_until = None    # out of descriptors: accepting resumes then
        self.shortage = {"accept": 0, "overflow": 0, "said": float("-inf")}  # since the last report
        self.counters = collections.Counter()
        # connections naming their host, or refused and lingering (fugue.sniffing)
        self.sniff = Sniffing(self.loop, system, self.counters, rc.router["sniff_timeout"],
                              rc.router["sniff_max_bytes"], on_named=self.route)
        self.ready = False
        self.started = system.monotonic()

    # -- setup ----------------------------------------------------------------------

    def setup(self):
        """Run directory, pid file, control socket (fugue.shell); then the listeners."""
        self.setup_shell(f"fugue master router {os.path.basename(self.rc.path)}")
        self.masters.run_dir = self.run_dir
        become_subreaper(self.system)
        for lst in self.listeners:
            lst.sock.setblocking(False)
            self.loop.add_reader(lst.sock, lambda lst=lst: self.on_accept(lst))

    # -- the loop (see Shell.run) -------------------------------------------------------

    def begin(self):
        for spec in self.rc.apps.values():
            self.masters.add(spec)

    def step(self):
        """Expire what is due; returns the next deadline."""
        now = self.system.monotonic()
        self.resume_accepting(now)
        self.sniff.step(now)
        for app in self.masters:
            if app.down_since is not None and not app.turned_away and app.removing is None:
                if now >= app.down_since + app.ready_timeout():
                    app.turned_away = True
                    log.error("app %s: not serving again within ready_timeout %gs; clients get 503 until it does",
                              app.name, app.ready_timeout())
                    self.turn_away_waiting(app, self.down_text(app))
            if app.backlog:
                self.flush_backlog(app)
        deadlines = [self.masters.respawn_due(now), self.masters.expire_asks(now)]
        deadlines += [app.down_since + app.ready_timeout() for app in self.masters
                      if app.down_since is not None and not app.turned_away and app.removing is None]
        if self.stopping == "graceful":
            self.stop_apps_when_idle()
        deadlines.append(self.sniff.deadline(now))
        deadlines.append(self.accept_paused_until)
        if any(app.backlog for app in self.masters):
            deadlines.append(now + BACKLOG_RETRY)
        deadlines.append(self.control.deadline() if self.control is not None else None)
        return min((d for d in deadlines if d is not None), default=None)

    def finished(self):
        return self.stopping is not None and not self.masters.running() and not self.sniff.conns

    def reap(self):
        for pid, status in self.system.reaped():
            if not self.masters.reaped(pid, status):
                log.info("reaped pid %d (%s): an orphan of an app's master", pid, describe_status(status))

    # -- connections: accept, peek, route -----------------------------------------------

    def on_accept(self, lst):
        for _ in range(ACCEPT_BATCH):
            if len(self.sniff.sniffing) >= self.max_sniffing:
                # Slowloris: connections that never name their host would hold every
                # descriptor. The oldest goes: a real client names its host at once.
                self.counters["sniff_overflow"] += 1
                self.shortage["overflow"] += 1
                self.sniff.close(next(iter(self.sniff.sniffing.values())))
                self.report_shortage()
            try:
                sock, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.counters["accept_errors"] += 1
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.debug("accept on %s: %s", lst.describe()["address"], e.strerror)
                    return  # ECONNABORTED and the like: that client only
                if self.shed_for_descriptors(e):
                    continue
                return
            self.counters["accepted"] += 1
            # The socket stays blocking (the worker gets it as accept() would give it):
            # the router only ever uses MSG_DONTWAIT on it.
            conn = Conn(sock, peer, sock.family != socket.AF_UNIX, self.sniff.deadline_of_new())
            self.sniff.peek(conn)

    def shed_for_descriptors(self, e):
        """Out of descriptors: close the oldest connection still naming its host and return
        True (accept again: a real client names its host at once, a slowloris never); with
        none to close, stop accepting for ACCEPT_PAUSE (the listen backlog holds new clients
        meanwhile) and return False. A level-triggered listener would spin otherwise. Said
        once per SHORTAGE_REPORT, with a count."""
        self.shortage["accept"] += 1
        self.shortage["why"] = e.strerror
        self.report_shortage()
        if self.sniff.sniffing:
            self.counters["sniff_overflow"] += 1
            self.sniff.close(next(iter(self.sniff.sniffing.values())))
            return True
        if self.accept_paused_until is None:
            for lst in self.listeners:
                self.loop.remove_reader(lst.sock)
        self.accept_paused_until = self.system.monotonic() + ACCEPT_PAUSE
        return False

    def resume_accepting(self, now):
        if self.accept_paused_until is not None and self.accept_paused_until <= now and self.stopping is None:
            self.accept_paused_until = None
            for lst in self.listeners:
                self.loop.add_reader(lst.sock, lambda lst=lst: self.on_accept(lst))

    def report_shortage(self):
        sh = self.shortage
        now = self.system.monotonic()
        if now - sh["said"] < SHORTAGE_REPORT:
            return
        if sh["accept"]:
            log.warning("descriptor shortage: accept failed %d time(s) (%s); the oldest connection still "
                        "naming its host closed each time, or accepting paused %gs; %d sniffing now "
                        "(sniff_max_conns %d)", sh["accept"], sh.get("why"), ACCEPT_PAUSE,
                        len(self.sniff.sniffing), self.max_sniffing)
        if sh["overflow"]:
            log.warning("sniff_max_conns (%d) reached: closed the oldest connection still naming its host "
                        "%d time(s)", self.max_sniffing, sh["overflow"])
        sh.update(accept=0, overflow=0, said=now)

    def route(self, conn, kind, name):
        choice = None
        if self.hook is not None:
            try:
                choice = self.hook(name if kind == "http" else None, name if kind == "tls" else None,
                                   conn.peer)
            except Exception:  # noqa: BLE001 - a broken hook must not take the router down
                self.counters["hook_errors"] += 1
                log.exception("route hook failed for %r", name)
        if choice is None:
            choice = self.lookup.get(name, _MISS)
            if choice is _MISS:
                choice = self.lookup[name] = self.table.lookup(name)
                if len(self.lookup) > 4096:  # names are the client's to choose: bound the cache
                    self.lookup.clear()
        if choice is None:
            choice = self.default_app
        app = self.apps.get(choice)
        if app is None or app.removing is not None:
            if kind == "http":
                self.counters["unknown_host"] += 1
                self.sniff.refuse(conn, 421, f"no app here serves {name!r}")
            else:
                self.counters["unknown_sni"] += 1
                self.sniff.close(conn)
            return
        self.sniff.unwatch(conn)
        self.sniff.forget(conn)
        if conn.lowat:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        info = {"peer": conn.peer, "host": name, "via": kind}
        if app.turned_away:
            self.unavailable(app, conn.sock, info, self.down_text(app))
        elif app.backlog:
            self.hold(app, conn.sock, info)
        else:
            self.deliver(app, conn.sock, info)

    def deliver(self, app, sock, info):
        """Send one connection into the app's inbox; True if it went (or was answered)."""
        try:
            send_connection(app.inbox, sock.fileno(), info)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            log.error("%s: cannot pass a connection: %s", app, e)
            self.unavailable(app, sock, info)
            return True
        app.routed += 1
        sock.close()
        return True

    def hold(self, app, sock, info):
        if len(app.backlog) >= self.rc.router["app_backlog"]:
            self.unavailable(app, sock, info)
        else:
            app.backlog.append((sock, info))

    def flush_backlog(self, app):
        while app.backlog:
            sock, info = app.backlog[0]
            if not self.deliver(app, sock, info):
                return
            app.backlog.popleft()

    def unavailable(self, app, sock, info, why=None):
        app.refused += 1
        self.counters["unavailable"] += 1
        conn = Conn(sock, info.get("peer"), sock.family != socket.AF_UNIX, 0)
        if info.get("via") == "http":
            self.sniff.refuse(conn, 503, why or f"app {app.name} cannot take more connections now")
        else:
            sock.close()

    def turn_away_waiting(self, app, why):
        """Answer every connection held for `app` or waiting in its inbox: 503 (HTTP) or close
        (TLS). Called when nobody will read them: the app stayed down past its ready_timeout,
        or it is removed. Never leaves a client hanging on a connection we accepted."""
        waiting = list(app.backlog) + take_back(app.app_end)
        app.backlog.clear()
        for sock, info in waiting:
            self.unavailable(app, sock, info, why)
        if waiting:
            log.warning("app %s: answered %d waiting connection(s): %s", app.name, len(waiting), why)

    def down_text(self, app):
        return f"app {app.name} is not running (its master could not be restarted)"

    # -- apps (their masters: fugue.appmasters) --------------------------------------------

    def rebuild_table(self):
        self.table = HostTable({name: list(app.spec.hostnames) for name, app in self.apps.items()
                                if app.removing is None})
        self.lookup = {}  # name as sniffed -> app name, or None

    def app_serving(self, app):
        """AppMasters: an app's master said READY for the first time; once all have, we serve."""
        if self.ready or any(not a.ever_ready for a in self.masters):
            return
        self.ready = True
        text = f"router serving {len(self.apps)} app{'s' if len(self.apps) != 1 else ''}: " + ", ".join(
            f"{a.name} ({', '.join(a.spec.hostnames)})" for a in self.masters)
        log.info("%s", text)
        self.tell_launcher(True, str(os.getpid()))
        self.system.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={text}")

    def app_failed(self, app, text):
        """AppMasters: an app's master exited before it served. At start the router gives up
        (True); an app added at run time is taken away again (False)."""
        if self.ready:
            return False
        self.exit_status = 1
        self.fatal_reason = text
        self.tell_launcher(False, text)
        self.begin_stop("quick")
        return True

    def remove_app(self, name, waiter=None):
        app = self.masters.begin_remove(name, waiter)
        self.rebuild_table()  # new connections for its names get 421 from now on
        log.info("removing app %s: stopping its master", name)
        for conn, info in list(app.backlog):
            self.unavailable(app, conn, info, f"app {app.name} is being removed")
        app.backlog.clear()
        self.masters.stop_removed(app)

    # -- signals (SIGNAL_COMMANDS in fugue.shell), stop ------------------------------------

    def on_reload(self):
        self.reread()

    def on_reopen_logs(self):
        """USR1, fuguectl reopen-logs: None if done, else why the router's were refused (the
        apps' masters reopen theirs either way)."""
        self.logs.reopen()
        for app in self.masters:
            self.masters.signal(app, signal.SIGUSR1)
        if self.logs.error:
            return self.logs.error
        log.info("reopened log files")
        return None

    def on_upgrade(self):
        log.warning("USR2: the router cannot re-exec itself yet; upgrade each app with "
                    "`upgrade APP` (its master re-execs; the router follows it)")

    def stop_children(self, how, handed_over):
        """Shell.begin_stop: no new connections; quick: drop what is being sniffed, kill the
        apps; graceful: route what was accepted, then the apps drain."""
        for lst in self.listeners:
            self.loop.remove_reader(lst.sock)
        close_listeners(self.listeners, unlink=True)
        self.listeners = []
        if how == "quick":
            for conn in list(self.sniff.conns.values()):
                self.sniff.close(conn)
            self.masters.stop("quick")
        else:
            self.stop_apps_when_idle()

    def stop_apps_when_idle(self):
        # Connections still being sniffed are routed first; then the apps drain.
        if any(c.state == "sniff" for c in self.sniff.conns.values()) or any(a.backlog for a in self.masters):
            return
        self.masters.stop("graceful")

    def reread(self):
        """HUP: read the file again; start new apps, remove gone ones, reload the rest."""
        try:
            rc = appconf.load(self.rc.path, start_dir=self.cfg.start_dir)
        except FugueError as e:
            log.error("HUP: %s; nothing changed", e)
            return
        self.rc = rc
        for name, app in list(self.apps.items()):
            if name not in rc.apps and app.removing is None:
                self.refusable(lambda name=name: self.remove_app(name))
        for name, spec in rc.apps.items():
            app = self.apps.get(name)
            if app is None:
                self.masters.add(spec)
            elif app.spec.same_as(spec):
                app.spec = spec  # hostnames may have changed
                self.masters.reload(app, lambda ok, text: None)
            else:
                log.warning("app %s: its options changed; they apply when its master restarts "
                            "(remove and add it); reloading its workers now", name)
                app.spec = appconf.AppSpec(name, spec.hostnames, app.spec.target, app.spec.options)
                self.masters.reload(app, lambda ok, text: None)
        self.rebuild_table()

    def release(self):
        """Shell.shutdown: the apps' masters are killed; every connection is closed."""
        self.masters.close()
        for conn in list(self.sniff.conns.values()):
            self.sniff.close(conn)


if __name__ == "__main__":
    from fugue.routed import main  # the entry points of routed mode; this module is imported once

    sys.exit(main())
