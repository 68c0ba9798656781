"""fugue: a Unicorn-style prefork daemon for Python.

    import fugue, http.server
    server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    fugue.start(server, 4000, None, 2, {"daemonize": True})

The script runs first as the master, which binds, daemonizes and spawns the
workers; each worker is a fresh interpreter running the same script, where
`fugue.start` receives the listening sockets over its channel and serves.
With the preload option one such interpreter per generation (the mold,
fugue.mold) runs the script up to `fugue.start` and forks the workers there.
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
        from .worker import serve

        return serve(server, options if isinstance(options, dict) else (
            workers if isinstance(workers, dict) else None))
    unix = isinstance(port, str) and not port.isdigit()
    if unix and (options is None) and (isinstance(workers, dict) or (workers is None and not isinstance(host, str))):
        options, workers, host = workers, host, None
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


def _run_master(server, port, host, workers, options):
    from . import config

    opts = dict(options or {})
    if not isinstance(options, (dict, type(None))):
        raise ConfigError(f"options must be a dict, not {type(options).__name__}")
    if workers is not None:
        opts["workers"] = workers
    binds = _binds(port, host)
    if binds and not opts.get("bind"):
        opts["bind"] = binds
    from . import reconfig

    reconfig.script_options = dict(opts)  # a reload reads the file and flags again over these
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
