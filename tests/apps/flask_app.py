"""A Flask app for the preload framework check: fuguectl start --app flask_app:app"""

import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return f"flask ok from {os.getpid()}"
