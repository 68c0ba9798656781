"""Routed mode's configuration: one TOML file, several apps, shared listeners.

    bind = ["0.0.0.0:80"]          # the public listeners, shared by every app
    sniff_timeout = 5.0            # a new connection must name its host within this
    workers = 2                    # any fugue option here is every app's default

    [apps.api]
    hostnames = ["api.example.com"]
    app = "api:application"        # or script = "api.py" (a script calling fugue.start)
    workers = 4                    # per-app options win

    [apps.www]
    hostnames = ["example.com", "*.example.com"]
    script = "www.py"

Who calls it: fugue.routed (start, check), fugue.router (HUP), fugue.routecontrol
(`add`), fugue.appmasters (app_master_env) and fugue._appboot. `load(path)`
returns a frozen RouterConfig or raises ConfigError naming the file, the app and
the key; it touches nothing but the file. Each app's master is `python -m
fugue._appboot` with app_master_env: an ordinary fugue master whose one listener
is the app's inbox.
"""

import dataclasses
import json
import os
import re

from . import config
from .errors import ConfigError
from .protocol import ENV_UPGRADE_FROM, ENV_UPGRADE_SOCK
from .sniff import HostTable
from .workers import put_fugue_on_path

# Options of the router itself: name, kind (as in config.OPTIONS), default, help.
ROUTER_OPTIONS = [
    ("sniff_timeout", "float+", 5.0,
     "seconds a new connection has to send its Host header or TLS SNI; then it is closed (slowloris)"),
    ("sniff_max_bytes", "int+", 8192, "bytes a client may send before its Host header; more and it is closed"),
    ("sniff_max_conns", "int+", 512, "connections that may be naming their host at once; past that the oldest is closed"),
    ("default_app", "str", None, "app for connections whose host no app claims (otherwise 421, or close for TLS)"),
    ("route", "callable", None, "module:attr, called (host, sni, peer) -> app name or None, before the host table"),
    ("app_backlog", "int+", 1024, "connections the router holds for an app that cannot take them yet; then 503"),
]
ROUTER_KINDS = {row[0]: row[1] for row in ROUTER_OPTIONS}
ROUTER_DEFAULTS = {row[0]: row[2] for row in ROUTER_OPTIONS}

# Options that belong to the router's process, not to an app's master.
ROUTER_ONLY = ("bind", "backlog", "pid_file", "daemonize", "log_file", "master_log_file", "status_bind")
# Options an app table may not set: the router owns the listeners and the daemon.
NOT_PER_APP = ("bind", "backlog", "daemonize", "command")
TARGET_KEYS = ("app", "script", "module")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclasses.dataclass(frozen=True)
class AppSpec:
    """One app: its names, what its workers run, and its master's options."""

    name: str
    hostnames: tuple
    target: dict
    options: dict     # validated fugue options for its master (plain data)

    def same_as(self, other):
        """Same target and master options (hostnames are the router's: they change without a restart)."""
        def key(spec):
            return spec.target, {k: v for k, v in spec.options.items() if k != "hostnames"}
        return other is not None and key(self) == key(other)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    path: str
    cfg: config.Config        # the router process's own options (bind, pid_file, logs ...)
    router: dict              # ROUTER_OPTIONS values
    apps: dict                # name -> AppSpec, in file order

    def host_table(self):
        return HostTable({name: list(spec.hostnames) for name, spec in self.apps.items()})


def coerce_router(name, value, source):
    """Check one router option (config.coerce knows only fugue's own names)."""
    kind = ROUTER_KINDS[name]
    # Borrow a fugue option of the same kind for the check, then name ours in the error.
    proxy = {"float+": "timeout", "int+": "backlog", "str": "name", "callable": "startup_check"}[kind]
    try:
        return config.coerce(proxy, value, source)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f" {proxy}:", f" {name}:")) from None


def is_routed(data):
    """True if a loaded TOML document describes routed mode (it has [apps.*] tables)."""
    return isinstance(data, dict) and isinstance(data.get("apps"), dict)


def is_routed_file(path):
    """True if the TOML file at `path` has [apps.*] tables; False if not or unreadable
    (the caller's own loader then reports what is wrong with it)."""
    try:
        return is_routed(config.read_toml(path)[0])
    except ConfigError:
        return False


def load(path, start_dir=None, overrides=None):
    """Read and validate a routed-mode file. `overrides` (from flags) win over the file."""
    start_dir = start_dir or config.start_directory()
    data, full = config.read_toml(path, start_dir)
    return parse(data, full, start_dir, overrides)


def parse(data, path, start_dir, overrides=None):
    """The RouterConfig of a TOML document already loaded (see `load`)."""
    where = f"{path}:"
    if not is_routed(data) or not data["apps"]:
        raise ConfigError(f"{path}: routed mode needs at least one [apps.NAME] table")
    data = dict(data)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    router = dict(ROUTER_DEFAULTS)
    shared = {}
    for key, value in data.items():
        if key == "apps":
            continue
        if key in ROUTER_KINDS:
            router[key] = coerce_router(key, value, f"key in {where}")
        elif key in TARGET_KEYS or key == "hostnames":
            raise ConfigError(f"{path}: {key!r} belongs in an [apps.NAME] table")
        else:
            shared[key] = config.coerce(key, value, f"key in {where}")
    cfg = config.build({k: v for k, v in shared.items()}, start_dir=start_dir)
    if not cfg.bind:
        raise ConfigError(f"{path}: routed mode needs bind = [...] (the shared listeners)")
    app_defaults = {k: v for k, v in shared.items() if k not in ROUTER_ONLY}
    apps = {}
    for name, table in data["apps"].items():
        apps[name] = parse_app(name, table, app_defaults, cfg, path)
    try:
        HostTable({n: list(s.hostnames) for n, s in apps.items()})  # a name claimed twice
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if router["default_app"] and router["default_app"] not in apps:
        raise ConfigError(f"{path}: default_app {router['default_app']!r} is not an app in the file")
    return RouterConfig(path=path, cfg=cfg, router=router, apps=apps)


def parse_app(name, table, defaults, cfg, path="apps"):
    """One [apps.NAME] table (also what `fuguectl add` sends) -> AppSpec."""
    where = f"{path}: [apps.{name}]"
    if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
        raise ConfigError(f"{path}: app name {name!r} must be letters, digits, '_', '-' or '.'")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    targets = [k for k in TARGET_KEYS if k in table]
    if len(targets) != 1:
        raise ConfigError(f"{where} needs exactly one of app = \"module:attr\", script = \"file.py\", "
                          f"module = \"pkg.mod\"")
    kind = targets[0]
    value = table[kind]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {kind} must be a non-empty string")
    if kind == "app" and not all(value.partition(":")[::2]):
        raise ConfigError(f"{where}: app must be \"module:attr\", not {value!r}")
    argv = table.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"{where}: argv must be a list of strings")
    if kind == "script":
        script = os.path.join(cfg.start_dir, value)
        target = {"script": script, "argv": [script] + argv}
    elif kind == "module":
        target = {"module": value, "argv": [value] + argv}
    else:
        target = {"app": value}
    hostnames = table.get("hostnames")
    if isinstance(hostnames, str):
        hostnames = [hostnames]
    if not isinstance(hostnames, list) or not all(isinstance(h, str) and h for h in hostnames):
        raise ConfigError(f"{where}: hostnames must be a list of names")
    try:
        HostTable({name: hostnames})
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    options = dict(defaults)
    for key, val in table.items():
        if key in TARGET_KEYS or key in ("argv", "hostnames"):
            continue
        if key in NOT_PER_APP or key in ROUTER_KINDS:
            raise ConfigError(f"{where}: {key} is the router's, not an app's: set it at the top level")
        options[key] = config.coerce(key, val, f"key in {where}")
    options.setdefault("name", name)
    # Each app's master has its own pid file and run directory under the router's tmp_path.
    tmp = cfg.path("tmp_path")
    options.setdefault("pid_file", os.path.join(tmp, f"app-{name}.pid"))
    options["tmp_path"] = options.get("tmp_path") or tmp
    options["daemonize"] = False
    options["hostnames"] = list(hostnames)
    options.pop("bind", None)
    plain = {k: (v if not callable(v) else f"{v.__module__}:{v.__qualname__}") for k, v in options.items()}
    return AppSpec(name=name, hostnames=tuple(hostnames), target=target, options=plain)


# -- an app's master ---------------------------------------------------------------

ENV_APP = "FUGUE_APP"


def app_master_env(spec, inbox_fd, start_dir, notify_path):
    """The environment of an app's master: its spec as JSON, the inbox descriptor, NOTIFY_SOCKET."""
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                                                         ENV_UPGRADE_SOCK, ENV_UPGRADE_FROM)}
    env[ENV_APP] = json.dumps({"name": spec.name, "target": spec.target, "options": spec.options,
                               "start_dir": start_dir, "inbox": inbox_fd})
    env["NOTIFY_SOCKET"] = notify_path
    put_fugue_on_path(env)
    return env
