"""ONE training loop for every stage. What differs between stages is the objective:

    objective.module            the nn.Module being trained (DistributedDataParallel wraps it)
    objective.loss(out, x, y)   -> (loss, {name: float}) for a batch
    objective.eval_model()      the plain UNet3D that validation measures and the checkpoint holds
    objective.before_step(step, steps) -> message or None   (GTAN grows here)
    objective.set_step(step, steps)                         (after a resume)

Under torchrun (WORLD_SIZE > 1) the same loop runs DistributedDataParallel: gloo on CPU,
NCCL on GPU. Rank r draws samples (step * world + r) * batch + j, so the data a run sees
depends only on the seed and the step: a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from liverkd.core.atomic import write_text
from liverkd.core.inference import THRESHOLD, segment_grid
from liverkd.core.metrics import dice
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.checkpoint import load_checkpoint, save_checkpoint
from liverkd.distill.data import PatchDataset, Prepared
from liverkd.distill.losses import DiceCELoss, DistillLoss
from liverkd.distill.models import UNet3D
from liverkd.distill.predictor import torch_predictor


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_every: int = 50
    num_workers: int = 0
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Polynomial decay (nnU-Net): lr * (1 - step / steps) ** 0.9."""
        return self.lr * (1 - step / self.steps) ** 0.9


# ------------------------------------------------------------------------------ objectives


class Supervised:
    """Dice + CE on the labels: the teacher and the no-KD baselines."""

    stage = "supervised"
    find_unused_parameters = False

    def __init__(self, model: UNet3D):
        self.module = model
        self.loss_fn = DiceCELoss()

    def to(self, device):
        return self

    def before_step(self, step, steps):
        return None

    def set_step(self, step, steps):
        pass

    def loss(self, logits, x, y):
        loss = self.loss_fn(logits, y)
        return loss, {"task": float(loss.detach())}

    def eval_model(self) -> UNet3D:
        return self.module


class KnowledgeDistillation(Supervised):
    """(1 - alpha) Dice+CE + alpha T^2 KL from a frozen teacher (Hinton et al. 2015)."""

    stage = "kd"

    def __init__(self, model: UNet3D, teacher: nn.Module, *, alpha: float = 0.5, temperature: float = 4.0):
        super().__init__(model)
        self.teacher = teacher.eval().requires_grad_(False)
        self.loss_fn = DistillLoss(alpha, temperature)

    def to(self, device):
        self.teacher.to(device)
        return self

    def loss(self, logits, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        return self.loss_fn(logits, y, t)


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join the torchrun group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def sync_buffers(module: nn.Module, ctx: Dist) -> None:
    """Rank 0's BatchNorm statistics everywhere. DDP broadcasts them before each forward,
    so the ranks only differ by their last step's update; this makes them one model."""
    if ctx.world > 1:
        for buf in module.buffers():
            dist.broadcast(buf, 0)


# ------------------------------------------------------------------------------ the loop


def validation_dice(model: nn.Module, volumes: list[Prepared], spec: PreprocessSpec, device) -> float:
    """Mean Dice over whole validation volumes on the spec grid, through liverkd.core.inference
    (the Segmenter's path: sliding window, probability, largest component, holes)."""
    predict = torch_predictor(model.to(device), device)
    scores = []
    for v in volumes:
        scores.append(dice(segment_grid(v.image, predict, spec.input_shape) > THRESHOLD, v.label))
    return float(np.mean(scores))


def partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.pt")


class PartialCheckpointExists(RuntimeError):
    pass


def train(
    objective,
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
    """Train to `settings.steps`, checkpointing `out.partial.pt` at every validation, then
    write `out` (best-validation weights of the eval model). Returns a summary dict.

    `stop_after` ends the run after that many steps as if it had been killed right after a
    checkpoint (the resume test uses it)."""
    out = Path(out)
    ctx = setup_distributed()
    # Soft-target gradients can decay into denormal floats, which x86 CPUs compute many times
    # slower; flushing them to zero changes no result we measured (same losses, same Dice).
    torch.set_flush_denormal(True)
    title = title or out.stem
    stage = stage or objective.stage
    partial = partial_path(out)
    module = objective.module.to(ctx.device)
    objective.to(ctx.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    state = {"step": 0, "best": None, "best_state": None, "step_loss": [], "epochs": [], "seconds": 0.0}
    if partial.exists():
        if not resume:
            raise PartialCheckpointExists(f"{partial}: an interrupted run is here; pass --resume to continue it "
                                          "or delete the file to start over")
        payload = load_checkpoint(partial)
        module.load_state_dict(payload["extra"]["trainable"])
        optimizer.load_state_dict(payload["optimizer"])
        state.update(payload["extra"]["loop"])
        objective.set_step(state["step"], settings.steps)
    net = module
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=objective.find_unused_parameters)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, num_workers=settings.num_workers,
        sampler=StepSampler(state["step"], settings.steps, settings.batch_size, ctx.rank, ctx.world),
    )
    started = time.perf_counter()
    seconds_before = state["seconds"]

    def checkpoint(final: bool):
        state["seconds"] = seconds_before + time.perf_counter() - started
        if not ctx.main:
            return
        model = objective.eval_model()
        extra = {"trainable": module.state_dict(), "loop": state, "settings": asdict(settings), "title": title}
        if final:
            if state["best_state"] is not None:  # a copy: the trained module itself stays as it is
                model = copy.deepcopy(model)
                model.load_state_dict(state["best_state"])
            summary = {"seconds": state["seconds"], "settings": extra["settings"], "epochs": state["epochs"]}
            save_checkpoint(out, model, spec, preset=preset, stage=stage, step=state["step"],
                            best_val_dice=state["best"], extra=summary)
            partial.unlink(missing_ok=True)
        else:
            save_checkpoint(partial, model, spec, preset=preset, stage=stage, step=state["step"],
                            best_val_dice=state["best"], optimizer=optimizer, extra=extra)
        write_log(out, state)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    epoch_losses: list[float] = []
    epoch_parts: dict[str, list[float]] = {}
    with Progress(*columns, disable=not ctx.main, transient=False) as bar:
        task = bar.add_task(title, total=settings.steps, completed=state["step"], info="")
        module.train()
        for x, y in loader:
            step = state["step"]
            message = objective.before_step(step, settings.steps)
            if message and ctx.main:
                bar.console.print(f"{title}: step {step}: {message}")
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            loss, parts = objective.loss(net(x), x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"{title}: loss is {value} at step {step}")
            state["step"] = step + 1
            state["step_loss"].append(value)
            epoch_losses.append(value)
            for k, v in parts.items():
                epoch_parts.setdefault(k, []).append(v)
            bar.update(task, completed=state["step"], info=f"loss {value:.3f}")
            done = state["step"] == settings.steps
            if state["step"] % settings.val_every == 0 or done:
                sync_buffers(module, ctx)
                val_dice = None
                if ctx.main:
                    model = objective.eval_model()
                    val_dice = validation_dice(model, val, spec, ctx.device)
                    if state["best"] is None or val_dice > state["best"]:
                        state["best"] = val_dice
                        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    module.train()
                row = {"step": state["step"], "lr": settings.lr_at(step), "loss": float(np.mean(epoch_losses)),
                       **{k: float(np.mean(v)) for k, v in epoch_parts.items()}, "val_dice": val_dice,
                       "seconds": seconds_before + time.perf_counter() - started}
                state["epochs"].append(row)
                epoch_losses, epoch_parts = [], {}
                if ctx.main:
                    bar.update(task, info=f"loss {value:.3f}  val Dice {val_dice:.3f}")
                    if not bar.console.is_terminal:  # logs get a line per validation instead of a bar
                        bar.console.print(f"{title}: step {state['step']}/{settings.steps}  loss {row['loss']:.3f}  "
                                          f"val Dice {val_dice:.3f}  {row['seconds']:.0f} s")
                checkpoint(final=done)
                ctx.barrier()
                if stop_after is not None and state["step"] >= stop_after and not done:
                    break
    return {"out": str(out), "step": state["step"], "best_val_dice": state["best"], "seconds": state["seconds"],
            "step_loss": state["step_loss"], "finished": state["step"] == settings.steps}


class StepSampler(torch.utils.data.Sampler):
    """Sample indices for this rank from `start` to `steps`, batch by batch."""

    def __init__(self, start: int, steps: int, batch_size: int, rank: int, world: int):
        self.start, self.steps, self.batch_size, self.rank, self.world = start, steps, batch_size, rank, world

    def __len__(self):
        return (self.steps - self.start) * self.batch_size

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


# ------------------------------------------------------------------------------ logs


def write_log(out: Path, state: dict) -> None:
    """OUT.csv (one row per validation) and OUT.png (loss per step, validation Dice)."""
    rows = state["epochs"]
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out.with_suffix(".csv"), buf.getvalue())
    plot_curves(out.with_suffix(".png"), state["step_loss"], rows, out.stem)


def plot_curves(path: Path, step_loss: list[float], rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from liverkd.core.atomic import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(1, len(step_loss) + 1)
    ax1.plot(steps, step_loss, lw=0.6, alpha=0.4, label="step")
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", label="mean per validation")
    ax1.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    ax1.legend()
    dices = [(r["step"], r["val_dice"]) for r in rows if r.get("val_dice") is not None]
    if dices:
        ax2.plot(*zip(*dices), "o-", color="C2")
    ax2.set(xlabel="step", ylabel="Dice", title=f"{title}: validation Dice", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
