"""A plain serve(sock, *, stop) callable: its own accept loop and a thread per connection."""

import http.server
import threading
import time
import urllib.parse

from kit import greeting, main

STOP = None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(float(dict(urllib.parse.parse_qsl(url.query)).get("s", 1)))
        body = greeting("plain").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if STOP.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def client(conn, addr):
    try:
        Handler(conn, addr, None)
    finally:
        conn.close()


def serve(sock, *, stop):
    global STOP
    STOP = stop
    while True:
        try:
            conn, addr = sock.accept()
        except OSError:
            if stop.is_set():
                return  # fugue is draining: the handler threads finish on their own
            raise
        threading.Thread(target=client, args=(conn, addr)).start()


if __name__ == "__main__":
    main(serve)
