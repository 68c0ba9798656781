"""The router's control socket: fuguectl's commands for a routed-mode file.

Who calls it: fugue.router (Router.Control). What it promises: the master's
control socket (fugue.control: 0600, SO_PEERCRED, one request per connection,
silent clients cut off) with the router's commands: status (the router and
each app, with its master's own status), reload [APP], upgrade APP, scale APP,
add APP, remove APP, stop, reopen-logs, pid. A refusal is the reply.
"""

import os

from . import apps as appconf
from .appmasters import ASK_SLOW_TIMEOUT, ASK_TIMEOUT
from .control import ControlServer
from .errors import ConfigError, Refused
from .sniff import HostTable

COMMANDS = ("status", "reload", "upgrade", "add", "remove", "stop", "reopen-logs", "scale", "pid")


class RouterControl(ControlServer):
    """ControlServer with the router's commands; `self.master` is the Router."""

    @property
    def router(self):
        return self.master

    def dispatch(self, conn, msg):
        cmd = msg.get("cmd")
        name = msg.get("app")

        def done(ok, text, data=None):
            self.reply(conn, ok, text, data)

        if cmd == "pid":
            done(True, str(os.getpid()), {"pid": os.getpid(), "routed": True})
        elif cmd == "status":
            self.status(done, name)
        elif cmd == "reload":
            targets = [self.app_named(name)] if name else list(self.router.apps.values())
            self.each(targets, self.router.masters.reload, done, "reload")
        elif cmd in ("upgrade", "scale"):
            if not name:
                raise Refused(f"{cmd}: name the app (the router cannot re-exec itself yet)")
            app = self.app_named(name)
            fields = {"workers": msg.get("workers")} if cmd == "scale" else {}
            self.router.masters.ask(app, cmd, fields, lambda ok, text, data: done(ok, f"app {app.name}: {text}"),
                                    ASK_SLOW_TIMEOUT)
        elif cmd == "add":
            self.add_command(name, msg.get("spec"), done)
        elif cmd == "remove":
            if not name:
                raise Refused("remove: name the app")
            self.router.remove_app(name, waiter=done)
        elif cmd == "stop":
            self.router.begin_stop("quick" if msg.get("quick") else "graceful")
            done(True, "stopping", {"pid": os.getpid()})
        elif cmd == "reopen-logs":
            refused = self.router.on_reopen_logs()
            done(refused is None, f"cannot reopen logs: {refused}; keeping the old files"
                 if refused else "reopened log files")
        else:
            done(False, f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")

    def app_named(self, name):
        app = self.router.apps.get(name)
        if app is None or app.removing is not None:
            raise Refused(f"no app {name!r}; apps: {', '.join(sorted(self.router.apps)) or 'none'}")
        return app

    def add_command(self, name, table, done):
        if self.router.stopping:
            raise Refused("add refused: the router is stopping")
        if not name:
            raise Refused("add: name the app")
        if name in self.router.apps:
            raise Refused(f"add: app {name!r} is already running (remove it first)")
        try:
            if table is None:  # as the config file says now
                rc = appconf.load(self.router.rc.path, start_dir=self.router.cfg.start_dir)
                if name not in rc.apps:
                    raise Refused(f"add: no [apps.{name}] table in {self.router.rc.path}")
                spec = rc.apps[name]
            else:
                defaults = {k: v for k, v in self.router.cfg.values.items()
                            if k not in appconf.ROUTER_ONLY and k in table}
                spec = appconf.parse_app(name, table, defaults, self.router.cfg)
            HostTable({**{n: list(a.spec.hostnames) for n, a in self.router.apps.items()},
                       name: list(spec.hostnames)})
        except (ConfigError, ValueError) as e:
            raise Refused(f"add: {e}") from None
        self.router.masters.add(spec, waiter=done)

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

    def status(self, done, only=None):
        apps = [self.app_named(only)] if only else list(self.router.apps.values())
        out = {"router": self.router_status(), "apps": {}}
        waiting = {app.name for app in apps}

        def finish():
            if not waiting:
                done(True, "status", out)

        for app in apps:
            out["apps"][app.name] = app.status()

            def got(ok, text, data, app=app):
                out["apps"][app.name]["master"] = data if ok else None
                if not ok:
                    out["apps"][app.name]["master_error"] = text
                waiting.discard(app.name)
                finish()

            if app.pid and app.state not in ("starting", "backoff"):
                self.router.masters.ask(app, "status", {}, got, ASK_TIMEOUT)
            else:
                waiting.discard(app.name)
        finish()

    def router_status(self):
        """The router itself, as `fuguectl status` shows it."""
        r = self.router
        return {
            "pid": os.getpid(), "uptime": round(r.system.monotonic() - r.started, 3),
            "config": r.rc.path, "stopping": r.stopping,
            "listeners": [lst.describe() for lst in r.listeners],
            "sniffing": sum(1 for c in r.sniff.conns.values() if c.state == "sniff"),
            "counters": dict(r.counters),
            "sniff_timeout": r.sniff.timeout, "default_app": r.default_app,
        }
