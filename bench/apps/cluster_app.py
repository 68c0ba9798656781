"""The app of the multi-host benchmark (bench/cluster.py): one WSGI app for fugue and gunicorn.

    GET /         "hello from HOST pid PID version VERSION"
    GET /healthz  200 "ok VERSION": gunicorn's health check (it has no /healthz of its own;
                  fugue's comes from the master, on the status listener)

VERSION is read once, when a worker imports this module, from version.txt beside
it: a deploy writes the new version there, then upgrades (fugue) or HUPs
(gunicorn); only workers started afterwards say the new one. Under fugue the
version is also handed to fugue.set_version(), so fugue's /healthz shows it.
"""

import os
import socket

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "version.txt"), encoding="utf-8") as f:
    VERSION = f.read().strip() or "0"
HOST = socket.gethostname() if not os.environ.get("CLUSTER_HOST") else os.environ["CLUSTER_HOST"]

try:
    import fugue

    fugue.set_version(VERSION)
except ImportError:  # gunicorn's side of the benchmark needs no fugue
    pass


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/healthz":
        body = f"ok {VERSION}\n".encode()
    else:
        body = f"hello from {HOST} pid {os.getpid()} version {VERSION}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
