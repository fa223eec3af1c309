"""RunnerConfig: what `liverkd runner` is told, checked once before anything starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_VOXELS = 512 * 512 * 1024
WATCH_MODES = ("auto", "poll")


class ConfigError(ValueError):
    """Options that cannot work together; restarting will not help (exit 2)."""


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's options (`liverkd runner --help` says each), checked by `check` before the loop starts."""

    engine: Path
    inbox: Path
    outbox: Path
    failed: Path | None = None
    """Failed inputs and their .error.json; default INBOX/failed."""
    backend: str = "auto"
    once: bool = False
    """Process what is in the inbox (waiting for files still arriving), then exit."""
    poll_s: float = 0.1
    settle_s: float = 1.0
    """A file without a NAME.done marker is ready once its size and times held still this long."""
    watch: str = "auto"
    """"auto": Linux inotify where it works, the poll as well (a file closed by its writer or
    renamed into the inbox is taken at once; one still being written is not taken by the settle
    window), else the poll alone, said in one `watch` log record; "poll": the poll alone."""
    retry_s: float = 2.0
    """First wait after an environment error (outbox full or unwritable); doubles up to RETRY_MAX_S."""
    heartbeat_s: float = 30.0
    log: Path | None = None
    status: Path | None = None
    delete_done: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS

    @property
    def work(self) -> Path:
        return self.inbox / "work"

    @property
    def done(self) -> Path:
        return self.inbox / "done"

    @property
    def failed_dir(self) -> Path:
        return self.failed if self.failed is not None else self.inbox / "failed"

    def check(self) -> RunnerConfig:
        for name in ("poll_s", "settle_s", "retry_s", "heartbeat_s", "max_voxels"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name.replace('_', '-')} must be over 0, not {getattr(self, name)}")
        if self.watch not in WATCH_MODES:
            raise ConfigError(f"watch must be one of {', '.join(WATCH_MODES)}, not {self.watch!r}")
        inbox, outbox = self.inbox.resolve(), self.outbox.resolve()
        if outbox == inbox or inbox in outbox.parents:
            raise ConfigError(f"{self.outbox}: the outbox must not be the inbox {self.inbox} or inside it")
        return self
