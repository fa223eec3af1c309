"""The PreprocessSpec applied to a volume, and its inverse, recorded once.

Training (liverkd.distill), calibration, export parity and inference (the Segmenter) all call
`prepare`, so what the network sees at training time is exactly what it sees in the room:

    prepared = prepare(volume, spec)       # reorient, resample, HU window
    p = segment_grid(prepared.x, predict)  # liverkd.core.inference: liver probability on that grid
    p_input = prepared.inverse(p)          # resample back, original orientation

`prepare` does not pad: segment_grid pads a grid smaller than the network input itself and drops
the padding before it keeps the largest component. Padded voxels are no voxel of the input, and
training never scores them (distill.data labels them IGNORE), so what the network says there is
unconstrained: a padded grid let a hallucinated 'liver' in the padding win the largest-component
step and erase the real one (both IRCAD CTs, a 3000-step student-30k: empty masks).

Training pairs use the same two first steps (`to_spec_grid`, `normalize`) via `prepare_pair`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liverkd.core import volume as V
from liverkd.core.spec import PreprocessSpec
from liverkd.core.timing import NoClock


@dataclass(frozen=True)
class Geometry:
    """What it takes to map an array on the spec grid back to the input's voxels."""

    orientation: V.Orientation
    canonical_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    spec_spacing: tuple[float, float, float]
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray


def to_spec_grid(vol: V.Volume, spec: PreprocessSpec, *, label: bool = False) -> tuple[np.ndarray, Geometry]:
    """Canonical RAS orientation, then resample to spec.spacing."""
    arr, affine, orientation = V.to_canonical(vol.array, vol.affine)
    spacing = V.spacing_of(affine)
    grid = V.resample(
        arr, spacing, spec.spacing, label=label, pooled=None if label else vol.block_mean_for(spec.spacing)
    )
    geometry = Geometry(
        orientation=orientation,
        canonical_shape=tuple(arr.shape),
        canonical_spacing=spacing,
        spec_spacing=spec.spacing,
        grid_shape=tuple(grid.shape),
        grid_affine=V.scaled_affine(affine, spacing, spec.spacing),
    )
    return grid, geometry


def normalize(grid: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return V.hu_window(grid, spec.hu_window)


def from_spec_grid(grid: np.ndarray, geometry: Geometry, *, label: bool = True, threshold=None) -> np.ndarray:
    """An array on the spec grid -> the input's voxel grid and axis order (nearest for labels,
    linear otherwise; with `threshold`, a uint8 mask of where the resampled values exceed it)."""
    if tuple(grid.shape) != geometry.grid_shape:
        raise ValueError(f"grid shape {grid.shape} != {geometry.grid_shape}")
    spacings = geometry.spec_spacing, geometry.canonical_spacing
    if threshold is not None and not label:  # written in the input's directions: no flipped copy afterwards
        flip = V.canonical_flips(geometry.orientation)
        back = V.resample_mask(grid, *spacings, geometry.canonical_shape, threshold, flip=flip)
        return V.from_canonical(back, geometry.orientation, flipped=True)
    back = V.resample(grid, *spacings, label=label, out_shape=geometry.canonical_shape)
    if threshold is not None:
        back = (back > threshold).view(np.uint8)
    return V.from_canonical(back, geometry.orientation)


@dataclass(frozen=True)
class Inverse:
    """The complete way back from the spec grid to the input's voxels: resample to the input
    spacing, turn back to the input's axis order."""

    geometry: Geometry

    def __call__(self, array: np.ndarray, *, label: bool = False) -> np.ndarray:
        """A (X, Y, Z) array on the network grid -> the input's grid. `label` picks nearest
        neighbour (masks); otherwise linear (probabilities)."""
        return from_spec_grid(array, self.geometry, label=label)

    def mask(self, probability: np.ndarray, threshold: float) -> np.ndarray:
        """A probability on the network grid -> uint8 mask on the input's grid: resampled
        linearly, thresholded at native resolution, then turned back to the input's axes."""
        return from_spec_grid(probability, self.geometry, label=False, threshold=threshold)


@dataclass(frozen=True)
class Prepared:
    """A volume ready for the network: x is float32 (X, Y, Z) on the spec grid, unpadded (the
    network input's shape is segment_grid's business), and `inverse` maps arrays on x's grid back."""

    x: np.ndarray
    inverse: Inverse


def prepare(vol: V.Volume, spec: PreprocessSpec, *, clock=None) -> Prepared:
    """Volume -> normalised spec grid + its inverse; `clock` (a liverkd.core.timing.Clock) times the steps."""
    clock = clock or NoClock()
    with clock.stage("reorient_resample"):
        grid, geometry = to_spec_grid(vol, spec)
    with clock.stage("normalize"):
        x = normalize(grid, spec)
    return Prepared(x, Inverse(geometry))


def prepare_pair(image: V.Volume, label: V.Volume, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Training pair on the spec grid: (normalized float32 image, uint8 liver mask)."""
    grid, _ = to_spec_grid(image, spec)
    lab, _ = to_spec_grid(V.Volume((label.array > 0).astype(np.uint8), label.affine), spec, label=True)
    if lab.shape != grid.shape:
        raise V.VolumeError(label.path or "<label>", f"label grid {lab.shape} != image grid {grid.shape}")
    return normalize(grid, spec), lab
