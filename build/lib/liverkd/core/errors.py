"""LiverkdError: the base of every error a user of liverkd is meant to read.

str() is one line, naming the file when there is one ('<path>: <problem>'). The CLI turns
any LiverkdError into that line on stderr and exit code 1 (bad input, data or model file);
usage errors (bad options, conflicting arguments) exit 2. Anything else is a bug: traceback.
"""

from __future__ import annotations

EXIT_INPUT = 1
"""A bad input, data set, model file or environment fact: one line on stderr."""
EXIT_USAGE = 2
"""Bad options or arguments (typer/click's own usage errors use 2 as well)."""


class LiverkdError(Exception):
    """One-line, user-facing error. `LiverkdError(path, problem)` or `LiverkdError(message)`."""

    exit_code = EXIT_INPUT

    def __init__(self, path_or_message, problem: str | None = None):
        if problem is None:
            self.path, self.problem = None, str(path_or_message)
            message = self.problem
        else:
            self.path, self.problem = str(path_or_message), problem
            message = f"{self.path}: {problem}"
        super().__init__(" ".join(message.splitlines()))  # one line, whatever the problem held
