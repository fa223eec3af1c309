"""InboxWatch: wake the loop as soon as a file in the inbox is complete (Linux inotify, via ctypes).

A file closed by its writer (IN_CLOSE_WRITE) or renamed into the inbox (IN_MOVED_TO) is complete
now: `closed` keeps its signature as seen when the event was read, and the inbox takes it at once
if it still has that signature. A file written to (IN_MODIFY) and not closed since is in
`writing`: the settle window does not take it, however long its writer pauses. Everything else
(files there before the watch, written from another machine over NFS/SMB, which makes no local
events, or after a queue overflow) goes through the poll and the settle rule as before.
Without inotify (another OS, its limits exhausted, `watch="poll"`) `wait` is the poll's sleep.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from collections.abc import Callable
from pathlib import Path

from .inbox import signature

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_ISDIR = 0x2000, 0x4000, 0x8000, 0x1000000, 0x40000000
MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name, NUL-padded)
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED


def inotify(folder: Path, mask: int = MASK) -> int:
    """A non-blocking inotify descriptor watching `folder`; OSError where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "no inotify in this C library") from None
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"inotify_init1: {os.strerror(e)}")
    if add_watch(fd, os.fsencode(folder), mask | IN_ONLYDIR) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        hint = " (fs.inotify.max_user_watches)" if e == errno.ENOSPC else ""
        raise OSError(e, f"inotify_add_watch {folder}: {os.strerror(e)}{hint}")
    return fd


def read_events(fd: int) -> list[tuple[int, str]]:
    """(mask, name) of every event queued on `fd`, oldest first; [] when none."""
    out = []
    while True:
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            return out
        at = 0
        while at < len(buf):
            _, mask, _, size = EVENT.unpack_from(buf, at)
            name = buf[at + EVENT.size : at + EVENT.size + size].rstrip(b"\0")
            out.append((mask, os.fsdecode(name)))
            at += EVENT.size + size


class InboxWatch:
    def __init__(self, folder: Path, use_inotify: bool = True, log: Callable[[str, str], None] | None = None):
        """`log(mode, reason)` is told once at the start and whenever the watch falls back to the poll."""
        self.folder = folder
        self.log = log or (lambda mode, reason: None)
        self.closed: dict[str, tuple] = {}
        """name -> signature (inbox.signature) when its writer closed it or it was renamed in"""
        self.writing: set[str] = set()
        self.fd: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        for end in (self._wake_r, self._wake_w):
            os.set_blocking(end, False)
        if not use_inotify:
            self.mode = "poll"
            self.log("poll", "polling (watch: poll)")
            return
        try:
            self.fd = inotify(folder)
        except OSError as e:
            self.mode = "poll"
            self.log("poll", f"inotify unavailable, polling: {e.strerror or e}")
        else:
            self.mode = "inotify"
            self.log("inotify", f"inotify on {folder}")

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`; True as soon as a file may have become complete, or on `wake`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            fds = [self._wake_r] if self.fd is None else [self._wake_r, self.fd]
            ready, _, _ = select.select(fds, [], [], left)
            if self._wake_r in ready:
                while True:
                    try:
                        if not os.read(self._wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                return True
            if ready and self.drain():
                return True
        return False

    def wake(self) -> None:
        """End the current `wait` now (safe in a signal handler)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full (a wake is pending anyway) or the watch is closed

    def drain(self) -> bool:
        """Apply the queued events; True when some file was closed or renamed in."""
        if self.fd is None:
            return False
        complete = False
        for mask, name in read_events(self.fd):
            if mask & IN_Q_OVERFLOW:  # events were lost: what we knew may be stale
                self.closed.clear()
                self.writing.clear()
            elif mask & GONE:  # the inbox itself was removed, moved or unmounted
                self._fall_back(f"the watch on {self.folder} ended (mask {mask:#x}); polling")
                return True
            elif not name or mask & IN_ISDIR:
                continue
            elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                self.writing.discard(name)
                try:
                    st = os.lstat(self.folder / name)
                except OSError:
                    self.closed.pop(name, None)
                    continue
                self.closed[name] = signature(st)
                complete = True
            else:  # IN_MODIFY: a writer is at it; IN_CREATE (open or link), IN_DELETE, IN_MOVED_FROM: unknown
                self.closed.pop(name, None)
                if mask & IN_MODIFY:
                    self.writing.add(name)
                else:
                    self.writing.discard(name)
        return complete

    def keep(self, names: set[str]) -> None:
        """Forget names no longer in the inbox (the state stays bounded by the inbox)."""
        self.closed = {k: v for k, v in self.closed.items() if k in names}
        self.writing &= names

    def _fall_back(self, reason: str) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.closed.clear()
        self.writing.clear()
        self.mode = "poll"
        self.log("poll", reason)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for end in (self._wake_r, self._wake_w):
            try:
                os.close(end)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
