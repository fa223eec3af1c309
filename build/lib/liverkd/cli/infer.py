"""CLI: `liverkd infer` (the work itself is deploy.segment.Segmenter)."""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import typer

from liverkd.cli.app import QUIET, app

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIX = "_liver"
FORMATS = ("nifti", "dicom-seg")
FILE_SUFFIXES = {"nifti": NIFTI_SUFFIXES, "dicom-seg": (".dcm",)}


class Job(NamedTuple):
    """One volume to segment: a NIfTI file, or one DICOM series of an input (`series`)."""

    label: str
    path: Path | None
    problem: str | None = None
    series: object = None
    """deploy.dicom.Series for a DICOM input."""
    series_tag: str | None = None
    """Its SeriesInstanceUID in the output name, when the input holds several image series."""


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _is_our_output(path: Path) -> bool:
    return any(path.name.endswith(OUTPUT_SUFFIX + s) for s in NIFTI_SUFFIXES)


def _from_folder(folder: Path) -> tuple[list[Path], str | None]:
    """NIfTI files in a folder (not our own *_liver outputs), else the folder itself as a DICOM series."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p) and not _is_our_output(p))
    if files:
        return files, None
    from liverkd.deploy.dicom import is_dicom_folder

    if is_dicom_folder(folder):
        return [folder], None
    return [], "no NIfTI files or DICOM series in this folder"


def expand_inputs(args: list[str]) -> list[tuple[str, Path | None, str | None]]:
    """Files, folders and globs -> (label, path, error) per volume; bad arguments keep an error."""
    out: list[tuple[str, Path | None, str | None]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files, error = _from_folder(path)
            out += [(str(p), p, None) for p in files] or [(arg, None, error)]
        elif path.exists() or not glob.has_magic(arg):
            out.append((arg, path, None))  # a missing file is reported by the reader, one line
        else:
            matches = [Path(m) for m in sorted(glob.glob(arg))]
            matches = [m for m in matches if m.is_dir() or not _is_our_output(m)]
            if not matches:
                out.append((arg, None, "no files match this pattern"))
            for m in matches:
                if m.is_dir():
                    files, error = _from_folder(m)
                    out += [(str(p), p, None) for p in files] or [(str(m), None, error)]
                else:
                    out.append((str(m), m, None))
    return out


def _is_dicom_input(path: Path) -> bool:
    """A folder that expand_inputs found no NIfTI in (a DICOM series folder), or a DICOM file."""
    if path.is_dir():
        return True
    from liverkd.deploy.dicom import looks_like_dicom

    return not _is_nifti(path) and path.is_file() and looks_like_dicom(path)


def dicom_jobs(jobs: list[tuple[str, Path | None, str | None]], series: str | None) -> list[Job]:
    """Each DICOM input -> one Job per image series in it (or the one `series` names); an input that
    holds none, or where it is ambiguous which is meant, keeps one Job with its problem."""
    from liverkd.core.volume import VolumeError, printable
    from liverkd.deploy.dicom import find_series, pick_image_series

    out: list[Job] = []
    seen = set()
    for label, path, problem in jobs:
        if problem is not None or path is None or not _is_dicom_input(path):
            out.append(Job(label, path, problem))
            continue
        try:
            chosen = pick_image_series(find_series(path), path, series)
        except VolumeError as e:
            out.append(Job(label, path, e.problem if e.path == printable(path) else str(e)))
            continue
        for s in chosen:
            key = (s.uid, tuple(p for p, _ in s.files))
            if key in seen:  # one series named twice (two of its files, a glob): segmented once
                continue
            seen.add(key)
            if path.is_file() and s.n_planes == len(s.files):  # a slice standing for its series: named after its folder
                path = s.folder
            if len(chosen) > 1:
                out.append(Job(f"{label} (series {s.uid})", path, None, s, s.uid))
            else:
                out.append(Job(label, path, None, s))
    return out


@app.command("infer")
def infer(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders, globs, DICOM folders or .dcm files."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output .nii.gz (.dcm with --format dicom-seg) of one input, or a folder; default beside the input.",
    ),
    engine: str | None = typer.Option(
        None, "--engine", help="Engine bundle folder, or a packaged model's name; default: the packaged student-30k."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt, torch or openvino (CPU)."),
    stats: bool = typer.Option(False, "--stats", help="Also write <output>.json: liver volume (mL), mean HU, timings."),
    preview: bool = typer.Option(False, "--preview", help="Also write <output>.png: axial/coronal/sagittal overlays."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON line per volume on stdout (paths, mL, timings)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace outputs that exist already (never a file that is an input of the run)."
    ),
    fmt: str = typer.Option(
        "nifti",
        "--format",
        help="nifti (default), or dicom-seg: a DICOM Segmentation referencing the source series (DICOM inputs only).",
    ),
    series: str | None = typer.Option(
        None, "--series", help="SeriesInstanceUID: segment only this series of each DICOM input."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads of ONNX Runtime / OpenVINO (default: $LIVERKD_THREADS, else the "
        "CPUs this process may run on).",
    ),  # fmt: skip
    device: str = typer.Option(
        "cpu",
        "--device",
        help="Where pre- and post-processing run: cpu, or cuda (CuPy: the volume stays on the GPU until the mask "
        "comes back; pick a GPU backend for the network too).",
    ),
    shard: str | None = typer.Option(
        None,
        "--shard",
        metavar="K/N",
        help="Only shard K of N, 0-based (a job array: K = $SLURM_ARRAY_TASK_ID of --array=0-(N-1), or "
        "$JOB_COMPLETION_INDEX): N runs with K = 0..N-1 segment every volume once, by a hash of its output path.",
    ),
    skip_existing: bool = typer.Option(
        False,
        "--skip-existing",
        help="Resume: skip a volume whose outputs (the mask, and the --stats/--preview files asked for) exist and "
        "are complete; an incomplete or foreign file there is replaced.",
    ),
    quiet: bool = QUIET,
):
    """Segment the liver: CT volumes in, uint8 masks (1 = liver) out with the input's exact geometry.

    An output that exists already is not replaced without --overwrite, and an output that is an
    input of the run (by name, link or mount) is never written. Each input that fails gets one line
    on stderr, the others are still segmented, and the exit code is 1.

    DICOM inputs: a folder (searched below, PATIENT/STUDY/SERIES nested or flat) or a .dcm file
    (a multi-frame Enhanced CT, or one slice standing for its series). Each CT image series in it is
    segmented: one output, or one per series named <input>_<SeriesInstanceUID>_liver... when it
    holds several; masks, segmentations, localizers and other modalities are left out.

    Job arrays (docs/batch.md): --shard K/N splits the inputs among N tasks, --skip-existing resumes
    a killed task. The next volume is read, and the last mask written, while one is segmented.
    """
    from rich.console import Console
    from rich.markup import escape

    from liverkd import models
    from liverkd.cli.progress import volume_progress
    from liverkd.core.errors import LiverkdError
    from liverkd.core.volume import VolumeError, printable
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.bundle import BundleError
    from liverkd.deploy.dicom_infer import output_path, segment_series
    from liverkd.deploy.segment import Segmenter, output_path_for

    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a name the locale cannot encode must not stop a run

    def say(message: str) -> None:
        err.print(message, markup=False)

    if threads is not None:
        from liverkd.deploy.backends.base import THREADS_ENV

        os.environ[THREADS_ENV] = str(threads)  # read where a CPU runtime opens its session
    if preview:
        from liverkd.extras import require

        require("matplotlib", "--preview")
    from liverkd.deploy.segment import DEVICES

    if device not in DEVICES:
        say(f"error: --device {printable(device)}: one of {', '.join(DEVICES)}")
        raise typer.Exit(2)
    if fmt not in FORMATS:
        say(f"error: --format {printable(fmt)}: one of {', '.join(FORMATS)}")
        raise typer.Exit(2)
    if fmt == "dicom-seg":
        from liverkd.deploy.dicom_seg import highdicom_missing

        if highdicom_missing():
            say(f"error: {highdicom_missing()}")
            raise typer.Exit(1)
    from liverkd.deploy import batch

    shard_of = None
    if shard is not None:
        try:
            shard_of = batch.parse_shard(shard)
        except ValueError as e:
            say(f"error: --shard {printable(shard)}: {e}")
            raise typer.Exit(2) from None
    if skip_existing and overwrite:
        say("error: --skip-existing keeps complete outputs, --overwrite replaces them: give one")
        raise typer.Exit(2)
    jobs = dicom_jobs(expand_inputs(inputs), series)
    out_file = None
    out_dir = None
    if output is not None:
        other = [s for f, suffixes in FILE_SUFFIXES.items() if f != fmt for s in suffixes]
        if output.name.endswith(tuple(other)) and not output.is_dir():
            say(f"error: -o {printable(output)}: --format {fmt} writes {' or '.join(FILE_SUFFIXES[fmt])} files")
            raise typer.Exit(2)
        if output.name.endswith(FILE_SUFFIXES[fmt]) and not output.is_dir():
            if len(jobs) != 1:
                say(f"error: -o {printable(output)}: a single output file, but {len(jobs)} inputs; give a folder")
                raise typer.Exit(2)
            out_file = output
        else:
            out_dir = output
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                say(f"error: {printable(out_dir)}: cannot create the output folder ({e.strerror or e})")
                raise typer.Exit(1) from None

    try:
        segmenter = Segmenter.load(models.resolve(engine), backend=backend, device=device)
        if engine is None:
            say(f"using the packaged model {models.DEFAULT} ({printable(segmenter.bundle.path)})")
    except (BundleError, RunnerError, LiverkdError) as e:
        say(f"error: {printable(e)}")
        raise typer.Exit(1) from None

    run_inputs = set().union(*(_ids(job) for job in jobs))  # of every shard: none is ever replaced
    planned = []
    for job in jobs:
        problem = job.problem
        if problem is None and job.series is None and fmt == "dicom-seg":
            problem = "a DICOM SEG references the source DICOM images; this input is not DICOM (--format nifti)"
        if problem is not None:
            out_path = None
        elif job.series is not None:
            out_path = out_file or output_path(job.path, job.series_tag, fmt=fmt, out_dir=out_dir)
        else:
            out_path = out_file or output_path_for(job.path, out_dir)
        planned.append(_Planned(job, problem, out_path))
    if shard_of is not None:
        k, n = shard_of
        mine = [p for p in planned if batch.in_shard(batch.shard_key(p.out_path or p.job.label), k, n)]
        say(f"shard {k}/{n}: {len(mine)} of {len(planned)} volumes")
        planned = mine

    failed = 0
    claimed: dict[object, str] = {}

    def report_error(label: str, problem: str) -> None:
        nonlocal failed
        failed += 1
        say(f"error: {printable(label)}: {printable(problem)}")
        if json_lines:
            print(json.dumps({"input": label, "output": None, "error": problem}), flush=True)

    work = []  # every input, in order: what it reports comes out in that order too
    for p in planned:
        key = None if p.out_path is None else _output_key(p.out_path)
        if p.problem is None and key in claimed:
            p = p._replace(problem=f"output {p.out_path} is also the output of {claimed[key]}; use separate folders")
        if p.problem is not None:
            work.append(p)
            continue
        claimed[key] = p.job.label
        if skip_existing:
            outputs = _outputs(p.out_path, stats, preview)
            if any(os.path.lexists(o) for o in outputs):
                like = p.job.path if p.job.series is None else None
                bad = [(o, why) for o in outputs if (why := batch.output_problem(o, like))]
                notes = tuple(
                    f"{printable(o)} is {printable(why)}; segmenting again" for o, why in bad if why != "missing"
                )
                # what is there is not a complete output of this volume: replaced
                p = p._replace(skip=not bad, overwrite=True, notes=notes)
        work.append(p._replace(overwrite=p.overwrite or overwrite))
    to_do = [p for p in work if p.problem is None and not p.skip]

    progress = volume_progress(err, disable=quiet or len(to_do) < 2 or not err.is_terminal)

    def emit(line: str) -> None:
        """A result line: above the progress bar when both share the terminal, else plain stdout."""
        if progress.live.is_started and sys.stdout.isatty():
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    read_file, compute_file, write_file = batch.file_stages(segmenter)

    def as_file(p: _Planned) -> batch.FileJob:
        return batch.FileJob(p.job.path, p.out_path, stats, preview, p.overwrite, frozenset(run_inputs))

    def read(p: _Planned):
        return None if p.problem or p.skip or p.job.series is not None else read_file(as_file(p))

    def compute(p: _Planned, got):
        if p.problem or p.skip:
            return None
        if p.job.series is None:
            return compute_file(as_file(p), got)
        return segment_series(
            segmenter, p.job.series, p.out_path, fmt=fmt, stats=stats, preview=preview,
            overwrite=p.overwrite, inputs=run_inputs, label=p.job.label,
        )  # fmt: skip

    def write(p: _Planned, computed):
        if p.problem or p.skip or p.job.series is not None:
            return computed
        return write_file(as_file(p), computed)

    finished = skipped = 0

    def done(p: _Planned, result, error, notes) -> None:
        nonlocal finished, skipped
        label, path = p.job.label, p.job.path
        for w in p.notes:
            say(f"warning: {printable(label)}: {w}")
        if p.problem is not None:
            report_error(label, p.problem)
            return
        if p.skip:
            skipped += 1
            record = {"input": label, "output": str(p.out_path), "skipped": True}
            line = f"{printable(label)} -> {printable(p.out_path)}: complete, skipped"
            emit(json.dumps(record) if json_lines else line)
            return
        finished += 1
        if isinstance(error, VolumeError):
            report_error(label, error.problem if error.path == printable(path) else str(error))
        elif error is not None:  # whatever else fails is this input's failure: one line, and the run goes on
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            report_error(label, f"{type(error).__name__}: {first}")
        else:
            for w in result.warnings + notes:
                say(f"warning: {printable(label)}: {printable(w)}")
            emit(json.dumps(result.to_dict()) if json_lines else _summary(result))
        progress.update(task, description=escape(printable(Path(label).name)))
        progress.advance(task)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    main = threading.current_thread() is threading.main_thread()  # where alone a handler can be set
    previous = signal.signal(signal.SIGTERM, on_term) if main else None  # unwinds as Ctrl-C: nothing half-written
    try:
        with segmenter, progress:
            task = progress.add_task("segmenting", total=len(to_do))
            batch.run(work, read, compute, write, done)
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        say(f"interrupted ({name}) after {finished} of {len(to_do)} volumes; every output written is complete "
            "(--skip-existing resumes)")  # fmt: skip
        raise typer.Exit(143 if name == "SIGTERM" else 130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    n_all = len(planned)
    if n_all > 1 or skipped:
        line = f"{n_all - failed - skipped} of {n_all} volumes segmented"
        line += f", {skipped} skipped (complete outputs exist)" if skipped else ""
        say(line + (f", {failed} failed" if failed else ""))
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)


class _Planned(NamedTuple):
    """A Job with its output, as this run will do it."""

    job: Job
    problem: str | None
    out_path: Path | None
    overwrite: bool = False
    skip: bool = False
    """--skip-existing: its outputs are complete."""
    notes: tuple = ()
    """Why what is at its outputs is not trusted (--skip-existing)."""


def _outputs(out_path: Path, stats: bool, preview: bool) -> list[Path]:
    """The mask and the sidecars asked for: what --skip-existing needs complete."""
    from liverkd.deploy.segment import sidecar_path

    return [out_path, *(sidecar_path(out_path, ext) for ext, want in ((".json", stats), (".png", preview)) if want)]


def _ids(job: Job) -> set:
    """What no output of the run may replace: the input file, or every file of a DICOM series."""
    if job.series is not None:
        from liverkd.deploy.dicom_infer import series_ids

        return series_ids(job.series)
    if job.path is None:
        return set()
    from liverkd.deploy.segment import input_ids

    return input_ids(job.path)


def _output_key(path: Path):
    """One output however it is named (a link to the folder, a mount): the folder's identity and the name."""
    try:
        st = os.stat(path.parent)
    except OSError:
        return str(path)
    return (st.st_dev, st.st_ino, path.name)


def _summary(result) -> str:
    from liverkd.core.volume import printable

    stages = ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.timings.items() if k != "total")
    lines = [
        f"{printable(result.input)} -> {printable(result.output)}: liver {result.liver_ml:.1f} mL, "
        f"{result.timings['total'] * 1000:.0f} ms",
        f"  stages (ms): {stages}",
    ]
    lines += [f"  {label}: {printable(p)}" for label, p in (("stats", result.stats), ("preview", result.preview)) if p]
    return "\n".join(lines)
