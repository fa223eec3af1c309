"""One Runner interface per backend (Polygraphy's idea); optional dependencies imported lazily."""

from liverkd.deploy.backends.base import Runner, RunnerError, open_runner

__all__ = ["Runner", "RunnerError", "open_runner"]
