"""The typer app `liverkd`. Each command is a thin call into liverkd.core, liverkd.distill or
liverkd.deploy, imported inside the command so that `liverkd --help` stays fast and torch-free.

Exit codes (the one policy, liverkd.core.errors): 0 success; 1 a file that cannot be used (a
volume, data set, engine bundle or checkpoint: one line on stderr naming it); 2 a usage error
(a bad option or argument, an unknown preset or config key).
"""

import sys

from liverkd.cli import data, demo, distill, engine, evaluate, infer, model, profile, runner, triton  # noqa: F401
from liverkd.cli.app import app


def main():
    from liverkd.core.errors import LiverkdError

    try:
        app()
    except LiverkdError as e:  # any command may raise one: the same line and code everywhere
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
