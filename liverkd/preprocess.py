"""The PreprocessSpec applied to a volume, and its inverse.

Training (distill) and inference (deploy.segment) both call these functions, so what the
network sees at training time is exactly what it sees in the intervention room.

    grid, geometry = to_spec_grid(volume, spec)      # reorient + resample (HU kept)
    x = normalize(grid, spec)                        # HU window -> [0, 1] float32
    ... network on x (crop/pad or sliding window) -> mask on the spec grid ...
    mask = from_spec_grid(mask_grid, geometry)       # resample back + original orientation
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liverkd import volume as V
from liverkd.spec import PreprocessSpec


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
    grid = V.resample(arr, spacing, spec.spacing, label=label)
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


def from_spec_grid(mask_grid: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label array on the spec grid -> the input's voxel grid and axis order."""
    if tuple(mask_grid.shape) != geometry.grid_shape:
        raise ValueError(f"mask grid shape {mask_grid.shape} != {geometry.grid_shape}")
    back = V.resample(
        mask_grid,
        geometry.spec_spacing,
        geometry.canonical_spacing,
        label=True,
        out_shape=geometry.canonical_shape,
    )
    return V.from_canonical(back, geometry.orientation)


def prepare_pair(image: V.Volume, label: V.Volume, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Training pair on the spec grid: (normalized float32 image, uint8 liver mask)."""
    grid, _ = to_spec_grid(image, spec)
    lab, _ = to_spec_grid(V.Volume((label.array > 0).astype(np.uint8), label.affine), spec, label=True)
    if lab.shape != grid.shape:
        raise V.VolumeError(label.path or "<label>", f"label grid {lab.shape} != image grid {grid.shape}")
    return normalize(grid, spec), lab
