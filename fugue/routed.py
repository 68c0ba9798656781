"""Routed mode's entry points: start a router, and talk to a running one.

    python -m fugue.router -c apps.toml [--daemonize] [--verbose]
    python -m fugue.router -c apps.toml status|reload [APP]|add APP|remove APP|upgrade APP|stop|pid
    fuguectl start|check -c apps.toml     (a file with [apps.NAME] tables: ctl_start)

Who calls it: fugue.router's __main__ (main), fugue.ctl (ctl_start,
render_status). What it promises: everything a user can get wrong is one line
on stderr and a non-zero exit, checked before daemonizing when possible; a
router that fails to start leaves no listener, pid file or run directory.
"""

import argparse
import json
import logging
import os
import sys

from . import apps as appconf
from . import config, notify
from .control import request
from .daemon import Logs, check_pid_file, daemonize, read_pid, setup_logging, tell_launcher
from .errors import ConfigError, FugueError
from .fds import close_listeners, open_listeners, systemd_listeners
from .router import Router
from .run import check_paths

log = logging.getLogger("fugue")


def start(config_path, overrides=None):
    """Bind, daemonize (if asked), run the router; returns the exit status.

    Who calls it: `fuguectl start -c apps.toml` when the file has [apps.*]
    tables, and `python -m fugue.router -c apps.toml`. Raises FugueError (one
    line) for anything the user can fix, before daemonizing when possible.
    """
    rc = appconf.load(config_path, overrides=overrides)
    setup_logging(rc.cfg.verbose, rc.cfg.log_level, rc.cfg.log_format, role="router")
    logging.raiseExceptions = False
    cfg = check_paths(rc.cfg)
    rc = appconf.RouterConfig(rc.path, cfg, rc.router, rc.apps)
    sys.path.insert(0, cfg.start_dir)  # for the route hook
    hook = load_hook(rc.router["route"])
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
        router = Router(rc, listeners, logs, hook=hook, ready_fd=ready_fd, daemonized=cfg.daemonize)
        router.setup()
        ready_fd = None
        status = router.run()
        if status and router.fatal_reason and not cfg.daemonize:
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


def load_hook(spec):
    """The `route` option as a callable (host, sni, peer) -> app name; ConfigError if it cannot be."""
    if spec is None or callable(spec):
        return spec
    from .apprun import resolve  # the worker's way of loading module:attr (imports the hook's module)

    try:
        fn = resolve(spec)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error
        raise ConfigError(f"route hook {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"route hook {spec!r} is not callable")
    return fn


def control_path(config_path, start_dir=None):
    """The router's control socket, found from the config file's pid_file and tmp_path."""
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
