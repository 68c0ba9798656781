"""What every supervisor process of fugue shares: the master and the router.

Who calls it: fugue.master and fugue.router subclass Shell; fugue.upgrade and
fugue.run use PidFile. What it promises:

- one loop pass is: signals -> reap -> finished? -> step (timers, decisions)
  -> wait, with one wait point (fugue.loop) and every signal a named command
  (SIGNAL_COMMANDS: the owner's `on_<command>` method runs it);
- the run directory tmp_path/fugue-PID is made only in a tmp_path that passes
  the ownership, sticky and symlink checks, after sweeping what killed
  masters left there; it holds the control socket and goes at exit;
- the pid file has one writer, PidFile: the master, the router and the upgrade
  write, rename and remove it only through it (the keeper, a parent of masters,
  only removes a pid file a killed master left);
- the launcher's ready pipe (daemonize) hears the outcome once: ok when the
  owner serves, or the reason it stopped, last of all at exit;
- a stop is graceful or quick, once each; shutdown leaves nothing behind.
"""

import logging
import os
import re
import shutil
import signal

from .daemon import alive, read_pid, remove_pid, tell_launcher, write_pid
from .errors import FugueError, Refused
from .fds import check_private_parent, close_listeners
from .loop import Loop
from .system import SYSTEM

log = logging.getLogger("fugue")

# The signal contract (man/fugue.7, README): each signal is a command of the owner.
SIGNAL_COMMANDS = {
    signal.SIGTERM: "graceful_stop", signal.SIGQUIT: "graceful_stop", signal.SIGINT: "quick_stop",
    signal.SIGHUP: "reload", signal.SIGUSR2: "upgrade", signal.SIGUSR1: "reopen_logs",
    signal.SIGTTIN: "more_workers", signal.SIGTTOU: "fewer_workers", signal.SIGWINCH: "winch",
}


class Shell:
    """A supervisor process: its loop, run directory, pid file, control socket, ready pipe.

    A subclass sets SIGNALS (those it installs), Control (its control server
    class), role ("master", "router"), and provides begin, reap, step,
    finished, stop_children (what a stop does to what it owns), release (kill
    and close it at exit) and on_<command>.
    """

    SIGNALS = ()
    Control = None
    role = "master"
    stopped_text = "the master stopped"   # what the launcher hears if it never served

    def __init__(self, cfg, listeners, logs, ready_fd=None, daemonized=False, system=SYSTEM):
        self.cfg = cfg
        self.listeners = listeners
        self.logs = logs
        self.ready_fd = ready_fd
        self.daemonized = daemonized
        self.system = system
        self.loop = Loop()
        self.pid_file = PidFile(cfg.path("pid_file"))
        self.run_dir = None
        self.control = None
        self.stopping = None            # None, "graceful" or "quick"
        self.exit_status = 0
        self.fatal_reason = None        # why it stopped itself (a start that failed)

    # -- setup ---------------------------------------------------------------------------

    def setup_shell(self, title, write_pid=True):
        """Run directory, process title, pid file, control socket; FugueError on failure."""
        self.run_dir = make_run_dir(self.cfg.path("tmp_path"))
        try:
            import setproctitle  # installed with fugue, but a missing one costs only the title

            setproctitle.setproctitle(title)
        except ImportError:
            pass
        if write_pid:
            self.pid_file.write()
        self.control = self.Control(self, os.path.join(self.run_dir, "control.sock"))
        self.loop.add_reader(self.control.sock, self.control.accept)

    # -- the loop ----------------------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns the exit status."""
        self.loop.install_signals(self.SIGNALS)
        self.begin()
        try:
            while True:
                # Signals first: a TERM sent to the whole process group reaches the
                # children too, and their exits must be read as part of the stop.
                for signum in self.loop.pop_signals():
                    self.refusable(lambda: self.handle_signal(signum))
                self.reap()
                if self.finished():
                    break
                self.loop.wait(self.step())
        finally:
            self.shutdown()
        return self.exit_status

    def handle_signal(self, signum):
        """Run the command the signal stands for (SIGNAL_COMMANDS)."""
        if signum == signal.SIGCHLD:
            return
        log.debug("signal %s", signal.Signals(signum).name)
        getattr(self, "on_" + SIGNAL_COMMANDS[signum])()

    def on_graceful_stop(self):
        self.begin_stop("graceful")

    def on_quick_stop(self):
        self.begin_stop("quick")

    def refusable(self, fn):
        """Run a command; a refusal or failure is logged, and the process goes on serving."""
        try:
            fn()
        except Refused as e:
            log.warning("%s", e)
        except FugueError as e:
            log.error("%s", e)
        except Exception:  # noqa: BLE001 - a bug in one command must not take the service down
            log.exception("internal error (please report it); the %s goes on", self.role)

    def tell_launcher(self, ok, text):
        """The launcher's ready pipe (daemonize): the outcome, once."""
        self.ready_fd = tell_launcher(self.ready_fd, ok, text)

    # -- stop and exit --------------------------------------------------------------------------

    def begin_stop(self, how, handed_over=False):
        """Graceful (drain) or quick (kill) stop; each happens once, and quick wins."""
        if self.stopping == "quick" or self.stopping == how:
            return
        if self.hold_stop(how, handed_over):
            return
        self.stopping = how
        if not handed_over:
            self.system.notify("STOPPING=1")
            log.info("%s stop", how)
        self.stop_children(how, handed_over)

    def hold_stop(self, how, handed_over):
        """True to put the stop off (the owner begins it again later): the master's drain_delay."""
        return False

    def handed_over(self):
        """True if a successor serves on our listeners and pid file (the master after USR2)."""
        return False

    def shutdown(self):
        """Leave nothing behind: children, sockets, the pid file, the run directory."""
        self.release()
        if self.control is not None:
            self.control.close()
        handed_over = self.handed_over()
        close_listeners(self.listeners, unlink=not handed_over)
        self.pid_file.remove(handed_over=handed_over)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.loop.close()
        log.info("%s exiting (status %d)", self.role, self.exit_status)
        if self.ready_fd is not None:  # last: the launcher's exit status is the final word
            self.tell_launcher(False, self.fatal_reason or self.stopped_text)


def make_run_dir(tmp):
    """tmp_path/fugue-<pid>: 0700, holds the control socket. FugueError if it cannot be made safely."""
    check_private_parent(tmp)
    sweep_stale(tmp)
    path = os.path.join(tmp, f"fugue-{os.getpid()}")
    if os.path.islink(path):  # planted in a shared tmp_path: remove the link, never follow it
        os.unlink(path)
    shutil.rmtree(path, ignore_errors=True)  # a stale one from a reused pid
    try:
        os.mkdir(path, 0o700)  # never follows a link: it fails if anything is (again) there
    except OSError as e:
        raise FugueError(f"cannot create the run directory {path}: {e.strerror}") from None
    return path


def sweep_stale(tmp):
    """Remove what masters killed with SIGKILL left in tmp_path: run directories
    (fugue-PID) and handoff directories (fugue-upgrade-PID-*) of our uid whose pid is gone."""
    for name in os.listdir(tmp):
        m = re.fullmatch(r"fugue-(?:upgrade-)?(\d+)(?:-.*)?", name)
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))) and (
                st.st_uid == os.getuid() and os.path.isdir(path) and not os.path.islink(path)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by pid %s", path, m.group(1))


class PidFile:
    """The pid file, and its `.oldbin` while an upgraded master drains (Unicorn's names).

    `path` names the master that serves. During an upgrade the old master
    renames it to `.oldbin` when the new one is ready (hand_over), the new one
    writes `path` (write), and the old one removes `.oldbin` when it exits.
    """

    def __init__(self, path):
        self.path = path
        self.oldbin = path + ".oldbin"

    def write(self):
        """This process serves: write the pid file atomically."""
        write_pid(self.path)

    def ours(self):
        """True if the pid file names this process."""
        try:
            return read_pid(self.path) == os.getpid()
        except FugueError:
            return False

    def hand_over(self):
        """Old master, its successor ready: the pid file becomes .oldbin (OSError if it cannot)."""
        os.replace(self.path, self.oldbin)

    def take_back(self):
        """Old master, its successor died after hand_over: the pid file is ours again."""
        try:
            os.replace(self.oldbin, self.path)
        except OSError:
            write_pid(self.path)

    def remove(self, handed_over=False):
        """At exit: remove the pid file (the .oldbin one after a hand_over) if it still names us."""
        remove_pid(self.oldbin if handed_over else self.path)

    def remove_oldbin_of(self, pid):
        """New master: remove the .oldbin a killed old master `pid` left behind."""
        remove_pid(self.oldbin, pid)
