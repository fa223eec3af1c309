"""The crash-safe record of the work in hand: one folder per claim in INBOX/work/.

    work/<claim>/NAME      the input, claimed from the inbox by one rename (its name kept)
    work/<claim>/.claim    JSON: name, claimed_at, attempts, runner, and the Plans of its
                           outputs and of its input's move (see place.py)

A claim id is short, unique and sorts in claim order, so two inputs of one name never meet.
`attempts` counts the runner processes that started the volume: it is raised and written
before an attempt begins (never again by the same process, whatever it retries), so an input
that kills the runner MAX_ATTEMPTS times is failed instead of crash-looping the service.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

from liverkd.core.atomic import write_json

from .place import Plan

JOURNAL = ".claim"
MAX_ATTEMPTS = 2
"""A volume that was in hand when the runner died this many times is failed (stage `recover`)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Claim:
    def __init__(self, folder: Path, record: dict):
        self.folder = folder
        self.record = record

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def input(self) -> Path:
        return self.folder / self.name

    def has_input(self) -> bool:
        return os.path.lexists(self.input)

    def plan(self, key: str) -> Plan | None:
        return Plan(self.record[key]) if key in self.record else None

    def save(self) -> None:
        write_json(self.folder / JOURNAL, self.record)

    def set_plan(self, key: str, plan: Plan | None) -> None:
        if plan is None:
            self.record.pop(key, None)
        else:
            self.record[key] = dict(plan)
        self.save()


class Journal:
    def __init__(self, work: Path, runner: str):
        self.work = work
        self.runner = runner
        """This process (pid and start time): what `attempts` counts."""

    def claims(self) -> list[Claim]:
        """Claims in work/, oldest first (a folder left by a crash before its rename is removed)."""
        out = []
        with os.scandir(self.work) as it:
            folders = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        for name in folders:
            claim = self._read(self.work / name)
            if claim is not None:
                out.append(claim)
        return out

    def _read(self, folder: Path) -> Claim | None:
        inputs = [n for n in os.listdir(folder) if not n.startswith(".")]
        try:
            return Claim(folder, json.loads((folder / JOURNAL).read_text()))
        except (OSError, ValueError):  # died between the rename and the first record
            if len(inputs) == 1:
                return Claim(folder, {"name": inputs[0], "attempts": 0})
        if not inputs:
            self._remove(folder)
        return None  # more than one file, no record: not a claim of ours, left alone

    def adopt(self) -> None:
        """Files lying in work/ itself (left by the one-file runner before deploy/service): claim them."""
        with os.scandir(self.work) as it:
            loose = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
        for name in loose:
            if name.startswith("."):
                (self.work / name).unlink()  # that runner's attempt markers and temps
            else:
                self.claim(self.work / name)

    def claim(self, src: Path) -> Claim:
        """Move `src` (a file in the inbox) into a new claim folder, and start its first attempt."""
        while True:
            folder = self.work / f"{time.time_ns() // 1_000_000:x}{secrets.token_hex(3)}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
        try:
            os.rename(src, folder / src.name)
        except BaseException:
            folder.rmdir()
            raise
        claim = Claim(folder, {"name": src.name, "claimed_at": now_iso(), "attempts": 0})
        self.begin_attempt(claim)
        return claim

    def begin_attempt(self, claim: Claim) -> int:
        """Count this process in `attempts`, on disk before the attempt; the count."""
        if claim.record.get("runner") != self.runner:
            record = {**claim.record, "attempts": claim.record.get("attempts", 0) + 1, "runner": self.runner}
            Claim(claim.folder, record).save()  # a failed write leaves the record as it was on disk
            claim.record = record
        return claim.record["attempts"]

    def release(self, claim: Claim) -> None:
        """A clean stop with the claim still in hand (waiting out an environment error): not a crash."""
        if claim.record.get("runner") == self.runner:
            claim.record = {**claim.record, "attempts": claim.record["attempts"] - 1, "runner": None}
            claim.save()

    def close(self, claim: Claim) -> None:
        """The input has left work/: forget the claim."""
        self._remove(claim.folder)

    @staticmethod
    def _remove(folder: Path) -> None:
        for name in os.listdir(folder):
            if name.startswith((JOURNAL, "." + JOURNAL)):  # the record and atomic_path's temps of it
                (folder / name).unlink()
        folder.rmdir()
