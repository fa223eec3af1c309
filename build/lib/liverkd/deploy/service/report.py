"""What the runner tells the world: a JSON-lines log and a status file for a supervisor.

Neither may stop the loop. The log is opened per record (logrotate can move it) without
blocking (a FIFO with no reader is refused, not waited on) and only when it is a regular
file; a record that cannot be written is kept (up to PENDING_MAX bytes) and written with the
next one that can, and the failures are counted (`log_errors` in the status and heartbeats).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from liverkd.core.atomic import write_text

from .journal import now_iso

PENDING_MAX = 1 << 20


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class JsonLog:
    def __init__(self, path: Path | None):
        self.path = path
        self.pending = b""
        self.errors = 0
        self.last_error: str | None = None

    def write(self, record: dict) -> None:
        self.pending += (json.dumps({"time": now_iso(), **record}) + "\n").encode()
        if len(self.pending) > PENDING_MAX:  # keep the newest records, from a line start
            cut = self.pending.index(b"\n", len(self.pending) - PENDING_MAX) + 1
            self.pending = self.pending[cut:]
        try:
            self._flush()
        except (OSError, ValueError) as e:  # ValueError: stdout closed
            self.errors += 1
            if self.last_error is None:  # once per run of failures: on stderr, where systemd looks
                _stderr(f"cannot write the log {self.path}: {one_line(e)} (records are kept and retried)")
            self.last_error = one_line(e)
        else:
            self.last_error = None

    def _flush(self) -> None:
        if self.path is None:
            sys.stdout.buffer.write(self.pending)
            sys.stdout.flush()
            self.pending = b""
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path}: not a regular file")
            while self.pending:
                self.pending = self.pending[os.write(fd, self.pending) :]
        finally:
            os.close(fd)


class StatusFile:
    """Rewritten whole (temp + rename) before and after each volume and at each heartbeat."""

    def __init__(self, path: Path | None, log: JsonLog):
        self.path = path
        self.log = log
        self.errors = 0

    def write(self, status: dict) -> None:
        if self.path is None:
            return
        try:
            write_text(self.path, json.dumps(status, indent=2) + "\n")
        except OSError as e:
            self.errors += 1
            self.log.write({"event": "error", "error": f"cannot write status {self.path}: {one_line(e)}"})

    def remove_stale_temps(self) -> None:
        """atomic_path's temps of the status file, left by a kill mid-write (the name is ours alone)."""
        if self.path is None or not self.path.parent.is_dir():
            return
        for p in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            p.unlink(missing_ok=True)


def _stderr(message: str) -> None:
    try:
        print(f"liverkd runner: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
