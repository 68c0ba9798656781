"""Entry point of an app's master in routed mode: `python -m fugue._appboot`.

Who runs it: fugue.appmasters, with the environment of apps.app_master_env
(FUGUE_APP: the app's name, target, options and inbox descriptor). It runs an
ordinary fugue master (fugue.run) whose one listener is the app's inbox. It
is the __main__ module of that process; nothing imports it.

FUGUE_APP stays in the environment: a USR2 upgrade re-execs this same
command, and the new master takes the inbox over the handoff socket.
"""

import json
import os
import sys

from fugue import config, notify
from fugue.apps import ENV_APP
from fugue.errors import FugueError
from fugue.run import run_master


def main():
    try:
        spec = json.loads(os.environ[ENV_APP])
        name = spec["name"]
        options = dict(spec["options"])
        options["bind"] = [f"inbox:{spec['inbox']}"]
        cfg = config.build(options, start_dir=spec["start_dir"])
        # One log for the router and every app: say whose master a line is from.
        status = run_master(cfg, spec["target"], role=f"master {name}")
    except FugueError as e:
        notify.claim()
        notify.send(f"STATUS=start failed: {e}")  # the router says why the app did not start
        print(f"fugue: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(e.status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


main()
