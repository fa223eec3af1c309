"""CLI: `liverkd data synth` and `liverkd data check` (the work is liverkd.core.synth / liverkd.core.datasets)."""

from __future__ import annotations

from pathlib import Path

import typer

from liverkd.cli.app import QUIET, app

data_app = typer.Typer(help="Data sets: synthetic CT, and checking a real data set's layout.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@data_app.command("synth")
def synth(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write (MSD layout: imagesTr/, labelsTr/, dataset.json)."
    ),
    n: int = typer.Option(8, "--n", min=1, help="Number of cases."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    shape: tuple[int, int, int] = typer.Option((64, 64, 64), "--shape", metavar="X Y Z", help="Voxels per axis."),
    spacing: float | None = typer.Option(
        None, "--spacing", metavar="MM", help="Isotropic voxel size in mm (default: 384 mm / shape per axis)."
    ),
    labelmaps: Path | None = typer.Option(
        None,
        "--labelmaps",
        metavar="DIR",
        help="TotalSegmentator-style subject folders (one <structure>.nii.gz per structure) to draw anatomy from; "
        "default: the procedural anatomy only.",
    ),
    procedural: float = typer.Option(
        0.0, "--procedural-fraction", min=0.0, max=1.0, help="With --labelmaps: this fraction of cases procedural."
    ),
    variants: bool = typer.Option(
        False, "--variants", help="Add the synthesis variants: a longer left lobe, liver-density masses, a fed stomach."
    ),
    preview: bool = typer.Option(
        False, "--preview", help="Also write OUT/preview.png (axial + coronal, liver outlined)."
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes; the bytes do not depend on it."),
    quiet: bool = QUIET,
):
    """Write seeded synthetic abdominal CTs with liver masks (MSD layout), domain-randomised."""
    from rich.console import Console

    from liverkd.cli.progress import volume_progress
    from liverkd.core.synth import write_dataset
    from liverkd.core.volume import VolumeError

    if out.exists() and not out.is_dir():
        _fail(f"{out}: exists and is not a folder")
    if preview:  # before the volumes are written, not after
        from liverkd.extras import require

        require("matplotlib", "--preview")
    try:
        with volume_progress(Console(stderr=True), disable=quiet) as bar:
            task = bar.add_task(f"synthetic CT {shape[0]}x{shape[1]}x{shape[2]}", total=n)
            pairs = write_dataset(out, n, seed=seed, shape=shape, spacing=spacing, labelmaps=labelmaps,
                                  procedural_fraction=procedural, variants=variants, workers=workers,
                                  progress=lambda done, total: bar.update(task, completed=done))  # fmt: skip
    except (ValueError, VolumeError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {len(pairs)} cases to {out} ({out / 'dataset.json'})")
    if preview:
        from liverkd.viz import preview_dataset

        typer.echo(f"preview: {preview_dataset(out)}")


@data_app.command("check")
def check(
    path: Path = typer.Argument(..., help="A data set folder (MSD, LiTS, TotalSegmentator) or a CSV/JSON list."),
):
    """Find the image/label pairs of a data set, load each and report shape, spacing and liver volume."""
    from rich.console import Console
    from rich.table import Table

    from liverkd.core.datasets import DatasetError, discover, load_case
    from liverkd.core.volume import VolumeError

    try:
        cases = discover(path)
    except DatasetError as e:
        _fail(str(e))
    table = Table(title=f"{path}: {len(cases)} case(s)")
    for name in ("case", "shape", "spacing mm", "liver mL"):
        table.add_column(name, justify="left" if name == "case" else "right")
    failed = 0
    for case in cases:
        try:
            image, label = load_case(case)
        except (DatasetError, VolumeError) as e:
            typer.echo(f"error: {e}", err=True)
            failed += 1
            continue
        spacing = image.spacing
        liver_ml = float(label.array.sum()) * spacing[0] * spacing[1] * spacing[2] / 1000
        table.add_row(case.case_id, "x".join(map(str, image.shape)), " ".join(f"{s:.2f}" for s in spacing),
                      f"{liver_ml:.0f}")  # fmt: skip
    Console().print(table)
    if failed:
        raise typer.Exit(1)
