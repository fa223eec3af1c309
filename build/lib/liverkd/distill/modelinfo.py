"""Size and cost of a network on one volume: parameters, GFLOPs, peak activation memory.

FLOPs count the multiply-adds of every convolution and transposed convolution (2 FLOPs per
MAC; BatchNorm, ReLU, pooling and concatenation are left out, they are < 2 % here).
Peak activation memory is measured, not estimated: during one no-grad inference (batch 1,
float32) a dispatch mode sees every tensor every op creates and tracks the bytes of the
storages still alive (freed when the last Python reference goes), input included.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from liverkd.distill.models import count_params


def conv_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    k = 1
    for s in module.kernel_size:
        k *= s
    if isinstance(module, nn.ConvTranspose3d):  # every input voxel meets every output channel
        return inp.numel() * module.out_channels * k // module.groups
    return out.numel() * (module.in_channels // module.groups) * k


class LiveBytes(TorchDispatchMode):
    """Peak total bytes of live tensor storages created inside the mode (plus `base`)."""

    def __init__(self, base: int = 0):
        super().__init__()
        self.live: dict[int, int] = {}
        self.base = base
        self.peak = base

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key in self.live or t.untyped_storage().nbytes() == 0:
            return
        self.live[key] = t.untyped_storage().nbytes()
        weakref.finalize(t, self.live.pop, key, None)
        self.peak = max(self.peak, self.base + sum(self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@torch.no_grad()
def model_info(model: nn.Module, shape=(128, 128, 128)) -> dict:
    model = model.eval()
    x = torch.zeros(1, model.config.in_channels, *shape)
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        macs += conv_macs(module, inputs[0], output)

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        with LiveBytes(base=x.numel() * x.element_size()) as mem:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        "params": count_params(model),
        "shape": list(shape),
        "gflops": 2 * macs / 1e9,
        "peak_activation_mib": mem.peak / 2**20,
    }
