"""One stage's training run: settings, AdamW, resume, and the callbacks around distill.loop.fit
(validate, checkpoint, curves, progress)."""

from __future__ import annotations

import copy
import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from liverkd.core.atomic import atomic_path, write_text
from liverkd.core.errors import EXIT_USAGE, LiverkdError
from liverkd.core.inference import THRESHOLD, segment_grid
from liverkd.core.metrics import dice
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.average import WeightAverage, state_copy
from liverkd.distill.checkpoint import load_checkpoint, save_checkpoint
from liverkd.distill.data import PatchDataset, Prepared
from liverkd.distill.loop import Callback, LoopState, StepSampler, fit, setup_distributed
from liverkd.distill.predictor import torch_predictor

if TYPE_CHECKING:
    from liverkd.distill.objectives import Objective


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_every: int = 50
    num_workers: int = 0
    patience: int = 0
    """Validations without a better Dice before the run stops early (best weights kept); 0: never."""
    average: float = 0.0
    """Decay of the weight average (distill/average.py) that validation measures and the
    checkpoint keeps; 0: the raw weights."""

    lr_schedule_steps: int = 0
    """The decay's length when longer than `steps` (the run stops part-way along it); 0: `steps`."""

    def lr_at(self, step: int) -> float:
        """Polynomial decay (nnU-Net): lr * (1 - step / length) ** 0.9, length = max(steps, lr_schedule_steps)."""
        return self.lr * (1 - step / max(self.steps, self.lr_schedule_steps)) ** 0.9


class PartialCheckpointExists(LiverkdError, RuntimeError):
    """An interrupted stage's checkpoint is there: continue it with --resume or delete it (usage, exit 2)."""

    exit_code = EXIT_USAGE


def partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.pt")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv weights only: BatchNorm weights and biases (every parameter with
    fewer than 2 dims) are not decayed (timm's param_groups_weight_decay rule)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def validation_dice(model: nn.Module, volumes: list[Prepared], spec: PreprocessSpec, device) -> float:
    """Mean Dice over whole validation volumes on the spec grid, through liverkd.core.inference
    (the Segmenter's path: sliding window, probability, largest component, holes)."""
    predict = torch_predictor(model.to(device), device)
    scores = []
    for v in volumes:
        scores.append(dice(segment_grid(v.image, predict, spec.input_shape) > THRESHOLD, v.label))
    return float(np.mean(scores))


def evaluated_model(objective, average: WeightAverage | None) -> nn.Module:
    """The eval model of the trained module, or of its weight average: the average is loaded
    into the module for the moment it takes to copy the eval model out, then the module's own
    weights go back."""
    if average is None:
        return objective.eval_model()
    module = objective.module
    own = state_copy(module)
    module.load_state_dict(average.state)
    try:
        return copy.deepcopy(objective.eval_model())
    finally:
        module.load_state_dict(own)


# ------------------------------------------------------------------------------ callbacks


class Averaging(Callback):
    """Update the weight average after every optimizer step."""

    def __init__(self, average: WeightAverage, module: nn.Module):
        self.average, self.module = average, module

    def on_step(self, state, loss, message):
        self.average.update(self.module)


class Validate(Callback):
    """Validation Dice into the row; the best weights so far into the state. With `patience`,
    the run stops (state.stopped) after that many validations without a better Dice."""

    def __init__(self, objective, volumes: list[Prepared], spec: PreprocessSpec, device, patience: int = 0,
                 average: WeightAverage | None = None):  # fmt: skip
        self.objective, self.volumes, self.spec, self.device = objective, volumes, spec, device
        self.patience, self.average = patience, average

    def on_validation(self, state, row):
        model = evaluated_model(self.objective, self.average)
        row["val_dice"] = validation_dice(model, self.volumes, self.spec, self.device)
        if state.best is None or row["val_dice"] > state.best:
            state.best = row["val_dice"]
            state.best_step = state.step
            state.best_state = state_copy(model, "cpu")
        since = sum(1 for r in state.validations if r["step"] > state.best_step)
        state.stopped = bool(self.patience) and since >= self.patience


class Checkpoint(Callback):
    """OUT.partial.pt (everything a resume needs) at every validation; at the end OUT.pt with the
    best-validation weights of the eval model, and the partial file removed."""

    def __init__(
        self,
        out: Path,
        objective,
        optimizer,
        spec: PreprocessSpec,
        settings: TrainSettings,
        *,
        preset: str | None,
        stage: str,
        title: str,
        average: WeightAverage | None = None,
    ):
        self.out, self.partial = out, partial_path(out)
        self.average = average
        self.objective, self.optimizer, self.spec, self.settings = objective, optimizer, spec, settings
        self.meta = {"preset": preset, "stage": stage}
        self.title = title

    def on_validation(self, state, row):
        model = self.objective.eval_model()
        common = {**self.meta, "step": state.step, "best_val_dice": state.best}
        if state.step < self.settings.steps and not state.stopped:
            extra = {
                "trainable": self.objective.module.state_dict(),
                "loop": asdict(state),
                "settings": asdict(self.settings),
                "title": self.title,
            }
            if self.average is not None:
                extra["average"] = self.average.state_dict()
            save_checkpoint(self.partial, model, self.spec, optimizer=self.optimizer, extra=extra, **common)
            return
        if state.best_state is not None:  # a copy: the trained module itself stays as it is
            model = copy.deepcopy(model)
            model.load_state_dict(state.best_state)
        summary = {"seconds": state.seconds, "settings": asdict(self.settings), "validations": state.validations,
                   "best_step": state.best_step, "stopped_early": state.stopped}  # fmt: skip
        save_checkpoint(self.out, model, self.spec, extra=summary, **common)
        self.partial.unlink(missing_ok=True)


class Curves(Callback):
    """OUT.csv (one row per validation) and OUT.png (loss per step, validation Dice)."""

    def __init__(self, out: Path):
        self.out = out

    def on_validation(self, state, row):
        rows = state.validations
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.out.with_suffix(".csv"), buf.getvalue())
        plot_curves(self.out.with_suffix(".png"), state.step_loss, rows, self.out.stem)


class ProgressBar(Callback):
    """A rich progress bar; in a log (no terminal) a line per validation instead."""

    def __init__(self, title: str, steps: int, done: int):
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        self.title, self.steps = title, steps
        self.bar = Progress(*columns, transient=False)
        self.task = self.bar.add_task(title, total=steps, completed=done, info="")
        self.bar.start()

    def on_step(self, state, loss, message):
        if message:
            self.bar.console.print(f"{self.title}: step {state.step - 1}: {message}")
        self.bar.update(self.task, completed=state.step, info=f"loss {loss:.3f}")

    def on_validation(self, state, row):
        self.bar.update(self.task, info=f"loss {state.step_loss[-1]:.3f}  val Dice {row['val_dice']:.3f}")
        if not self.bar.console.is_terminal:
            self.bar.console.print(
                f"{self.title}: step {state.step}/{self.steps}  loss {row['loss']:.3f}  "
                f"val Dice {row['val_dice']:.3f}  {row['seconds']:.0f} s"
            )

    def close(self):
        self.bar.stop()


def plot_curves(path: Path, step_loss: list[float], rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(np.arange(1, len(step_loss) + 1), step_loss, lw=0.6, alpha=0.4, label="step")
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", label="mean per validation")
    ax1.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    ax1.legend()
    ax2.plot([r["step"] for r in rows], [r["val_dice"] for r in rows], "o-", color="C2")
    ax2.set(xlabel="step", ylabel="Dice", title=f"{title}: validation Dice", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ the run


def train(
    objective: Objective,
    dataset: PatchDataset,
    val: list[Prepared],
    spec: PreprocessSpec,
    settings: TrainSettings,
    out,
    *,
    preset: str | None = None,
    stage: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    title: str | None = None,
) -> dict:
    """Train `objective` (distill/objectives.py) to `settings.steps`, checkpointing `out.partial.pt`
    at every validation, then write `out` (best-validation weights of the eval model).

    `stop_after` ends the run after that many steps as if it had been killed right after a
    checkpoint (the resume test uses it). Returns a summary dict."""
    out = Path(out)
    ctx = setup_distributed()
    # Soft-target gradients can decay into denormal floats, which x86 CPUs compute many times
    # slower; flushing them to zero changes no result we measured (same losses, same Dice).
    torch.set_flush_denormal(True)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch and window shapes: pick the fastest conv kernels once
    title = title or out.stem
    module = objective.module.to(ctx.device)
    objective.to(ctx.device)
    optimizer = torch.optim.AdamW(param_groups(module, settings.weight_decay), lr=settings.lr)
    state = LoopState()
    partial = partial_path(out)
    payload = None
    if partial.exists():
        if not resume:
            raise PartialCheckpointExists(
                f"{partial}: an interrupted run is here; pass --resume to continue it or delete the file to start over"
            )
        payload = load_checkpoint(partial)
        module.load_state_dict(payload["extra"]["trainable"])
        optimizer.load_state_dict(payload["optimizer"])
        state = LoopState(**payload["extra"]["loop"])
        objective.set_step(state.step, settings.steps)
    average = WeightAverage(module, settings.average) if settings.average and ctx.main else None  # rank 0 validates
    if average is not None and payload is not None and "average" in payload["extra"]:
        average.load_state_dict(payload["extra"]["average"])  # else it starts from the resumed weights
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        sampler=StepSampler(state.step, settings.steps, settings.batch_size, ctx.rank, ctx.world),
    )
    callbacks = []
    if ctx.main:  # rank 0 validates, writes and shows progress
        callbacks = [
            *([Averaging(average, module)] if average is not None else []),
            Validate(objective, val, spec, ctx.device, settings.patience, average),
            Checkpoint(
                out,
                objective,
                optimizer,
                spec,
                settings,
                preset=preset,
                stage=stage or objective.stage,
                title=title,
                average=average,
            ),
            Curves(out),
            ProgressBar(title, settings.steps, state.step),
        ]
    fit(
        objective,
        optimizer,
        loader,
        state,
        ctx,
        steps=settings.steps,
        val_every=settings.val_every,
        lr_at=settings.lr_at,
        callbacks=callbacks,
        stop_after=stop_after,
        title=title,
    )
    return {
        "out": str(out),
        "step": state.step,
        "best_val_dice": state.best,
        "seconds": state.seconds,
        "step_loss": state.step_loss,
        "finished": state.step == settings.steps or state.stopped,
        "stopped_early": state.stopped,
    }
