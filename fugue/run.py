"""Starting a master: the ordered steps from a validated Config to a running loop.

Who calls it: fugue.start and fuguectl start. Everything a user can get wrong
is checked before daemonizing, so it is reported on the terminal as one line;
whatever was created is removed again on any failure.
"""

import logging
import os
import sys

from . import keeper, notify, upgrade, watch
from .config import DEFAULT_TMP_PATHS
from .daemon import Logs, check_pid_file, daemonize, setup_logging, tell_launcher
from .errors import FugueError
from .master import Master
from .fds import close_listeners, open_listeners, systemd_listeners
from .shell import PidFile
from .statushttp import parse_status_bind
from .workers import Identity

log = logging.getLogger("fugue")


def check_paths(cfg):
    working = cfg.working_path if os.path.isabs(cfg.working_path) else cfg.path("working_path")
    if not os.path.isdir(working):
        raise FugueError(f"working_path {working} does not exist or is not a directory")
    tmp = cfg.path("tmp_path")
    if cfg.tmp_path in DEFAULT_TMP_PATHS and not os.path.lexists(tmp):
        try:
            os.mkdir(tmp, 0o700)  # the default, as the original fugue: ./tmp
        except OSError as e:
            raise FugueError(f"cannot create tmp_path {tmp}: {e.strerror}") from None
    if not os.path.isdir(tmp):
        raise FugueError(f"tmp_path {tmp} does not exist or is not a directory")
    if not os.access(tmp, os.W_OK | os.X_OK):
        raise FugueError(f"tmp_path {tmp} is not writable")
    pid_dir = os.path.dirname(cfg.path("pid_file"))
    if not os.path.isdir(pid_dir):
        raise FugueError(f"pid file directory {pid_dir} does not exist")
    access_log = cfg.path("access_log") if cfg.access_log != "-" else None
    if access_log and not os.path.isdir(os.path.dirname(access_log)):
        raise FugueError(f"access_log {access_log}: directory {os.path.dirname(access_log)} does not exist")
    if cfg.status_bind:
        parse_status_bind(cfg.status_bind)  # bound after the listeners: a bad one must not get that far
    watch.preflight(cfg)
    return cfg.replace(working_path=working)


def run_master(cfg, target, role="master"):
    """Bind (or adopt, or take over on upgrade), daemonize, run the loop. Returns the exit status.
    `role` names the master in its log lines (an app's master in routed mode: "master NAME")."""
    setup_logging(cfg.verbose, cfg.log_level, cfg.log_format, role=role)
    logging.raiseExceptions = False  # a full disk must not turn log lines into tracebacks
    cfg = check_paths(cfg)
    identity = Identity(cfg.uid, cfg.gid)
    from .accesslog import prepare_for_workers  # the workers open it, as their user

    prepare_for_workers(cfg.access_log, identity.uid, identity.gid)
    logs = Logs(cfg.path("log_file"), cfg.path("master_log_file"))
    logs.open()
    upgrade_path = upgrade.from_environment()
    handoff = None
    first_generation = 1
    if upgrade_path:
        handoff, listeners, first_generation = upgrade.connect(
            upgrade_path, PidFile(cfg.path("pid_file")), cfg.path("tmp_path"))
        from .reconfig import follow_bind  # USR2 applies a changed bind

        try:
            listeners = follow_bind(listeners, cfg)
        except FugueError as e:
            handoff.report(str(e))  # so `fuguectl upgrade` and the old master's log say why
            close_listeners(listeners)
            raise
    else:
        check_pid_file(cfg.path("pid_file"))
        listeners = systemd_listeners()
        keeper.restore_specs(listeners)
        if not listeners:
            if not cfg.bind:
                raise FugueError("nothing to listen on: give a port, a Unix socket path or --bind")
            listeners = open_listeners(cfg.bind, cfg.backlog)
    if keeper.wanted(cfg, upgrade_path):
        # Under systemd or as PID 1 this process stays, as the keeper; the master is its child.
        logs.redirect_master()
        return keeper.run(cfg, listeners, unlink=True)
    ready_fd = None
    master = None
    try:
        from .limits import check_descriptor_limit

        check_descriptor_limit(len(listeners), cfg.workers if cfg.workers is not None else os.cpu_count() or 1)
        if cfg.daemonize and not upgrade_path:
            preserve = [lst.fileno() for lst in listeners] + logs.preserve()
            ready_fd = daemonize(preserve, cfg.umask)
        elif cfg.daemonize:
            os.umask(cfg.umask)
        logs.redirect_master()
        for lst in listeners:
            log.info("listening on %s (%s)", lst.describe()["address"], lst.name)
        notify.claim()
        master = Master(cfg, listeners, target, identity, logs, ready_fd=ready_fd, handoff=handoff,
                        first_generation=first_generation, daemonized=cfg.daemonize)
        master.setup()
        ready_fd = None  # the master owns it now
        status = master.run()
        if status and getattr(master, "fatal_reason", None) and not cfg.daemonize:
            raise FugueError(f"start failed: {master.fatal_reason}")
        return status
    except FugueError as e:
        if ready_fd is not None:
            tell_launcher(ready_fd, False, str(e))
        if master is None or master.run_dir is None:
            close_listeners(listeners, unlink=not upgrade_path)
        if master is not None and master.control is None:
            master.pid_file.remove()
        if cfg.daemonize and not upgrade_path:
            log.error("%s", e)
            os._exit(e.status)
        raise
    finally:
        sys.stdout.flush()
