"""`liverkd evaluate PRED LABEL`: Dice, IoU, HD95, ASSD and RVD of predicted masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from liverkd.cli.app import QUIET, app

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PRED_SUFFIX = "_liver"
"""`liverkd infer` writes <case>_liver.nii.gz for <case>.nii.gz."""


def case_name(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def nifti_files(folder: Path) -> dict[str, Path]:
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)}


def pair_by_name(pred_dir: Path, label_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """(pairs, unmatched predictions, unmatched labels).

    The label <case> pairs with prediction <case>_liver, else with prediction <case>
    (`_liver` first: a prediction folder may also hold the input CTs).
    """
    preds, labels = nifti_files(pred_dir), nifti_files(label_dir)
    pairs, used = [], set()
    for case, label in labels.items():
        for name in (case + PRED_SUFFIX, case):
            if name in preds and name not in used:
                pairs.append((case, preds[name], label))
                used.add(name)
                break
    paired_labels = {case for case, _, _ in pairs}
    unmatched_preds = [p for name, p in preds.items() if name not in used]
    unmatched_labels = [p for case, p in labels.items() if case not in paired_labels]
    return pairs, unmatched_preds, unmatched_labels


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "inf"


@app.command()
def evaluate(
    pred: Path = typer.Argument(..., metavar="PRED", help="Predicted mask (.nii/.nii.gz) or a folder of them."),
    label: Path = typer.Argument(..., metavar="LABEL", help="Reference mask or a folder of them (paired by name)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per case on stdout, nothing else."),
    hd95: str = typer.Option(
        "max", "--hd95", help="max: the larger directed 95th percentile (MONAI, nnU-Net); pooled: both sets (MedPy)."
    ),
    quiet: bool = QUIET,
):
    """Score predicted liver masks against reference masks (Dice, IoU, HD95, ASSD, RVD)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from liverkd.core.metrics import evaluate_files, to_jsonable
    from liverkd.core.volume import VolumeError

    def fail(message: str):
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1)

    if hd95 not in ("max", "pooled"):
        typer.echo(f"error: --hd95 {hd95!r}: choose max or pooled", err=True)
        raise typer.Exit(2)
    for path in (pred, label):
        if not path.exists():
            fail(f"{path}: no such file or folder")
    if pred.is_dir() != label.is_dir():
        fail(f"{pred} and {label}: give two files or two folders")
    if pred.is_dir():
        pairs, lone_preds, lone_labels = pair_by_name(pred, label)
        for p in lone_preds:
            typer.echo(f"warning: {p}: no reference mask with a matching name", err=True)
        for p in lone_labels:
            typer.echo(f"warning: {p}: no prediction with a matching name", err=True)
        if not pairs:
            fail(f"{pred} and {label}: no masks paired by name")
    else:
        pairs = [(case_name(label), pred, label)]

    rows, failed = [], 0
    with Progress(console=Console(stderr=True), transient=True, disable=quiet or len(pairs) < 2) as progress:
        for case, pred_path, label_path in progress.track(pairs, description="evaluating"):
            try:
                metrics = evaluate_files(pred_path, label_path, hd95)
            except VolumeError as e:
                progress.console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
                failed += 1
                continue
            rows.append((case, metrics))
            if as_json:
                record = {"case": case, "pred": str(pred_path), "label": str(label_path), **to_jsonable(metrics)}
                typer.echo(json.dumps(record))

    if not as_json and rows:
        table = Table(title=f"{len(rows)} case(s)")
        for name in ("case", "Dice", "IoU", "HD95 mm", "ASSD mm", "RVD %"):
            table.add_column(name, justify="left" if name == "case" else "right")

        def add(case, m, **style):
            rvd = m["rvd"] * 100
            rvd_text = f"{rvd:+.1f}" if math.isfinite(rvd) else "inf"
            table.add_row(
                case, _fmt(m["dice"], 4), _fmt(m["iou"], 4), _fmt(m["hd95"], 2), _fmt(m["assd"], 2), rvd_text, **style
            )

        for case, m in rows:
            add(case, m)
        mean = {k: float(sum(m[k] for _, m in rows) / len(rows)) for k in rows[0][1]}
        table.add_section()
        add("mean", mean, style="bold")
        Console().print(table)
    if failed:
        raise typer.Exit(1)
