"""`python -m gwsync.cli`: the same as the `gwsync` command."""

from . import run

run()
