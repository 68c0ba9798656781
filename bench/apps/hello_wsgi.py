"""Hello WSGI app for the reload benchmarks: says which process and which
generation answered.

    hello from pid 4242 gen 3

The generation is read once, when a worker imports this module: from the file
named by $HELLO_GEN_FILE if set (a benchmark rewrites it before each HUP or
USR2, and only workers started afterwards see the new number), else from $GEN,
else "0". An environment variable alone cannot mark generations: a HUP keeps
the master's environment and gunicorn's USR2 re-execs with the original one.
"""

import os


def _generation() -> str:
    path = os.environ.get("HELLO_GEN_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "0"
    return os.environ.get("GEN", "0")


GENERATION = _generation()


def app(environ, start_response):
    body = f"hello from pid {os.getpid()} gen {GENERATION}\n".encode("ascii")
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
