"""CLI: `liverkd export` and `liverkd build-engine` (the work itself is deploy.export / deploy.build)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from liverkd.cli.app import QUIET, app


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="A liverkd checkpoint (.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write."),
    dynamic: bool = typer.Option(
        False, "--dynamic", help="Dynamic spatial axes (ONNX Runtime only; TensorRT wants fixed)."
    ),
):
    """Export a checkpoint to ONNX (opset 17, BatchNorm folded, simplified) and check it against PyTorch."""
    from liverkd.deploy.export import ExportError, export_onnx

    try:
        result = export_onnx(checkpoint, out, dynamic=dynamic)
    except (ExportError, ValueError, ImportError) as e:
        _fail(str(e))
    typer.echo(result.summary())


@app.command("build-engine")
def build_engine(
    source: str = typer.Argument(
        ..., help="A liverkd checkpoint (.pt), an ONNX file from `liverkd export`, or a packaged model's name."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write, e.g. engines/student-30k-int8."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or int8."),
    calib_data: Path = typer.Option(
        None, "--calib-data", help="Folder of NIfTI volumes for int8 calibration (default: ./calib_data)."
    ),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax (default), entropy or percentile."),
    backend: str = typer.Option("auto", "--backend", help="auto, tensorrt or onnxruntime."),
    workspace: int = typer.Option(1024, "--workspace", help="TensorRT workspace limit in MiB."),
    min_agreement: float = typer.Option(0.995, "--min-agreement", help="Refuse the bundle below this Dice vs fp32."),
    cuda_binding: str = typer.Option(
        "auto", "--cuda-binding", help="TensorRT's CUDA binding: auto (cuda-python, else pycuda), cuda-python, pycuda."
    ),
    quiet: bool = QUIET,
):
    """Build an engine bundle (ONNX, INT8/FP16 variants, TensorRT plan where possible, engine.json)."""
    from rich.console import Console

    from liverkd import models
    from liverkd.extras import require

    require("onnx", "liverkd build-engine")  # one line naming the extra, not a traceback
    if Path(source).suffix == ".pt" and Path(source).is_file():
        require("torch", f"liverkd build-engine {source} (a checkpoint: exported to ONNX first)")
    from liverkd.core.volume import VolumeError
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.build import BuildError
    from liverkd.deploy.build import build_engine as build
    from liverkd.deploy.calibrate import CalibrationError
    from liverkd.deploy.export import ExportError

    console = Console(highlight=False, soft_wrap=True)

    def log(message: str) -> None:  # --quiet keeps the warnings
        if not quiet or message.startswith("WARNING"):
            console.print(message, markup=False)

    try:
        if not Path(source).exists() and source in models.names():  # the packaged model, e.g. on the target
            source = str(models.path(source) / "model.onnx")
        with console.status(f"building {out} ({precision})...") if not quiet else contextlib.nullcontext():
            bundle = build(
                Path(source),
                out,
                precision,
                calib_data=calib_data,
                calib_method=calib_method,
                backend=backend,
                workspace_mib=workspace,
                min_agreement=min_agreement,
                cuda_binding=cuda_binding,
                log=log,
            )
    except (BuildError, CalibrationError, ExportError, RunnerError, VolumeError, ValueError) as e:
        _fail(str(e))
    files = ", ".join(sorted(record.path for record in bundle.meta.files.values()))
    console.print(f"wrote {bundle.path}: {files}")
