"""Putting finished files into shared folders (outbox, done/, failed/) without ever replacing one.

A file is first written under a short temp name of its claim (`.lk<claim>-<role>`, made by
liverkd.core.atomic: exclusive, never through a symlink, fsynced), then hard-linked to its final
name; link(2) fails instead of replacing, so a name that is taken, by an earlier input or by
another runner sharing the folder, moves the whole group on to `STEM~<claim>` + its tails.
A group (mask + stats, input + error file) lands all or nothing, and a Plan recorded in the
claim's journal before the links says which final names (and inodes) are this claim's own.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from liverkd.core.atomic import atomic_path, fsync_dir

NAME_MAX = 255
"""Bytes in one file name (Linux, ext4, xfs, btrfs, tmpfs)."""
NIFTI_EXTS = (".nii.gz", ".nii")


def split_name(name: str) -> tuple[str, str]:
    """`ct.nii.gz` -> (`ct`, `.nii.gz`); `notes.txt` -> (`notes`, `.txt`); `x` -> (`x`, ``)."""
    for ext in NIFTI_EXTS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext


def _cut(text: str, max_bytes: int) -> str:
    while len(os.fsencode(text)) > max_bytes:
        text = text[:-1]
    return text


def bases(stem: str, claim_id: str, tails: list[str]) -> Iterator[str]:
    """The stems a group tries, in order: STEM, STEM~CLAIM, STEM~CLAIM.2 ...; each cut so that
    every `stem + tail` fits NAME_MAX (a 250-character input still gets its outputs)."""
    room = NAME_MAX - max(len(os.fsencode(t)) for t in tails)
    yield _cut(stem, room)
    for k in range(1, 100):
        mark = f"~{claim_id}" + (f".{k}" if k > 1 else "")
        yield _cut(stem, room - len(mark)) + mark


def temp_path(folder: Path, claim_id: str, role: str) -> Path:
    """The fixed temp name of one file of a claim; written through atomic_path, which replaces
    (never follows) whatever is there."""
    return folder / f".lk{claim_id}-{role}"


def is_temp_of(name: str, claim_id: str) -> bool:
    """This claim's temps and the temps atomic_path makes beside them."""
    return name.startswith(".") and f".lk{claim_id}-" in name


def remove_temps(folder: Path, claim_id: str) -> None:
    """Only this claim's own temps: other runners sharing the folder keep theirs."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if is_temp_of(e.name, claim_id)]
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing of ours can be there
    for name in names:
        (folder / name).unlink(missing_ok=True)


def copy_in(src: Path, folder: Path, claim_id: str) -> Path:
    """`src` as a file on `folder`'s file system: itself when it is there already, else a fsynced copy."""
    if os.lstat(src).st_dev == os.stat(folder).st_dev:  # the folder may be a symlink the operator set
        return src
    with atomic_path(temp_path(folder, claim_id, "copy")) as tmp:
        shutil.copyfile(src, tmp, follow_symlinks=False)
    return temp_path(folder, claim_id, "copy")


class Plan(dict):
    """Where a group goes: {"folder", "names", "inodes"}; JSON in the journal."""

    @classmethod
    def of(cls, folder: Path, names: list[str], sources: list[Path]) -> Plan:
        return cls(folder=str(folder), names=names, inodes=[os.lstat(s).st_ino for s in sources])

    @property
    def paths(self) -> list[Path]:
        return [Path(self["folder"]) / n for n in self["names"]]

    def placed(self) -> list[bool]:
        """Which final names hold this group's very files (same inode), not someone else's."""
        out = []
        for path, inode in zip(self.paths, self["inodes"]):
            try:
                out.append(os.lstat(path).st_ino == inode)
            except FileNotFoundError:
                out.append(False)
        return out

    def undo(self) -> None:
        for path, mine in zip(self.paths, self.placed()):
            if mine:
                path.unlink()


def place(folder: Path, stem: str, claim_id: str, items: list[tuple[Path, str]], record) -> list[Path]:
    """Hard-link each (source, tail) to `folder/BASE+tail` for the first BASE free for all of them.

    `record(plan)` persists the plan before its links are made. Sources stay where they are.
    """
    sources, tails = [s for s, _ in items], [t for _, t in items]
    for base in bases(stem, claim_id, tails):
        names = [base + t for t in tails]
        if any(os.path.lexists(folder / n) for n in names):
            continue
        plan = Plan.of(folder, names, sources)
        record(plan)
        if _link_all(sources, plan.paths):
            fsync_dir(folder)
            return plan.paths
    raise OSError(errno.EEXIST, f"{folder}: no free name for {stem}")


def _link_all(sources: list[Path], paths: list[Path]) -> bool:
    """Link all, or none: False when a name was taken since the check (another runner's: left alone)."""
    made = []
    try:
        for src, path in zip(sources, paths):
            os.link(src, path, follow_symlinks=False)
            made.append(path)
    except BaseException as e:
        for path in made:
            path.unlink(missing_ok=True)
        if isinstance(e, FileExistsError):
            return False
        raise
    return True
