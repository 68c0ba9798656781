"""A WSGI app for preload with warmup: it remembers which process called it first."""

import json
import os

FIRST_CALL = []


def app(environ, start_response):
    if not FIRST_CALL:
        FIRST_CALL.append(os.getpid())
    body = json.dumps({"pid": os.getpid(), "first_call_pid": FIRST_CALL[0],
                       "host": environ.get("HTTP_HOST")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
