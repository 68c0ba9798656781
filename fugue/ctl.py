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
Its flags, config file and target are fugue.ctlargs; `check` is fugue.ctlcheck.

`fuguectl start` must be re-runnable as it is: on USR2 the master re-execs its
own command line (sys.orig_argv) from the start directory, and the new master,
seeing FUGUE_UPGRADE_SOCK (fugue.upgrade), takes the listeners instead of binding and does not
daemonize again. So everything here is derived from argv, the files and $PWD.
"""

import json
import os
import socket
import sys
import time

from . import config
from .ctlargs import (EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_USAGE, _parse, _parse_options_after_app,
                      _say, build_parser, check_value, choose_target, environment, flag_of, gather_options,
                      is_app_spec, load_config_file)
from .ctlcheck import check, check_target
from .errors import ConfigError, FugueError


class NotRunning(FugueError):
    """No master to talk to (no pid file, or a stale one): exit 3, as LSB's status."""

    def __init__(self, message):
        super().__init__(message, status=EXIT_NOT_RUNNING)


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
