"""Hello app for fugue's half of the reload benchmark: says which process and
which generation answered, in the same words as hello_wsgi.py (gunicorn's half).

    hello from pid 4242 gen 3

    python3 -m fugue.ctl start --bind 127.0.0.1:0 -w 2 bench/apps/hello_fugue.py

An http.server ThreadingHTTPServer with HTTP/1.1 keep-alive, as in
examples/hello.py. The generation is fugue's own number (fugue.generation()):
a HUP's new workers and a USR2's new master's workers each get the next one,
so the load can tell which generation answered without any help from the
benchmark. The benchmark appends a syntax error to a copy of this file to
make a broken deploy.
"""

import http.server
import os

import fugue


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # One write per response. With the default (unbuffered) wfile the head and
    # the body leave in two small writes, and the second waits for the client's
    # delayed ACK (Nagle): ~40 ms per request, 700 req/s instead of thousands.
    wbufsize = -1

    def do_GET(self):
        body = f"hello from pid {os.getpid()} gen {fugue.generation()}\n".encode("ascii")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # keep the log quiet under load
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello, bind_and_activate=False)
server.daemon_threads = True
# Bind, workers and everything else come from fuguectl's flags.
fugue.start(server)
