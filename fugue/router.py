"""Routed mode: several apps on one port, by Host header and TLS SNI, without a proxy.

    python -m fugue.router -c apps.toml          (fuguectl start -c apps.toml)

Processes:

    router (owns the public listeners, pid file, control socket; a subreaper)
     ├── master of app A  (an ordinary fugue master; its one listener is A's inbox)
     │    └── workers      (read A's inbox like a listener: fugue.inbox.Inbox)
     └── master of app B ...

The router accepts each connection, peeks at its first bytes (MSG_PEEK: it
never consumes one) until `fugue.sniff` names the host, and sends the
connection itself over the app's inbox (SCM_RIGHTS) to whichever of that
app's workers reads it first. The worker talks to the client directly: its
real address, no extra hop for the bytes, and a keep-alive connection stays
with the worker that got it. A reload of app A is A's master's business
(its own HUP, rollout and rollback); B never notices.

A connection that names no host within `sniff_timeout`, or sends
`sniff_max_bytes` without one, is closed (slowloris); an unknown host gets
`421 Misdirected Request` (HTTP) or is closed (TLS); both are counted.

One selectors loop, no threads: reap -> signals -> expire -> wait. App masters
report READY / RELOADING / MAINPID on a per-app notify socket (sd_notify
lines), so the router knows when an app is serving and follows a USR2 upgrade
of an app's master (the new master is reparented to the router, a subreaper).
"""

import collections
import heapq
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import time

from . import apps as appconf
from . import notify, policy, protocol
from .errors import ConfigError, FugueError, Refused
from .fds import bind_unix_path, close_listeners, connect_unix_path
from .inbox import inbox_pair, send_connection, take_back
from .control import ControlServer
from .loop import Loop
from .sniff import NEED_MORE, SniffError, sniff
from .workers import describe_status, reaped

log = logging.getLogger("fugue")

SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGCHLD)
ACCEPT_BATCH = 64          # accepts per wakeup, so one busy listener cannot starve the rest
LINGER = 2.0               # seconds to read what a refused client still sends before closing
REPEEK = 0.02              # re-peek interval where poll ignores SO_RCVLOWAT (Unix listeners)
BACKLOG_RETRY = 0.005      # an app's inbox was full: try again this soon
ASK_TIMEOUT = 5.0          # status from an app's master
ASK_SLOW_TIMEOUT = 600.0   # reload / upgrade: the app's master answers when it knows
COMMANDS = ("status", "reload", "upgrade", "add", "remove", "stop", "reopen-logs", "scale", "pid")
_MISS = object()
_REASONS = {400: "Bad Request", 421: "Misdirected Request", 503: "Service Unavailable"}


class Conn:
    """A connection being sniffed (state "sniff") or refused and lingering ("linger")."""

    __slots__ = ("sock", "peer", "tcp", "deadline", "seen", "lowat", "watched", "state")

    def __init__(self, sock, peer, tcp, deadline):
        self.sock = sock
        self.peer = peer
        self.tcp = tcp
        self.deadline = deadline
        self.seen = -1          # bytes peeked last time
        self.lowat = False      # SO_RCVLOWAT raised
        self.watched = False    # a reader in the loop
        self.state = "sniff"


class App:
    """The router's record of one app: its names, inbox, master and counters."""

    def __init__(self, spec, notify_path):
        self.spec = spec
        self.name = spec.name
        self.inbox, self.app_end = inbox_pair()   # the router keeps both ends: see fugue.inbox
        self.notify_path = notify_path
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_unix_path(self.notify, notify_path)
        os.chmod(notify_path, 0o600)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.setblocking(False)
        self.pid = None            # its master now
        self.old_pids = set()      # masters it replaced by USR2, still draining
        self.state = "starting"    # starting, ready, reloading, backoff, stopping, failed
        self.status_text = ""
        self.routed = 0
        self.refused = 0           # 503: the app could take no more
        self.backlog = collections.deque()
        self.started = time.monotonic()
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


class Router:
    def __init__(self, rc, listeners, logs, ready_fd=None, daemonized=False):
        self.rc = rc
        self.cfg = rc.cfg
        self.listeners = listeners
        self.logs = logs
        self.ready_fd = ready_fd
        self.daemonized = daemonized
        self.loop = Loop()
        self.apps = {}
        self.table = rc.host_table()
        self.lookup = {}
        self.sniff_timeout = rc.router["sniff_timeout"]
        self.max_bytes = rc.router["sniff_max_bytes"]
        self.default_app = rc.router["default_app"]
        self.hook = load_hook(rc.router["route"])
        self.conns = {}                    # fd -> Conn (sniffing or lingering)
        self.timers = []                   # heap of (deadline, seq, Conn)
        self.repeek = []                   # Conns to peek again (no SO_RCVLOWAT there)
        self.seq = 0
        self.counters = collections.Counter()
        self.asks = {}                     # sock -> (deadline, callback)
        self.stopping = None
        self.exit_status = 0
        self.ready = False
        self.started = time.monotonic()
        self.pid_file = self.cfg.path("pid_file")
        self.run_dir = None
        self.control = None
        self.notify_seq = 0

    # -- setup ----------------------------------------------------------------------

    def setup(self):
        from .daemon import write_pid

        tmp = self.cfg.path("tmp_path")
        self.run_dir = os.path.join(tmp, f"fugue-{os.getpid()}")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.mkdir(self.run_dir, 0o700)
        _become_subreaper()
        try:
            import setproctitle

            setproctitle.setproctitle(f"fugue master router {os.path.basename(self.rc.path)}")
        except ImportError:
            pass
        write_pid(self.pid_file)
        self.control = RouterControl(self, os.path.join(self.run_dir, "control.sock"))
        self.loop.add_reader(self.control.sock, self.control.accept)
        for lst in self.listeners:
            lst.sock.setblocking(False)
            self.loop.add_reader(lst.sock, lambda lst=lst: self.on_accept(lst))

    # -- the loop -------------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns the exit status."""
        self.loop.install_signals(SIGNALS)
        for spec in self.rc.apps.values():
            self.add_app(spec)
        try:
            while True:
                signums = self.loop.pop_signals()
                if signal.SIGCHLD in signums:
                    self.reap()
                for signum in signums:
                    self.handle_signal(signum)
                if self.finished():
                    break
                self.loop.wait(self.step())
        finally:
            self.shutdown()
        return self.exit_status

    def step(self):
        """Expire what is due; returns the next deadline."""
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(self.timers)
            if conn.state != "done" and conn.deadline == deadline:
                self.expire(conn)
        if self.repeek:
            due, self.repeek = self.repeek, []
            for conn in due:
                if conn.state == "sniff":
                    self.peek(conn)
        for app in list(self.apps.values()):
            if app.down_since is not None and not app.turned_away and app.removing is None:
                if now >= app.down_since + app.ready_timeout():
                    app.turned_away = True
                    log.error("app %s: not serving again within ready_timeout %gs; clients get 503 until it does",
                              app.name, app.ready_timeout())
                    self.turn_away_waiting(app, self.down_text(app))
            if app.backlog:
                self.flush_backlog(app)
            if app.state == "backoff" and app.not_before <= now:
                self.spawn_master(app)
        for sock, (deadline, callback) in list(self.asks.items()):
            if deadline <= now:
                self.end_ask(sock, False, "the app's master did not answer in time", None)
        if self.stopping == "graceful":
            self.stop_apps_when_idle()
        deadlines = [self.timers[0][0]] if self.timers else []
        if self.repeek or any(app.backlog for app in self.apps.values()):
            deadlines.append(now + (REPEEK if self.repeek else BACKLOG_RETRY))
        deadlines += [app.not_before for app in self.apps.values() if app.state == "backoff"]
        deadlines += [app.down_since + app.ready_timeout() for app in self.apps.values()
                      if app.down_since is not None and not app.turned_away and app.removing is None]
        deadlines += [d for d, _ in self.asks.values()]
        deadlines.append(self.control.deadline() if self.control is not None else None)
        deadlines = [d for d in deadlines if d is not None]
        return min(deadlines, default=None)

    def finished(self):
        return self.stopping is not None and not any(
            app.pid or app.old_pids for app in self.apps.values()) and not self.conns

    # -- connections: accept, peek, route -----------------------------------------------

    def on_accept(self, lst):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next wakeup
                self.counters["accept_errors"] += 1
                log.warning("accept on %s: %s", lst.describe()["address"], e.strerror)
                return
            self.counters["accepted"] += 1
            # The socket stays blocking (the worker gets it as accept() would give it):
            # the router only ever uses MSG_DONTWAIT on it.
            conn = Conn(sock, peer, sock.family != socket.AF_UNIX, time.monotonic() + self.sniff_timeout)
            self.peek(conn)

    def peek(self, conn):
        try:
            data = conn.sock.recv(self.max_bytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            self.counters["reset"] += 1
            self.close(conn)
            return
        if data == b"":
            self.counters["closed_early"] += 1
            self.close(conn)
            return
        if data is not None and len(data) == conn.seen and conn.lowat:
            # Woken with nothing new although SO_RCVLOWAT asked for more: a FIN.
            self.counters["closed_early"] += 1
            self.close(conn)
            return
        result = NEED_MORE
        if data is not None and len(data) != conn.seen:
            try:
                result = sniff(data, self.max_bytes)
            except SniffError as e:
                self.counters["too_big" if len(data) >= self.max_bytes else "bad_request"] += 1
                log.debug("closing %s: %s", _peer_text(conn.peer), e)
                if data[:1] != b"\x16" and len(data) < self.max_bytes:
                    self.refuse(conn, 400, f"{e}")
                else:
                    self.close(conn)
                return
            conn.seen = len(data)
        if result is NEED_MORE:
            self.wait_for_more(conn)
            return
        self.route(conn, *result)

    def wait_for_more(self, conn):
        if conn.seen > 0 and conn.tcp:
            # Peeking consumes nothing, so the socket stays readable: ask the kernel
            # to wake us only once more bytes than we have seen are there (or a FIN).
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, conn.seen + 1)
            conn.lowat = True
        if conn.seen > 0 and not conn.tcp:
            self.unwatch(conn)             # AF_UNIX poll ignores SO_RCVLOWAT
            self.repeek.append(conn)
        elif not conn.watched:
            self.loop.add_reader(conn.sock, lambda: self.peek(conn))
            conn.watched = True
        if conn.sock.fileno() not in self.conns:
            self.conns[conn.sock.fileno()] = conn
            self.push_timer(conn)

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
                self.refuse(conn, 421, f"no app here serves {name!r}")
            else:
                self.counters["unknown_sni"] += 1
                self.close(conn)
            return
        self.unwatch(conn)
        self.forget(conn)
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
            self.refuse(conn, 503, why or f"app {app.name} cannot take more connections now")
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

    def refuse(self, conn, status, text):
        """Answer an HTTP client with an error, then linger-close (RST would eat the answer)."""
        body = (text + "\n").encode("utf-8", "replace")
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            if conn.lowat:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                conn.lowat = False
            conn.sock.recv(self.max_bytes, socket.MSG_DONTWAIT)  # what we peeked: ours now
            conn.sock.send(head + body, socket.MSG_DONTWAIT)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.state = "linger"
        conn.deadline = time.monotonic() + LINGER
        self.unwatch(conn)
        self.loop.add_reader(conn.sock, lambda: self.discard(conn))
        conn.watched = True
        self.conns[conn.sock.fileno()] = conn
        self.push_timer(conn)

    def discard(self, conn):
        try:
            while conn.sock.recv(65536, socket.MSG_DONTWAIT):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close(conn)

    def expire(self, conn):
        if conn.state == "sniff":
            self.counters["timed_out"] += 1
            log.debug("closing %s: no host named within %.1fs", _peer_text(conn.peer), self.sniff_timeout)
        self.close(conn)

    def push_timer(self, conn):
        self.seq += 1
        heapq.heappush(self.timers, (conn.deadline, self.seq, conn))

    def unwatch(self, conn):
        if conn.watched:
            self.loop.remove_reader(conn.sock)
            conn.watched = False

    def forget(self, conn):
        self.conns.pop(conn.sock.fileno(), None)
        conn.state = "done"

    def close(self, conn):
        self.unwatch(conn)
        self.forget(conn)
        conn.sock.close()

    # -- app masters ------------------------------------------------------------------

    def add_app(self, spec, waiter=None):
        self.notify_seq += 1
        app = App(spec, os.path.join(self.run_dir, f"notify-{self.notify_seq}.sock"))
        self.apps[spec.name] = app
        self.loop.add_reader(app.notify, lambda: self.on_notify(app))
        if waiter:
            app.waiters.append(waiter)
        self.rebuild_table()
        self.spawn_master(app)
        return app

    def rebuild_table(self):
        from .sniff import HostTable

        self.table = HostTable({name: list(app.spec.hostnames) for name, app in self.apps.items()
                                if app.removing is None})
        self.lookup = {}  # name as sniffed -> app name, or None

    def spawn_master(self, app):
        from .workers import python_argv

        fd = app.app_end.fileno()
        env = appconf.app_master_env(app.spec, fd, self.cfg.start_dir, app.notify_path)
        argv = python_argv() + ["-m", "fugue._appboot"]
        pid = os.fork()
        if pid == 0:
            try:
                self.loop.forget_in_child()
                os.set_inheritable(fd, True)
                _die_with_parent()
                os.chdir(self.cfg.start_dir)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        app.pid = pid
        app.state = "starting"
        app.started = time.monotonic()
        log.info("%s: starting its master", app)

    def on_notify(self, app):
        while True:
            try:
                data, anc, _, _ = app.notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            creds = [struct.unpack("3i", c[:12]) for lvl, kind, c in anc
                     if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
            if not creds or creds[0][1] not in (0, os.getuid()):
                continue
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines()
                          if "=" in line)
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
                log.info("%s serving again after %.1fs", app, time.monotonic() - app.down_since)
            app.down_since = None
            app.turned_away = False
            if first:
                log.info("%s ready: %s", app, app.status_text)
                for waiter in app.waiters:
                    waiter(True, f"app {app.name} serving: {app.status_text}")
                app.waiters = []
                self.maybe_ready()

    def maybe_ready(self):
        if self.ready or any(not app.ever_ready for app in self.apps.values()):
            return
        self.ready = True
        text = f"router serving {len(self.apps)} app{'s' if len(self.apps) != 1 else ''}: " + ", ".join(
            f"{a.name} ({', '.join(a.spec.hostnames)})" for a in self.apps.values())
        log.info("%s", text)
        if self.ready_fd is not None:
            from .daemon import tell_launcher

            self.ready_fd = tell_launcher(self.ready_fd, True, str(os.getpid()))
        notify.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={text}")

    def reap(self):
        for pid, status in reaped():
            app = next((a for a in self.apps.values() if a.pid == pid), None)
            if app is not None:
                self.master_exited(app, status)
                continue
            old = next((a for a in self.apps.values() if pid in a.old_pids), None)
            if old is not None:
                old.old_pids.discard(pid)
                log.info("%s: its old master pid %d exited", old, pid)
                self.maybe_remove(old)
                continue
            log.info("reaped pid %d (%s): an orphan of an app's master", pid, describe_status(status))

    def master_exited(self, app, status):
        desc = describe_status(status)
        app.pid = None
        reason = app.status_text if app.status_text.startswith("start failed") else ""
        if app.removing is not None or self.stopping:
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
            if not self.ready:
                self.exit_status = 1
                self.fatal_reason = text
                if self.ready_fd is not None:
                    from .daemon import tell_launcher

                    self.ready_fd = tell_launcher(self.ready_fd, False, text)
                self.begin_stop("quick")
            else:  # `add` at run time: it never served, take it away again
                app.removing = []
                self.rebuild_table()
                self.maybe_remove(app)
            return
        now = time.monotonic()
        app.failures = policy.next_failures(app.failures, now - app.started)
        app.restarts += 1
        delay = policy.backoff_delay(app.failures)
        app.state = "backoff"
        app.not_before = now + delay
        if app.down_since is None:
            app.down_since = now
        log.error("app %s: its master %s; restarting it in %.2fs (connections wait in its inbox)",
                  app.name, desc, delay)

    def maybe_remove(self, app):
        if app.removing is None or app.pid or app.old_pids:
            return
        if self.apps.get(app.name) is app:
            del self.apps[app.name]
        self.loop.remove_reader(app.notify)
        self.turn_away_waiting(app, f"app {app.name} was removed")  # what its workers did not take
        app.close()
        log.info("app %s removed", app.name)
        for waiter in app.removing:
            waiter(True, f"app {app.name} removed")
        app.removing = []

    def remove_app(self, name, waiter=None):
        app = self.apps.get(name)
        if app is None:
            raise Refused(f"remove: no app {name!r}")
        if app.removing is not None:
            raise Refused(f"remove: app {name!r} is already being removed")
        app.removing = [waiter] if waiter else []
        self.rebuild_table()  # new connections for its names get 421 from now on
        log.info("removing app %s: stopping its master", name)
        for conn, info in list(app.backlog):
            self.unavailable(app, conn, info, f"app {app.name} is being removed")
        app.backlog.clear()
        self.signal_masters(app, signal.SIGQUIT)
        if app.state == "backoff":
            app.state = "stopped"
        self.maybe_remove(app)

    def signal_masters(self, app, signum):
        for pid in [app.pid, *app.old_pids]:
            if pid:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    # -- signals, stop --------------------------------------------------------------------

    def handle_signal(self, signum):
        if signum == signal.SIGCHLD:
            return
        if signum in (signal.SIGTERM, signal.SIGQUIT):
            self.begin_stop("graceful")
        elif signum == signal.SIGINT:
            self.begin_stop("quick")
        elif signum == signal.SIGHUP:
            self.reread()
        elif signum == signal.SIGUSR1:
            self.logs.reopen()
            for app in self.apps.values():
                self.signal_masters(app, signal.SIGUSR1)
            log.info("reopened log files")
        elif signum == signal.SIGUSR2:
            log.warning("USR2: the router cannot re-exec itself yet; upgrade each app with "
                        "`upgrade APP` (its master re-execs; the router follows it)")

    def begin_stop(self, how):
        if self.stopping == "quick" or self.stopping == how:
            return
        self.stopping = how
        log.info("%s stop", how)
        notify.send("STOPPING=1")
        for lst in self.listeners:
            self.loop.remove_reader(lst.sock)
        close_listeners(self.listeners, unlink=True)
        self.listeners = []
        if how == "quick":
            for conn in list(self.conns.values()):
                self.close(conn)
            for app in self.apps.values():
                self.signal_masters(app, signal.SIGINT)
                if app.state == "backoff":
                    app.state = "stopped"
        else:
            self.stop_apps_when_idle()

    def stop_apps_when_idle(self):
        # Connections still being sniffed are routed first; then the apps drain.
        if any(c.state == "sniff" for c in self.conns.values()) or any(a.backlog for a in self.apps.values()):
            return
        for app in self.apps.values():
            if app.state not in ("stopping", "stopped"):
                if app.state == "backoff":
                    app.state = "stopped"
                    continue
                app.state = "stopping"
                self.signal_masters(app, signal.SIGQUIT)

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
                self._quietly(lambda name=name: self.remove_app(name))
        for name, spec in rc.apps.items():
            app = self.apps.get(name)
            if app is None:
                self.add_app(spec)
            elif app.spec.same_as(spec):
                app.spec = spec  # hostnames may have changed
                self.reload_app(app, lambda ok, text: None)
            else:
                log.warning("app %s: its options changed; they apply when its master restarts "
                            "(remove and add it); reloading its workers now", name)
                app.spec = appconf.AppSpec(name, spec.hostnames, app.spec.target, app.spec.options)
                self.reload_app(app, lambda ok, text: None)
        self.rebuild_table()

    def _quietly(self, fn):
        try:
            fn()
        except Refused as e:
            log.warning("%s", e)

    def shutdown(self):
        from .daemon import remove_pid

        if self.ready_fd is not None:
            from .daemon import tell_launcher

            self.ready_fd = tell_launcher(self.ready_fd, False, getattr(self, "fatal_reason", "stopped"))
        for app in self.apps.values():
            self.signal_masters(app, signal.SIGKILL)
            app.close()
        for conn in list(self.conns.values()):
            self.close(conn)
        for sock in list(self.asks):
            sock.close()
        close_listeners(self.listeners, unlink=True)
        if self.control is not None:
            self.control.close()
        remove_pid(self.pid_file)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.loop.close()
        log.info("router exiting (status %d)", self.exit_status)

    # -- control socket: fuguectl's way in ------------------------------------------------

    def reply(self, conn, ok, text, data=None):
        self.control.reply(conn, ok, text, data)

    def command(self, conn, msg):
        cmd = msg.get("cmd")
        name = msg.get("app")

        def done(ok, text, data=None):
            self.reply(conn, ok, text, data)

        if cmd == "pid":
            done(True, str(os.getpid()), {"pid": os.getpid(), "routed": True})
        elif cmd == "status":
            self.status(done, name)
        elif cmd == "reload":
            targets = [self.app_named(name)] if name else list(self.apps.values())
            self.each(targets, self.reload_app, done, "reload")
        elif cmd in ("upgrade", "scale"):
            if not name:
                raise Refused(f"{cmd}: name the app (the router cannot re-exec itself yet)")
            app = self.app_named(name)
            fields = {"workers": msg.get("workers")} if cmd == "scale" else {}
            self.ask(app, cmd, fields, lambda ok, text, data: done(ok, f"app {app.name}: {text}"),
                     ASK_SLOW_TIMEOUT)
        elif cmd == "add":
            self.add_command(name, msg.get("spec"), done)
        elif cmd == "remove":
            if not name:
                raise Refused("remove: name the app")
            self.remove_app(name, waiter=done)
        elif cmd == "stop":
            self.begin_stop("quick" if msg.get("quick") else "graceful")
            done(True, "stopping", {"pid": os.getpid()})
        elif cmd == "reopen-logs":
            self.handle_signal(signal.SIGUSR1)
            done(True, "reopened log files")
        else:
            done(False, f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")

    def app_named(self, name):
        app = self.apps.get(name)
        if app is None or app.removing is not None:
            raise Refused(f"no app {name!r}; apps: {', '.join(sorted(self.apps)) or 'none'}")
        return app

    def add_command(self, name, table, done):
        if self.stopping:
            raise Refused("add refused: the router is stopping")
        if not name:
            raise Refused("add: name the app")
        if name in self.apps:
            raise Refused(f"add: app {name!r} is already running (remove it first)")
        try:
            if table is None:  # as the config file says now
                rc = appconf.load(self.rc.path, start_dir=self.cfg.start_dir)
                if name not in rc.apps:
                    raise Refused(f"add: no [apps.{name}] table in {self.rc.path}")
                spec = rc.apps[name]
            else:
                defaults = {k: v for k, v in self.cfg.values.items()
                            if k not in appconf.ROUTER_ONLY and k in table}
                spec = appconf.parse_app(name, table, defaults, self.cfg)
            from .sniff import HostTable

            HostTable({**{n: list(a.spec.hostnames) for n, a in self.apps.items()},
                       name: list(spec.hostnames)})
        except (ConfigError, ValueError) as e:
            raise Refused(f"add: {e}") from None
        self.add_app(spec, waiter=done)

    def each(self, apps, fn, done, what):
        """Run fn(app, waiter) for each app; reply once all answered."""
        if not apps:
            done(False, f"{what}: no apps")
            return
        results = {}

        def one(app):
            def waiter(ok, text):
                results[app.name] = (ok, text)
                if len(results) == len(apps):
                    done(all(ok for ok, _ in results.values()),
                         "; ".join(f"{n}: {t}" for n, (_, t) in results.items()),
                         {n: {"ok": ok, "text": t} for n, (ok, t) in results.items()})
            return waiter

        for app in apps:
            fn(app, one(app))

    def reload_app(self, app, waiter):
        if app.pid is None or app.state in ("starting", "backoff"):
            waiter(False, f"app {app.name} is not serving yet ({app.state})")
            return
        self.ask(app, "reload", {}, lambda ok, text, data: waiter(ok, text), ASK_SLOW_TIMEOUT)

    def status(self, done, only=None):
        apps = [self.app_named(only)] if only else list(self.apps.values())
        out = {"router": self.router_status(), "apps": {}}
        waiting = {app.name for app in apps}

        def finish():
            if not waiting:
                done(True, "status", out)

        for app in apps:
            out["apps"][app.name] = self.app_status(app)

            def got(ok, text, data, app=app):
                out["apps"][app.name]["master"] = data if ok else None
                if not ok:
                    out["apps"][app.name]["master_error"] = text
                waiting.discard(app.name)
                finish()

            if app.pid and app.state not in ("starting", "backoff"):
                self.ask(app, "status", {}, got, ASK_TIMEOUT)
            else:
                waiting.discard(app.name)
        finish()

    def router_status(self):
        return {
            "pid": os.getpid(), "uptime": round(time.monotonic() - self.started, 3),
            "config": self.rc.path, "stopping": self.stopping,
            "listeners": [lst.describe() for lst in self.listeners],
            "sniffing": sum(1 for c in self.conns.values() if c.state == "sniff"),
            "counters": dict(self.counters),
            "sniff_timeout": self.sniff_timeout, "default_app": self.default_app,
        }

    def app_status(self, app):
        return {"hostnames": list(app.spec.hostnames), "master_pid": app.pid, "state": app.state,
                "status_text": app.status_text, "routed": app.routed, "held": len(app.backlog),
                "refused_503": app.refused, "master_restarts": app.restarts,
                "target": app.spec.target}

    # asking an app's master over its control socket, without blocking the loop

    def ask(self, app, cmd, fields, callback, timeout):
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
        self.asks[sock] = (time.monotonic() + timeout, callback)
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


class RouterControl(ControlServer):
    """The control socket (0600, SO_PEERCRED, silent clients cut off), with the router's commands."""

    def dispatch(self, conn, msg):
        self.master.command(conn, msg)


# -- helpers ---------------------------------------------------------------------------

def load_hook(spec):
    if spec is None or callable(spec):
        return spec
    from .worker import resolve

    try:
        fn = resolve(spec)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error
        raise ConfigError(f"route hook {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"route hook {spec!r} is not callable")
    return fn


def _peer_text(peer):
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "?")


def _prctl(option, arg):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, arg, 0, 0, 0) == 0


def _become_subreaper():
    # An app master upgraded by USR2 is the child of the old one; when the old
    # one exits, the new one must become ours to reap, not init's.
    if not _prctl(36, 1):  # PR_SET_CHILD_SUBREAPER
        log.warning("cannot become a child subreaper; an app master upgraded by USR2 will not be reaped")


def _die_with_parent():
    # In an app master's child before exec: if the router dies, its apps stop
    # (their inboxes would never receive again) instead of running on unseen.
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- starting ----------------------------------------------------------------------------

def start(config_path, overrides=None):
    """Bind, daemonize (if asked), run the router; returns the exit status.

    Who calls it: `fuguectl start -c apps.toml` when the file has [apps.*]
    tables, and `python -m fugue.router -c apps.toml`. Raises FugueError (one
    line) for anything the user can fix, before daemonizing when possible.
    """
    from .daemon import Logs, check_pid_file, daemonize, setup_logging, tell_launcher
    from .fds import open_listeners, systemd_listeners
    from .run import check_paths

    from . import daemon

    rc = appconf.load(config_path, overrides=overrides)
    daemon.LOG_FORMAT = daemon.LOG_FORMAT.replace("[master]", "[router]")
    setup_logging(rc.cfg.verbose, rc.cfg.log_level, rc.cfg.log_format)
    logging.raiseExceptions = False
    cfg = check_paths(rc.cfg)
    rc = appconf.RouterConfig(rc.path, cfg, rc.router, rc.apps)
    sys.path.insert(0, cfg.start_dir)  # for the route hook
    load_hook(rc.router["route"])
    logs = Logs(cfg.path("log_file"), cfg.path("master_log_file"))
    logs.open()
    check_pid_file(cfg.path("pid_file"))
    listeners = systemd_listeners() or open_listeners(cfg.bind, cfg.backlog)
    ready_fd = None
    router = None
    try:
        if cfg.daemonize:
            ready_fd = daemonize([lst.fileno() for lst in listeners] + logs.preserve(), cfg.umask)
        logs.redirect_master()
        for lst in listeners:
            log.info("listening on %s (%s)", lst.describe()["address"], lst.name)
        notify.claim()
        router = Router(rc, listeners, logs, ready_fd=ready_fd, daemonized=cfg.daemonize)
        router.setup()
        ready_fd = None
        status = router.run()
        if status and getattr(router, "fatal_reason", None) and not cfg.daemonize:
            raise FugueError(router.fatal_reason)
        return status
    except FugueError as e:
        if ready_fd is not None:
            tell_launcher(ready_fd, False, str(e))
        if router is None or router.run_dir is None:
            close_listeners(listeners, unlink=True)
        if cfg.daemonize:
            log.error("%s", e)
            os._exit(e.status)
        raise


def control_path(config_path, start_dir=None):
    """The router's control socket, found from the config file's pid_file and tmp_path."""
    from .daemon import read_pid

    rc = appconf.load(config_path, start_dir=start_dir)
    pid = read_pid(rc.cfg.path("pid_file"))
    if pid is None:
        raise FugueError(f"no router running (no pid file {rc.cfg.path('pid_file')})")
    return os.path.join(rc.cfg.path("tmp_path"), f"fugue-{pid}", "control.sock")


def shared_user_warnings(rc):
    """Apps that run as one user share everything: a worker of one may take another's inbox
    and descriptors (pidfd_getfd, ptrace) and answer its clients. One line per such group."""
    users = {}
    for name, spec in rc.apps.items():
        uid = spec.options.get("uid")
        users.setdefault("the router's user" if uid is None else f"user {uid}", []).append(name)
    for who, names in users.items():
        if len(names) > 1:
            yield (f"apps {', '.join(names)} run as {who}: they are not isolated from each other "
                   "(a worker of one can take another's connections); give each app its own uid")


def ctl_start(args):
    """`fuguectl start|check -c apps.toml` for a routed-mode file (called by fugue.ctl).

    Flags given to fuguectl (fugue options: --daemonize, --verbose, --workers ...)
    win over the file's top level, as in the single-app form.
    """
    from . import config

    overrides = {}
    for name in config.NAMES:
        value = getattr(args, name, None)
        if value is not None and value != [] and name != "hostnames":
            overrides[name] = value
    if args.command == "check":
        rc = appconf.load(args.config, overrides=overrides)
        load_hook(rc.router["route"])
        for line in shared_user_warnings(rc):
            print(f"fugue: warning: {line}", file=sys.stderr)
        print(f"ok: {len(rc.apps)} app{'s' if len(rc.apps) != 1 else ''} on {', '.join(rc.cfg.bind)}: "
              + "; ".join(f"{n} ({', '.join(a.hostnames)})" for n, a in rc.apps.items()))
        return 0
    return start(args.config, overrides)


def render_status(data):
    """The human table of `fuguectl status` for a router (the same data as --json)."""
    r = data.get("router") or {}
    c = r.get("counters") or {}
    lines = [f"router    pid {r.get('pid')}, up {r.get('uptime', 0):.1f}s, "
             f"{', '.join(lst.get('address', '?') for lst in r.get('listeners') or [])}"
             + (f", stopping ({r['stopping']})" if r.get("stopping") else ""),
             f"routed    {c.get('accepted', 0)} accepted; refused: {c.get('unknown_host', 0)} unknown host (421), "
             f"{c.get('unknown_sni', 0)} unknown SNI, {c.get('timed_out', 0)} too slow, "
             f"{c.get('too_big', 0) + c.get('bad_request', 0)} bad, {c.get('unavailable', 0)} unavailable (503)",
             "",
             f"{'APP':14} {'STATE':10} {'MASTER':>7} {'GEN':>4} {'READY':>7} {'ROUTED':>8} {'REQS':>8}  HOSTNAMES"]
    for name, app in (data.get("apps") or {}).items():
        m = app.get("master") or {}
        mm = m.get("master") or {}
        ready = f"{m.get('ready_workers', '-')}/{mm.get('workers_wanted', '-')}" if m else "-"
        reqs = (m.get("totals") or {}).get("requests", "-") if m else "-"
        lines.append(f"{name:14} {app.get('state', '?'):10} {app.get('master_pid') or '-':>7} "
                     f"{mm.get('generation', '-'):>4} {ready:>7} {app.get('routed', 0):>8} {reqs:>8}  "
                     f"{', '.join(app.get('hostnames') or [])}")
        if app.get("status_text"):
            lines.append(f"{'':14} {app['status_text']}")
    return "\n".join(lines)


def main(argv=None):
    """python -m fugue.router -c apps.toml [--daemonize] [--verbose]
    python -m fugue.router -c apps.toml status|reload [APP]|add APP|remove APP|upgrade APP|stop|pid"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fugue.router", description="fugue routed mode")
    parser.add_argument("-c", "--config", required=True, help="the apps file (TOML with [apps.NAME] tables)")
    parser.add_argument("-D", "--daemonize", action="store_true", default=None)
    parser.add_argument("-v", "--verbose", action="store_true", default=None)
    parser.add_argument("command", nargs="?", default="start")
    parser.add_argument("app", nargs="?")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return start(args.config, {"daemonize": args.daemonize, "verbose": args.verbose})
        from .control import request

        fields = {"app": args.app} if args.app else {}
        timeout = None if args.command in ("reload", "upgrade", "add", "remove") else 30
        reply = request(control_path(args.config), args.command, timeout=timeout, **fields)
    except FugueError as e:
        print(f"fugue: {e}", file=sys.stderr)
        return e.status
    except OSError as e:
        print(f"fugue: cannot reach the router: {e}", file=sys.stderr)
        return 1
    if args.command == "status" and reply.get("ok"):
        print(json.dumps(reply.get("data"), indent=2, default=str))
    else:
        print(reply.get("text"))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
