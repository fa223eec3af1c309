"""ONE training loop for every stage; what differs between stages is the objective
(distill/objectives.py), and everything around a step is a Callback (distill/train.py:
validation, checkpoints, curves, progress).

Under torchrun (WORLD_SIZE > 1) the same loop runs DistributedDataParallel: gloo on CPU,
NCCL on GPU. Rank r draws samples (step * world + r) * batch + j, so the data a run sees
depends only on the seed and the step: a resumed run continues exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from liverkd.distill.objectives import Objective


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


def agree(flag: bool, ctx: Dist) -> bool:
    """Rank 0's `flag` on every rank (rank 0 alone validates, so it alone decides an early stop)."""
    if ctx.world == 1:
        return bool(flag)
    buf = torch.tensor([int(flag)], device=ctx.device)
    dist.broadcast(buf, 0)
    return bool(buf.item())


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


@dataclass
class LoopState:
    """Everything a resumed run needs besides weights and optimizer (saved in OUT.partial.pt)."""

    step: int = 0
    best: float | None = None
    best_state: dict | None = None
    best_step: int = 0
    stopped: bool = False
    """Set by a callback (Validate's patience) at a validation: the run ends there, as if finished."""
    step_loss: list[float] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    """One row per validation: step, lr, mean loss and parts since the last one, seconds, ..."""
    seconds: float = 0.0


class Callback:
    """What happens around the steps; every hook does nothing unless overridden."""

    def on_step(self, state: LoopState, loss: float, message: str | None) -> None:
        """After each optimizer step; `message` is what the objective said before it."""

    def on_validation(self, state: LoopState, row: dict) -> None:
        """Every `val_every` steps and after the last; callbacks may add to `row` for later ones."""

    def close(self) -> None:
        """When the loop ends, normally or not."""


def fit(
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    state: LoopState,
    ctx: Dist,
    *,
    steps: int,
    val_every: int,
    lr_at: Callable[[int], float],
    callbacks: list[Callback],
    stop_after: int | None = None,
    title: str = "training",
) -> LoopState:
    """Train `objective.module` from `state.step` to `steps`; `stop_after` ends the run after that
    many steps as if it had been killed right after a validation (the resume test uses it)."""
    module = objective.module
    net = module
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=objective.find_unused_parameters,
        )
    started, seconds_before = time.perf_counter(), state.seconds
    window: list[tuple[float, dict]] = []
    module.train()
    try:
        for x, y in loader:
            step = state.step
            message = objective.before_step(step, steps, optimizer)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            loss, parts = objective.loss(net(x), x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"{title}: loss is {value} at step {step}")
            state.step = step + 1
            state.step_loss.append(value)
            window.append((value, parts))
            for cb in callbacks:
                cb.on_step(state, value, message)
            if state.step % val_every and state.step != steps:
                continue
            sync_buffers(module, ctx)
            state.seconds = seconds_before + time.perf_counter() - started
            row = {
                "step": state.step,
                "lr": lr_at(step),
                "loss": float(np.mean([v for v, _ in window])),
                # mean of each part over the steps that had it (GTAN's assistant may skip steps)
                **{
                    k: float(np.mean([p[k] for _, p in window if k in p]))
                    for k in dict.fromkeys(k for _, p in window for k in p)
                },
                "seconds": state.seconds,
            }
            state.validations.append(row)
            window = []
            for cb in callbacks:
                cb.on_validation(state, row)
            module.train()
            ctx.barrier()
            if agree(state.stopped, ctx):
                break
            if stop_after is not None and stop_after <= state.step < steps:
                break
    finally:
        for cb in callbacks:
            cb.close()
    return state
