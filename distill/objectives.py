"""What a training stage optimises: the Objective protocol and the stages that implement it.

Every stage (teacher, no-KD student, KD, TAKD's assistant and student, GTAN) runs the one
loop of distill/loop.py; only its objective differs. TAKD is `KnowledgeDistillation` with the
trained assistant as the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from liverkd.distill.gtan import (
    AssistantAndStudent,
    SlimUNet3D,
    assistant_index,
    extract,
    grow_adam_state,
    width_schedule,
)
from liverkd.distill.losses import BalancedKDLoss, DiceCELoss, DistillLoss, KDLoss
from liverkd.distill.models import UNet3D, UNetConfig


class Objective(Protocol):
    stage: str
    """Default checkpoint stage name."""
    find_unused_parameters: bool
    """For DistributedDataParallel: some parameters get no gradient in a step."""
    module: nn.Module
    """What the optimizer trains; the loop moves it to the device and DDP wraps it."""

    def to(self, device) -> Objective:
        """Move the frozen parts (teachers) to `device`."""

    def before_step(self, step: int, steps: int, optimizer: torch.optim.Optimizer) -> str | None:
        """Before optimizer step `step` of `steps`: schedules (alpha) and growth, which may change
        `module` and the optimizer's state to match. Returns a message worth printing, or None."""

    def set_step(self, step: int, steps: int) -> None:
        """After a resume at `step`, before the first before_step: restore what is not in the weights."""

    def loss(self, out, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, {name: float}) for a batch; `out` is module(x)."""

    def eval_model(self) -> UNet3D:
        """The plain UNet3D that validation measures and the checkpoint holds."""


@dataclass(frozen=True)
class KDSettings:
    """The `kd:` section of a pipeline config; docs/method.md section 3."""

    temperature: float = 1.0
    """From the sweep in docs/results.md (T = 1, 2, 4, 8 on the ablation's validation; 4 before)."""
    alpha: float = 0.5
    """Weight of the KD term; (1 - alpha) weighs Dice + CE."""
    warmup: float = 0.1
    """Fraction of a stage's steps over which alpha rises linearly from 0 to `alpha`."""
    balance: str = "teacher"
    """Class-balanced KD (BalancedKDLoss) with the classes from the "labels" or the "teacher"'s
    argmax; "none": Hinton's mean over all voxels (KDLoss)."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"'kd.temperature' must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"'kd.alpha' must be in [0, 1], got {self.alpha}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"'kd.warmup' must be in [0, 1], got {self.warmup}")
        if self.balance not in (*BalancedKDLoss.GROUPINGS, "none"):
            raise ValueError(f"'kd.balance' must be labels, teacher or none, got {self.balance!r}")

    def alpha_at(self, step: int, steps: int) -> float:
        ramp = self.warmup * steps
        return self.alpha if step >= ramp else self.alpha * step / ramp

    def loss(self) -> DistillLoss:
        if self.balance == "none":
            return DistillLoss(KDLoss(self.temperature))
        return DistillLoss(BalancedKDLoss(self.temperature, by=self.balance))


class Supervised:
    """Dice + CE on the labels: the teacher and the no-KD baselines."""

    stage = "supervised"
    find_unused_parameters = False

    def __init__(self, model: UNet3D):
        self.module = model
        self.loss_fn = DiceCELoss()

    def to(self, device):
        return self

    def before_step(self, step, steps, optimizer):
        return None

    def set_step(self, step, steps):
        pass

    def loss(self, logits, x, y):
        loss = self.loss_fn(logits, y)
        return loss, {"task": float(loss.detach())}

    def eval_model(self) -> UNet3D:
        return self.module


class KnowledgeDistillation(Supervised):
    """(1 - alpha) Dice+CE + alpha KD from a frozen teacher (Hinton et al. 2015); alpha warms up."""

    stage = "kd"

    def __init__(self, model: UNet3D, teacher: nn.Module, kd: KDSettings = KDSettings()):
        super().__init__(model)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd = kd
        self.loss_fn = kd.loss()
        self.alpha = 0.0

    def to(self, device):
        self.teacher.to(device)
        return self

    def before_step(self, step, steps, optimizer):
        self.alpha = self.kd.alpha_at(step, steps)
        return None

    def loss(self, logits, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        loss, parts = self.loss_fn(logits, y, t, self.alpha)
        return loss, {**parts, "alpha": self.alpha}


class GTANObjective(KnowledgeDistillation):
    """Loss = KD(assistant <- teacher) + KD(student <- [(1-beta) assistant, beta teacher]) on one
    weight-shared SlimUNet3D whose assistant grows (distill/gtan.py).

    The assistant's logits are detached as the student's target (in-place distillation,
    Yu & Huang 2019), so the student does not pull the assistant towards itself."""

    stage = "gtan"
    find_unused_parameters = True  # BNs of inactive widths get no gradient

    def __init__(
        self,
        teacher: nn.Module,
        student: UNetConfig,
        assistant: UNetConfig,
        *,
        n_widths: int = 4,
        grow_until: float = 0.5,
        beta: float = 0.0,
        assistant_every: int = 1,
        kd: KDSettings = KDSettings(),
    ):
        if assistant_every < 1:
            raise ValueError(f"gtan assistant_every must be >= 1, got {assistant_every}")
        if not 0 <= beta <= 1:
            raise ValueError(f"gtan beta must be in [0, 1], got {beta}")
        if not 0 <= grow_until <= 1:
            raise ValueError(f"gtan grow_until must be in [0, 1], got {grow_until}")
        if (student.in_channels, student.n_classes, student.convs_per_level) != (
            assistant.in_channels,
            assistant.n_classes,
            assistant.convs_per_level,
        ):
            raise ValueError("student and assistant must differ only in their widths")
        self.slim = SlimUNet3D(assistant, width_schedule(student.widths, assistant.widths, n_widths))
        super().__init__(AssistantAndStudent(self.slim), teacher, kd)
        self.n_widths = n_widths
        self.grow_until = grow_until
        self.beta = beta
        self.assistant_every = assistant_every

    def before_step(self, step, steps, optimizer):
        super().before_step(step, steps, optimizer)
        self.module.with_assistant = step % self.assistant_every == 0
        k = assistant_index(step, steps, self.n_widths, self.grow_until)
        old = self.module.assistant_k
        if k == old:
            return None
        for a in range(old, k):
            self.slim.grow(a, a + 1)
            grow_adam_state(optimizer, self.slim, a, a + 1)
        self.module.assistant_k = k
        return f"assistant grows to widths {self.slim.schedule[k]}"

    def set_step(self, step, steps):
        """The loaded weights hold the growth of the steps already taken (0..step-1); a growth
        due at `step` itself still happens in before_step."""
        self.module.assistant_k = assistant_index(max(step - 1, 0), steps, self.n_widths, self.grow_until)

    def loss(self, outputs, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        a = outputs.get("assistant")
        if a is None:  # a step without the assistant's pass (assistant_every > 1): KD from the teacher
            loss_s, parts_s = self.loss_fn(outputs["student"], y, t, self.alpha)
            parts = {"student_task": parts_s["task"], "student_kd": parts_s["kd"],
                     "assistant_k": self.module.assistant_k, "alpha": self.alpha}  # fmt: skip
            return loss_s, parts
        loss_a, parts_a = self.loss_fn(a, y, t, self.alpha)
        loss_s, parts_s = self.loss_fn(outputs["student"], y, [(1 - self.beta, a.detach()), (self.beta, t)], self.alpha)
        parts = {
            "assistant_kd": parts_a["kd"],
            "student_task": parts_s["task"],
            "student_kd": parts_s["kd"],
            "assistant_k": self.module.assistant_k,
            "alpha": self.alpha,
        }
        return loss_a + loss_s, parts

    def eval_model(self) -> UNet3D:
        return extract(self.slim, 0)
