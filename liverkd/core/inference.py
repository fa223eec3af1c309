"""The one inference path, for training evaluation and the Segmenter alike (nnU-Net's rule:
the trainer validates through the predictor users run):

    mask = segment_volume(volume, spec, predict)     # prepare -> segment_grid -> inverse -> threshold

`predict` is any callable float32 (1, 1, x, y, z) -> (1, C, x, y, z) scores: a Runner's
`infer` (ONNX Runtime, TensorRT, OpenVINO) or a torch model wrapped by
liverkd.distill.predictor. Nothing here imports torch.

On the network grid, `segment_grid` gives the liver PROBABILITY, cleaned: only the largest
connected component (with its enclosed holes filled) keeps its probability. That probability
is resampled back to the input's voxels (linear) and thresholded there, as nnU-Net and
TotalSegmentator do, so the boundary is smooth at native resolution instead of 3 mm blocks.

Sliding windows: the scheme is MONAI's `sliding_window_inference(mode="gaussian")` (the one nnU-Net also uses),
written in numpy for a batch-1 engine:

- the grid is padded with `pad_value` up to the window size on axes where it is smaller;
- windows start every `roi * (1 - overlap)` voxels along each axis, the last one flush with
  the end of the grid, so every voxel is covered and no window hangs over the edge;
- each window's prediction is weighted by a Gaussian centred on the window
  (sigma = `sigma_scale` * window size per axis, peak 1, zeros clamped to the smallest
  positive weight), summed, and divided by the summed weights.

Centre voxels of a window see the most context and are the most reliable; the Gaussian
lets them dominate, so no seams show where windows meet.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np

from liverkd.core import accel, xp
from liverkd.core import volume as V
from liverkd.core.preprocess import prepare
from liverkd.core.spec import PreprocessSpec
from liverkd.core.timing import RUNNER_STAGES, NoClock

THRESHOLD = 0.5
"""Liver where its probability is above this (argmax of two classes)."""


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets along one axis of length `size` (>= roi) for windows of length `roi`."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    starts = list(range(0, size - roi, step))
    starts.append(size - roi)
    return starts


def gaussian_importance(roi_size, sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian weight map over one window, peak 1, no zeros."""
    axes = []
    for n in roi_size:
        sigma = max(sigma_scale * n, 1e-3)
        t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (t / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w /= w.max()
    w = w.astype(np.float32)
    positive = w[w > 0]
    return np.maximum(w, positive.min()) if positive.size else np.ones_like(w)


def sliding_window_inference(
    image: np.ndarray,
    roi_size,
    predictor: Callable[[np.ndarray], np.ndarray],
    *,
    overlap: float = 0.25,
    sigma_scale: float = 0.125,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Blend `predictor` over windows of `roi_size` covering the 3-D `image`.

    image:      (X, Y, Z) float array (already normalised).
    roi_size:   (x, y, z) window = the engine's fixed input shape.
    predictor:  float32 (1, 1, x, y, z) -> (1, C, x, y, z); pass probabilities (softmax)
                rather than raw logits so that blending averages like with like.
    overlap:    fraction of a window shared with its neighbour along each axis (MONAI's
                default 0.25; 0.5 is smoother and costs about 2^3/1.5^3 = 2.4x the windows).
    pad_value:  fill for axes shorter than the window (normalised air is 0.0).

    Returns the blended (C, X, Y, Z) float32 prediction on the input grid.
    """
    if image.ndim != 3:
        raise ValueError(f"sliding_window_inference needs a 3-D array, got shape {image.shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi_size)
    shape = tuple(image.shape)
    padded_shape = tuple(max(n, r) for n, r in zip(shape, roi))
    before = tuple((p - n) // 2 for n, p in zip(shape, padded_shape))
    inner = tuple(slice(b, b + n) for b, n in zip(before, shape))
    a = xp.of(image)
    if padded_shape != shape:
        padded = a.full(padded_shape, pad_value, dtype=np.float32)
        padded[inner] = image
    else:
        padded = image.astype(np.float32, copy=False)

    weight_map = xp.like(gaussian_importance(roi, sigma_scale), image)
    weight_sum = a.zeros(padded_shape, dtype=np.float32)
    blended = None
    starts = [window_starts(n, r, overlap) for n, r in zip(padded_shape, roi)]
    for corner in itertools.product(*starts):
        window = tuple(slice(c, c + r) for c, r in zip(corner, roi))
        pred = predictor(a.ascontiguousarray(padded[window])[None, None])
        if pred.ndim != 5 or pred.shape[0] != 1 or tuple(pred.shape[2:]) != roi:
            raise ValueError(f"predictor returned shape {pred.shape}, expected (1, C, {', '.join(map(str, roi))})")
        if blended is None:
            blended = a.zeros((pred.shape[1],) + padded_shape, dtype=np.float32)
        blended[(slice(None),) + window] += pred[0] * weight_map
        weight_sum[window] += weight_map
    blended /= weight_sum
    return blended[(slice(None),) + inner]


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Channel softmax as float32 (numerically stable)."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (the liver is one organ); empty stays empty."""
    labels, n = accel.component_labels(mask, 26)
    if n <= 1:
        return mask.astype(bool, copy=False)
    sizes = xp.of(labels).bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill cavities fully enclosed in 3-D (vessels inside the liver that the network missed):
    background components (6-connected, as scipy's binary_fill_holes) that do not touch the
    border of the mask's bounding box. Outside the box, background touches the border anyway."""
    box = bounding_box(mask)
    if box is None:
        return mask.astype(bool, copy=True)
    inside = mask[box].astype(bool, copy=False)
    labels, n = accel.component_labels(~inside, 6)
    a = xp.of(labels)
    hole = a.ones(n + 1, dtype=bool)
    hole[0] = False
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        hole[a.unique(face)] = False
    out = a.zeros(mask.shape, dtype=bool)
    out[box] = inside | hole[labels]
    return out


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every nonzero voxel, grown by `margin` (None: empty). Three
    projections instead of scipy's find_objects, which is ~20x slower on a 128^3 grid."""
    box = []
    for axis in range(mask.ndim):
        hit = xp.to_host(xp.of(mask).flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))))
        if len(hit) == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)


def dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 3x3x3 cube (border: background), separably: two shifted ORs per
    axis (several times faster than scipy's binary_dilation or maximum_filter on bool)."""
    out = mask.astype(bool, copy=True)
    for axis in range(out.ndim):
        shifted = out.copy()
        lo = [slice(None)] * out.ndim
        hi = [slice(None)] * out.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        shifted[tuple(hi)] |= out[tuple(lo)]
        shifted[tuple(lo)] |= out[tuple(hi)]
        out = shifted
    return out


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest connected component, then hole filling, as uint8 (1 = liver)."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint8)
    return fill_holes(largest_component(mask)).astype(np.uint8)


def liver_probability(scores: np.ndarray, label: int = 1) -> np.ndarray:
    """(1, C, X, Y, Z) or (C, X, Y, Z) logits -> float32 (X, Y, Z) probability of `label`
    (softmax over C; a single channel is a sigmoid logit)."""
    if scores.ndim == 5:
        scores = scores[0]
    if scores.shape[0] == 1:
        return _sigmoid(scores[0].astype(np.float32))
    if scores.shape[0] == 2:  # softmax of two is the sigmoid of their difference: one exp, not two
        return _sigmoid(scores[label].astype(np.float32) - scores[1 - label].astype(np.float32))
    return softmax(scores, axis=0)[label]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in place on a float32 array (exp overflowing to inf gives 0, as it should)."""
    out = np.negative(z, out=z)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += np.float32(1.0)
    return np.reciprocal(out, out=out)


def clean_probability(p: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The probability of the largest component only: voxels over `threshold` that are not in
    the largest 26-connected component (holes filled) drop to 0, enclosed holes rise to 1, and
    the one-voxel rim around the component keeps its value so that resampling interpolates the
    boundary as the network drew it. Thresholding the result gives `clean_mask(p > threshold)`."""
    a = xp.of(p)
    fg = p > threshold
    if not fg.any():
        return a.zeros(p.shape, dtype=np.float32)
    keep = fill_holes(largest_component(fg))
    box = bounding_box(keep, margin=1)
    out = a.zeros(p.shape, dtype=np.float32)
    out[box] = a.where(dilate(keep[box]), p[box], np.float32(0.0))
    holes = keep[box] & ~fg[box]
    out[box][holes] = 1.0
    return out


def segment_grid(x: np.ndarray, predict, roi_size, *, overlap: float = 0.25, label: int = 1, clock=None) -> np.ndarray:
    """Normalised (X, Y, Z) grid -> cleaned liver probability on the same grid.

    A grid that fits in `roi_size` is padded with air and run once; a larger one is a
    Gaussian-blended sliding window. With a `clock`, the time outside `predict` counts as
    "postprocess" (a Runner's own h2d/network/d2h are added by the caller's predict)."""
    clock = clock or NoClock()
    roi = tuple(int(r) for r in roi_size)
    t0 = time.perf_counter()
    before = sum(clock.seconds.get(s, 0.0) for s in RUNNER_STAGES)
    if all(n <= r for n, r in zip(x.shape, roi)):
        plan = V.plan_crop_pad(x.shape, roi)
        window = V.crop_pad(x.astype(np.float32, copy=False), plan, fill=0.0)[None, None]
        p = V.uncrop_pad(liver_probability(predict(window), label), plan)
    else:
        probs = sliding_window_inference(x, roi, lambda w: softmax(predict(w)), overlap=overlap)
        p = probs[label] if probs.shape[0] > 1 else liver_probability(probs[None], label)
    p = clean_probability(p)
    in_predict = sum(clock.seconds.get(s, 0.0) for s in RUNNER_STAGES) - before
    clock.add("postprocess", time.perf_counter() - t0 - in_predict)
    return p


def segment_volume(
    vol: V.Volume, spec: PreprocessSpec, predict, *, roi_size=None, overlap: float = 0.25, label: int = 1, clock=None
) -> np.ndarray:
    """The whole way from a Volume to its uint8 liver mask on the volume's own voxel grid."""
    clock = clock or NoClock()
    p, inverse = segment_probability(vol, spec, predict, roi_size=roi_size, overlap=overlap, label=label, clock=clock)
    with clock.stage("resample_back"):
        return inverse.mask(p, THRESHOLD)


def segment_probability(
    vol: V.Volume, spec: PreprocessSpec, predict, *, roi_size=None, overlap: float = 0.25, label: int = 1, clock=None
):
    """segment_volume up to the cleaned liver probability on the network grid: (p, inverse).
    `inverse.mask(p, THRESHOLD)` is the mask; `inverse(p)` the probability on the input's voxels."""
    roi = tuple(roi_size or spec.input_shape)
    prepared = prepare(vol, spec, clock=clock)
    p = segment_grid(prepared.x, predict, roi, overlap=overlap, label=label, clock=clock)
    return p, prepared.inverse
