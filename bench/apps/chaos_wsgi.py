"""The chaos benchmark's WSGI app: hello_wsgi plus two ways to misbehave.

    GET /        -> hello_wsgi's answer ("hello from pid 4242 gen 3")
    GET /hang    -> never answers (a request stuck forever in app code)

With CHAOS_IGNORE_TERM=1 in the environment, every worker that imports this
module sets SIGTERM to SIG_IGN, as a library that swallows signals would.
Both gunicorn and fugue import the app after installing their own signal
handlers, so the app's choice wins in both.

It imports hello_wsgi, so a syntax error appended to hello_wsgi.py (what the
"broken code" faults do) breaks this app too.
"""

import os
import signal
import time

import hello_wsgi

if os.environ.get("CHAOS_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def app(environ, start_response):
    if environ.get("PATH_INFO", "").startswith("/hang"):  # /hang/<padding>: a long target
        time.sleep(3600)
    return hello_wsgi.app(environ, start_response)
