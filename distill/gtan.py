"""GTAN: the growing teacher assistant (our reading of Xu et al. 2021; docs/method.md).

The assistant and the student are ONE weight-shared network (`SlimUNet3D`): it has the
assistant's full widths, and any width schedule entry runs the leading channels of every
layer. Entry 0 is the student; entries 1..K are the assistant's widths, growing from just
above the student's to the full assistant. Each width has its own BatchNorm (switchable BN,
Yu et al. 2019). When the assistant grows, the channels that become active enter with zero
outgoing weights and the wider BN starts as a copy of the narrower one, so the network's
function is unchanged at the moment of growth. In each step the assistant distils from the
frozen teacher and the student slice distils from the assistant (and optionally the
teacher). At the end `extract_student` copies the slice into a standalone UNet3D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from liverkd.distill.losses import DistillLoss
from liverkd.distill.models import UNet3D, UNetConfig


def width_schedule(student: tuple[int, ...], assistant: tuple[int, ...], n_widths: int) -> list[tuple[int, ...]]:
    """[student, a_1, ..., a_K = assistant]; a_k interpolates linearly per level."""
    if len(student) != len(assistant):
        raise ValueError(f"student depth {len(student)} != assistant depth {len(assistant)}")
    if any(s > a for s, a in zip(student, assistant)):
        raise ValueError(f"student widths {student} must fit inside assistant widths {assistant} at every level")
    if n_widths < 1:
        raise ValueError(f"gtan needs at least one assistant width, got {n_widths}")
    out = [tuple(student)]
    for k in range(1, n_widths + 1):
        out.append(tuple(s + math.ceil((a - s) * k / n_widths) for s, a in zip(student, assistant)))
    return out


def assistant_index(step: int, steps: int, n_widths: int, grow_until: float) -> int:
    """Schedule entry the assistant uses at `step`: 1 at the start, n_widths from
    fraction `grow_until` of training on, equal spans in between."""
    if n_widths == 1 or grow_until <= 0:
        return n_widths
    progress = step / max(1, steps)
    return 1 + min(n_widths - 1, int((n_widths - 1) * progress / grow_until))


def _bn_set(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.BatchNorm3d(w) for w in widths)


class SlimUNet3D(nn.Module):
    """UNet3D (same layers) at the assistant's widths, runnable at any schedule entry."""

    def __init__(self, assistant: UNetConfig, schedule: list[tuple[int, ...]]):
        super().__init__()
        if tuple(schedule[-1]) != tuple(assistant.widths):
            raise ValueError(f"last schedule entry {schedule[-1]} != assistant widths {assistant.widths}")
        self.config = assistant
        self.schedule = [tuple(w) for w in schedule]
        w, n = assistant.widths, assistant.convs_per_level
        levels = range(len(w))
        per_level = [[s[i] for s in self.schedule] for i in levels]
        def cin(i, j):
            return w[i] if j else (assistant.in_channels if i == 0 else w[i - 1])

        self.down = nn.ModuleList(
            nn.ModuleList(nn.Conv3d(cin(i, j), w[i], 3, padding=1, bias=False) for j in range(n)) for i in levels
        )
        self.down_bn = nn.ModuleList(nn.ModuleList(_bn_set(per_level[i]) for _ in range(n)) for i in levels)
        up_levels = list(reversed(range(len(w) - 1)))
        self.up = nn.ModuleList(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2) for i in up_levels)
        self.dec = nn.ModuleList(
            nn.ModuleList(nn.Conv3d(2 * w[i] if j == 0 else w[i], w[i], 3, padding=1, bias=False) for j in range(n))
            for i in up_levels
        )
        self.dec_bn = nn.ModuleList(nn.ModuleList(_bn_set(per_level[i]) for _ in range(n)) for i in up_levels)
        self.head = nn.Conv3d(w[0], assistant.n_classes, 1)

    @property
    def up_levels(self) -> list[int]:
        return list(reversed(range(len(self.config.widths) - 1)))

    # -- which weights a width uses; forward and extraction share these --------------------

    def down_weight(self, i: int, j: int, ws) -> torch.Tensor:
        cin = (self.config.in_channels if i == 0 else ws[i - 1]) if j == 0 else ws[i]
        return self.down[i][j].weight[: ws[i], :cin]

    def dec_weight(self, u: int, j: int, ws) -> torch.Tensor:
        i = self.up_levels[u]
        weight = self.dec[u][j].weight[: ws[i]]
        if j:
            return weight[:, : ws[i]]
        full = self.config.widths[i]  # input = [skip channels | upsampled channels]
        return torch.cat([weight[:, : ws[i]], weight[:, full : full + ws[i]]], dim=1)

    def up_params(self, u: int, ws) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.up_levels[u]
        return self.up[u].weight[: ws[i + 1], : ws[i]], self.up[u].bias[: ws[i]]

    def head_params(self, ws) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.weight[:, : ws[0]], self.head.bias

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        ws = self.schedule[k]
        skips = []
        for i in range(len(ws)):
            for j in range(len(self.down[i])):
                x = F.relu(self.down_bn[i][j][k](F.conv3d(x, self.down_weight(i, j, ws), padding=1)))
            if i < len(ws) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for u in range(len(self.up)):
            weight, bias = self.up_params(u, ws)
            x = torch.cat([skips.pop(), F.conv_transpose3d(x, weight, bias, stride=2)], dim=1)
            for j in range(len(self.dec[u])):
                x = F.relu(self.dec_bn[u][j][k](F.conv3d(x, self.dec_weight(u, j, ws), padding=1)))
        weight, bias = self.head_params(ws)
        return F.conv3d(x, weight, bias)

    # -- growth --------------------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, old: int, new: int) -> None:
        """Make entry `new` compute exactly what entry `old` computes (function-preserving):
        zero every weight reading a channel active in `new` but not in `old`, and start the
        BNs of `new` as copies of those of `old` (fresh statistics for the new channels)."""
        a, b = self.schedule[old], self.schedule[new]
        full = self.config.widths
        for i in range(len(full)):
            for j, conv in enumerate(self.down[i]):
                if j:
                    conv.weight[:, a[i] : b[i]] = 0
                elif i:
                    conv.weight[:, a[i - 1] : b[i - 1]] = 0
        for u, i in enumerate(self.up_levels):
            self.up[u].weight[a[i + 1] : b[i + 1]] = 0
            for j, conv in enumerate(self.dec[u]):
                conv.weight[:, a[i] : b[i]] = 0
                if j == 0:
                    conv.weight[:, full[i] + a[i] : full[i] + b[i]] = 0
        self.head.weight[:, a[0] : b[0]] = 0
        for bn_sets in [*self.down_bn, *self.dec_bn]:
            for bns in bn_sets:
                _copy_bn(bns[old], bns[new])


def _copy_bn(src: nn.BatchNorm3d, dst: nn.BatchNorm3d) -> None:
    dst.reset_parameters()
    c = src.num_features
    dst.weight[:c] = src.weight
    dst.bias[:c] = src.bias
    dst.running_mean[:c] = src.running_mean
    dst.running_var[:c] = src.running_var
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


@torch.no_grad()
def extract(slim: SlimUNet3D, k: int = 0) -> UNet3D:
    """Schedule entry k (default: the student) as a standalone UNet3D with copied weights."""
    ws = slim.schedule[k]
    cfg = slim.config
    net = UNet3D(UNetConfig(widths=ws, in_channels=cfg.in_channels, n_classes=cfg.n_classes,
                            convs_per_level=cfg.convs_per_level))

    def load_block(block: nn.Sequential, weights, bns):
        convs = [m for m in block if isinstance(m, nn.Conv3d)]
        norms = [m for m in block if isinstance(m, nn.BatchNorm3d)]
        for conv, norm, weight, bn in zip(convs, norms, weights, bns):
            conv.weight.copy_(weight)
            norm.load_state_dict(bn.state_dict())

    for i, block in enumerate(net.down):
        load_block(block, [slim.down_weight(i, j, ws) for j in range(len(slim.down[i]))],
                   [slim.down_bn[i][j][k] for j in range(len(slim.down[i]))])
    for u, (up, block) in enumerate(zip(net.up, net.dec)):
        weight, bias = slim.up_params(u, ws)
        up.weight.copy_(weight)
        up.bias.copy_(bias)
        load_block(block, [slim.dec_weight(u, j, ws) for j in range(len(slim.dec[u]))],
                   [slim.dec_bn[u][j][k] for j in range(len(slim.dec[u]))])
    weight, bias = slim.head_params(ws)
    net.head.weight.copy_(weight)
    net.head.bias.copy_(bias)
    return net.eval()


class AssistantAndStudent(nn.Module):
    """Both forward passes in one module call, so DistributedDataParallel sees one forward
    per backward."""

    def __init__(self, slim: SlimUNet3D):
        super().__init__()
        self.slim = slim
        self.assistant_k = 1

    def forward(self, x):
        return {"assistant": self.slim(x, self.assistant_k), "student": self.slim(x, 0)}


class GTANObjective:
    """Loss = KD(assistant <- teacher) + KD(student <- [(1-beta) assistant, beta teacher]).

    The assistant's logits are detached as the student's target (in-place distillation,
    Yu & Huang 2019), so the student does not pull the assistant towards itself."""

    stage = "gtan"
    find_unused_parameters = True  # BNs of inactive widths get no gradient

    def __init__(self, teacher: nn.Module, student: UNetConfig, assistant: UNetConfig, *, n_widths: int = 4,
                 grow_until: float = 0.5, beta: float = 0.0, alpha: float = 0.5, temperature: float = 4.0):
        if not 0 <= beta <= 1:
            raise ValueError(f"gtan beta must be in [0, 1], got {beta}")
        if not 0 <= grow_until <= 1:
            raise ValueError(f"gtan grow_until must be in [0, 1], got {grow_until}")
        if (student.in_channels, student.n_classes, student.convs_per_level) != (
            assistant.in_channels, assistant.n_classes, assistant.convs_per_level):
            raise ValueError("student and assistant must differ only in their widths")
        self.teacher = teacher.eval().requires_grad_(False)
        self.slim = SlimUNet3D(assistant, width_schedule(student.widths, assistant.widths, n_widths))
        self.module = AssistantAndStudent(self.slim)
        self.n_widths = n_widths
        self.grow_until = grow_until
        self.beta = beta
        self.loss_fn = DistillLoss(alpha, temperature)

    def to(self, device):
        self.teacher.to(device)
        return self

    def before_step(self, step: int, steps: int) -> str | None:
        k = assistant_index(step, steps, self.n_widths, self.grow_until)
        old = self.module.assistant_k
        if k == old:
            return None
        for a in range(old, k):
            self.slim.grow(a, a + 1)
        self.module.assistant_k = k
        return f"assistant grows to widths {self.slim.schedule[k]}"

    def set_step(self, step: int, steps: int) -> None:
        """After a resume at `step`: the loaded weights hold the growth of the steps already
        taken (0..step-1); a growth due at `step` itself still happens in before_step."""
        self.module.assistant_k = assistant_index(max(step - 1, 0), steps, self.n_widths, self.grow_until)

    def loss(self, outputs, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        a = outputs["assistant"]
        loss_a, parts_a = self.loss_fn(a, y, t)
        loss_s, parts_s = self.loss_fn(outputs["student"], y, [(1 - self.beta, a.detach()), (self.beta, t)])
        parts = {"assistant_kd": parts_a["kd"], "student_task": parts_s["task"], "student_kd": parts_s["kd"],
                 "assistant_k": self.module.assistant_k}
        return loss_a + loss_s, parts

    def eval_model(self) -> UNet3D:
        return extract(self.slim, 0)
