"""Losses as small modules, one idea each (RepDistiller's distiller_zoo style).

Logits are (N, C, X, Y, Z); labels are (N, X, Y, Z) integer class maps in which IGNORE marks
voxels that no loss counts (patch voxels outside the volume, distill/data.py).
Defaults and their sources are in docs/method.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1
"""Label of a voxel no loss counts: a patch voxel that lies outside the volume."""


def counted(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (N, X, Y, Z): the voxels the losses count."""
    return labels != IGNORE


class SoftDiceLoss(nn.Module):
    """1 - soft Dice of the foreground classes, pooled over the batch (nnU-Net's batch Dice)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = counted(labels).unsqueeze(1)
        probs = logits.float().softmax(dim=1)[:, 1:] * keep
        onehot = F.one_hot(labels.clamp(min=0).long(), logits.shape[1]).movedim(-1, 1)[:, 1:] * keep
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
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE) + self.dice(logits, labels)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per voxel (N, X, Y, Z): T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(dim=1) * t * t


class KDLoss(nn.Module):
    """Hinton et al. 2015, per voxel (Liu et al. 2019's pixel-wise distillation): T^2 * KL,
    averaged over the counted voxels. The T^2 keeps the gradient scale independent of T.

    On a liver patch most voxels are background, so this mean is mostly a background term:
    see BalancedKDLoss."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student_logits, teacher_logits, labels=None) -> torch.Tensor:
        kl = soft_kl(student_logits, teacher_logits, self.temperature)
        return kl.mean() if labels is None else kl[counted(labels)].mean()


class BalancedKDLoss(KDLoss):
    """Class-balanced KD: the per-voxel T^2 KL of KDLoss, averaged separately over the voxels of
    each class, then the mean over the classes present in the batch.

    Every voxel is weighted by 1 / (classes present x voxels of its class): inverse class
    frequency, the w_c term of U-Net's weight map (Ronneberger et al. 2015), which counts the
    classes in the ground truth. `by` says where a voxel's class comes from: "labels" (the
    ground truth, as U-Net's w_c) or "teacher" (the teacher's argmax, so the term depends on the
    teacher alone). docs/method.md section 3 says why the balance (the plain mean over ~88 %
    background voxels emptied the 100k student's mask in 2 of 3 seeds) and what labels change: grouped
    by the teacher, a batch where the teacher calls only a few voxels liver gives those few
    voxels, right or wrong, half the term."""

    GROUPINGS = ("labels", "teacher")

    def __init__(self, temperature: float = 1.0, by: str = "teacher"):
        super().__init__(temperature)
        if by not in self.GROUPINGS:
            raise ValueError(f"by must be one of {', '.join(self.GROUPINGS)}, got {by!r}")
        self.by = by

    def forward(self, student_logits, teacher_logits, labels=None) -> torch.Tensor:
        kl = soft_kl(student_logits, teacher_logits, self.temperature)
        if self.by == "labels" and labels is None:
            raise ValueError("BalancedKDLoss(by='labels') needs the labels")
        keep = torch.ones_like(kl, dtype=torch.bool) if labels is None else counted(labels)
        classes = labels if self.by == "labels" else teacher_logits.detach().argmax(dim=1)
        groups = [keep & (classes == c) for c in range(teacher_logits.shape[1])]
        return torch.stack([kl[g].mean() for g in groups if g.any()]).mean()


class DistillLoss(nn.Module):
    """(1 - alpha) * Dice+CE(labels) + alpha * KD(teacher), the usual KD mix.

    `targets` is teacher logits or a list of (weight, logits) pairs: the KD term is then their
    weighted sum (the GTAN student learns from the assistant and, optionally, the teacher).
    `alpha` comes with each call: the objectives warm it up from 0 (distill/objectives.py).
    """

    def __init__(self, kd: KDLoss):
        super().__init__()
        self.task = DiceCELoss()
        self.kd = kd

    def forward(self, logits, labels, targets, alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
        targets = targets if isinstance(targets, list) else [(1.0, targets)]
        task = self.task(logits, labels)
        kd = sum(w * self.kd(logits, t, labels) for w, t in targets if w > 0)
        loss = (1 - alpha) * task + alpha * kd
        return loss, {"task": float(task.detach()), "kd": float(kd.detach()) if torch.is_tensor(kd) else 0.0}
