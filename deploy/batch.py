"""Batch inference for job arrays: a deterministic shard of the inputs, resuming without redoing
finished volumes, and reading/writing overlapped with the engine (`liverkd infer --shard K/N
--skip-existing`; docs/batch.md).

    jobs = [FileJob(Path(p), output_path_for(p)) for p in files if in_shard(shard_key(output_path_for(p)), k, n)]
    run(jobs, *file_stages(segmenter), done=lambda job, result, error, notes: ...)

- Shards: a volume belongs to shard `sha256(resolved output path) mod N` (0-based K). Each
  volume's shard depends on its own name only, not on the others or on any listing order, so N
  tasks that started at different times, or saw a few more or fewer files, still never do one
  volume twice; keyed on the output, two inputs that would write one file meet in one task, which
  refuses the second as a single run does.
- Complete outputs (`output_problem`): a cheap check that an existing file is whole (NIfTI header
  + gzip trailer or file size, shape and affine against the input's header; stats JSON parses;
  PNG ends with its IEND chunk), never a full decode.
- The pipeline (`run`): one reader thread decodes the next volume and one writer thread
  compresses and writes the previous mask while the current one is segmented on the calling
  thread. At most one volume read ahead and one write in flight (three volumes in memory at the
  most); results come back in input order, one failing input never stops the others, and an
  interrupt lets the write in flight finish (it is atomic: temp file, then rename), cancels the
  rest, and is raised again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core.timing import Clock
from liverkd.deploy.segment import (
    Segmentation,
    SegmentResult,
    check_output,
    read_input,
    sidecar_path,
)

__all__ = ["FileJob", "file_stages", "in_shard", "output_problem", "parse_shard", "run", "shard_key"]


# ------------------------------------------------------------------ shards


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), 0 <= K < N (0-based, as $SLURM_ARRAY_TASK_ID of --array=0-(N-1) and
    Kubernetes' $JOB_COMPLETION_INDEX); ValueError saying what is wrong."""
    k, sep, n = text.strip().partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = -1
    if not sep or n_i < 1 or not 0 <= k_i < n_i:
        raise ValueError("K/N with 0 <= K < N (0-based, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return k_i, n_i


def shard_key(path) -> str:
    """A volume's key: its output path with the folder resolved (links, `..`, the working folder),
    so any spelling of the same command line on the same files gives the same key."""
    path = Path(path)
    return os.path.join(os.path.realpath(path.parent), path.name)


def in_shard(key: str, k: int, n: int) -> bool:
    """Whether the volume keyed `key` belongs to shard `k` of `n` (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(os.fsencode(key)).digest()
    return int.from_bytes(digest[:8], "big") % n == k


# ------------------------------------------------------------------ complete outputs

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def output_problem(path, like=None) -> str | None:
    """None when `path` is a complete output of liverkd, else why not. `like`: the input NIfTI whose
    shape and affine a mask must have (its header alone is read). Headers and a few bytes only."""
    path = Path(path)
    try:
        if not path.is_file():
            return "missing" if not path.exists() else "not a regular file"
        name = path.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_problem(path, like)
        if name.endswith(".json"):
            record = json.loads(path.read_text())
            return None if isinstance(record, dict) and "liver_ml" in record else "not a liverkd stats file"
        if name.endswith(".png"):
            with open(path, "rb") as f:
                start = f.read(8)
                f.seek(max(0, path.stat().st_size - len(PNG_END)))
                end = f.read()
            return None if start == b"\x89PNG\r\n\x1a\n" and end == PNG_END else "not a complete PNG"
        if name.endswith(".dcm"):
            return _seg_problem(path)
        return "unknown kind of output"
    except (OSError, ValueError, EOFError) as e:  # unreadable, undecodable, not JSON
        return f"unreadable ({V.printable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)})"


def _nifti_problem(path: Path, like) -> str | None:
    try:
        img = nib.load(path)  # the header only: the voxels stay on disk
        header, offset = img.header, int(img.dataobj.offset)  # (the image's header says offset 0)
    except Exception as e:  # nibabel raises many kinds on a file that is not a NIfTI image
        return f"not a readable NIfTI ({type(e).__name__})"
    need = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:  # a whole gzip member ends with the data's length mod 2**32
            f.seek(size - 4)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize != need % 2**32:
            return "truncated (its gzip trailer does not end the data)"
    elif size < need:
        return f"truncated ({size:,} of {need:,} bytes)"
    if header.get_data_dtype() != np.uint8 or len(header.get_data_shape()) != 3:
        return "not a uint8 3-D mask"
    if like is None:
        return None
    try:
        ref = nib.load(like).header
    except Exception as e:  # the input's own problem: segmenting it again says what it is
        return f"not comparable with the input ({type(e).__name__})"
    shape = tuple(ref.get_data_shape()[:3])
    if tuple(header.get_data_shape()) != shape:
        return f"shape {tuple(header.get_data_shape())}, the input's is {shape}"
    mm = V.MM_PER_UNIT.get(int(ref["xyzt_units"]) & 7, 1.0) if isinstance(ref, nib.Nifti1Header) else 1.0
    affine = np.diag([mm, mm, mm, 1.0]) @ ref.get_best_affine()
    if not np.allclose(header.get_best_affine(), affine, rtol=1e-5, atol=1e-3):
        return "its affine is not the input's"
    return None


def _seg_problem(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1))
        need = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.BitsAllocated) + 7) // 8
        if str(ds.SOPClassUID) != SEG_SOP_CLASS or len(ds.PixelData) < need:
            return "not a complete DICOM SEG"
    except Exception as e:  # pydicom raises many kinds on a truncated or foreign file
        return f"not a readable DICOM SEG ({type(e).__name__})"
    return None


# ------------------------------------------------------------------ NIfTI files: Segmenter.segment_file in three stages


@dataclass(frozen=True)
class FileJob:
    """One NIfTI file (or DICOM series folder) -> one mask, as Segmenter.segment_file does it."""

    input: Path
    output: Path
    stats: bool = False
    preview: bool = False
    overwrite: bool = False
    inputs: frozenset = frozenset()
    """input_ids of the run: never replaced (check_output)."""

    def outputs(self) -> list[Path]:
        wanted = ((".json", self.stats), (".png", self.preview))
        return [self.output, *(sidecar_path(self.output, ext) for ext, want in wanted if want)]

    def check_outputs(self) -> None:
        for path in self.outputs():
            check_output(path, self.input, overwrite=self.overwrite, inputs=self.inputs)


@dataclass
class _Read:
    vol: V.Volume
    clock: Clock


def file_stages(segmenter):
    """(read, compute, write) for `run`: Segmenter.segment_file's steps, checks, timings and result,
    split where the threads meet. `total` is the volume's wall clock from its read to its write."""

    def read(job: FileJob) -> _Read:
        clock = Clock()
        job.check_outputs()
        with clock.stage("read"):
            vol = read_input(job.input, segmenter.spec.spacing)
        return _Read(vol, clock)

    def compute(job: FileJob, got: _Read) -> tuple[_Read, Segmentation]:
        return got, segmenter.segment_volume(got.vol, clock=got.clock)

    def write(job: FileJob, done: tuple[_Read, Segmentation]) -> SegmentResult:
        got, seg = done
        return segmenter.write_outputs(seg, job.output, clock=got.clock, label=str(job.input), title=job.input.name,
                                       stats=job.stats, preview=job.preview, protect=job.check_outputs)  # fmt: skip

    return read, compute, write


# ------------------------------------------------------------------ the pipeline

Done = Callable[[object, object, BaseException | None, list], None]
_local = threading.local()


def run(items: Sequence, read: Callable, compute: Callable, write: Callable, done: Done, *, overlap: bool = True):
    """For each item: `write(item, compute(item, read(item)))`, then `done(item, result, error, notes)`
    in input order, on the calling thread (`error`: the Exception that stopped this item, else None;
    `notes`: the warnings it raised, other than VolumeWarning, which results carry themselves).

    With `overlap`, `read` runs for the next item on a reader thread and `write` for the previous one
    on a writer thread while `compute` runs here. An interrupt (KeyboardInterrupt, or whatever the
    caller's signal handler raises) cancels the queued read, waits for the running read and the
    write in flight, and is raised again: every output is whole or absent."""
    notes: list[list[str]] = [[] for _ in items]
    with _recording_warnings():
        if not overlap:
            for i, item in enumerate(items):
                try:
                    result = _into(notes[i], _whole, read, compute, write, item)
                except Exception as e:
                    done(item, None, e, notes[i])
                else:
                    done(item, result, None, notes[i])
            return
        finished: dict[int, tuple] = {}  # index -> (result, error): filled on the writer thread itself
        reported: set[int] = set()

        def write_one(i: int, computed) -> None:
            try:
                finished[i] = (_into(notes[i], write, items[i], computed), None)
            except Exception as e:
                finished[i] = (None, e)

        def report(i: int, result=None, error=None) -> None:
            if i in reported:
                return
            reported.add(i)  # first: an interrupt inside done() must not report it twice
            if i in finished:
                result, error = finished[i]
            done(items[i], result, error, notes[i])

        with ThreadPoolExecutor(1, "liverkd-read") as reader, ThreadPoolExecutor(1, "liverkd-write") as writer:
            reads: dict[int, Future] = {}
            pending: tuple[int, Future] | None = None
            try:
                for i, item in enumerate(items):
                    for j in (i, i + 1):  # this one and the next: one volume ahead, no more
                        if j < len(items) and j not in reads:
                            reads[j] = reader.submit(_into, notes[j], read, items[j])
                    error = computed = None
                    try:
                        got = reads.pop(i).result()
                        computed = _into(notes[i], compute, item, got)
                    except Exception as e:
                        error = e
                    got = None  # the decoded volume is the write's to keep now, not ours
                    if pending is not None:
                        pending[1].result()  # write_one catches its own errors
                        report(pending[0])
                        pending = None
                    if error is not None:
                        report(i, None, error)
                    else:
                        pending = (i, writer.submit(write_one, i, computed))
                        computed = None
                if pending is not None:
                    pending[1].result()
                    report(pending[0])
            except BaseException:
                # An interrupt can land between any two statements here (even between a submit and
                # the assignment of its future), so what was written is read from `finished`, which
                # only the writer thread fills: wait for it, then report every write that ended.
                for future in reads.values():
                    future.cancel()
                writer.shutdown(wait=True)
                for i in sorted(finished):
                    with contextlib.suppress(Exception):
                        report(i)
                raise


def _whole(read, compute, write, item):
    return write(item, compute(item, read(item)))


def _into(notes: list, fn, *args):
    """fn(*args), with the warnings it raises on this thread noted in `notes` (once each)."""
    _local.notes = notes
    try:
        return fn(*args)
    finally:
        _local.notes = None


@contextlib.contextmanager
def _recording_warnings():
    """Warnings of each item's stages into that item's notes, whichever thread raised them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def note(message, category, filename, lineno, file=None, line=None):
            sink = getattr(_local, "notes", None)
            if sink is None:
                shown(message, category, filename, lineno, file, line)
            elif str(message) not in sink:
                sink.append(str(message))

        warnings.simplefilter("always")
        warnings.simplefilter("ignore", V.VolumeWarning)  # a Volume's and a Segmentation's warnings hold them
        warnings.showwarning = note
        yield
