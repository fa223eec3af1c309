"""Smooth random fields: displacements (Waves), anatomy-frame textures (Lattice) and fields
on an output grid (smooth_field) for texture, bias, mesentery and vessels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class Waves:
    """A smooth random 3-D displacement field: a sum of plane waves (exact at any point)."""

    def __init__(self, rng: np.random.Generator, n: int, amplitude_mm: float, wavelength_mm=(90.0, 220.0)):
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=(n, 1))
        self.k = (2 * np.pi * direction / wavelength).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
        self.amp = (rng.normal(size=(n, 3)) * amplitude_mm / np.sqrt(n / 2)).astype(np.float32)

    def __call__(self, x, y, z):
        """The field at arbitrary points (three arrays of one shape)."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = [np.zeros(shape, np.float32) for _ in range(3)]
        for k, phase, amp in zip(self.k, self.phase, self.amp, strict=True):
            s = np.sin(k[0] * x + k[1] * y + k[2] * z + phase)
            for axis in range(3):
                out[axis] += amp[axis] * s
        return out

    @property
    def reach_mm(self) -> float:
        """No displacement component is larger than this."""
        return float(np.abs(self.amp).sum(axis=0).max())

    def on_grid(self, axes) -> list[np.ndarray]:
        """The field over the grid of 1-D `axes` (mm).

        Each wave factorises into per-axis complex exponentials, so the sum over waves is a
        matrix product instead of a sine per wave per voxel."""
        n = len(self.k)
        ex, ey, ez = (np.exp(1j * self.k[:, i, None].astype(np.float64) * np.asarray(a, np.float64)[None, :])
                      for i, a in enumerate(axes))  # fmt: skip
        ez = ez * np.exp(1j * self.phase.astype(np.float64))[:, None]
        exy = (ex[:, :, None] * ey[:, None, :]).reshape(n, -1).astype(np.complex64)
        shape = tuple(len(a) for a in axes)
        return [(exy.T @ (self.amp[:, i : i + 1] * ez).astype(np.complex64)).imag.reshape(shape) for i in range(3)]


class Lattice:
    """Smooth random scalar field (unit variance) on a fixed lattice over a box of the anatomy
    frame, interpolated trilinearly, so a procedural patient does not depend on the grid."""

    def __init__(self, rng: np.random.Generator, cell_mm: float, box):
        self.step = cell_mm / 2
        self.lo = np.asarray(box[0], np.float32)
        shape = tuple(int(np.ceil((h - lo) / self.step)) + 1 for lo, h in zip(*box, strict=True))
        grid = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0, mode="wrap")
        self.grid = grid / grid.std()

    def __call__(self, x, y, z):
        coords = [(np.asarray(c, np.float32) - lo) / self.step for c, lo in zip((x, y, z), self.lo, strict=True)]
        return ndimage.map_coordinates(self.grid, np.broadcast_arrays(*coords), order=1, mode="nearest",
                                       prefilter=False)  # fmt: skip


def _interpolation_matrix(n_fine: int, spacing: float, step: float, n_coarse: int) -> np.ndarray:
    """(n_fine, n_coarse) linear interpolation weights from a coarse lattice to fine voxels."""
    u = np.arange(n_fine) * spacing / step + 1.0
    i = np.clip(np.floor(u).astype(int), 0, n_coarse - 2)
    w = (u - i).astype(np.float32)
    m = np.zeros((n_fine, n_coarse), np.float32)
    m[np.arange(n_fine), i] = 1 - w
    m[np.arange(n_fine), i + 1] = w
    return m


def smooth_field(rng: np.random.Generator, shape, spacing, cell_mm: float) -> np.ndarray:
    """Unit-variance smooth random field on a grid (float32), features about `cell_mm` wide.

    White noise on a lattice of cell_mm / 2, Gaussian-smoothed, then interpolated to the grid
    one axis at a time (three matrix products: cheap even at 256^3)."""
    step = cell_mm / 2
    n_coarse = [int(np.ceil(n * s / step)) + 3 for n, s in zip(shape, spacing, strict=True)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(n_coarse, dtype=np.float32), 1.0, mode="wrap")
    wx, wy, wz = (_interpolation_matrix(n, s, step, nc) for n, s, nc in zip(shape, spacing, n_coarse, strict=True))
    out = (wx @ coarse.reshape(n_coarse[0], -1)).reshape(shape[0], n_coarse[1], n_coarse[2])
    out = np.ascontiguousarray(np.einsum("yj,xjk->xyk", wy, out, optimize=True))
    out = (out.reshape(-1, n_coarse[2]) @ wz.T).reshape(shape)  # 2-D products: stacked matmul is far slower
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    return out


def soft_step(x, width: float):
    """0 below -width/2, 1 above +width/2, linear between: an edge one `width` wide (partial volume)."""
    return np.clip(np.asarray(x, np.float32) / np.float32(width) + np.float32(0.5), 0, 1)
