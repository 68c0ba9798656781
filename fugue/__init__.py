"""fugue: a Unicorn-style prefork daemon for Python.

    import fugue, http.server
    server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    fugue.start(server, 4000, None, 2, {"daemonize": True})

The script runs first as the master, which binds, daemonizes and spawns the
workers; each worker is a fresh interpreter running the same script, where
`fugue.start` receives the listening sockets over its channel and serves.
With the preload option one such interpreter per generation (the mold,
fugue.mold) runs the script up to `fugue.start` and forks the workers there.

The modules, by tier. A module imports only from its own tier or the tiers
above it in this list (data flows one way: config -> master -> mechanisms ->
OS), never in a cycle; tests/test_imports.py holds the code to this map.

  tier pure:        errors protocol policy loop sniff
      errors      FugueError (shown as one line), ConfigError, Refused
      protocol    encode/decode of channel messages, control frames, the handoff
                  manifest; the upgrade's environment names
      policy      decide(snapshot): which workers to spawn, stop, kill, promote
      loop        the one selectors loop: signal wakeup fd, readers, deadlines
      sniff       the host a new connection names (HTTP Host, TLS SNI)
  tier mechanisms:  config reconfig fds notify daemon accesslog foreign inbox health watch workers statushttp
                    apps system limits leftovers
      config      the validated, frozen Config (start() arguments, flags, TOML, env)
      reconfig    what a reload reads again, and what of it a generation can carry
      fds         listeners: bind, adopt, pass (SCM_RIGHTS); safe paths
      notify      sd_notify to the supervisor
      daemon      daemonizing, logs, the pid file's reading and writing
      accesslog   a worker's access log (gunicorn's format)
      foreign     NOTIFY_SOCKET and stderr of foreign workers (and the router's app masters)
      inbox       routed connections as packets, read by workers like a listener
      health      /healthz, /livez, drain_delay, fuguectl drain
      watch       watch mode's file watcher (watchfiles)
      workers     fork + exec of a worker: identity, environment, fork_quietly, reap
      statushttp  the management HTTP listener (status_bind)
      apps        routed mode's configuration (apps.toml)
      system      the OS seam of the state machines: spawn, kill, clock, notify, reap, subreaper
      limits      RLIMIT_NOFILE checked at start; a refused spawn described with its limit
      leftovers   what an exited worker left in its process group (TERM, KILL); listener holders
  tier machines:    status control shell molds pool rollout upgrade appmasters sniffing
      status      the status of a master and its workers, as data
      control     the control socket, and fuguectl's client side of it
      shell       what the master and the router share: loop pass, run directory,
                  PidFile (the pid file's one writer), signal table, stop, shutdown
      molds       preload, the master's side: a mold per generation, the workers it forks
      pool        the worker slots: spawn, channels, READY, stop, kill, backoff
      rollout     a generation's life: begin, promote, rollback; queued asks; the watch trigger
      upgrade     USR2, both sides: the handoff, step down, take over, failure report
      appmasters  the router's supervision of each app's master
      sniffing    the router's connections until they name their host: peek, deadlines, refuse
  tier processes:   master routecontrol router keeper
      master      the master: the wiring between pool, rollout and upgrade
      routecontrol  the router's control commands
      router      routed mode: sniffing and routing connections to apps' inboxes
      keeper      the stable parent under systemd and as PID 1; the master is its child
  tier entry points:  run routed ctl ctlargs ctlcheck apprun worker mold _boot _appboot _mold fugue
      run         starting a master: checks, bind or take over, daemonize, run
      routed      starting a router, and python -m fugue.router's commands
      ctl         fuguectl: main, start, the control commands; it never imports master
      ctlargs     fuguectl's flags (gunicorn's/uvicorn's aliases), config file and target
      ctlcheck    fuguectl check: the checks start makes before binding
      worker      a worker process: listeners, privileges, the channel, drain, recycling
      apprun      a worker running its app: target, startup check, adapter, exit status
      mold        preload: the interpreter of a generation that imports the app and
                  forks its workers (its master side is molds)
      _boot       python -m fugue._boot: a worker's entry point
      _appboot    python -m fugue._appboot: an app master's entry point
      _mold       python -m fugue._mold: a preload mold's entry point
      fugue       this file: fugue.start and the API an app calls
  adapters/*: one module per kind of server; they import each other and the pure and
      mechanisms tiers, never the master's side.
"""

import os
import sys

from .errors import ConfigError, FugueError

__all__ = ["start", "worker_id", "generation", "ready", "on_takedown", "after_fork", "stats", "server_status",
           "set_version", "FugueError", "ConfigError"]
__version__ = "0.1.0"

# Set by fuguectl before it runs a target in the master: what the workers run,
# and options from flags and the config file that win over the script's own.
_cli_target = None
_cli_options = None


def _in_worker():
    # Imported when called, not at the top: `import fugue` in an app stays cheap.
    from . import worker

    return worker.current


def _in_master():
    # Imported when called, not at the top: a worker never imports the master.
    from . import master

    return master.current


def worker_id():
    """1..N in a worker (a replacement takes its slot's id); 0 in a preload mold (the
    interpreter the workers are forked from); None in the master."""
    rt = _in_worker()
    return rt.worker_id if rt else None


def generation():
    """The worker generation this process belongs to (the serving one, in the master)."""
    rt = _in_worker()
    if rt:
        return rt.generation
    m = _in_master()
    return m.generation if m else None


def ready():
    """With the wait_ready option: tell the master this worker is warmed up (serverswap's readyFor)."""
    rt = _in_worker()
    if rt:
        rt.app_ready()


def set_version(text):
    """In a worker: the app's version, shown by /healthz so a deploy tool sees the new code is live.

    Wins over the `version` option; call it at import time or later (it is sent at once).
    In the master it does nothing: the workers, running the same code, report it.
    """
    rt = _in_worker()
    if rt:
        rt.set_version(text)


def on_takedown(fn):
    """Run `fn()` in this worker when it starts to drain (serverswap's onTakedown)."""
    rt = _in_worker()
    if rt:
        rt.on_takedown(fn)
    return fn


def after_fork(fn):
    """Run `fn()` once in each worker before it serves (a decorator too).

    With preload the app is imported once per generation and the workers are forked
    from that interpreter: this is where a worker opens its own database connections
    and starts its threads. Without preload it runs at the same point, so an app
    behaves the same either way. A hook that raises fails the worker with the reason.
    """
    rt = _in_worker()
    if rt:
        rt.after_fork(fn)
    return fn


class _Stats:
    """`fugue.stats.incr("orders")`: a counter summed over all workers in the status."""

    def incr(self, name, n=1):
        rt = _in_worker()
        if rt:
            rt.stats.incr(str(name), n)


stats = _Stats()


def server_status(timeout=2.0):
    """The aggregated status of all workers, from inside a worker or the master."""
    rt = _in_worker()
    if rt:
        return rt.server_status(timeout)
    m = _in_master()
    if m is not None:
        from .status import collect

        return collect(m)
    return None


def _binds(port, host):
    if port is None:
        return []
    if isinstance(port, int) and not isinstance(port, bool):
        if host and ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return [f"{host or ''}:{port}"]
    if isinstance(port, str):
        if port.isdigit():
            return _binds(int(port), host)
        return [port if port.startswith(("unix:", "fd:")) else "unix:" + port]
    raise ConfigError(f"port must be a number or a Unix socket path, not {port!r}")


def start(server, port=None, host=None, workers=None, options=None):
    """Run `server` under fugue: the master here, the server in each worker.

    TCP:  start(server, port, host=None, workers=None, options=None)
    Unix: start(server, "/path/app.sock", workers=None, options=None)

    In the master this returns only when the master exits (the process then
    exits with the master's status). In a worker it serves, then exits.
    """
    rt = _in_worker()
    if rt is not None:
        from .apprun import serve

        local = options if isinstance(options, dict) else (workers if isinstance(workers, dict) else None)
        rt.script_options = _reported_options(*_unix_args(port, host, workers, options))
        return serve(server, local)
    port, host, workers, options = _unix_args(port, host, workers, options)
    try:
        status = _run_master(server, port, host, workers, options)
    except FugueError as e:
        print(f"fugue: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(e.status)
    sys.exit(status)


def _target_for_script():
    """What a worker runs to get the same server: the script or module this process was started with.

    Read from sys.orig_argv, not __main__: a launcher script may have run the app
    with runpy, and the workers must run the launcher again, as the master did.
    """
    from .config import start_directory

    orig = list(getattr(sys, "orig_argv", []))[1:]
    i = 0
    while i < len(orig) and orig[i].startswith("-") and orig[i] not in ("-m", "-c", "-"):
        i += 2 if orig[i] in ("-X", "-W") else 1
    rest = orig[i:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return {"module": rest[1], "argv": [rest[1]] + rest[2:]}
    if rest and rest[0] not in ("-c", "-") and os.path.exists(rest[0]):
        return {"script": os.path.join(start_directory(), rest[0]), "argv": rest}
    raise FugueError("fugue.start must be called from a script or module that workers can run again "
                     "(not from python -c or an interactive session)")


def _unix_args(port, host, workers, options):
    """start(server, "/path.sock", workers, options): a Unix socket path takes no host."""
    unix = isinstance(port, str) and not port.isdigit()
    if unix and (options is None) and (isinstance(workers, dict) or (workers is None and not isinstance(host, str))):
        return port, None, host, workers
    return port, host, workers, options


def _script_options(port, host, workers, options):
    """The options fugue.start's arguments give, as a dict of fugue options."""
    opts = dict(options or {})
    if workers is not None:
        opts["workers"] = workers
    binds = _binds(port, host)
    if binds and not opts.get("bind"):
        opts["bind"] = binds
    return opts


def _reported_options(port, host, workers, options):
    """In a worker: what this code's fugue.start asks for, as plain data for READY, so the
    master can apply a changed script (fugue.reconfig.script_changes); None if unreadable."""
    from .config import NAMES

    try:
        opts = _script_options(port, host, workers, options if isinstance(options, dict) else None)
    except (FugueError, TypeError, ValueError):
        return None
    out = {}
    for key, value in opts.items():
        if key not in NAMES:
            continue
        out[key] = f"{value.__module__}:{value.__qualname__}" if callable(value) else value
    return out


def _run_master(server, port, host, workers, options):
    from . import config, reconfig

    if not isinstance(options, (dict, type(None))):
        raise ConfigError(f"options must be a dict, not {type(options).__name__}")
    opts = _script_options(port, host, workers, options)
    reconfig.script_options = dict(opts)  # a reload reads the file and flags again over these
    reconfig.cli_options = dict(_cli_options or {})
    if _cli_options:
        opts.update(_cli_options)
    cfg = config.build(opts)
    target = _cli_target or _target_for_script()
    if server is not None and not isinstance(server, (str, list)):
        # Check the adapter now, in the master, so a wrong server type is one clear error.
        from .adapters import pick

        try:
            pick(server, cfg.public())
        except ValueError as e:
            raise FugueError(str(e)) from None
    from .run import run_master

    return run_master(cfg, target)
