"""Where the anatomy lies in the scanner: a random affine (rotation, anisotropic scale), a smooth
elastic displacement, and the field of view's position on the patient (which may cut the liver).

Output (scanner) frame w: RAS mm with the field of view centred on 0. An anatomy point p shows
at w where w + d(w) = R S (p - c): R a rotation, S a per-axis scale (a bigger or smaller
patient), c the anatomy point at the centre of the field of view, d the elastic field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liverkd.core.synth.fields import Waves

CUT_PROBABILITY = {"none": 0.7, "top": 0.15, "bottom": 0.15}


def rotation(degrees) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Placement:
    rotation_deg: np.ndarray
    scale: np.ndarray
    elastic: Waves
    centre: np.ndarray  # anatomy point (mm) at the centre of the field of view
    cut: str  # what was aimed at: none | top | bottom (the label says what happened)

    @property
    def forward(self) -> np.ndarray:
        """R S: anatomy offsets -> scanner offsets."""
        return rotation(self.rotation_deg) @ np.diag(self.scale)

    @property
    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.forward)

    def displaced_axes(self, axes) -> list[np.ndarray]:
        """w + d(w) over the output grid of 1-D `axes` (three 3-D arrays)."""
        d = self.elastic.on_grid(axes)
        shape = (-1, 1, 1), (1, -1, 1), (1, 1, -1)
        return [np.asarray(a, np.float32).reshape(s) + di for a, s, di in zip(axes, shape, d, strict=True)]

    def voxel_coordinates(self, displaced, affine) -> np.ndarray:
        """(3, X, Y, Z) voxel indices, in the grid of `affine`, of the anatomy under each output voxel."""
        to_voxel = np.linalg.inv(affine[:3, :3])
        g = (to_voxel @ self.inverse).astype(np.float32)
        offset = (to_voxel @ (self.centre - affine[:3, 3])).astype(np.float32)
        out = np.empty((3, *displaced[0].shape), np.float32)
        for i in range(3):
            out[i] = g[i, 0] * displaced[0] + g[i, 1] * displaced[1] + g[i, 2] * displaced[2] + offset[i]
        return out

    def anatomy_box(self, half_fov, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi) of the anatomy that the field of view can show."""
        reach = np.asarray(half_fov) + self.elastic.reach_mm
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * reach
        points = corners @ self.inverse.T + self.centre
        return points.min(axis=0) - margin_mm, points.max(axis=0) + margin_mm

    def describe(self) -> dict:
        return {
            "rotation_deg": [round(float(a), 1) for a in self.rotation_deg],
            "scale": [round(float(s), 3) for s in self.scale],
            "elastic_mm": round(float(np.sqrt((self.elastic.amp**2).sum(axis=0).mean())), 1),
            "fov_aim": self.cut,
        }


def draw_placement(rng: np.random.Generator, anatomy, fov_mm) -> Placement:
    """Rotation +-10 deg about x and y, +-15 about z; body size 0.85-1.2 with +-7% per in-plane
    axis and 0.85-1.2 along z; elastic 0-12 mm; the FOV placed on the liver (see _centre_z)."""
    u = rng.uniform
    angles = np.array([u(-10, 10), u(-10, 10), u(-15, 15)])
    size = u(0.85, 1.2)
    scale = np.array([size * u(0.93, 1.07), size * u(0.93, 1.07), u(0.85, 1.2)])
    elastic = Waves(rng, 8, amplitude_mm=u(0, 12), wavelength_mm=(70, 220))
    cut = str(rng.choice(list(CUT_PROBABILITY), p=list(CUT_PROBABILITY.values())))
    fraction = u(0.1, 0.5)
    cx, cy = np.asarray(anatomy.centre_xy) + rng.uniform(-25, 25, 2) / scale[:2]
    placement = Placement(angles, scale, elastic, np.array([cx, cy, 0.0]), cut)
    placement.centre[2] = _centre_z(placement, anatomy, np.asarray(fov_mm, float) / 2, fraction, u(0, 1))
    return placement


def _centre_z(placement: Placement, anatomy, half_fov, fraction: float, t: float) -> float:
    """Anatomy z at the FOV centre. 'none': the liver's box inside the FOV (with a margin for the
    elastic field), preferring a FOV inside the label map's coverage; 'top' / 'bottom': that FOV
    edge `fraction` of the way into the liver."""
    m = placement.forward[2]  # output z of an anatomy point = m . p - m . c
    lo, hi = anatomy.liver_box()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    z_min, z_max = (corners @ m).min(), (corners @ m).max()
    half = half_fov[2]
    base = m[0] * placement.centre[0] + m[1] * placement.centre[1]
    if placement.cut == "top":
        u = z_max - fraction * (z_max - z_min) - half
    elif placement.cut == "bottom":
        u = z_min + fraction * (z_max - z_min) + half
    else:
        margin = 6.0 + placement.elastic.reach_mm
        u_lo, u_hi = z_max - half + margin, z_min + half - margin
        reach = abs(placement.inverse[2, 2]) * half
        cov_lo, cov_hi = (anatomy.coverage_z[0] + reach) * m[2] + base, (anatomy.coverage_z[1] - reach) * m[2] + base
        if max(u_lo, cov_lo) <= min(u_hi, cov_hi):
            u_lo, u_hi = max(u_lo, cov_lo), min(u_hi, cov_hi)
        u = u_lo + t * (u_hi - u_lo) if u_lo <= u_hi else (z_min + z_max) / 2
    u = _keep_cut_edges_out(u, m, lo, hi, anatomy.coverage_z, half, placement.elastic.reach_mm)
    return float((u - base) / m[2])


def _keep_cut_edges_out(u: float, m, lo, hi, coverage_z, half: float, reach: float) -> float:
    """Where the label map's own coverage cuts the liver (TotalSegmentator subjects scanned
    from the dome down), that cut must lie outside the FOV: a liver sliced flat in the middle of
    an image is no real case. Clamp u so the FOV ends before the coverage does over the liver."""
    xy = np.array([[x, y] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])]) @ m[:2]
    e = reach + 3.0
    if hi[2] >= coverage_z[1] - 3.0:
        u = min(u, xy.min() + m[2] * coverage_z[1] - half - e)
    if lo[2] <= coverage_z[0] + 3.0:
        u = max(u, xy.max() + m[2] * coverage_z[0] + half + e)
    return u
