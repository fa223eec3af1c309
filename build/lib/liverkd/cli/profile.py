"""CLI: `liverkd profile` (the work is in deploy/profile.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from liverkd.cli.app import QUIET, app


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} for {option} does not exist")


@app.command()
def profile(
    engine: list[str] = typer.Option(
        None, "--engine", "-e", help="Bundle folder or packaged model name; repeat to compare. Default: student-30k."
    ),
    backend: list[str] = typer.Option(
        None,
        "--backend",
        "-b",
        help="auto | onnxruntime | tensorrt | torch | openvino; repeat to compare (every engine on every backend). "
        "Default: auto.",
    ),
    volumes: Path | None = typer.Option(None, "--volumes", help="Folder of NIfTI CTs (or a data set layout)."),
    synthetic: int | None = typer.Option(
        None, "--synthetic", help="Profile on N phantom CTs written to a temp folder."
    ),
    warmup: int = typer.Option(5, "--warmup", help="Untimed volumes per target before timing."),
    runs: int = typer.Option(50, "--runs", help="Timed volumes per target."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report (every sample) as JSON."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write per-stage statistics as CSV."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: stage breakdown and latency histogram."),
    quiet: bool = QUIET,
):
    """Time every stage of segmenting a volume (read to write), per engine and backend."""
    from rich.console import Console

    from liverkd import models
    from liverkd.cli.progress import volume_progress
    from liverkd.core.errors import LiverkdError
    from liverkd.core.volume import VolumeError
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.bundle import BundleError
    from liverkd.deploy.profile import profile as run

    console = Console() if sys.stdout.isatty() else Console(width=120)  # logs keep whole numbers
    try:
        if volumes is not None and synthetic is not None:
            raise ValueError("give --volumes or --synthetic, not both")
        for path, option in ((json_out, "--json"), (csv_out, "--csv"), (plot, "--plot")):
            _check_output(path, option)
        if plot is not None:  # before the timing, not after
            from liverkd.extras import require

            require("matplotlib", "--plot")
        engines = [models.resolve(e) for e in engine] if engine else [models.resolve(None)]
        with volume_progress(console, disable=quiet) as progress:
            report = run(
                engines,
                list(backend) if backend else ["auto"],
                volumes_dir=volumes,
                synthetic=synthetic,
                warmup=warmup,
                runs=runs,
                progress=progress,
            )
    except (BundleError, RunnerError, VolumeError, LiverkdError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
    report.render(console)
    for path, write in ((json_out, report.write_json), (csv_out, report.write_csv), (plot, report.write_plot)):
        if path is not None:
            console.print(f"wrote {write(path)}")
