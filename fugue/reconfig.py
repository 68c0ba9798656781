"""What a reload reads again, and what of it the next worker generation can carry.

Who calls it: the master, when a reload (HUP, fuguectl reload, a watched change) begins.
`fuguectl start` sets `reread_hook`, which reads the config file (-c) and the flags
again; they go over the options the script gave fugue.start (`script_options`, set by
fugue.start), as at start. The script's own options change with its code: each new
worker reports what its fugue.start asks for in READY, and `script_changes` applies
the difference when that generation is promoted (so `python app.py` alone, without
fuguectl, follows its script too).

What it promises: `reread(cfg, target)` returns a `Reread`: the Config the next
generation runs with (the old one with every option a generation can carry replaced),
the worker target, what changed, and which changed options only an upgrade (USR2) can
apply (config.MASTER_ONLY: bind, uid, log files ...). A file that is no longer valid
raises ConfigError (one line) and changes nothing.
"""

import dataclasses
import os

from . import config


@dataclasses.dataclass
class Reread:
    cfg: config.Config
    target: dict
    applied: dict            # option -> new value, carried by the next generation
    needs_upgrade: list      # changed options a reload cannot apply

    def upgrade_note(self):
        """'bind changed: needs `fuguectl upgrade`', or None."""
        if not self.needs_upgrade:
            return None
        return f"{', '.join(self.needs_upgrade)} changed: needs `fuguectl upgrade`"


# Set at start (see the module docstring); module state, so nothing here imports fugue itself.
reread_hook = None
script_options = None     # what the script's fugue.start gave, as the master holds it
cli_options = None        # the config file and flags, as last read (they win over the script)


def reread(cfg, target):
    if reread_hook is None:
        return Reread(cfg, target, {}, [])
    global cli_options
    options, new_target = reread_hook()
    cli_options = dict(options)
    merged = dict(script_options or {})
    merged.update(options)
    new = config.build(merged, start_dir=cfg.start_dir)
    if not os.path.isabs(new.working_path):
        new = new.replace(working_path=new.path("working_path"))
    applied, needs_upgrade = config.reload_changes(cfg, new)
    if "script" in target or not new_target:
        new_target = target  # the master runs that script: its workers run it again
    if new_target != target:
        applied["target"] = new_target
    return Reread(cfg.replace(**{k: v for k, v in applied.items() if k != "target"}), new_target,
                  applied, needs_upgrade)


def _plain(options):
    return {k: (f"{v.__module__}:{v.__qualname__}" if callable(v) else v) for k, v in (options or {}).items()}


def script_changes(cfg, target, reported):
    """Master, when a reloaded generation is promoted: the options its code's fugue.start
    gives (`reported`, plain data from a new worker's READY) against those the master
    holds. None if nothing changed; else a Reread of what changed, the config file and
    flags winning as at start. A script's options are only known once its new code runs,
    so they apply from its promotion: `workers` at once (more or fewer slots), the
    master's timeouts at once, what the workers read with the next workers; what only a
    new master can apply is named, as for the file. ConfigError if they are not valid."""
    global script_options
    if not isinstance(reported, dict) or script_options is None:
        return None
    held = _plain(script_options)
    cli = cli_options or {}
    changed = {k for k in set(held) | set(reported) if held.get(k) != reported.get(k) and k not in cli}
    if not changed:
        return None
    merged = dict(reported)
    merged.update(cli)
    new = config.build(merged, start_dir=cfg.start_dir)
    if not os.path.isabs(new.working_path):
        new = new.replace(working_path=new.path("working_path"))
    applied, needs_upgrade = config.reload_changes(cfg, new)
    applied = {k: v for k, v in applied.items() if k in changed}
    needs_upgrade = [k for k in needs_upgrade if k in changed]
    script_options = dict(reported)
    return Reread(cfg.replace(**applied), target, applied, needs_upgrade)


def follow_bind(handed, cfg):
    """New master (USR2): the listeners its `bind` names now, from those the old master
    handed over. Still named: kept (the same sockets: no client sees a change). Newly
    named: bound here (FugueError if that fails: the upgrade fails, the old master goes
    on). No longer named: closed in this process; the old master keeps its copy until
    it exits, so nothing is cut off before the new master serves. Adopted sockets
    (systemd's, fd:N) are always kept; an empty `bind` keeps what was handed over."""
    import logging

    from .fds import Listener, close_listeners, open_listeners

    if not cfg.bind:
        return handed
    keep = [lst for lst in handed if lst.spec in cfg.bind or str(lst.spec).startswith("fd:")]
    gone = [lst for lst in handed if lst not in keep]
    have = {lst.spec for lst in handed}
    added = open_listeners([spec for spec in cfg.bind if spec not in have], cfg.backlog)
    names = {lst.name for lst in keep}
    for i, lst in enumerate(added):
        n = len(keep) + i
        while f"l{n}" in names:
            n += 1
        names.add(f"l{n}")
        added[i] = Listener(lst.sock, f"l{n}", lst.spec)
    log = logging.getLogger("fugue")
    for lst in gone:
        log.info("upgrade: %s is no longer in bind: not listening on it", lst.describe()["address"])
        _remember_path(lst)
    close_listeners(gone, unlink=False)
    return keep + added


# New master: socket files of Unix listeners that bind no longer names. The old master still
# serves on them until it exits; then `unlink_dropped` removes them.
dropped_paths = []


def _remember_path(lst):
    import socket
    import stat

    if lst.sock.family != socket.AF_UNIX or str(lst.spec).startswith("fd:"):
        return
    try:
        path = lst.sock.getsockname()
        st = os.lstat(path) if isinstance(path, str) and path and not path.startswith("\0") else None
    except OSError:
        return
    if st is not None and stat.S_ISSOCK(st.st_mode):
        dropped_paths.append((path, st.st_dev, st.st_ino))


def unlink_dropped():
    """New master, once the old master is gone: remove the socket files of dropped Unix
    listeners, if each is still the very socket it was (same device and inode)."""
    while dropped_paths:
        path, dev, ino = dropped_paths.pop()
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass
