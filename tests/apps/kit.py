"""Shared by the adapter test apps: behaviour.json, the greeting, argv -> fugue.start.

python <app>.py [PORT] [WORKERS] [OPTIONS_JSON]; behaviour.json in the working
directory shapes the generation that imports it, as for app.py:
  {"version": "v2", "raise_at_import": true}
"""

import json
import os
import sys

import fugue

try:
    with open("behaviour.json") as f:
        BEHAVIOUR = json.load(f)
except FileNotFoundError:
    BEHAVIOUR = {}

VERSION = BEHAVIOUR.get("version", "v1")
IN_WORKER = fugue.worker_id() is not None

if IN_WORKER and BEHAVIOUR.get("raise_at_import"):
    raise RuntimeError("broken at import on purpose")


def greeting(kind):
    return (f"hello from worker {fugue.worker_id()} pid {os.getpid()} "
            f"generation {fugue.generation()} version {VERSION} {kind}\n")


def main(server):
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    fugue.start(server, port, "127.0.0.1", workers, options)
