"""Implicit shapes in millimetres for the procedural anatomy: ellipsoids, smooth unions, capsules."""

from __future__ import annotations

import numpy as np


def ellipsoid(x, y, z, center, radii, yaw_deg: float = 0.0):
    """Quadratic form: < 1 inside the ellipsoid; yaw turns it about z."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if yaw_deg:
        c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2


def softmin(values, k: float = 4.0):
    """Smooth union of quadratic forms (organ lobes blend with a fillet)."""
    low = np.minimum.reduce(values)
    return low - np.log(sum(np.exp(-k * (v - low)) for v in values)) / k


def capsules(points: np.ndarray, segments) -> np.ndarray:
    """Boolean per point (N, 3): inside any capsule (a, b, radius)."""
    inside = np.zeros(len(points), bool)
    for a, b, r in segments:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        box = np.all((points >= np.minimum(a, b) - r) & (points <= np.maximum(a, b) + r), axis=1)
        idx = np.flatnonzero(box)
        if idx.size == 0:
            continue
        p = points[idx]
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
        d2 = ((p - a - t[:, None] * ab) ** 2).sum(axis=1)
        inside[idx[d2 < r * r]] = True
    return inside


def points_of(mask, qx, qy, qz) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of `mask` and the (N, 3) points there."""
    idx = np.flatnonzero(mask)
    return idx, np.stack([qx.reshape(-1)[idx], qy.reshape(-1)[idx], qz.reshape(-1)[idx]], axis=1)


def scatter(shape, flat_indices) -> np.ndarray:
    """Boolean array of `shape`, True at `flat_indices`."""
    mask = np.zeros(shape, bool)
    mask.reshape(-1)[flat_indices] = True
    return mask
