"""GTAN: the growing teacher assistant (our reading of Xu et al. 2021; docs/method.md).

The assistant and the student are ONE weight-shared network (`SlimUNet3D`): it has the
assistant's full widths, and any width schedule entry runs the leading channels of every
layer. Entry 0 is the student; entries 1..K are the assistant's widths, growing from just
above the student's to the full assistant. Each width has its own BatchNorm (switchable BN,
Yu et al. 2019). When the assistant grows, the channels that become active enter with zero
outgoing weights and the wider BN starts as a copy of the narrower one, so the network's
function is unchanged at the moment of growth; `grow_adam_state` gives the newly active
weights optimizer moments that match. At the end `extract` copies the student's slice into a
standalone UNet3D. The training objective is distill/objectives.py `GTAN`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from liverkd.distill.models import UNet3D, UNetConfig

Runs = list[tuple[int, int]]
"""Channels as [start, stop) runs; a decoder conv reads two ([skip | upsampled])."""


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


def _take(t: torch.Tensor, dim: int, runs: Runs) -> torch.Tensor:
    parts = [t.narrow(dim, a, b - a) for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _dims(conv: nn.Module) -> tuple[int, int]:
    """(output-channel dim, input-channel dim) of the layer's weight."""
    return (1, 0) if isinstance(conv, nn.ConvTranspose3d) else (0, 1)


def _mask(size: int, runs: Runs, device) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool, device=device)
    for a, b in runs:
        m[a:b] = True
    return m


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
        nn.init.zeros_(self.head.bias)  # as UNet3D's head (distill/models.py)

    @property
    def up_levels(self) -> list[int]:
        return list(reversed(range(len(self.config.widths) - 1)))

    # -- which channels a width uses; forward, growth and extraction share these ----------------

    def down_io(self, i: int, j: int, ws) -> tuple[Runs, Runs]:
        cin = (self.config.in_channels if i == 0 else ws[i - 1]) if j == 0 else ws[i]
        return [(0, ws[i])], [(0, cin)]

    def dec_io(self, u: int, j: int, ws) -> tuple[Runs, Runs]:
        i = self.up_levels[u]
        full = self.config.widths[i]  # input of the first conv = [skip channels | upsampled channels]
        return [(0, ws[i])], ([(0, ws[i]), (full, full + ws[i])] if j == 0 else [(0, ws[i])])

    def up_io(self, u: int, ws) -> tuple[Runs, Runs]:
        i = self.up_levels[u]
        return [(0, ws[i])], [(0, ws[i + 1])]

    def head_io(self, ws) -> tuple[Runs, Runs]:
        return [(0, self.config.n_classes)], [(0, ws[0])]

    def layers(self):
        """Every conv layer with its channel function ws -> (output runs, input runs), in
        UNet3D's module order (down, up, dec, head)."""
        n = range(self.config.convs_per_level)
        for i, convs in enumerate(self.down):
            yield from ((convs[j], lambda ws, i=i, j=j: self.down_io(i, j, ws)) for j in n)
        for u, up in enumerate(self.up):
            yield up, lambda ws, u=u: self.up_io(u, ws)
        for u, convs in enumerate(self.dec):
            yield from ((convs[j], lambda ws, u=u, j=j: self.dec_io(u, j, ws)) for j in n)
        yield self.head, self.head_io

    @staticmethod
    def sliced(conv: nn.Module, io: tuple[Runs, Runs]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias restricted to the channels `io` names."""
        (runs_out, runs_in), (out_dim, in_dim) = io, _dims(conv)
        weight = _take(_take(conv.weight, out_dim, runs_out), in_dim, runs_in)
        return weight, None if conv.bias is None else _take(conv.bias, 0, runs_out)

    def active(self, ws) -> dict[nn.Parameter, torch.Tensor]:
        """Boolean mask per conv parameter: the entries width `ws` uses."""
        masks = {}
        for conv, io in self.layers():
            (runs_out, runs_in), (out_dim, in_dim) = io(ws), _dims(conv)
            out_shape, in_shape = [1] * conv.weight.ndim, [1] * conv.weight.ndim
            out_shape[out_dim], in_shape[in_dim] = -1, -1
            size, device = conv.weight.shape, conv.weight.device
            out_mask, in_mask = _mask(size[out_dim], runs_out, device), _mask(size[in_dim], runs_in, device)
            masks[conv.weight] = (out_mask.view(out_shape) & in_mask.view(in_shape)).expand_as(conv.weight)
            if conv.bias is not None:
                masks[conv.bias] = out_mask
        return masks

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        ws = self.schedule[k]
        skips = []
        for i in range(len(ws)):
            for j, conv in enumerate(self.down[i]):
                weight, _ = self.sliced(conv, self.down_io(i, j, ws))
                x = F.relu(self.down_bn[i][j][k](F.conv3d(x, weight, padding=1)))
            if i < len(ws) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for u in range(len(self.up)):
            weight, bias = self.sliced(self.up[u], self.up_io(u, ws))
            x = torch.cat([skips.pop(), F.conv_transpose3d(x, weight, bias, stride=2)], dim=1)
            for j, conv in enumerate(self.dec[u]):
                weight, _ = self.sliced(conv, self.dec_io(u, j, ws))
                x = F.relu(self.dec_bn[u][j][k](F.conv3d(x, weight, padding=1)))
        weight, bias = self.sliced(self.head, self.head_io(ws))
        return F.conv3d(x, weight, bias)

    # -- growth --------------------------------------------------------------------------------

    def bn_pairs(self, old: int, new: int):
        """(BN of entry old, BN of entry new) for every normalised layer."""
        for bn_sets in [*self.down_bn, *self.dec_bn]:
            for bns in bn_sets:
                yield bns[old], bns[new]

    @torch.no_grad()
    def grow(self, old: int, new: int) -> None:
        """Make entry `new` compute exactly what entry `old` computes (function-preserving):
        zero every weight reading a channel active in `new` but not in `old`, and start the
        BNs of `new` as copies of those of `old` (fresh statistics for the new channels)."""
        a, b = self.schedule[old], self.schedule[new]
        for conv, io in self.layers():
            in_dim = _dims(conv)[1]
            for (_, stop_a), (_, stop_b) in zip(io(a)[1], io(b)[1]):
                conv.weight.narrow(in_dim, stop_a, stop_b - stop_a).zero_()
        for src, dst in self.bn_pairs(old, new):
            _copy_bn(src, dst)


def _copy_bn(src: nn.BatchNorm3d, dst: nn.BatchNorm3d) -> None:
    dst.reset_parameters()
    c = src.num_features
    dst.weight[:c] = src.weight
    dst.bias[:c] = src.bias
    dst.running_mean[:c] = src.running_mean
    dst.running_var[:c] = src.running_var
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


@torch.no_grad()
def grow_adam_state(optimizer: torch.optim.Optimizer, slim: SlimUNet3D, old: int, new: int) -> None:
    """Adam/AdamW moments for the weights that growth from entry `old` to `new` makes active.

    Adam keeps one step counter per TENSOR. Entries that were never active have zero moments
    while the counter is at the tensor's step s, so their first update is
    lr * (1 - b1) g / sqrt((1 - b2) g^2) / [(1 - b1^s) / sqrt(1 - b2^s)] -> 3.16 lr for large s
    (b1 = 0.9, b2 = 0.999), and it rises to about 6 lr over the next ~20 steps while the
    second moment fills: new weights jump just when the function-preserving growth should
    leave the network as it was.

    So, bias-correction-aware: a newly active entry keeps a first moment of 0 and gets as
    second moment the mean stored second moment of the entries already active in the same
    tensor. That stored value carries the same (1 - b2^s) factor the tensor's counter
    corrects for, so after correction the new entry sees its layer's gradient scale: its
    first update is about (1 - b1) = 0.1 lr and it reaches lr as its first moment fills (a
    warm-up of the new weights). The BNs of `new` start as copies of those of `old`, and so do
    their moments and counter (new channels: first moment 0, the mean second moment).
    Parameters the optimizer has no state for yet start fresh, which Adam corrects itself."""
    was, now = slim.active(slim.schedule[old]), slim.active(slim.schedule[new])
    for p, mask in now.items():
        state = optimizer.state.get(p)
        if state and "exp_avg_sq" in state:
            fresh = mask & ~was[p]
            state["exp_avg"][fresh] = 0
            state["exp_avg_sq"][fresh] = state["exp_avg_sq"][was[p]].mean()
    for src_bn, dst_bn in slim.bn_pairs(old, new):
        for src, dst in zip(src_bn.parameters(), dst_bn.parameters()):
            state = optimizer.state.get(src)
            if not state or "exp_avg_sq" not in state:
                optimizer.state.pop(dst, None)
                continue
            exp_avg, exp_avg_sq = torch.zeros_like(dst), torch.full_like(dst, float(state["exp_avg_sq"].mean()))
            exp_avg[: src.numel()], exp_avg_sq[: src.numel()] = state["exp_avg"], state["exp_avg_sq"]
            optimizer.state[dst] = {"step": state["step"].clone(), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


@torch.no_grad()
def extract(slim: SlimUNet3D, k: int = 0) -> UNet3D:
    """Schedule entry k (default: the student) as a standalone UNet3D with copied weights."""
    ws = slim.schedule[k]
    cfg = slim.config
    net = UNet3D(
        UNetConfig(widths=ws, in_channels=cfg.in_channels, n_classes=cfg.n_classes, convs_per_level=cfg.convs_per_level)
    )
    # UNet3D's and SlimUNet3D's conv layers come in the same order; so do their BatchNorms
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    for target, (conv, io) in zip(convs, slim.layers(), strict=True):
        weight, bias = slim.sliced(conv, io(ws))
        target.weight.copy_(weight)
        if bias is not None:
            target.bias.copy_(bias)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    for target, (_, bn) in zip(norms, slim.bn_pairs(k, k), strict=True):
        target.load_state_dict(bn.state_dict())
    return net.eval()


class AssistantAndStudent(nn.Module):
    """Both forward passes in one module call, so DistributedDataParallel sees one forward
    per backward."""

    def __init__(self, slim: SlimUNet3D):
        super().__init__()
        self.slim = slim
        self.assistant_k = 1
        self.with_assistant = True
        """False on the steps GTAN's assistant_every skips: the student's pass alone."""

    def forward(self, x):
        if not self.with_assistant:
            return {"student": self.slim(x, 0)}
        return {"assistant": self.slim(x, self.assistant_k), "student": self.slim(x, 0)}
