"""fuguectl check, and the target checks fuguectl start makes before binding.

Who calls it: fugue.ctl. What it promises: everything `start` would refuse before
binding is refused here, in one line, and nothing is started or bound. An --app is
imported in a fresh interpreter as the workers' user (never the master's), as a
worker would import it.
"""

import json
import os
import re
import shutil
import subprocess
import sys

from . import config, protocol
from .ctlargs import _say
from .errors import ConfigError, FugueError


_APP_CHECK = """
import json, sys
from fugue.apprun import describe_exception, resolve
try:
    obj = resolve(sys.argv[1])
except BaseException as e:
    print(describe_exception(e)); sys.exit(1)
from fugue.adapters import pick
try:
    pick(obj, json.loads(sys.argv[2]))
except Exception as e:
    print(e); sys.exit(1)
"""


def working_dir(cfg):
    return cfg.working_path if os.path.isabs(cfg.working_path) else cfg.path("working_path")


def check_target(target, cfg):
    """Fail now, on the terminal, for a target no worker could run."""
    if "app" in target:
        spec = target["app"]
        if not (":" in spec and all(spec.split(":", 1))):
            raise ConfigError(f"--app {spec}: expected MODULE:ATTR")
        # In a fresh interpreter, as a worker would: the master never imports the app.
        import fugue

        home = os.path.dirname(os.path.dirname(os.path.abspath(fugue.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([home] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        for key in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", protocol.ENV_UPGRADE_SOCK):
            env.pop(key, None)
        plain = {k: v for k, v in cfg.public().items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        wd = working_dir(cfg)
        if not os.path.isdir(wd):
            raise FugueError(f"working_path {wd} does not exist or is not a directory")
        # As the workers' user, never the master's: the app's import-time code is app code, and
        # the master may be root (issue 12). Dropped as a worker drops (Identity.apply).
        from .workers import Identity

        identity = Identity(cfg.uid, cfg.gid)
        drop = identity.apply if (identity.uid is not None or identity.gid is not None) else None
        try:
            done = subprocess.run([sys.executable, "-c", _APP_CHECK, spec, json.dumps(plain)], cwd=wd, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=cfg.ready_timeout, preexec_fn=drop)
        except PermissionError:
            raise FugueError(f"--app {spec}: user {identity.describe()} cannot execute {sys.executable} "
                             f"in {wd}: the interpreter, fugue and the app must be readable by the "
                             "workers' user") from None
        except subprocess.TimeoutExpired:
            raise FugueError(f"--app {spec}: importing it took more than {cfg.ready_timeout:g}s") from None
        if done.returncode:
            lines = (done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}").splitlines()
            raise FugueError(f"--app {spec}: {re.sub(r' [(]<string>, line [0-9]+[)]$', '', lines[-1])}")
    elif "command" in target:
        prog = target["command"][0]
        if "/" in prog:
            path = os.path.join(working_dir(cfg), prog)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise FugueError(f"command {prog}: not an executable file")
        elif not shutil.which(prog):
            raise FugueError(f"command {prog}: not found in PATH")
    elif "script" in target:
        script = target["script"][0]
        path = os.path.join(config.start_directory(), script)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            raise FugueError(f"script {script}: {e.strerror}") from None
        try:
            compile(source, path, "exec")
        except SyntaxError as e:
            raise FugueError(f"script {script}: SyntaxError: {e.msg} (line {e.lineno})") from None
        except ValueError as e:
            raise FugueError(f"script {script}: {e}") from None


def check(args, options, target):
    """fuguectl check: everything start would check before binding, and nothing more."""
    from .daemon import read_pid
    from .fds import parse_bind
    from .workers import Identity

    cfg = config.build(options)
    for spec in cfg.bind:
        parse_bind(spec)
    if not cfg.bind and target and "script" not in target and "LISTEN_FDS" not in os.environ:
        # what start would refuse (a script may give its own port to fugue.start)
        raise FugueError("nothing to listen on: give --bind (or bind in the config file)")
    if cfg.status_bind:
        from .statushttp import parse_status_bind

        parse_status_bind(cfg.status_bind)
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            _say("fugue: warning: /metrics of status_bind needs prometheus-client "
                 "(pip install 'fugue-daemon[status]')")
    Identity(cfg.uid, cfg.gid)
    from .watch import preflight

    preflight(cfg)
    wd = working_dir(cfg)
    if not os.path.isdir(wd):
        raise FugueError(f"working_path {wd} does not exist or is not a directory")
    tmp = cfg.path("tmp_path")
    if not os.path.isdir(tmp) and not (cfg.tmp_path in config.DEFAULT_TMP_PATHS
                                       and os.path.isdir(os.path.dirname(tmp))):
        raise FugueError(f"tmp_path {tmp} does not exist or is not a directory")
    for name in ("pid_file", "log_file", "master_log_file", "access_log"):
        path = cfg.path(name)
        if path and not os.path.isdir(os.path.dirname(path)):
            raise FugueError(f"{name} {path}: directory {os.path.dirname(path)} does not exist")
    read_pid(cfg.path("pid_file"))  # garbage or no access is an error now, not at start
    if target is not None:
        check_target(target, cfg)
    what = ("no target" if target is None else
            f"app {target['app']}" if "app" in target else
            f"script {target['script'][0]}" if "script" in target else
            f"command {' '.join(target['command'])}")
    source = args.config or "flags and defaults"
    binds = ", ".join(cfg.bind) or ("LISTEN_FDS" if "LISTEN_FDS" in os.environ else "the script's own")
    print(f"ok: {source}: {what}; {cfg.workers} worker{'s' if cfg.workers != 1 else ''}; listening on {binds}")
    return 0
