"""What every supervisor process of fugue shares: the master and the router.

Who calls it: fugue.master, fugue.router, fugue.upgrade and fugue.run.
What it promises: the pid file has one writer, PidFile; nothing else in fugue
writes, renames or removes a pid file.
"""

import os

from .daemon import read_pid, remove_pid, write_pid
from .errors import FugueError


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
