"""Segmentation metrics for binary masks: Dice, IoU, HD95, ASSD (mm), relative volume difference.

Masks are arrays of the same shape; any non-zero voxel is foreground (so an MSD label with
1 = liver and 2 = tumour counts as liver). `spacing` is the voxel size in mm per array axis.

Surface distances. The surface of a mask is the mask minus its erosion by the 6-connected
cross, with the outside of the array counting as background (a mask cut by the field of view
has a surface on that face). For every surface voxel of one mask we take the Euclidean
distance, in mm, to the nearest surface voxel of the other (scipy's exact EDT with
`sampling=spacing`), in both directions.
  - hd95 ("max", the default): the larger of the two directed 95th percentiles, the
    definition of MONAI's `compute_hausdorff_distance(percentile=95)` and nnU-Net, so numbers
    compare with papers that use them. "pooled": the 95th percentile of both directed sets
    pooled together (MedPy's `hd95`); it is never larger. numpy's default linear
    interpolation either way; hd95 of a mask with itself is 0.
  - assd: the mean of the two directed distance sets pooled together.
Everything is computed on the bounding box of both masks plus a one-voxel margin (clipped
to the array), which gives the same numbers as the whole array (see `_cropped`), so a
512 x 512 x 400 CT costs about what its liver's box costs.

Empty masks (chosen here; the literature does not agree):
  - both empty: dice 1, iou 1, hd95 0, assd 0, rvd 0 (a perfect "nothing there").
  - one empty:  dice 0, iou 0, hd95 inf, assd inf (no surface to measure to);
                rvd -1 when the prediction is empty, inf when the reference is.
  JSON has no infinity: `to_jsonable` turns inf/NaN into null.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from liverkd.core.volume import VolumeError, load

_CROSS = ndimage.generate_binary_structure(3, 1)


def _masks(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _cropped(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of either plus `margin` voxels (clipped to the array).

    Every metric here is the same on the crop: no foreground is cut off, and a box edge that
    is not the array edge has a background margin, so erosion inside the box equals erosion
    of the whole array (where the box meets the array edge, border_value=0 acts as before).
    """
    either = a | b
    if a.ndim != 3 or not either.any():
        return a, b
    plane = either.any(axis=2)
    xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    zs = np.flatnonzero(either[xs[0] : xs[-1] + 1, ys[0] : ys[-1] + 1].any(axis=(0, 1)))
    box = tuple(
        slice(max(int(span[0]) - margin, 0), min(int(span[-1]) + 1 + margin, n))
        for span, n in zip((xs, ys, zs), a.shape, strict=True)
    )
    return a[box], b[box]


def dice(a, b) -> float:
    a, b = _masks(a, b)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def iou(a, b) -> float:
    a, b = _masks(a, b)
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def relative_volume_difference(pred, ref) -> float:
    """(|pred| - |ref|) / |ref|, signed: +0.1 means the prediction is 10 % too large."""
    pred, ref = _masks(pred, ref)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_ref == 0:
        return 0.0 if n_pred == 0 else math.inf
    return (n_pred - n_ref) / n_ref


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(a, b, spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances in mm: (a's surface -> b's, b's surface -> a's).

    None when either mask is empty (see the module docstring for what the metrics make of it).
    """
    a, b = _masks(a, b)
    if a.ndim != 3:
        raise ValueError(f"surface distances need 3-D masks, got shape {a.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if not a.any() or not b.any():
        return None
    a, b = _cropped(a, b)
    surf_a, surf_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)
    return to_b[surf_a], to_a[surf_b]


HD95_MODES = ("max", "pooled")


def _hd95_assd(a, b, spacing, mode: str = "max") -> tuple[float, float]:
    if mode not in HD95_MODES:
        raise ValueError(f"hd95 mode must be one of {', '.join(HD95_MODES)}, got {mode!r}")
    d = surface_distances(a, b, spacing)
    if d is None:
        return (0.0, 0.0) if not (np.any(a) or np.any(b)) else (math.inf, math.inf)
    pooled = np.concatenate(d)
    if mode == "max":
        hd = max(float(np.percentile(d[0], 95)), float(np.percentile(d[1], 95)))
    else:
        hd = float(np.percentile(pooled, 95))
    return hd, float(pooled.mean())


def hd95(a, b, spacing, mode: str = "max") -> float:
    return _hd95_assd(a, b, spacing, mode)[0]


def assd(a, b, spacing) -> float:
    return _hd95_assd(a, b, spacing)[1]


def evaluate_masks(pred, ref, spacing, hd95_mode: str = "max") -> dict[str, float]:
    """All metrics of `pred` against `ref`: keys dice, iou, hd95 (mm), assd (mm), rvd."""
    pred, ref = _cropped(*_masks(pred, ref))
    hd, mean = _hd95_assd(pred, ref, spacing, hd95_mode)
    return {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "hd95": hd,
        "assd": mean,
        "rvd": relative_volume_difference(pred, ref),
    }


def evaluate_files(pred_path, ref_path, hd95_mode: str = "max") -> dict[str, float]:
    """evaluate_masks on two NIfTI masks that must share shape and affine (VolumeError if not)."""
    pred, ref = load(pred_path), load(ref_path)
    if pred.shape != ref.shape:
        raise VolumeError(pred_path, f"shape {pred.shape} differs from {ref_path} shape {ref.shape}")
    if not np.allclose(pred.affine, ref.affine, rtol=0, atol=1e-3):
        raise VolumeError(
            pred_path,
            f"affine differs from {ref_path} (max difference {np.abs(pred.affine - ref.affine).max():.4g})",
        )
    return evaluate_masks(pred.array, ref.array, ref.spacing, hd95_mode)


def to_jsonable(metrics: dict) -> dict:
    """inf/NaN -> None, so json.dumps writes null rather than the non-JSON `Infinity`."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
