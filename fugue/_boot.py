"""Entry point of an exec'd worker: `python -m fugue._boot` (kept tiny so that
`fugue.worker` is imported once, under its own name, not as __main__)."""

from fugue.apprun import main

main()
