"""Options: one table, validated once into a frozen Config.

Who calls it: `fugue.start` (options dict), `fuguectl` (flags and TOML files).
What it promises: every value in a Config has been checked for type and range;
an unknown or ill-typed option raises ConfigError naming the option and the
allowed names or values. Nothing here touches the OS beyond path arithmetic.
"""

import dataclasses
import os
import re

from .errors import ConfigError

# One row per option: name, kind, default, help. `kind` drives coercion of
# strings (from flags and env) and the check of values from dicts and TOML.
#   int+ (>= 1), int0 (>= 0), float+ (> 0), float0 (>= 0), bool, str, path,
#   list (of str), callable (a callable or a dotted "module:attr" string),
#   choice:a|b|c, id (user or group: name or number).
OPTIONS = [
    ("workers", "int0", None, "number of worker processes, at most 1024 (default: the CPU count)"),
    ("bind", "list", [], "listeners: HOST:PORT, [V6]:PORT, :PORT, unix:PATH, fd:N (repeatable)"),
    ("backlog", "int+", 2048, "listen(2) backlog of sockets fugue binds"),
    ("working_path", "path", None, "directory the workers chdir to (default: the start directory)"),
    ("tmp_path", "path", None, "directory for the private run directory (default: tmp beside the -c file, else ./tmp)"),
    ("pid_file", "path", None, "pid file of the master (default: fugue.pid beside the -c file, else in the start directory)"),
    ("log_file", "path", None, "log file for the master and the workers"),
    ("master_log_file", "path", None, "log file for the master alone"),
    ("access_log", "path", None, "access log, one line per HTTP request, written by the workers (-: stdout; "
     "default: none)"),
    ("access_log_format", "str", None, "access log line in gunicorn's atoms, such as %(h)s %(t)s \"%(r)s\" "
     "%(s)s %(b)s %(D)s (default: gunicorn's)"),
    ("log_level", "choice:debug|info|warning|error|critical", "info",
     "least severe level logged (verbose means debug); waitress's and uvicorn's loggers follow it"),
    ("log_format", "choice:text|json", "text", "text lines, or one JSON object per line (log and access log)"),
    ("uid", "id", None, "user the workers run as (name or number)"),
    ("gid", "id", None, "group the workers run as (name or number)"),
    ("umask", "int0", 0o022, "umask of the daemonized master and its workers"),
    ("daemonize", "bool", False, "fork into the background; the launcher exits once all workers are ready"),
    ("verbose", "bool", False, "log every worker state change and protocol step"),
    ("name", "str", None, "name shown in process titles and logs (default: the script's name)"),
    ("graceful_timeout", "float+", 30.0, "seconds a stopping worker may take to finish in-flight work"),
    ("timeout", "float+", 30.0, "seconds without a heartbeat before a worker is killed"),
    ("ready_timeout", "float+", 30.0, "seconds a new worker or master has to become ready"),
    ("wait_ready", "bool", False, "READY is sent by the app calling fugue.ready(), not on serving"),
    ("startup_check", "callable", None, "callable (or module:attr) run in each new worker before READY"),
    ("warmup", "list", [], "paths each new HTTP worker GETs from its own app before READY; a 5xx or an exception fails it"),
    ("preload", "bool", False,
     "import the app once per generation and fork its workers from that interpreter (not for a command)"),
    ("reload_strategy", "choice:all|rolling", "all", "all: the whole new generation ready first; rolling: k at a time"),
    ("reload_batch", "int+", 1, "workers replaced at a time by a rolling reload"),
    ("adapter", "choice:auto|socketserver|handler|wsgi|asgi|asyncio|callable", "auto",
     "kind of server in the workers (auto: guessed from the target)"),
    ("command", "list", [], "a foreign program run as each worker with the listeners from fd 3 (LISTEN_FDS)"),
    ("ready_mode", "choice:stable|notify", "stable",
     "foreign workers: READY after stable_after seconds up, or on sd_notify READY=1"),
    ("stable_after", "float0", 1.0, "seconds a foreign worker must stay up to count as READY"),
    ("stop_signal", "str", "TERM", "signal sent to a foreign worker for a graceful stop"),
    ("threads", "int+", None, "WSGI: threads per worker running the app (waitress's threads; default 4)"),
    ("keep_alive", "float+", None, "WSGI/ASGI: seconds an idle keep-alive connection stays open "
     "(waitress's channel_timeout, default 120; uvicorn's timeout_keep_alive, default 5)"),
    ("max_requests", "int0", 0, "recycle a worker after this many requests (0: never)"),
    ("max_requests_jitter", "int0", 0, "random extra 0..N requests, so workers do not recycle together"),
    ("max_memory", "int0", 0, "recycle a worker whose RSS exceeds this many bytes (0: never)"),
    ("watch", "bool", False, "reload when a watched file changes"),
    ("watch_paths", "list", [], "paths to watch (default: the app's directory)"),
    ("watch_include", "list", ["*.py"], "globs of files whose change reloads"),
    ("watch_exclude", "list", [], "globs of files never watched (added to the built-in ignores)"),
    ("watch_settle", "float0", 0.3, "seconds the tree must be quiet before a watch reload"),
    ("status_bind", "str", None, "HOST:PORT of a management HTTP listener (JSON, Prometheus, /healthz, /livez)"),
    ("drain_delay", "float0", 0.0, "seconds of 503 on /healthz, still serving, before a graceful stop"),
    ("version", "str", None, "version shown by /healthz (the app's fugue.set_version() wins)"),
    ("status_hosts", "list", [], "Host names the status listener answers besides IP addresses and localhost"),
    ("status_targets", "bool", False, "status listener: show in-flight request targets with their query strings"),
    ("hostnames", "list", [], "routed mode: hostnames this app serves"),
]

# Upper bounds: a number beyond them cannot work (it overflows where it reaches the OS: listen(2)'s
# backlog is a C int, a wait longer than about 24 days overflows epoll's timeout), so it is refused
# here, in one line, rather than at run time, in a traceback.
INT_MAX = 2 ** 63 - 1
SECONDS_MAX = 1e6  # about 11.6 days
MAX_WORKERS = 1024  # more would be a fork bomb on any one machine, not a deployment
LIMITS = {"backlog": 2 ** 31 - 1, "umask": 0o777, "workers": MAX_WORKERS}
REQUEST_PATH = re.compile(r"/[!-~]*")  # an origin-form request target: printable ASCII, no space
ID_MAX = 2 ** 32 - 2  # (uid_t)-1 means "no change" to setuid(2)

NAMES = [row[0] for row in OPTIONS]
KINDS = {row[0]: row[1] for row in OPTIONS}
DEFAULTS = {row[0]: row[2] for row in OPTIONS}
HELP = {row[0]: row[3] for row in OPTIONS}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _describe(kind):
    return {
        "int+": "an integer >= 1", "int0": "an integer >= 0", "float+": "a number > 0",
        "float0": "a number >= 0", "bool": "true or false", "str": "a string",
        "path": "a path", "list": "a list of strings", "callable": "a callable or 'module:attr'",
        "id": "a name or a number",
    }.get(kind) or "one of " + ", ".join(kind[len("choice:"):].split("|"))


def coerce(name, value, source="option"):
    """Check one option value (strings from flags are converted); return the clean value."""
    if name not in KINDS:
        raise ConfigError(f"unknown {source} {name!r}; valid: {', '.join(NAMES)}")
    kind = KINDS[name]
    if value is None:
        return None

    def bad():
        return ConfigError(f"{source} {name}: {value!r} is not {_describe(kind)}")

    def too_large(limit, shown):
        e = ConfigError(f"{source} {name}: {value!r} is too large (at most {shown})")
        e.expected = f"{_describe(kind)}, at most {shown}"  # for fuguectl's 'expected ...' form
        return e

    if kind in ("int+", "int0"):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise bad() from None
        if not isinstance(value, int) or value < (1 if kind == "int+" else 0):
            raise bad()
        limit = LIMITS.get(name, INT_MAX)
        if value > limit:
            raise too_large(limit, oct(limit) if name == "umask" else limit)
        return value
    if kind in ("float+", "float0"):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"),):
            raise bad()
        if value < 0 or (kind == "float+" and value == 0):
            raise bad()
        if value > SECONDS_MAX:
            raise too_large(SECONDS_MAX, f"{SECONDS_MAX:.0f} seconds")
        return float(value)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value or "\0" in value:
            raise bad()
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v and "\0" not in v for v in value):
            raise bad()
        if name == "warmup":  # each is sent as an HTTP request target
            for path in value:
                if not REQUEST_PATH.fullmatch(path):
                    e = ConfigError(f"{source} {name}: {path!r} is not a request path such as /health")
                    e.expected = "request paths such as /health (ASCII, no spaces: %-encode the rest)"
                    raise e
        return list(value)
    if kind == "id":
        if isinstance(value, bool):
            raise bad()
        number = value if isinstance(value, int) else (
            int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None)
        if number is not None and number >= 0:
            if number > ID_MAX:
                raise too_large(ID_MAX, ID_MAX)
            return number
        if isinstance(value, str) and value and "\0" not in value:
            return value
        raise bad()
    if kind == "callable":
        if callable(value):
            return value
        if isinstance(value, str) and ":" in value and all(value.split(":", 1)):
            return value
        raise bad()
    if kind.startswith("choice:"):
        if value not in kind[len("choice:"):].split("|"):
            raise bad()
        return value
    raise AssertionError(kind)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every option, validated, with paths made absolute against `start_dir`."""

    values: dict
    start_dir: str

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def path(self, name):
        """An option that is a path, absolute against the unresolved start directory."""
        value = self.values[name]
        return None if value is None else os.path.join(self.start_dir, value)

    def replace(self, **changes):
        values = dict(self.values)
        values.update(changes)
        return Config(values=values, start_dir=self.start_dir)

    def public(self):
        """The options as plain data (callables shown by name), for status and the workers."""
        out = {}
        for key, value in self.values.items():
            out[key] = value if not callable(value) else f"{value.__module__}:{value.__qualname__}"
        return out


# What a reload (HUP, fuguectl reload) cannot apply: they belong to the master process (its
# sockets, identity, files, process title), so only an upgrade (USR2), a new master, can.
# Every other option is carried by the next worker generation.
MASTER_ONLY = ("bind", "backlog", "uid", "gid", "umask", "daemonize", "pid_file", "tmp_path",
               "log_file", "master_log_file", "status_bind", "name", "verbose")


def reload_changes(old, new):
    """(options a reload applies, changed options only an upgrade can apply), comparing two
    Configs. Pure: the caller logs the second list ("bind changed: needs `fuguectl upgrade`")."""
    applied, needs_upgrade = {}, []
    for name in NAMES:
        before, after = old.values.get(name), new.values.get(name)
        if before == after:
            continue
        if name in MASTER_ONLY:
            needs_upgrade.append(name)
        else:
            applied[name] = after
    return applied, needs_upgrade


def start_directory():
    """The directory fugue was started from, as the user spelled it ($PWD), not resolved.

    A deploy that switches a `current` symlink and then upgrades must be picked up by
    the new master, so we keep $PWD when it names the same directory as getcwd().
    """
    cwd = os.getcwd()
    pwd = os.environ.get("PWD")
    if pwd and os.path.isabs(pwd):
        try:
            if os.path.samefile(pwd, cwd):
                return pwd
        except OSError:
            pass
    return cwd


# tmp_path values that are a default (`tmp` in the start directory, or in the directory of
# the config file given with -c): a missing one is created (0700) at start, as the original
# fugue's ./tmp; a tmp_path the user named must exist. fuguectl adds the file's default here.
DEFAULT_TMP_PATHS = {"tmp"}


def file_defaults(directory):
    """The defaults of pid_file and tmp_path for a config file in `directory`: beside it.

    So `fuguectl status -c /etc/fugue/hello.toml` finds the master from any directory, and
    a unit needs the paths once, in the file."""
    tmp = os.path.join(directory, "tmp")
    DEFAULT_TMP_PATHS.add(tmp)
    return {"pid_file": os.path.join(directory, "fugue.pid"), "tmp_path": tmp}


def build(options=None, start_dir=None, source="option"):
    """Validate `options` (a dict) over the defaults and return a Config."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"options must be a dict, not {type(options).__name__}")
    values = dict(DEFAULTS)
    for name, value in options.items():
        values[name] = coerce(name, value, source)
    if values["workers"] is None:
        values["workers"] = os.cpu_count() or 1
    start_dir = start_dir or start_directory()
    if values["tmp_path"] is None:
        values["tmp_path"] = "tmp"
    if values["pid_file"] is None:
        values["pid_file"] = "fugue.pid"
    if values["working_path"] is None:
        values["working_path"] = start_dir
    if values["access_log"] not in (None, "-"):  # the workers open it, from working_path
        values["access_log"] = os.path.join(start_dir, values["access_log"])
    if values["access_log_format"] is not None:
        from .accesslog import check_format

        check_format(values["access_log_format"])
    return Config(values=values, start_dir=start_dir)


def merge(*layers):
    """Later dicts win: defaults < config file < flags (None in a layer means unset)."""
    out = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                out[key] = value
    return out


def read_toml(path, start_dir=None):
    """(data, full path) of a TOML config file; every failure is one ConfigError line.

    `path` is shown as given; it is read relative to the start directory."""
    import tomllib

    full = os.path.join(start_dir or start_directory(), path)
    try:
        with open(full, "rb") as f:
            return tomllib.load(f), full
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None