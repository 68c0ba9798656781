"""Entry point of an app's master in routed mode: `python -m fugue._appboot`
(kept tiny so that `fugue.apps` is imported once, under its own name)."""

from fugue.apps import app_master_main

app_master_main()
