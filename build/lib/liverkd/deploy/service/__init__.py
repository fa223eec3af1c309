"""The embedded device runner (`liverkd runner`): one warm Segmenter, segmenting each volume
that arrives in an inbox folder. docs/runner.md is the operator's side of it.

    config    RunnerConfig: the options, checked once
    inbox     which files are complete (marker, inotify close/rename, or settle window); the lock
    watch     InboxWatch: inotify on the inbox (ctypes), waking the loop when a file is complete
    journal   one folder per claim in work/: the crash-safe record of the work in hand
    place     temps, names that fit, and links that never replace a file
    report    the JSON-lines log and the status file (neither can stop the loop)
    loop      Service: claim -> segment -> deliver -> move, retries, exit codes
"""

from .config import RunnerConfig


def serve(cfg: RunnerConfig, prog: str = "liverkd runner") -> int:
    """Run until SIGTERM/SIGINT (or, with cfg.once, until the inbox is done); the exit code."""
    from .loop import serve as run  # numpy, psutil and the Segmenter only when it runs

    return run(cfg, prog)


__all__ = ["RunnerConfig", "serve"]
