"""One runner's folders, log and status, and how to run it (`python -m liverkd runner`, a real
subprocess) for tests/test_service*.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverkd.core.synth import synth_case

REPO = Path(__file__).resolve().parents[1]


def phantom_bytes(seed: int = 0, shape=(32, 32, 32), gz: bool = True, descrip: str = "") -> bytes:
    img = synth_case(seed, shape=shape)[0].to_nifti()
    img.header["descrip"] = descrip.encode()
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=1) if gz else data


def blank_bytes(shape) -> bytes:
    return gzip.compress(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)).to_bytes())


class Box:
    def __init__(self, root: Path, engine: Path, outbox: Path | None = None):
        self.root, self.engine = root, engine
        self.inbox, self.outbox = root / "inbox", outbox or root / "outbox"
        self.log, self.status = root / "runner.log", root / "status.json"
        self.inbox.mkdir(parents=True, exist_ok=True)

    def args(self, *extra) -> list[str]:
        return [
            "--engine", str(self.engine), "--inbox", str(self.inbox), "--outbox", str(self.outbox),
            "--log", str(self.log), "--status", str(self.status), "--poll-s", "0.05", "--settle-s", "0.3",
            "--heartbeat-s", "0.2", "--retry-s", "0.2", *extra,
        ]  # fmt: skip

    def cmd(self, *extra) -> list[str]:
        return [sys.executable, "-m", "liverkd", "runner", *self.args(*extra)]

    def start(self, *extra) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def once(self, *extra, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd("--once", *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def drop(self, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
        """The handover docs/runner.md asks for: NAME.part (or a hidden name), then a rename."""
        part = self.inbox / (f"{name}.part" if len(name) < 250 else ".incoming")
        part.write_bytes(data)
        if mtime_ns is not None:
            os.utime(part, ns=(mtime_ns, mtime_ns))
        return part.rename(self.inbox / name)

    def records(self, event: str = "volume") -> list[dict]:
        if not self.log.is_file():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in lines if r["event"] == event]

    def names(self, sub: str) -> list[str]:
        folder = self.inbox / sub
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def claimed(self) -> list[str]:
        """Inputs in hand: work/<claim>/NAME."""
        work = self.inbox / "work"
        return sorted(p.name for p in work.glob("*/*") if not p.name.startswith(".")) if work.is_dir() else []

    def outputs(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir())

    def stats(self) -> list[dict]:
        return [
            json.loads(p.read_text())
            for p in sorted(self.outbox.glob("*_liver.json"))
            if not p.is_symlink() and p.is_file()
        ]

    def state(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"runner exited early (rc {proc.returncode}): {proc.stderr.read()[-800:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for the runner")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@contextlib.contextmanager
def unwritable(folder: Path):
    """Nothing can be made in `folder` for the duration: chmod 555, or, as root (whom modes do not
    stop), the immutable attribute (chattr +i; the test is skipped where the file system has none)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip(f"cannot make {folder} unwritable as root (no chattr +i here)")
    try:
        yield
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
