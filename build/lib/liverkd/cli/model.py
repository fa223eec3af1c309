"""`liverkd model-info PRESET`: parameters, GFLOPs per volume and peak activation memory."""

from __future__ import annotations

import typer

from liverkd.cli.app import app


@app.command("model-info")
def model_info(
    preset: str = typer.Argument(..., metavar="PRESET", help="teacher, ta, student-100k or student-30k."),
    shape: tuple[int, int, int] = typer.Option((128, 128, 128), "--shape", help="Input volume X Y Z (voxels)."),
):
    """Print a preset's parameters, GFLOPs per volume and peak activation memory."""
    from liverkd.extras import require

    require("torch", "liverkd model-info")  # one line naming the extra, not a traceback
    from liverkd.distill.modelinfo import model_info as info
    from liverkd.distill.models import PRESETS, create_model

    if preset not in PRESETS:
        typer.echo(f"error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}", err=True)
        raise typer.Exit(2)
    model = create_model(preset)
    if any(s % model.divisor or s < model.divisor for s in shape):
        typer.echo(f"error: --shape {' '.join(map(str, shape))} must be multiples of {model.divisor}", err=True)
        raise typer.Exit(2)
    teacher = sum(p.numel() for p in create_model("teacher").parameters())
    r = info(model, shape)
    typer.echo(f"{preset}: widths {list(model.config.widths)}")
    typer.echo(f"  parameters        {r['params']:,} ({100 * r['params'] / teacher:.1f}% of the teacher)")
    typer.echo(f"  GFLOPs/volume     {r['gflops']:.2f} at {'x'.join(map(str, shape))} (conv multiply-adds x 2)")
    typer.echo(f"  peak activations  {r['peak_activation_mib']:.0f} MiB (fp32 inference, batch 1)")
