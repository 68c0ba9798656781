"""A routed-mode TLS app: the router passes the raw TCP connection (it routes on
the ClientHello's SNI without terminating TLS); each worker wraps it with its
own certificate. python routed_tls.py NAME CERT KEY.

Answers "NAME tls worker ID pid PID peer HOST:PORT sni SERVERNAME".
"""

import http.server
import os
import ssl
import sys

import fugue

NAME = sys.argv[1] if len(sys.argv) > 1 else "tls"
CERT = sys.argv[2] if len(sys.argv) > 2 else "cert.pem"
KEY = sys.argv[3] if len(sys.argv) > 3 else "key.pem"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        body = (f"{NAME} tls worker {fugue.worker_id()} pid {os.getpid()} peer {peer} "
                f"sni {getattr(self.request, 'fugue_sni', None)}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("", 0), Handler, bind_and_activate=False)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(CERT, KEY)
        self.context.sni_callback = self._remember_sni

    @staticmethod
    def _remember_sni(sslobj, name, context):
        sslobj.fugue_sni = name  # the SSLSocket being handshaken

    def finish_request(self, request, client_address):
        # The handshake runs in the request's own thread, never in the accept loop.
        tls = self.context.wrap_socket(request, server_side=True)
        super().finish_request(tls, client_address)


if __name__ == "__main__":
    fugue.start(TLSServer(), 0, "127.0.0.1", 1)
