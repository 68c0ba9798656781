"""The app of the preload and after_fork tests: python preload_app.py [BIND] [WORKERS] [OPTIONS_JSON]

Answers with JSON: its pid, its parent, the pid and euid of the interpreter that
imported it (the mold's, when the worker was forked from one), the version of
preload_lib (a module: new code must come from a new import), and what its
after_fork hook saw. Behaviour for the next import from preload.json in the
working directory: {"hazard": "thread"|"loop"|"sqlite", "after_fork_fails": true, "ready_at_import": true}.
/crash exits at once.
"""

import http.server
import json
import os
import sys
import threading

import fugue
import preload_lib

IMPORT_PID = os.getpid()
IMPORT_EUID = os.geteuid()
try:
    with open("preload.json") as f:
        BEHAVIOUR = json.load(f)
except FileNotFoundError:
    BEHAVIOUR = {}

if fugue.worker_id() is not None:
    with open("imports.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    HAZARD = BEHAVIOUR.get("hazard")
    if HAZARD == "thread":  # an error reporter's background thread
        threading.Thread(target=threading.Event().wait, name="error-reporter", daemon=True).start()
    elif HAZARD == "loop":  # an event loop made at import (its self-pipe is a connected socket pair)
        import asyncio

        LOOP = asyncio.new_event_loop()
    elif HAZARD == "sqlite":  # a database connection opened at import
        import sqlite3

        DB = sqlite3.connect("app.db")
        DB.execute("create table if not exists t (x)")

if BEHAVIOUR.get("ready_at_import"):  # with wait_ready: warmed up by the import itself
    fugue.ready()

HOOKED = []


@fugue.after_fork
def reopen_connections():
    if BEHAVIOUR.get("after_fork_fails"):
        raise ConnectionError("database unreachable on purpose")
    HOOKED.append(fugue.worker_id())
    with open("after_fork.log", "a") as f:
        f.write(f"{os.getpid()} {fugue.worker_id()} {os.geteuid()}\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/crash":
            os._exit(7)
        body = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "import_pid": IMPORT_PID,
                           "import_euid": IMPORT_EUID, "euid": os.geteuid(),
                           "worker": fugue.worker_id(), "generation": fugue.generation(),
                           "version": preload_lib.VERSION, "hooked": HOOKED})
        data = (body + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    bind = sys.argv[1] if len(sys.argv) > 1 else "0"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    fugue.start(server, bind if not bind.isdigit() else int(bind), "127.0.0.1", workers, options)
