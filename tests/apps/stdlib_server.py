"""A Python HTTP server made of the standard library alone, the kind that runs
under systemd: it serves on the socket it inherits at fd 3 (LISTEN_FDS /
LISTEN_PID), says READY=1 on $NOTIFY_SOCKET (sd_notify), and drains on SIGTERM.
Nothing in it knows fugue; FUGUE_WORKER_ID/FUGUE_GENERATION only decorate the
greeting.
"""

import http.server
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse

VERSION = "v1"


def sd_notify(*lines):
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall("\n".join(lines).encode())


def activated_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("stdlib_server: not socket-activated (LISTEN_FDS/LISTEN_PID)")
    sock = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
    os.close(3)
    # Other processes accept on the same socket: never block in accept() for a
    # connection somebody else took.
    sock.setblocking(False)
    return sock


draining = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(float(dict(urllib.parse.parse_qsl(url.query)).get("s", 1)))
        body = (f"hello from worker {os.environ.get('FUGUE_WORKER_ID')} pid {os.getpid()} "
                f"generation {os.environ.get('FUGUE_GENERATION')} version {VERSION} stdlib "
                f"uid {os.getuid()}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight
    block_on_close = True

    def get_request(self):
        conn, addr = super().get_request()
        conn.setblocking(True)
        return conn, addr


def main():
    sock = activated_socket()
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock

    def on_term(signum, frame):
        draining.set()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    sd_notify("STATUS=serving", "READY=1")
    print(f"stdlib_server {os.getpid()} {VERSION} serving on fd 3", flush=True)
    server.serve_forever(poll_interval=0.2)
    sd_notify("STOPPING=1")
    server.server_close()  # joins the handler threads


if __name__ == "__main__":
    main()
