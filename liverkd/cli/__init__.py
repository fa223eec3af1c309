"""The typer app `liverkd`. Each command is a thin call into liverkd, distill or deploy,
imported inside the command so that `liverkd --help` stays fast and torch-free."""

from liverkd.cli import data, demo, distill, engine, evaluate, infer, model, profile, runner  # noqa: F401
from liverkd.cli.app import app


def main():
    app()
