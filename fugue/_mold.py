"""Entry point of a preload mold: `python -m fugue._mold` (kept tiny so that
`fugue.mold` is imported once, under its own name, not as __main__)."""

from fugue.mold import main

main()
