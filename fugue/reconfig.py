"""What a reload reads again, and what of it the next worker generation can carry.

Who calls it: the master, when a reload (HUP, fuguectl reload, a watched change) begins.
`fuguectl start` sets `reread_hook`, which reads the config file (-c) and the flags
again; they go over the options the script gave fugue.start when the master started
(`script_options`, set by fugue.start), as at start. A master started by a script alone
(no fuguectl) has nothing to read again: its reloads keep its options.

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
script_options = None


def reread(cfg, target):
    if reread_hook is None:
        return Reread(cfg, target, {}, [])
    options, new_target = reread_hook()
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
    close_listeners(gone, unlink=False)
    return keep + added
