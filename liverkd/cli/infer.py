"""CLI: `liverkd infer` (the work itself is deploy.segment.Segmenter)."""

from __future__ import annotations

import glob
import json
import os
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace outputs that exist already (never a file that is an input of the run)."
    ),
):
    """Segment the liver: CT volumes in, uint8 masks (1 = liver) out with the input's exact geometry.

    An output that exists already is not replaced without --overwrite, and an output that is an
    input of the run (by name, link or mount) is never written. Each input that fails gets one line
    on stderr, the others are still segmented, and the exit code is 1.
    """
    import warnings

    from rich.console import Console
    from rich.markup import escape

    from liverkd import models
    from liverkd.cli.progress import volume_progress
    from liverkd.core.errors import LiverkdError
    from liverkd.core.volume import VolumeError, VolumeWarning, printable
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.bundle import BundleError
    from liverkd.deploy.segment import Segmenter, input_ids, output_path_for

    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a name the locale cannot encode must not stop a run

    def say(message: str) -> None:
        err.print(message, markup=False)

    jobs = expand_inputs(inputs)
    out_file = None
    out_dir = None
    if output is not None:
        if _is_nifti(output) and not output.is_dir():
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
        segmenter = Segmenter.load(models.resolve(engine), backend=backend)
        if engine is None:
            say(f"using the packaged model {models.DEFAULT} ({printable(segmenter.bundle.path)})")
    except (BundleError, RunnerError, LiverkdError) as e:
        say(f"error: {printable(e)}")
        raise typer.Exit(1) from None

    failed = 0
    claimed: dict[object, str] = {}
    run_inputs = set().union(*(input_ids(path) for _, path, _ in jobs if path is not None))

    def report_error(label: str, problem: str) -> None:
        nonlocal failed
        failed += 1
        say(f"error: {printable(label)}: {printable(problem)}")
        if json_lines:
            print(json.dumps({"input": label, "output": None, "error": problem}), flush=True)

    progress = volume_progress(err, disable=len(jobs) < 2 or not err.is_terminal)
    with segmenter, progress:
        task = progress.add_task("segmenting", total=len(jobs))
        for label, path, problem in jobs:
            progress.update(task, description=escape(printable(Path(label).name)))
            out_path = None if problem else out_file or output_path_for(path, out_dir)
            key = None if out_path is None else _output_key(out_path)
            if key in claimed:
                problem = f"output {out_path} is also the output of {claimed[key]}; use separate folders"
            if problem is not None:
                report_error(label, problem)
                progress.advance(task)
                continue
            claimed[key] = label
            try:
                with warnings.catch_warnings(record=True) as caught:  # shown below, one line each, on success
                    warnings.simplefilter("ignore", VolumeWarning)  # they are in result.warnings
                    result = segmenter.segment_file(
                        path, out_path, stats=stats, preview=preview, overwrite=overwrite, inputs=run_inputs
                    )
            except VolumeError as e:
                report_error(label, e.problem if e.path == printable(path) else str(e))
            except Exception as e:  # whatever else fails is this input's failure: one line, and the run goes on
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                report_error(label, f"{type(e).__name__}: {first}")
            else:
                for w in result.warnings + [str(w.message) for w in caught]:
                    say(f"warning: {printable(label)}: {printable(w)}")
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
