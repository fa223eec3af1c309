"""An exponential moving average of the weights, the model that validation measures and the
checkpoint keeps when `train.average` is set.

Why: the shipped models are trained on synthetic CT and used on real CT, a domain shift, and
their validation Dice still swings by 0.1 between validations late in a run (0.82 / 0.74 / 0.83
at steps 2500-3000, docs/results.md) while the learning rate decays: which weights the run ends
on is partly luck. Averaging the weights along the trajectory finds flatter minima, which
generalise better out of domain (SWAD, Cha et al., NeurIPS 2021; Izmailov et al., UAI 2018),
and an average does not depend on one step's batch. The BatchNorm statistics are averaged with
the weights (timm's ModelEmaV2): they are the statistics the averaged weights were trained
with, over far more than the ~20 patches that momentum 0.1 remembers.

The decay ramps up as min(decay, (1 + t) / (10 + t)) so that the first steps, far from the
trained weights, are forgotten quickly (timm's warm-up rule).

Not torch.optim.swa_utils.AveragedModel: it averages a deep copy of the module, but the model
validation measures is the objective's eval model (GTAN extracts it from its trained module),
so the average has to go back into that module to be evaluated (distill/train.py,
evaluated_model): a plain state dict is all that needs.
"""

from __future__ import annotations

import torch
from torch import nn


def state_copy(module: nn.Module, device=None) -> dict:
    """A detached copy of `module`'s state dict (parameters and buffers), on `device` (default:
    where each tensor is)."""
    return {k: v.detach().to(device or v.device, copy=True) for k, v in module.state_dict().items()}


def decay_at(decay: float, updates: int) -> float:
    """The weight of the old average at update number `updates` (1, 2, ...)."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The average of `module`'s state (parameters and buffers) over its optimizer steps."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"a weight average needs 0 < decay < 1, got {decay}")
        self.decay, self.updates = decay, 0
        self.state = state_copy(module)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = decay_at(self.decay, self.updates)
        for k, v in module.state_dict().items():
            average = self.state[k]
            if average.is_floating_point():
                average.mul_(d).add_(v.detach(), alpha=1 - d)
            else:  # BatchNorm's num_batches_tracked
                average.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, payload: dict) -> None:
        self.decay, self.updates = float(payload["decay"]), int(payload["updates"])
        for k, v in payload["state"].items():
            self.state[k].copy_(v)
