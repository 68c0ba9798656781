"""What the master and the router share (fugue.shell), as tables: the signal table, stop,
the run directory's checks and sweep, the pid file's steps. No process of fugue's: a
Shell subclass with a FakeSystem; real directories and files in tmp_path.
"""

import logging
import os
import signal
import subprocess

import pytest

from fugue.errors import FugueError, Refused
from fugue.shell import SIGNAL_COMMANDS, PidFile, Shell, make_run_dir, sweep_stale
from fugue.system import System


class FakeSystem(System):
    def __init__(self):
        self.notified = []

    def notify(self, *fields):
        self.notified.append(fields)


class Cfg:
    def __init__(self, tmp):
        self.tmp = tmp

    def path(self, name):
        return os.path.join(self.tmp, "fugue.pid") if name == "pid_file" else self.tmp


class Owner(Shell):
    """A shell that records what its commands and stops were asked to do."""

    def __init__(self, tmp, hold=False):
        super().__init__(Cfg(tmp), [], None, system=FakeSystem())
        self.done = []
        self.hold = hold

    def hold_stop(self, how, handed_over):
        return self.hold and how == "graceful"

    def stop_children(self, how, handed_over):
        self.done.append(("stop_children", how, handed_over))

    def on_reload(self):
        self.done.append("reload")

    def on_upgrade(self):
        raise Refused("upgrade refused: an upgrade is already in progress")

    def on_reopen_logs(self):
        raise RuntimeError("a bug")


def test_every_signal_of_the_contract_is_a_command():
    assert set(SIGNAL_COMMANDS) == {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                                    signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH}
    from fugue.master import Master
    from fugue.router import Router

    for owner in (Master, Router):  # each command a signal it installs stands for is defined
        for signum in owner.SIGNALS:
            if signum != signal.SIGCHLD:
                assert callable(getattr(owner, "on_" + SIGNAL_COMMANDS[signum])), (owner, signum)


# (signals in order) -> (stopping at the end, what stop_children was asked, STOPPING=1 sent)
@pytest.mark.parametrize("signals, stopping, children", [
    ([signal.SIGTERM], "graceful", [("stop_children", "graceful", False)]),
    ([signal.SIGQUIT, signal.SIGTERM], "graceful", [("stop_children", "graceful", False)]),  # once
    ([signal.SIGTERM, signal.SIGINT], "quick",
     [("stop_children", "graceful", False), ("stop_children", "quick", False)]),  # quick wins
    ([signal.SIGINT, signal.SIGTERM], "quick", [("stop_children", "quick", False)]),  # and stays
])
def test_stops(tmp_path, signals, stopping, children):
    owner = Owner(str(tmp_path))
    for signum in signals:
        owner.refusable(lambda: owner.handle_signal(signum))
    assert owner.stopping == stopping
    assert owner.done == children
    assert owner.system.notified == [("STOPPING=1",)] * len(children)


def test_a_held_stop_begins_later_and_a_handed_over_one_is_quiet(tmp_path):
    owner = Owner(str(tmp_path), hold=True)
    owner.handle_signal(signal.SIGTERM)
    assert owner.stopping is None and owner.done == []  # drain_delay: not yet
    owner.hold = False
    owner.begin_stop("graceful", handed_over=True)
    assert owner.stopping == "graceful" and owner.done == [("stop_children", "graceful", True)]
    assert owner.system.notified == []  # the new master serves: no STOPPING=1


def test_commands_that_refuse_or_fail_are_logged_not_fatal(tmp_path, caplog):
    owner = Owner(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fugue"):
        owner.refusable(lambda: owner.handle_signal(signal.SIGUSR2))
        owner.refusable(lambda: owner.handle_signal(signal.SIGUSR1))
        owner.refusable(lambda: owner.handle_signal(signal.SIGHUP))
    assert owner.done == ["reload"]
    assert "upgrade refused: an upgrade is already in progress" in caplog.text
    assert "internal error (please report it); the master goes on" in caplog.text


def test_the_run_directory_is_private_and_replaces_a_planted_link(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, tmp / f"fugue-{os.getpid()}")
    path = make_run_dir(str(tmp))
    assert path == str(tmp / f"fugue-{os.getpid()}")
    assert not os.path.islink(path) and os.stat(path).st_mode & 0o777 == 0o700
    assert victim.exists()  # the link was removed, never followed


@pytest.mark.parametrize("mode, error", [
    (0o777, "world-writable without the sticky bit"),
    (0o1777, None),
])
def test_a_tmp_path_others_can_rename_in_is_refused(tmp_path, mode, error):
    tmp = tmp_path / "shared"
    tmp.mkdir()
    os.chmod(tmp, mode)
    if error:
        with pytest.raises(FugueError, match=error):
            make_run_dir(str(tmp))
    else:
        assert os.path.isdir(make_run_dir(str(tmp)))


def test_the_sweep_removes_what_dead_masters_left_and_nothing_else(tmp_path):
    dead = subprocess.Popen(["true"])  # a pid that has exited (and is not ours)
    dead.wait()
    for name in (f"fugue-{dead.pid}", f"fugue-upgrade-{dead.pid}-abc", f"fugue-{os.getpid()}",
                 f"fugue-{os.getppid()}", "other"):
        (tmp_path / name).mkdir()
    sweep_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([f"fugue-{os.getpid()}", f"fugue-{os.getppid()}", "other"])


def test_the_pid_file_steps_of_an_upgrade(tmp_path):
    pid_file = PidFile(str(tmp_path / "fugue.pid"))
    pid_file.write()
    assert pid_file.ours()
    pid_file.hand_over()  # the old master, its successor ready
    assert not os.path.exists(pid_file.path) and open(pid_file.oldbin).read().strip() == str(os.getpid())
    pid_file.take_back()  # the successor died
    assert pid_file.ours() and not os.path.exists(pid_file.oldbin)
    os.unlink(pid_file.path)
    pid_file.take_back()  # nothing to rename: written afresh
    assert pid_file.ours()
    with open(pid_file.path, "w") as f:
        f.write("1\n")  # another master's now
    pid_file.remove()
    assert os.path.exists(pid_file.path)  # not ours: left alone
    with open(pid_file.oldbin, "w") as f:
        f.write("4242\n")
    pid_file.remove_oldbin_of(4242)
    assert not os.path.exists(pid_file.oldbin)

