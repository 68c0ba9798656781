"""What a worker leaves behind: the rest of its process group, and listeners held by strangers.

Who calls it: the master. Each worker leads its own process group (workers.spawn calls
setpgid before exec), so what its app forks without exec (a subprocess that daemonizes
half-way, a multiprocessing pool) stays in that group and keeps the listening sockets
it inherited. Once the worker has been reaped, `Leftovers.worker_exited` sends TERM to
what is left of the group and `tick` sends KILL after `graceful_timeout`; a stopping
master waits for them the same way (`finish`). A process that left the group (setsid)
cannot be told from a bystander and is not signalled: if it still holds a listener when
the master exits for good, `name_listener_holders` names it in the log, so "port already
in use" at the next start has an answer.
"""

import logging
import os
import select
import signal
import time

log = logging.getLogger("fugue")


def group_members(pgid):
    """Pids of the live (not zombie) processes of process group `pgid`."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:  # out of descriptors: nothing to learn now
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 3 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def _signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Leftovers:
    """Process groups of exited workers that still have members: TERM, then KILL."""

    def __init__(self, grace):
        self.grace = grace
        self.groups = {}  # pgid (the worker's pid) -> when KILL is due

    def worker_exited(self, pgid, now):
        """Called once a worker (leader of group `pgid`) has been reaped."""
        members = group_members(pgid)
        if not members:
            return
        _signal_group(pgid, signal.SIGTERM)
        self.groups[pgid] = now + self.grace
        log.warning("worker pid %d left %d process%s in its group (%s): TERM now, KILL in %gs",
                    pgid, len(members), "" if len(members) == 1 else "es",
                    " ".join(map(str, members[:8])), self.grace)

    def tick(self, now):
        """KILL what is overdue; returns the next deadline, or None."""
        for pgid, due in list(self.groups.items()):
            if not group_members(pgid):
                del self.groups[pgid]
            elif due <= now:
                _signal_group(pgid, signal.SIGKILL)
                log.warning("killed what worker pid %d left in its group (still there after %gs)",
                            pgid, self.grace)
                del self.groups[pgid]
        return min(self.groups.values(), default=None)

    def finish(self):
        """At the master's exit: wait for the groups to go, KILL them when their time is up.

        The members are not our children, so the wait is on their pidfds (readable when the
        process exits): woken by each exit or by the KILL deadline, not by polling."""
        while self.groups:
            due = self.tick(time.monotonic())
            if due is None:
                return
            fds = []
            for pgid in self.groups:
                for pid in group_members(pgid):
                    try:
                        fds.append(os.pidfd_open(pid))
                    except OSError:  # gone meanwhile (ESRCH): the next tick sees it
                        pass
            try:
                # No pidfd at all (every member went in between, or no descriptor left to
                # open one): look again shortly rather than spin.
                left = max(0.0, due - time.monotonic())
                select.select(fds, [], [], left if fds else min(0.05, left))
            finally:
                for fd in fds:
                    os.close(fd)


def listener_inodes(listeners):
    """{socket inode: address} of `listeners`, taken while they are open (a stopping master
    closes them before its workers are done)."""
    inodes = {}
    for lst in listeners:
        if lst.describe().get("family") == "inbox":  # routed mode: the router holds it, rightly
            continue
        try:
            inodes[os.fstat(lst.fileno()).st_ino] = lst.describe()["address"]
        except (OSError, ValueError):
            continue
    return inodes


def name_listener_holders(inodes):
    """Log every other process that still holds one of the listeners (`listener_inodes`);
    called at the master's exit, when no successor took them over."""
    if not inodes:
        return
    me = os.getpid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit() or int(name) in (me, 1):  # pid 1: systemd's own socket units
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                log.warning("listener %s is still held by pid %s (%s): the port stays open until it exits",
                            inodes[int(target[8:-1])], name, _command(name))
                break


def _command(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120] or "?"
    except OSError:
        return "?"
