"""`liverkd distill run|ablation CONFIG.yaml`: teacher -> GTAN -> student, and the ablation table."""

from __future__ import annotations

from pathlib import Path

import typer

from liverkd.cli.app import app

distill_app = typer.Typer(
    help="Train teacher, assistants and students (KD, TAKD, GTAN) from a YAML config.", no_args_is_help=True
)
app.add_typer(distill_app, name="distill")

CONFIG = typer.Argument(..., metavar="CONFIG.yaml", help="Pipeline config, e.g. configs/quick.yaml.")
RESUME = typer.Option(False, "--resume", help="Continue stages that were interrupted (their .partial.pt checkpoints).")


def _fail(message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load(config: Path):
    from liverkd.distill.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        _fail(str(e))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@distill_app.command("run")
def run(config: Path = CONFIG, resume: bool = RESUME):
    """Train teacher -> GTAN -> student (or the config's `method`); write RUN_DIR/student.pt and its held-out Dice."""
    cfg = _load(config)
    import time

    from liverkd.distill.pipeline import run as run_pipeline
    from liverkd.distill.train import PartialCheckpointExists

    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, resume=resume)
    except (PartialCheckpointExists, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0])
    if not _is_main():
        return
    n = len(result["test_cases"])
    how = {"gtan": "GTAN", "kd": "KD", "nokd": "no KD"}[result["method"]]
    for role in ("teacher", "student"):
        if role in result:
            r = result[role]
            typer.echo(
                f"{role:<8} {r['preset']:<13} {r['params']:>9,} params  held-out Dice {r['dice']:.3f}"
                + (f"  ({how}, {n} held-out cases, the `liverkd infer` path)" if role == "student" else "")
            )
    typer.echo(
        f"wrote {Path(cfg.run_dir) / 'student.pt'} and {Path(cfg.run_dir) / 'heldout.json'} "
        f"in {time.perf_counter() - started:.0f} s"
    )


@distill_app.command("ablation")
def ablation(
    config: Path = CONFIG,
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per method (Dice mean ± sd over them)."),
    resume: bool = RESUME,
):
    """Teacher once; then no KD, KD, TAKD and GTAN per student size: a markdown + JSON table."""
    cfg = _load(config)
    from liverkd.distill.pipeline import ablation as run_ablation
    from liverkd.distill.pipeline import markdown_table
    from liverkd.distill.train import PartialCheckpointExists

    try:
        table = run_ablation(cfg, seeds=seeds, resume=resume)
    except (PartialCheckpointExists, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0])
    if not _is_main():
        return
    typer.echo(markdown_table(table))
    typer.echo(f"wrote {Path(cfg.run_dir) / 'ablation.md'} and {Path(cfg.run_dir) / 'ablation.json'}")
