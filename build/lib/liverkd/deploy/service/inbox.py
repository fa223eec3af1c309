"""The inbox: which files are complete, and the lock that keeps it to one runner.

A file is ready when either
- a marker NAME.done sits beside it, made after the file's last change (the sender's word; an
  empty marker without its file is removed: no later file can make it count), or
- its size, inode, mtime and ctime held still for `settle_s` of this machine's monotonic
  clock, over at least OBSERVATIONS polls (the file's own times are compared only with each
  other, never with our clock, so a sender whose clock lags cannot make a file look old).
With an InboxWatch on inotify (watch.py), also when its writer closed it or it was renamed in
and it has not changed since (at once, no settle window); and a file its writer is still at
(written, not closed) is not taken by the settle window.
Names starting with a dot, temp names (NAME.part ...) and anything not a regular file (a
symlink, a FIFO, a folder) are never taken: write NAME.part and rename it when complete.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .watch import InboxWatch

TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
MARKER = ".done"
OBSERVATIONS = 3
LOCK = ".runner.lock"
RESERVED = ("work", "done", "failed")
"""The runner's own folders in the inbox: never inputs, even when something else stands there."""


def is_candidate(entry: os.DirEntry) -> bool:
    name = entry.name
    return (
        not name.startswith(".")
        and name not in RESERVED
        and not name.endswith((*TEMP_SUFFIXES, MARKER))
        and entry.is_file(follow_symlinks=False)
    )


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Inbox:
    def __init__(self, folder: Path, settle_s: float, watch: InboxWatch | None = None):
        self.folder = folder
        self.settle_s = settle_s
        self.watch = watch
        self.seen: dict[str, tuple[tuple, float, int]] = {}
        """name -> (signature, monotonic time it was first seen, polls it has held)"""

    def waiting(self) -> int:
        """Files in the inbox that may become inputs (ready or still arriving)."""
        with os.scandir(self.folder) as it:
            return sum(is_candidate(e) for e in it)

    def ready(self) -> list[Path]:
        """Complete files, oldest mtime first. Call once per poll: each call is one observation."""
        watch = self.watch
        if watch is not None:
            watch.drain()  # before the scan: what a writer did up to now counts
        now = time.monotonic()
        ready, seen = [], {}
        with os.scandir(self.folder) as it:
            listing = list(it)
        self._remove_dead_markers(listing)
        entries = [e for e in listing if is_candidate(e)]
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            sig = signature(st)
            prev, first, polls = self.seen.get(entry.name, (None, now, 0))
            first, polls = (first, polls + 1) if prev == sig else (now, 1)
            seen[entry.name] = (sig, first, polls)
            if watch is not None and entry.name in watch.writing:
                settled = False
            else:
                settled = polls >= OBSERVATIONS and now - first >= self.settle_s
            closed = watch is not None and watch.closed.get(entry.name) == sig
            if closed or settled or self._marked(entry.name, st):
                ready.append((st.st_mtime_ns, entry.name))
        self.seen = seen  # only names present now: bounded by the inbox, not by history
        if watch is not None:
            watch.keep(set(seen))
        return [self.folder / name for _, name in sorted(ready)]

    def _remove_dead_markers(self, listing: list[os.DirEntry]) -> None:
        """An empty NAME.done without NAME: its file was taken (at its close, before the marker
        came) or removed. No later NAME can make it count (it would be newer), so it goes."""
        names = {e.name for e in listing}
        for entry in listing:
            name = entry.name
            if name.endswith(MARKER) and not name.startswith(".") and name[: -len(MARKER)] not in names:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def _marked(self, name: str, st: os.stat_result) -> bool:
        try:
            marker = os.lstat(self.folder / (name + MARKER))
        except OSError:
            return False
        return stat.S_ISREG(marker.st_mode) and marker.st_ctime_ns >= st.st_ctime_ns

    def taken(self, name: str) -> None:
        """After the claim: the marker has served."""
        self.seen.pop(name, None)
        if self.watch is not None:
            self.watch.closed.pop(name, None)
        try:
            (self.folder / (name + MARKER)).unlink()
        except OSError:
            pass  # none, or it stays: a marker older than the next file of this name is ignored


def lock(folder: Path) -> int:
    """An exclusive lock on INBOX/.runner.lock, held for the life of the process (the kernel drops it)."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockError(f"{path}: a symbolic link; refusing to open it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise LockError(f"{path}: not a plain file of its own (a hard link or special file); refusing it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise LockError(f"{folder}: already served by another runner (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


class LockError(ValueError):
    """The inbox is not ours to serve (exit 2)."""
