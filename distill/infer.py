"""A network over a whole volume on the spec grid: padded to the spec's input shape when
it fits, otherwise a sliding window of that shape with Gaussian blending."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from liverkd import volume as V


def _gaussian(shape, sigma_frac: float = 0.125) -> np.ndarray:
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (sigma_frac * n)) ** 2) for n in shape]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).astype(np.float32)


def _starts(n: int, t: int) -> list[int]:
    if n <= t:
        return [0]
    stride = max(1, t // 2)
    starts = list(range(0, n - t, stride))
    return starts + [n - t]


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: np.ndarray, input_shape, device="cpu") -> np.ndarray:
    """Softmax probabilities (C, *image.shape) for a normalized spec-grid image."""
    input_shape = tuple(int(s) for s in input_shape)
    model.eval()
    padded_shape = tuple(max(n, t) for n, t in zip(image.shape, input_shape))
    plan = V.plan_crop_pad(image.shape, padded_shape)
    x = V.crop_pad(image.astype(np.float32), plan)
    weight = _gaussian(input_shape) if padded_shape != input_shape else np.ones(input_shape, np.float32)
    acc = None
    norm = np.zeros(padded_shape, np.float32)
    for start in itertools.product(*(_starts(n, t) for n, t in zip(padded_shape, input_shape))):
        box = tuple(slice(s, s + t) for s, t in zip(start, input_shape))
        tile = torch.from_numpy(np.ascontiguousarray(x[box]))[None, None].to(device)
        probs = model(tile).float().softmax(dim=1)[0].cpu().numpy()
        if acc is None:
            acc = np.zeros((probs.shape[0], *padded_shape), np.float32)
        acc[(slice(None), *box)] += probs * weight
        norm[box] += weight
    acc /= norm
    return np.stack([V.uncrop_pad(c, plan) for c in acc])


def predict_mask(model, image: np.ndarray, input_shape, device="cpu") -> np.ndarray:
    return predict_probs(model, image, input_shape, device).argmax(axis=0).astype(np.uint8)
