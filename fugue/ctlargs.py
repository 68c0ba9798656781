"""fuguectl's command line: its flags (gunicorn's and uvicorn's aliases among them),
the TOML config file under them, and the target to run.

Who calls it: fugue.ctl (start, check and the control commands), fugue.ctlcheck.
What it promises: every option of fugue.start is a flag (config.OPTIONS) and a key
of the config file; flags win over the file. A bad flag, key or value is a
ConfigError of one line naming where it came from (`--workers x`, `FILE: key = ...`).
argparse's own refusals are one line too (_Parser), with the closest flag named.
Nothing here starts anything or talks to a master.
"""

import argparse
import difflib
import json
import os
import re
import sys

from . import __version__, config
from .errors import ConfigError, one_line, shown

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
        self.exit(EXIT_USAGE, f"fugue: {one_line(message)} (see {self.prog} --help)\n")


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
        own.error(f"unrecognized arguments: {' '.join(map(shown, extra))}{_did_you_mean(own, extra)}")
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
        text = shown(" ".join(value) if isinstance(value, list) else value)  # a newline must not split the error
        flag_options[name] = check_value(name, value, f"{flag_of(name)} {text}")
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
