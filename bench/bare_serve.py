#!/usr/bin/env python3
"""The overhead benchmark's baseline: the server fugue runs, without fugue.

    python3 bench/bare_serve.py --kind wsgi --app hello_wsgi:app --workers 2

Binds 127.0.0.1:0 (backlog 2048, fugue's default), imports the app, then
forks N copies of the same server fugue's adapter would run in a worker,
all accepting on the one socket: waitress with fugue's defaults (4 threads)
for WSGI, uvicorn.Server with fugue's uvicorn.Config defaults for ASGI. No
master loop, no channel, no heartbeat, no per-request counters: the parent
only waits. Prints "bare: listening on 127.0.0.1:PORT" and one
"bare: worker PID serving" per child. Stopped by SIGTERM to its process
group (what the benchmark does).
"""

import argparse
import importlib
import os
import signal
import socket
import sys

BACKLOG = 2048


def serve_wsgi(app, sock):
    import waitress

    # fugue.adapters.wsgi.DEFAULTS
    server = waitress.create_server(app, sockets=[sock], threads=4, ident="fugue")
    print(f"bare: worker {os.getpid()} serving", flush=True)
    server.run()


def serve_asgi(app, sock):
    import uvicorn

    # fugue.adapters.asgi.DEFAULTS (and its graceful timeout default)
    config = uvicorn.Config(app, lifespan="auto", access_log=False, log_config=None,
                            log_level="warning", server_header=False,
                            timeout_graceful_shutdown=30)
    print(f"bare: worker {os.getpid()} serving", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("wsgi", "asgi"), required=True)
    parser.add_argument("--app", required=True, help="module:attr")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    module, _, attr = args.app.partition(":")
    app = getattr(importlib.import_module(module), attr)
    # As fugue.fds does: from getaddrinfo, so proto is IPPROTO_TCP. asyncio sets
    # TCP_NODELAY only on sockets whose proto says TCP; a socket made with
    # proto 0 gets Nagle + delayed ACK stalls (40 ms) under uvicorn.
    family, kind, proto, _, addr = socket.getaddrinfo("127.0.0.1", 0, socket.AF_INET,
                                                      socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(BACKLOG)
    print(f"bare: listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    serve = serve_wsgi if args.kind == "wsgi" else serve_asgi
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                serve(app, sock)
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    sock.close()
    signal.signal(signal.SIGTERM, lambda *_: None)  # the group gets it; outlive the children
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
