"""CLI: `liverkd infer` (the work itself is deploy.segment.Segmenter)."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import typer

from liverkd.cli.app import app

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIX = "_liver"


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


@app.command("infer")
def infer(
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders, globs, or DICOM series folders."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Output .nii.gz (one input) or folder; default <input>_liver.nii.gz beside it."
    ),
    engine: str | None = typer.Option(
        None, "--engine", help="Engine bundle folder, or a packaged model's name; default: the packaged student-30k."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt, torch or openvino (CPU)."),
    stats: bool = typer.Option(False, "--stats", help="Also write <output>.json: liver volume (mL), mean HU, timings."),
    preview: bool = typer.Option(False, "--preview", help="Also write <output>.png: axial/coronal/sagittal overlays."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON line per volume on stdout (paths, mL, timings)."),
):
    """Segment the liver: CT volumes in, uint8 masks (1 = liver) out with the input's exact geometry."""
    import warnings

    from rich.console import Console

    from liverkd import models
    from liverkd.cli.progress import volume_progress
    from liverkd.core.errors import LiverkdError
    from liverkd.core.volume import VolumeError, VolumeWarning
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.bundle import BundleError
    from liverkd.deploy.segment import Segmenter, output_path_for

    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def say(message: str) -> None:
        err.print(message, markup=False)

    jobs = expand_inputs(inputs)
    out_file = None
    out_dir = None
    if output is not None:
        if _is_nifti(output) and not output.is_dir():
            if len(jobs) != 1:
                say(f"error: -o {output}: a single output file, but {len(jobs)} inputs; give a folder")
                raise typer.Exit(2)
            out_file = output
        else:
            out_dir = output
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                say(f"error: {out_dir}: cannot create the output folder ({e.strerror or e})")
                raise typer.Exit(1) from None

    try:
        segmenter = Segmenter.load(models.resolve(engine), backend=backend)
        if engine is None:
            say(f"using the packaged model {models.DEFAULT} ({segmenter.bundle.path})")
    except (BundleError, RunnerError, LiverkdError) as e:
        say(f"error: {e}")
        raise typer.Exit(1) from None

    failed = 0
    claimed: dict[Path, str] = {}

    def report_error(label: str, problem: str) -> None:
        nonlocal failed
        failed += 1
        say(f"error: {label}: {problem}")
        if json_lines:
            print(json.dumps({"input": label, "output": None, "error": problem}), flush=True)

    progress = volume_progress(err, disable=len(jobs) < 2)
    with segmenter, progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", VolumeWarning)  # shown below, once, per input
        task = progress.add_task("segmenting", total=len(jobs))
        for label, path, problem in jobs:
            progress.update(task, description=Path(label).name)
            if problem is not None:
                report_error(label, problem)
                progress.advance(task)
                continue
            out_path = out_file or output_path_for(path, out_dir)
            key = out_path.resolve()
            if key in claimed:
                report_error(label, f"output {out_path} is also the output of {claimed[key]}; use separate folders")
                progress.advance(task)
                continue
            claimed[key] = label
            try:
                result = segmenter.segment_file(path, out_path, stats=stats, preview=preview)
            except VolumeError as e:
                report_error(label, e.problem if e.path == str(path) else str(e))
            except (RunnerError, OSError, MemoryError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                report_error(label, f"{type(e).__name__}: {first}")
            else:
                for w in result.warnings:
                    say(f"warning: {label}: {w}")
                if json_lines:
                    print(json.dumps(result.to_dict()), flush=True)
                else:
                    print(_summary(result), flush=True)
            progress.advance(task)
    if len(jobs) > 1:
        say(f"{len(jobs) - failed} of {len(jobs)} volumes segmented" + (f", {failed} failed" if failed else ""))
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)


def _summary(result) -> str:
    stages = ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.timings.items() if k != "total")
    lines = [
        f"{result.input} -> {result.output}: liver {result.liver_ml:.1f} mL, {result.timings['total'] * 1000:.0f} ms",
        f"  stages (ms): {stages}",
    ]
    lines += [f"  {label}: {p}" for label, p in (("stats", result.stats), ("preview", result.preview)) if p]
    return "\n".join(lines)
