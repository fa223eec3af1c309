"""CLI: see the module that it calls for the work itself."""

from liverkd.cli.app import app  # noqa: F401
