"""A routed-mode test app: python routed_app.py NAME (as a [apps.X] script, argv = [NAME]).

Answers every GET with one line naming the app, the worker and the client
address the worker sees:
  "NAME worker ID pid PID generation G peer HOST:PORT host HOSTHEADER"
/slow?s=N sleeps first. If a file NAME.broken exists in the working directory,
a new worker fails at import (so a reload of NAME rolls back).
"""

import http.server
import os
import sys
import time
import urllib.parse

import fugue

NAME = sys.argv[1] if len(sys.argv) > 1 else "app"

if fugue.worker_id() is not None and os.path.exists(f"{NAME}.broken"):
    raise RuntimeError(f"{NAME} is broken on purpose")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/slow":
            time.sleep(float(dict(urllib.parse.parse_qsl(url.query)).get("s", 1)))
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        body = (f"{NAME} worker {fugue.worker_id()} pid {os.getpid()} generation {fugue.generation()} "
                f"peer {peer} host {self.headers.get('Host')}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def make_server():
    server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    server.daemon_threads = True
    return server


if __name__ == "__main__":
    fugue.start(make_server(), 0, "127.0.0.1", 1)
