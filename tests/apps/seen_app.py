"""An app module that records who imports it (tests/test_hardening.py, issue 12 item 2)."""
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "seen", "imports"), "a") as f:
    f.write(f"{os.getpid()} {os.getuid()} {os.geteuid()} {os.getgid()}\n")

from app import Handler  # noqa: E402,F401 - the handler adapter serves it
