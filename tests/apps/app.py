"""The app the process tests run: python app.py [BIND] [WORKERS] [OPTIONS_JSON]

BIND is a port (0: any), HOST:PORT or a Unix socket path. Behaviour for the
generation that imports it comes from behaviour.json in the working directory
(so a test can make the *next* generation broken, slow to start, etc.):
  {"version": "v2", "raise_at_import": true, "exit_at_import": 3,
   "check_fails": true, "never_ready": true, "ready_delay": 0.5}
Endpoints: / (who answers), /slow?s=N, /ids (uid gid cwd), /crash, /status, /count?name=x
"""

import http.server
import json
import os
import sys
import time
import urllib.parse

import fugue

try:
    with open("behaviour.json") as f:
        BEHAVIOUR = json.load(f)
except FileNotFoundError:
    BEHAVIOUR = {}

VERSION = BEHAVIOUR.get("version", "v1")
in_worker = fugue.worker_id() is not None
fugue.set_version(VERSION)  # /healthz shows it (a no-op in the master)

if in_worker and BEHAVIOUR.get("raise_at_import"):
    raise RuntimeError("broken at import on purpose")
if in_worker and BEHAVIOUR.get("exit_at_import"):
    sys.exit(int(BEHAVIOUR["exit_at_import"]))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/slow":
            time.sleep(float(query.get("s", 1)))
            body = f"slow done by {os.getpid()}"
        elif url.path == "/ids":
            body = json.dumps({"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
                               "groups": os.getgroups(), "cwd": os.getcwd()})
        elif url.path == "/crash":
            os._exit(7)
        elif url.path == "/count":
            fugue.stats.incr(query.get("name", "hits"))
            body = "counted"
        elif url.path == "/status":
            body = json.dumps(fugue.server_status())
        else:
            body = (f"hello from worker {fugue.worker_id()} pid {os.getpid()} "
                    f"generation {fugue.generation()} version {VERSION}")
        data = (body + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


def check():
    if BEHAVIOUR.get("check_fails"):
        raise RuntimeError("startup check failed on purpose")


def main():
    bind = sys.argv[1] if len(sys.argv) > 1 else "0"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if BEHAVIOUR.get("check_fails") or options.pop("use_check", False):
        options["startup_check"] = check
    if BEHAVIOUR.get("never_ready") or BEHAVIOUR.get("ready_delay") is not None:
        options["wait_ready"] = True
    if in_worker and BEHAVIOUR.get("ready_delay") is not None:
        import threading

        threading.Timer(float(BEHAVIOUR["ready_delay"]), fugue.ready).start()
    server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    server.daemon_threads = True
    if bind.isdigit():
        fugue.start(server, int(bind), "127.0.0.1", workers, options)
    elif bind.startswith("/") or bind.startswith("unix:"):
        fugue.start(server, bind, workers, options)
    else:
        host, _, port = bind.rpartition(":")
        fugue.start(server, int(port), host.strip("[]") or None, workers, options)


if __name__ == "__main__":
    main()
