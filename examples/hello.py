"""hello: an http.server app on 127.0.0.1:4000 with 2 workers.

    python3 examples/hello.py            # foreground; Ctrl-C stops it
    curl http://127.0.0.1:4000/
"""

import http.server
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fugue  # noqa: E402


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self):
        body = (f"hello from worker {fugue.worker_id()} pid {os.getpid()} "
                f"generation {fugue.generation()}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # keep the log quiet under load
        pass


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 4000), Hello, bind_and_activate=False)
    fugue.start(server, 4000, "127.0.0.1", 2, {"verbose": "-v" in sys.argv})
