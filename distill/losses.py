"""Losses as small modules, one idea each (RepDistiller's distiller_zoo style).

Logits are (N, C, X, Y, Z); labels are (N, X, Y, Z) integer class maps.
Defaults and their sources are in docs/method.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftDiceLoss(nn.Module):
    """1 - soft Dice of the foreground classes, pooled over the batch (nnU-Net's batch Dice)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=1)[:, 1:]
        onehot = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        dims = (0, *range(2, probs.ndim))
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        return 1 - ((2 * inter + self.smooth) / (denom + self.smooth)).mean()


class DiceCELoss(nn.Module):
    """Cross-entropy + soft Dice, equal weights (the nnU-Net default)."""

    def __init__(self):
        super().__init__()
        self.dice = SoftDiceLoss()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long()) + self.dice(logits, labels)


class KDLoss(nn.Module):
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes,
    averaged over voxels. The T^2 keeps the gradient scale independent of T."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_s = F.log_softmax(student_logits.float() / t, dim=1)
        log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(dim=1)
        return kl.mean() * t * t


class DistillLoss(nn.Module):
    """(1 - alpha) * Dice+CE(labels) + alpha * KD(teacher), the usual KD mix.

    `teacher_logits` may be a list of (weight, logits) pairs: the KD term is then their
    weighted sum (the GTAN student learns from the assistant and, optionally, the teacher).
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.task = DiceCELoss()
        self.kd = KDLoss(temperature)

    def forward(self, logits, labels, teacher_logits) -> tuple[torch.Tensor, dict[str, float]]:
        targets = teacher_logits if isinstance(teacher_logits, list) else [(1.0, teacher_logits)]
        task = self.task(logits, labels)
        kd = sum(w * self.kd(logits, t) for w, t in targets if w > 0)
        loss = (1 - self.alpha) * task + self.alpha * kd
        return loss, {"task": float(task.detach()), "kd": float(kd.detach()) if torch.is_tensor(kd) else 0.0}
