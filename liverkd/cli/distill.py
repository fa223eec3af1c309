"""`liverkd distill run|ablation CONFIG`: teacher -> GTAN -> student, and the ablation table."""

from __future__ import annotations

from pathlib import Path

import typer

from liverkd import configs
from liverkd.cli.app import QUIET, app

distill_app = typer.Typer(
    help="Train teacher, assistants and students (KD, TAKD, GTAN) from a YAML config.", no_args_is_help=True
)
app.add_typer(distill_app, name="distill")

CONFIG = typer.Argument(
    ...,
    metavar="CONFIG",
    help=f"A config file, or a packaged config's name: {', '.join(configs.names())}. "
    "Relative paths inside it (run_dir, data) are relative to the current directory.",
)
RESUME = typer.Option(False, "--resume", help="Continue stages that were interrupted (their .partial.pt checkpoints).")
SET = typer.Option(
    None,
    "--set",
    metavar="KEY=VALUE",
    help="Override one config value, dotted key, value read as YAML (train.steps.teacher=10, "
    "data.path=/data/Task03_Liver); repeatable.",
)


def _fail(message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load(config: str, overrides: list[str] | None, quiet: bool):
    from liverkd.extras import require

    for module in ("torch", "yaml", "matplotlib"):  # the `train` extra; a MissingExtra is one line, exit 1
        require(module, "liverkd distill")
    from liverkd.distill.config import ConfigError, load_config

    if quiet:  # the pipeline's progress bars and lines all go to rich's global console
        import rich

        rich.get_console().quiet = True
    try:
        return load_config(config, overrides or ())
    except ConfigError as e:
        _fail(str(e))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@distill_app.command("run")
def run(config: str = CONFIG, overrides: list[str] = SET, resume: bool = RESUME, quiet: bool = QUIET):
    """Train teacher -> GTAN -> student (or the config's `method`); write RUN_DIR/student.pt and its held-out Dice."""
    cfg = _load(config, overrides, quiet)
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
    config: str = CONFIG,
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per method (Dice mean ± sd over them)."),
    overrides: list[str] = SET,
    resume: bool = RESUME,
    quiet: bool = QUIET,
):
    """Teacher once; then no KD, KD, TAKD and GTAN per student size: a markdown + JSON table."""
    cfg = _load(config, overrides, quiet)
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
