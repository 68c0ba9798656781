"""fugue.system's prctl calls: one PR_SET_CHILD_SUBREAPER for the router, the keeper and preload.

System.become_subreaper returns None or why not; each caller decides: the router and the
keeper warn, preload (molds) refuses to start.
"""

import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fugue import appmasters, molds
from fugue.errors import FugueError
from fugue.system import System

PR_GET_CHILD_SUBREAPER = 37


def test_become_subreaper_makes_this_process_a_subreaper():
    # In a child interpreter: the flag stays on the process that set it.
    code = ("import ctypes, sys\n"
            "from fugue.system import SYSTEM\n"
            "assert SYSTEM.become_subreaper() is None\n"
            "v = ctypes.c_int(0)\n"
            f"ctypes.CDLL(None).prctl({PR_GET_CHILD_SUBREAPER}, ctypes.byref(v), 0, 0, 0)\n"
            "print(v.value)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "1", "")


class Refusing(System):
    def become_subreaper(self):
        return "Invalid argument"


def test_preload_refuses_to_start_without_a_subreaper(monkeypatch):
    monkeypatch.setattr(molds, "SYSTEM", Refusing())
    with pytest.raises(FugueError, match=r"^preload needs PR_SET_CHILD_SUBREAPER \(Linux 3.4\+\): Invalid argument$"):
        molds.become_subreaper()


def test_the_router_warns_without_a_subreaper(caplog):
    with caplog.at_level(logging.WARNING, logger="fugue"):
        appmasters.become_subreaper(Refusing())
    assert [r.getMessage() for r in caplog.records] == [
        "cannot become a child subreaper (Invalid argument); an app master upgraded by USR2 will not be reaped"]


def test_one_prctl_in_fugue():
    # The router's, the keeper's and preload's copies are gone: prctl (subreaper, and an app
    # master's PDEATHSIG) is called in system.py only.
    hits = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "fugue")):
        for name in files:
            if name.endswith(".py") and ".prctl(" in open(os.path.join(dirpath, name)).read():
                hits.append(name)
    assert hits == ["system.py"]
