"""Imported by preload_app.py: the tests rewrite VERSION to deploy new code."""

VERSION = "v1"
