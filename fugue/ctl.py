"""fuguectl: start a fugue master, check a config, and talk to a running master.

    fuguectl start [OPTIONS] SCRIPT [ARGS...]     a script that calls fugue.start()
    fuguectl start [OPTIONS] --app MODULE:ATTR    a server object (or WSGI/ASGI app)
    fuguectl start [OPTIONS] MODULE:ATTR          the same, as gunicorn spells it
    fuguectl start [OPTIONS] -- COMMAND [ARGS...] a foreign program fed through LISTEN_FDS
    fuguectl check [OPTIONS] [TARGET]             validate, start nothing
    fuguectl stop|reload|upgrade|scale|reopen-logs|status|pid|watch|drain|undrain

Who calls it: the `fuguectl` console script, `python -m fugue.ctl`, systemd units.
What it promises: every option of fugue.start is a flag and a key of a TOML
config file (-c); flags win over the file, the file over the script's own
options, those over the defaults. Every error is one line on stderr and a
non-zero exit: 1 a command failed (rolled back, refused, timed out), 2 bad
usage or configuration, 3 no master is running. It never imports fugue.master:
a running master is reached through its control socket, found from the pid file.

`fuguectl start` must be re-runnable as it is: on USR2 the master re-execs its
own command line (sys.orig_argv) from the start directory, and the new master,
seeing FUGUE_UPGRADE_SOCK (fugue.upgrade), takes the listeners instead of binding and does not
daemonize again. So everything here is derived from argv, the files and $PWD.
"""

import argparse
import difflib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

from . import __version__, config, protocol
from .errors import ConfigError, FugueError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

# Friendly flags besides the generated --option-name ones; most are gunicorn's own
# spelling of the same thing (README "Coming from gunicorn").
ALIASES = {
    "workers": ["-w"],
    "bind": ["-b"],
    "timeout": ["-t"],
    "pid_file": ["-p", "--pid"],
    "uid": ["--user", "-u"],
    "gid": ["--group", "-g"],
    "working_path": ["--chdir"],
    "log_file": ["--error-logfile"],
    "access_log": ["--access-logfile"],
    "access_log_format": ["--access-logformat"],
    "verbose": ["-v"],
    "ready_mode": ["--ready"],
    "watch": ["--reload"],
}

# gunicorn's worker classes (-k) that one of fugue's adapters replaces.
WORKER_CLASSES = {
    "sync": "wsgi",
    "gthread": "wsgi",
    "uvicorn.workers.UvicornWorker": "asgi",
    "uvicorn.workers.UvicornH11Worker": "asgi",
    "uvicorn_worker.UvicornWorker": "asgi",
    "uvicorn_worker.UvicornH11Worker": "asgi",
}
# A positional MODULE:ATTR is an app, as in gunicorn (a script is a path, usually *.py).
APP_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
NOT_FLAGS = ("command",)          # given as `fuguectl start -- COMMAND ARGS...`
TARGET_KEYS = ("app", "script")   # config file keys that name what to run
CONTROL_COMMANDS = ("stop", "reload", "upgrade", "scale", "reopen-logs", "status", "pid", "watch",
                    "add", "remove", "drain", "undrain")
COMMANDS = ("start", "check") + CONTROL_COMMANDS


class NotRunning(FugueError):
    """No master to talk to (no pid file, or a stale one): exit 3, as LSB's status."""

    def __init__(self, message):
        super().__init__(message, status=EXIT_NOT_RUNNING)


# -- the command line --------------------------------------------------------------------

def flag_of(name):
    return "--" + name.replace("_", "-")


def _metavar(kind):
    return {"int+": "N", "int0": "N", "float+": "SECONDS", "float0": "SECONDS", "path": "PATH",
            "id": "NAME|ID", "callable": "MODULE:ATTR", "list": "VALUE", "str": "TEXT"}.get(
        kind, "{" + kind[len("choice:"):].replace("|", ",") + "}" if kind.startswith("choice:") else "VALUE")


def add_option_flags(parser):
    """One flag per row of config.OPTIONS (--bind repeatable, --no-X for booleans)."""
    group = parser.add_argument_group("options (each is also a key of the config file, see fugue(5))")
    for name, kind, _, text in config.OPTIONS:
        if name in NOT_FLAGS:
            continue
        text = text.replace("%", "%%")
        names = [flag_of(name)] + ALIASES.get(name, [])
        if kind == "bool":
            group.add_argument(flag_of(name), dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
            for alias in ALIASES.get(name, []):
                group.add_argument(alias, dest=name, action="store_const", const=True,
                                   help=f"same as {flag_of(name)}")
        elif kind == "list":
            group.add_argument(*names, dest=name, action="append", default=None,
                               metavar=_metavar(kind), help=text if "repeat" in text else text + " (repeatable)")
        else:
            group.add_argument(*names, dest=name, default=None, metavar=_metavar(kind), help=text)
    group.add_argument("-D", "--daemon", dest="daemonize", action="store_const", const=True,
                       help="same as --daemonize")
    group.add_argument("--foreground", dest="daemonize", action="store_const", const=False,
                       help="stay in the foreground (as under systemd); same as --no-daemonize")
    borrowed = parser.add_argument_group("gunicorn's and uvicorn's flags (see README, Coming from gunicorn)")
    borrowed.add_argument("-k", "--worker-class", dest="worker_class", metavar="CLASS",
                          help="gunicorn's worker class: sync or gthread (WSGI), uvicorn.workers.UvicornWorker "
                               "(ASGI); same as --adapter wsgi|asgi")
    borrowed.add_argument("-e", "--env", dest="env", action="append", metavar="KEY=VALUE",
                          help="set an environment variable for the master and the workers (repeatable)")
    borrowed.add_argument("--host", dest="uv_host", metavar="HOST",
                          help="uvicorn's --host: with --port, one more --bind HOST:PORT (default 127.0.0.1)")
    borrowed.add_argument("--port", dest="uv_port", metavar="PORT",
                          help="uvicorn's --port: with --host, one more --bind HOST:PORT (default 8000)")
    borrowed.add_argument("--uds", dest="uv_uds", metavar="PATH", help="uvicorn's --uds: same as --bind unix:PATH")
    borrowed.add_argument("--fd", dest="uv_fd", metavar="N", help="uvicorn's --fd: same as --bind fd:N")


def add_find_flags(parser):
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML config file (see fugue(5))")
    parser.add_argument("--pid-file", *ALIASES["pid_file"], dest="pid_file", metavar="PATH",
                        help="pid file of the master (default: from -c or beside its file, else fugue.pid)")
    parser.add_argument("--tmp-path", dest="tmp_path", metavar="PATH",
                        help="tmp_path of the master, where its control socket lives "
                             "(default: from -c or beside its file, else ./tmp)")
    parser.add_argument("--wait", type=float, metavar="SECONDS", default=None,
                        help="give up after this long (default: 10s; for stop, reload and upgrade: "
                             "until the master has an outcome)")


class _Parser(argparse.ArgumentParser):
    """argparse refusing in one line, as every other bad input (the usage stays in --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"fugue: {message} (see {self.prog} --help)\n")


def _did_you_mean(parser, words):
    """'; did you mean --log-level?' for a mistyped flag of this command, else ''."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    for word in words:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            if close and close[0] != word.split("=", 1)[0]:
                return f"; did you mean {close[0]}?"
    return ""


def _parse(parser, argv, commands=None):
    """parse_args, naming the closest flag of the command when one is mistyped."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        own = (commands or {}).get(getattr(args, "command", None), parser)
        own.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(own, extra)}")
    return args


def build_parser():
    parser = _Parser(
        prog="fuguectl", description="Start and control fugue, a Unicorn-style prefork daemon for Python.",
        epilog="See fuguectl(1), fugue(5) and fugue(7).")
    parser.add_argument("--version", action="version", version=f"fuguectl (fugue) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.fugue_commands = sub.choices

    for name, text in (("start", "start a master (TARGET: a script calling fugue.start, MODULE:ATTR or --app, "
                                 "or -- COMMAND)"),
                       ("check", "validate the options, the config file and the target (an --app imported as "
                                  "the workers' user); start nothing")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-c", "--config", metavar="FILE", help="TOML config file (see fugue(5))")
        p.add_argument("--app", metavar="MODULE:ATTR", help="serve this object (imported in each worker)")
        add_option_flags(p)
        p.add_argument("target", nargs="?", metavar="SCRIPT|MODULE:ATTR",
                       help="a script that calls fugue.start(), or an app to serve (as --app)")
        p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help="the script's arguments (after MODULE:ATTR: more options)")
        parser.fugue_start_parsers = getattr(parser, "fugue_start_parsers", {})
        parser.fugue_start_parsers[name] = p

    def control(name, text):
        p = sub.add_parser(name, help=text, description=text)
        add_find_flags(p)
        return p

    control("stop", "stop the master gracefully and wait until it is gone").add_argument(
        "--quick", action="store_true", help="quick stop: kill the workers at once (as SIGINT)")
    control("reload", "start a new worker generation; exit 0 only if it took over").add_argument(
        "app", nargs="?", metavar="APP", help="routed mode: this app only (default: every app)")
    control("upgrade", "re-exec the master (USR2); exit 0 only if the new master took over").add_argument(
        "app", nargs="?", metavar="APP", help="routed mode: the master of this app")
    control("scale", "set the number of workers").add_argument(
        "workers", metavar="N|+N|-N", help="a number of workers, or a change")
    control("reopen-logs", "reopen the log files (as USR1), after logrotate moved them; "
            "exit 1 if one is refused (a symlink, an unsafe directory)")
    control("status", "show the master, its workers and their counters").add_argument(
        "--json", action="store_true", help="print the status as JSON")
    control("pid", "print the pid of the running master")
    control("watch", "pause or resume watch mode").add_argument(
        "state", choices=("on", "off"), help="on: reload on changes; off: pause watching")
    control("drain", "take this host out of load balancers: /healthz says 503, all goes on serving")
    control("undrain", "end a drain: /healthz follows the workers again")
    control("add", "routed mode: start APP as the config file now describes it").add_argument(
        "app", metavar="APP", help="the name of an [apps.APP] table")
    control("remove", "routed mode: stop routing to APP and drain its master").add_argument(
        "app", metavar="APP", help="the name of a running app")
    return parser


def main(argv=None):
    """Entry point of the `fuguectl` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    tail = None
    if argv and argv[0] in ("start", "check") and "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    try:
        args = _parse(parser, argv, parser.fugue_commands)
        if args.command in ("start", "check") and args.args and is_app_spec(args.target):
            _parse_options_after_app(parser.fugue_start_parsers[args.command], args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command in ("start", "check"):
            return start_or_check(args, tail)
        return control_command(args)
    except FugueError as e:
        _say(f"fugue: {e}")
        return e.status
    except KeyboardInterrupt:
        _say("fugue: interrupted")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_FAILED


def is_app_spec(target):
    """True for a positional MODULE:ATTR (gunicorn's APP_MODULE) that is not a file."""
    return bool(target and APP_SPEC.fullmatch(target) and not os.path.exists(target))


def _parse_options_after_app(sub, args):
    """gunicorn takes options after the app (`myproj.wsgi:application -w 4`): parse them too."""
    more = _parse(sub, args.args)
    if more.target:
        sub.error(f"one app only: {args.target} and {more.target}")
    for key, value in vars(more).items():
        if key in ("target", "args") or value is None:
            continue
        old = getattr(args, key, None)
        setattr(args, key, old + value if isinstance(old, list) and isinstance(value, list) else value)
    args.args = []


def _say(text):
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(text, file=sys.stderr)
    sys.stderr.flush()


# -- options: config file + flags ---------------------------------------------------------

def _toml_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return repr(value)


def check_value(name, value, where):
    """One option value, checked (flags' strings converted); ConfigError names `where`."""
    kind = config.KINDS[name]
    try:
        if name == "umask" and isinstance(value, str) and value.isdigit():
            value = int(value, 8)  # 022 and 0022 mean what they mean to umask(1)
        return config.coerce(name, value)
    except ValueError:
        raise ConfigError(f"{where}: expected an octal umask such as 022") from None
    except ConfigError as e:
        expected = getattr(e, "expected", None) or config._describe(kind)  # "..., at most N" if too large
        raise ConfigError(f"{where}: expected {expected}") from None


def load_config_file(path, only=None):
    """(options, target) from a TOML file; relative paths in it are relative to its directory,
    and so are the defaults of pid_file and tmp_path (config.file_defaults).

    `only`: check and return just these keys (the control commands need the pid
    file and tmp_path: a config being edited must not stop `fuguectl stop`)."""
    shown = path
    data, full = config.read_toml(path)
    base = os.path.dirname(full)
    options, target = {}, {}
    for key, value in data.items():
        if only is not None and key not in only:
            continue
        if key in TARGET_KEYS:
            target[key] = _target_value(shown, key, value, base)
            continue
        if key not in config.KINDS:
            close = difflib.get_close_matches(key, config.NAMES + list(TARGET_KEYS), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{shown}: unknown key {key!r}{hint}; allowed keys: "
                              f"{', '.join(config.NAMES + list(TARGET_KEYS))}")
        value = check_value(key, value, f"{shown}: {key} = {_toml_text(value)}")
        if config.KINDS[key] == "path" and value is not None and not (key == "access_log" and value == "-"):
            value = os.path.join(base, value)
        elif key == "bind":  # unix:PATH too
            value = [f"unix:{os.path.join(base, v[5:])}" if v.startswith("unix:") else v for v in value]
        options[key] = value
    from .apps import is_routed

    for key, value in ({} if is_routed(data) else config.file_defaults(base)).items():
        if key not in options and (only is None or key in only):
            options[key] = value
    if len(target) > 1 or (target and options.get("command")):
        raise ConfigError(f"{shown}: give one of app, script or command, not several")
    if options.get("command"):
        target = {"command": options.pop("command")}
    return options, target


def _target_value(shown, key, value, base):
    if key == "app":
        if not (isinstance(value, str) and ":" in value and all(value.split(":", 1))):
            raise ConfigError(f"{shown}: app = {_toml_text(value)}: expected 'module:attr'")
        return value
    argv = [value] if isinstance(value, str) else value
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) and a for a in argv)):
        raise ConfigError(f"{shown}: script = {_toml_text(value)}: expected a path, "
                          "or a list of a path and its arguments")
    return [os.path.join(base, argv[0])] + argv[1:]


def gather_options(args):
    """(options, target from the file): the config file under the flags."""
    if args.config and args.config.endswith(".py"):
        raise ConfigError(f"-c {args.config}: fugue's config file is TOML (see fugue(5)), not a gunicorn.conf.py; "
                          "write its settings as TOML keys (bind = [\"127.0.0.1:8000\"], workers = 4) or flags")
    file_options, file_target = load_config_file(args.config) if args.config else ({}, {})
    borrowed_flags(args)
    flag_options = {}
    for name in config.NAMES:
        value = getattr(args, name, None)
        if value is None or name in NOT_FLAGS:
            continue
        shown = " ".join(value) if isinstance(value, list) else value
        if isinstance(shown, str) and not shown.isprintable():
            shown = repr(shown)  # a newline must not split the error
        flag_options[name] = check_value(name, value, f"{flag_of(name)} {shown}")
    return config.merge(file_options, flag_options), file_target


def borrowed_flags(args):
    """gunicorn's -k and uvicorn's --host/--port/--uds/--fd, turned into fugue's options on `args`."""
    if args.worker_class is not None:
        adapter = WORKER_CLASSES.get(args.worker_class)
        if adapter is None:
            raise ConfigError(f"-k {args.worker_class}: no fugue adapter replaces this worker class; "
                              f"choose one of {', '.join(WORKER_CLASSES)} (or --adapter)")
        if args.adapter not in (None, adapter):
            raise ConfigError(f"-k {args.worker_class} means --adapter {adapter}, not --adapter {args.adapter}")
        args.adapter = adapter
    binds = []
    if args.uv_host is not None or args.uv_port is not None:
        host = args.uv_host if args.uv_host is not None else "127.0.0.1"
        binds.append(f"[{host}]:{args.uv_port or 8000}" if ":" in host else f"{host}:{args.uv_port or 8000}")
    if args.uv_uds is not None:
        binds.append(f"unix:{args.uv_uds}")
    if args.uv_fd is not None:
        binds.append(f"fd:{args.uv_fd}")
    if binds:
        args.bind = (args.bind or []) + binds
    if args.bind:  # gunicorn spells an inherited descriptor fd://N
        args.bind = [f"fd:{b[5:]}" if b.startswith("fd://") else b for b in args.bind]


def environment(args):
    """-e KEY=VALUE pairs, checked: {key: value}."""
    out = {}
    for item in args.env or []:
        key, eq, value = item.partition("=")
        if not eq or not key or not key.replace("_", "a").isalnum() or key[0].isdigit() or "\0" in value:
            raise ConfigError(f"-e {item!r}: expected KEY=VALUE (KEY: letters, digits and _)")
        out[key] = value
    return out


def choose_target(args, tail, file_target):
    """The worker target from the command line, else from the config file."""
    if args.target and re.fullmatch(r"[\w.]+:[\w.]+\(.*\)", args.target):
        raise ConfigError(f"{args.target}: fugue does not call app factories; name the app object "
                          "(app = create_app() in a module, then MODULE:app)")
    if is_app_spec(args.target) and tail is None:
        if args.app:
            raise ConfigError(f"give {args.target} or --app {args.app}, not both")
        return {"app": args.target}
    if args.target and args.app:
        raise ConfigError("give a script or --app, not both")
    if tail is not None and not args.target:
        if args.app:
            raise ConfigError("--app takes no arguments after --")
        if not tail:
            raise ConfigError("nothing after --: give the command to run")
        return {"command": list(tail)}
    if args.target:
        return {"script": [args.target] + list(args.args) + list(tail or [])}
    if args.app:
        return {"app": args.app}
    if file_target.get("script"):
        return {"script": file_target["script"]}
    if file_target.get("app"):
        return {"app": file_target["app"]}
    if file_target.get("command"):
        return {"command": file_target["command"]}
    raise ConfigError("nothing to start: give a script, --app MODULE:ATTR or -- COMMAND "
                      "(or app, script or command in the config file)")


# -- start and check -----------------------------------------------------------------------

def start_or_check(args, tail):
    try:
        return _start_or_check(args, tail)
    except FugueError as e:
        from .upgrade import report_failure

        report_failure(str(e))  # a new master exec'd by USR2 tells the old one why it cannot start
        raise


def _start_or_check(args, tail):
    from .apps import is_routed_file

    if args.config and is_routed_file(args.config):  # routed mode: [apps.NAME] tables (fugue.router)
        from .routed import ctl_start

        return ctl_start(args)
    options, file_target = gather_options(args)
    target = choose_target(args, tail, file_target) if (
        args.command == "start" or args.target or args.app or tail is not None or file_target) else None
    env = environment(args)
    if args.command == "check":
        return check(args, options, target)
    if not args.config and os.path.exists(os.path.join(config.start_directory(), "gunicorn.conf.py")):
        _say("fugue: note: gunicorn.conf.py is not read here; fugue's config file is TOML, given with -c")
    os.environ.update(env)  # before the master starts: the workers and an upgraded master inherit it
    from . import reconfig

    reconfig.reread_hook = lambda: reread_options(args, tail)  # a reload reads the file and flags again
    if "script" in target:
        return run_script(target["script"], options)
    cfg = config.build(options)
    check_target(target, cfg)
    from .run import run_master

    return run_master(cfg, target)


def reread_options(args, tail):
    """(options, target) from the config file and the flags, read again for a reload
    (fugue.reconfig); ConfigError, one line, if the file is no longer valid."""
    options, file_target = gather_options(args)
    return options, choose_target(args, tail, file_target)


def run_script(argv, options):
    """Run the script as __main__ in this process: its fugue.start() becomes the master."""
    import runpy

    import fugue

    script = argv[0]
    path = os.path.join(config.start_directory(), script)
    if not os.path.isfile(path):
        raise FugueError(f"script {script} not found")
    fugue._cli_options = options
    fugue._cli_target = {"script": path, "argv": list(argv)}
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except (SystemExit, KeyboardInterrupt, FugueError):
        raise
    except BaseException as e:  # noqa: BLE001 - the user's script failed before fugue.start
        from .worker import describe_exception

        raise FugueError(f"{script} failed: {describe_exception(e)}") from None
    raise FugueError(f"{script} returned without calling fugue.start()")


_APP_CHECK = """
import json, sys
from fugue.worker import describe_exception, resolve
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


# -- talking to a running master ----------------------------------------------------------------

class Master:
    """Where a running master is: its pid and its control socket."""

    def __init__(self, pid, pid_file, sock):
        self.pid = pid
        self.pid_file = pid_file
        self.sock = sock


def _process_gone(pid):
    """True if `pid` is not running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def find_master(args):
    """The running master named by --pid-file / -c / the defaults; NotRunning if none."""
    from .daemon import is_fugue_master, read_pid

    options = {}
    if args.config:
        options, _ = load_config_file(args.config, only=("pid_file", "tmp_path"))
    for name in ("pid_file", "tmp_path"):
        if getattr(args, name):
            options[name] = check_value(name, getattr(args, name), f"{flag_of(name)} {getattr(args, name)}")
    shown = options.get("pid_file") or "fugue.pid"
    start = config.start_directory()
    pid_file = os.path.join(start, shown)
    tmp = os.path.join(start, options.get("tmp_path") or "tmp")
    pid = read_pid(pid_file)
    if pid is None:
        raise NotRunning(f"no fugue master: pid file {shown} not found")
    if _process_gone(pid):
        raise NotRunning(f"no fugue master: stale pid file {shown} (pid {pid} is not running)")
    if not is_fugue_master(pid):
        raise NotRunning(f"no fugue master: stale pid file {shown} (pid {pid} is not a fugue master)")
    return Master(pid, shown, os.path.join(tmp, f"fugue-{pid}", "control.sock"))


def talk(master, cmd, timeout, **fields):
    """One command to the master; the reply dict. Every failure is one FugueError line."""
    from . import control, protocol

    try:
        reply = control.request(master.sock, cmd, timeout, **fields)
    except FileNotFoundError:
        raise FugueError(f"cannot reach the master (pid {master.pid}): no control socket at "
                         f"{master.sock} (is --tmp-path right?)") from None
    except PermissionError:
        raise FugueError(f"permission denied: the control socket of master pid {master.pid} belongs to "
                         f"another user (run fuguectl as the master's user or root)") from None
    except ConnectionRefusedError:
        raise FugueError(f"the master (pid {master.pid}) is not accepting commands "
                         f"(connection to {master.sock} refused)") from None
    except (TimeoutError, socket.timeout):
        raise FugueError(f"timed out after {timeout:g}s waiting for the master (pid {master.pid}) "
                         f"to answer {cmd}") from None
    except ConnectionError:
        raise FugueError(f"the master (pid {master.pid}) closed the connection without answering {cmd} "
                         "(did it exit?)") from None
    except OSError as e:
        raise FugueError(f"cannot reach the master (pid {master.pid}): {e.strerror or e}") from None
    except protocol.ProtocolError as e:
        raise FugueError(f"the master (pid {master.pid}) sent a bad reply: {e}") from None
    if reply.get("refused"):
        raise FugueError(str(reply.get("text")))
    return reply


def _timeout(args, waits_for_outcome):
    if args.wait is not None:
        return args.wait if args.wait > 0 else None
    return None if waits_for_outcome else 10.0


def control_command(args):
    cmd = args.command
    if cmd == "scale" and not args.workers.strip().lstrip("+-").isdigit():
        raise ConfigError(f"scale: {args.workers!r} is not N, +N or -N")
    master = find_master(args)
    if cmd == "pid":
        print(master.pid)
        return 0
    if cmd == "scale":
        text = args.workers.strip()
        reply = talk(master, "scale", _timeout(args, False), workers=text)
    elif cmd == "watch":
        reply = talk(master, "watch", _timeout(args, False), on=args.state == "on")
    elif cmd == "stop":
        return stop(args, master)
    elif cmd == "status":
        reply = talk(master, "status", _timeout(args, False))
        if reply.get("ok"):
            data = reply.get("data") or {}
            print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_status(data))
            return 0
    else:
        app = {"app": args.app} if getattr(args, "app", None) else {}  # routed mode: one app
        reply = talk(master, cmd, _timeout(args, cmd in ("reload", "upgrade", "add", "remove")), **app)
    if not reply.get("ok"):
        raise FugueError(str(reply.get("text") or f"{cmd} failed"))
    done = f"{cmd} done: " if cmd in ("reload", "upgrade") else ""
    print(done + str(reply.get("text") or "ok"))
    return 0


def stop(args, master):
    deadline = None if _timeout(args, True) is None else time.monotonic() + args.wait
    reply = talk(master, "stop", _timeout(args, True), quick=bool(args.quick))
    if not reply.get("ok"):
        raise FugueError(str(reply.get("text") or "stop failed"))
    # Wait until the pid is gone: a polled condition with a deadline, there is no fd to wait on.
    while not _process_gone(master.pid):
        if deadline is not None and time.monotonic() > deadline:
            raise FugueError(f"timed out after {args.wait:g}s: master pid {master.pid} is still stopping")
        time.sleep(0.05)
    print(f"master pid {master.pid} stopped")
    return 0


# -- the status table ----------------------------------------------------------------------------

def duration(seconds):
    """12.3s, 5m03s, 2h05m, 3d04h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def render_status(data):
    """The human table of `fuguectl status` (the same data as --json)."""
    if "router" in data:  # routed mode
        from .routed import render_status as render_router_status

        return render_router_status(data)
    m = data.get("master") or {}
    workers = data.get("workers") or []
    totals = data.get("totals") or {}
    lines = [f"master    {m.get('name')}, pid {m.get('pid')}, up {duration(m.get('uptime'))}"]
    gen = f"generation {m.get('generation')} serving"
    if m.get("pending_generation"):
        gen += f", generation {m['pending_generation']} starting"
    if m.get("upgrade"):
        gen += f", upgrading to new master pid {m['upgrade'].get('new_pid')}"
    if m.get("stopping"):
        gen += f", stopping ({m['stopping']})"
    drain = m.get("draining")
    if drain:
        gen += ", draining" + (f" (stop in {duration(drain['stop_in'])})" if drain.get("stop_in") is not None
                               else " (fuguectl drain)")
    lines.append(f"workers   {data.get('ready_workers', 0)} ready of {m.get('workers_wanted')} wanted; {gen}")
    asked = m.get("asked") or []
    if asked:
        lines.append("asked     " + ", then ".join(f"{a.get('kind')} ({a.get('source')})" for a in asked)
                     + ": waits its turn")
    event = m.get("last_event")
    if event:
        outcome = "ok" if event.get("ok") else "FAILED"
        lines.append(f"last      {event.get('what')} {outcome} {duration(event.get('ago'))} ago: {event.get('text')}")
    for lst in data.get("listeners") or []:
        lines.append(f"listening {lst.get('address')} ({lst.get('name')})")
    if m.get("watch") is not None:
        lines.append(f"watch     {'on' if m['watch'] else 'paused'}")
    if m.get("log_trouble"):
        lines.append(f"logs      {m['log_trouble']}")
    for mold in data.get("molds") or []:  # preload: the interpreter a generation's workers fork from
        extra = f", not fork-safe: {', '.join(mold['hazards'])}" if mold.get("hazards") else ""
        lines.append(f"mold      pid {mold.get('pid')}, generation {mold.get('generation')}, "
                     f"{mold.get('state')}, {mold.get('forks', 0)} forked{extra}")
    lines.append(f"requests  {totals.get('requests', 0)} served, {totals.get('in_flight', 0)} in flight, "
                 f"{totals.get('connections', 0)} connections open")
    counters = data.get("counters") or {}
    if counters:
        lines.append("counters  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    header = ("ID", "PID", "GEN", "STATE", "UPTIME", "REQUESTS", "IN-FLIGHT", "CONNS", "HEARTBEAT", "RESTARTS")
    rows = [header]
    for w in workers:
        beat = "-" if w.get("last_heartbeat") is None else duration(w["last_heartbeat"]) + " ago"
        rows.append((str(w.get("id")), str(w.get("pid")), str(w.get("generation")), str(w.get("state")),
                     duration(w.get("uptime")), str(w.get("requests", 0)), str(w.get("in_flight", 0)),
                     str(w.get("connections", 0)), beat, str(w.get("restarts", 0))))
    lines.append("")
    if workers:
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(c.ljust(widths[i]) if i == 3 else c.rjust(widths[i])
                                   for i, c in enumerate(r)).rstrip())
    else:
        lines.append("no workers")
    serving = [(w.get("id"), c) for w in workers for c in (w.get("current") or [])]
    if serving:
        lines.append("")
        lines.append("serving now")
        for wid, c in serving:
            lines.append(f"  worker {wid}: {c.get('info')} ({duration(c.get('for'))})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
