"""A Flask app served by fugue (WSGI: waitress in every worker).

    pip install 'fugue-daemon[wsgi]' flask
    cd examples/flask && fuguectl start -c fugue.toml
    # the same, as a gunicorn user would write it:
    #   fuguectl start -w 2 -b 127.0.0.1:8000 --access-logfile - app:app
    curl http://127.0.0.1:8000/

Edit VERSION and `fuguectl reload -c fugue.toml`: no request is lost, and an edit that
does not import is rolled back (the old generation goes on serving).
"""

import os

from flask import Flask

import fugue

VERSION = "v1"

app = Flask(__name__)


@app.get("/")
def hello():
    return (f"hello from flask worker {fugue.worker_id()} pid {os.getpid()} "
            f"generation {fugue.generation()} version {VERSION}\n",
            200, {"Content-Type": "text/plain"})
