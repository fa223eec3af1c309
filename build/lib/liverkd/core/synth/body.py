"""The body around the labelled structures, which TotalSegmentator label maps do not have: a body
outline, abdominal wall muscle, subcutaneous fat, skin, visceral fat with soft-tissue strands
and gas in the unlabelled space inside, air outside, a patient table, and sometimes arms.

The outline starts from the labelled structures: closed per axial slice, each piece made
convex (the trunk, an arm beside it), smoothed along z: the "core". Everything else is a
function of the signed in-plane distance to the core (mm, negative inside), so wall and fat
thicknesses are plain thresholds on one interpolated map, with edges one voxel wide (partial
volume) instead of jagged nearest-neighbour steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from liverkd.core.synth.fields import smooth_field, soft_step

CORE_SPACING_MM = 8.0
IN_PLANE_ONLY = 1e4
"""EDT sampling along z: neighbours in other slices are this far away, so distances are 2-D."""
SMOOTH_Z_MM = 6.0


def core_distance(tissue, affine, closing_mm: float, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Signed in-plane distance (mm, float32) to the body core on a ~8 mm grid, and that grid's affine.

    Core: the labelled voxels, closed per slice (gaps narrower than 2 * closing_mm bridged),
    each connected piece of a slice replaced by its convex hull (a trunk, an arm), the distance
    then smoothed along z so that the body surface does not step where a structure starts. The
    grid reaches in-plane over the world box [lo, hi] that the field of view shows, so wall and
    fat go on past a label map cropped tightly around the body."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    k = np.maximum(np.round(CORE_SPACING_MM / spacing).astype(int), 1)
    step = spacing * k
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (corners - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    before = np.clip(np.ceil(-ijk.min(axis=0) / k), 0, 100).astype(int)
    after = np.clip(np.ceil((ijk.max(axis=0) - tissue.shape) / k), 0, 100).astype(int)
    before[2] = after[2] = 0  # along z the anatomy is mirrored instead
    occupied = np.pad(tissue > 0, [(b * kk, a * kk + (-n) % kk) for b, a, kk, n in zip(before, after, k, tissue.shape)])
    s = occupied.shape
    occupied = occupied.reshape(s[0] // k[0], k[0], s[1] // k[1], k[1], s[2] // k[2], k[2]).any(axis=(1, 3, 5))
    sampling = (*step[:2], IN_PLANE_ONLY)
    core = _convex_pieces(ndimage.binary_closing(occupied, _disc(closing_mm, step[:2])) | occupied)
    signed = ndimage.distance_transform_edt(~core, sampling=sampling) - ndimage.distance_transform_edt(
        core, sampling=sampling
    )
    signed = ndimage.gaussian_filter1d(np.clip(signed, -200, 200), SMOOTH_Z_MM / step[2], axis=2, mode="nearest")
    coarse = affine.copy()
    coarse[:3, :3] = affine[:3, :3] * k
    # coarse voxel j is centred on source voxel (j - before) * k + (k - 1) / 2
    coarse[:3, 3] = affine[:3, :3] @ ((k - 1) / 2 - before * k) + affine[:3, 3]
    return signed.astype(np.float32), coarse


def _disc(radius_mm: float, step) -> np.ndarray:
    """In-plane disc structuring element (shape (a, b, 1)) of `radius_mm`."""
    r = [max(1, int(radius_mm // s)) for s in step]
    x, y = np.meshgrid(*(np.arange(-n, n + 1) * s for n, s in zip(r, step)), indexing="ij")
    return (np.hypot(x, y) <= radius_mm)[:, :, None]


def _convex_pieces(mask: np.ndarray) -> np.ndarray:
    """Each 8-connected piece of each axial slice replaced by its convex hull."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    labels, _ = ndimage.label(mask, structure=in_plane)
    out = mask.copy()
    for i, box in enumerate(ndimage.find_objects(labels)):
        piece = labels[box][:, :, 0] == i + 1
        points = np.argwhere(piece)
        if len(points) < 4:
            continue
        try:
            hull = ConvexHull(points)
        except QhullError:  # all on a line
            continue
        grid = np.stack(np.meshgrid(*(np.arange(n) for n in piece.shape), indexing="ij"), axis=-1).reshape(-1, 2)
        inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-6).all(axis=1)
        out[box][:, :, 0] |= inside.reshape(piece.shape)
    return out


@dataclass
class BodyDraw:
    closing_mm: float
    wall_mm: float
    fat_mm: float
    fat_posterior: float  # posterior fat as a fraction of the anterior/lateral
    skin_mm: float
    skin_hu: float
    table: dict | None
    arms: dict | None

    def describe(self) -> dict:
        return {
            "wall_mm": round(self.wall_mm, 1),
            "fat_mm": round(self.fat_mm, 1),
            "table": self.table is not None,
            "arms": "beside the body" if self.arms else "out of view",
        }


def draw_body(rng: np.random.Generator, has_humerus: bool) -> BodyDraw:
    u = rng.uniform
    table = None
    if u() < 0.85:
        table = {"gap_mm": u(0, 10), "rise_mm": u(0, 40), "shell_mm": u(2, 6), "depth_mm": u(20, 60),
                 "shell_hu": u(100, 600), "foam_hu": u(-950, -700), "half_width_mm": u(180, 260)}  # fmt: skip
    arms = None
    if not has_humerus and u() < 0.3:  # a label map with a humerus brings its own arms
        arms = {"gap_mm": u(5, 40), "radius_mm": u(35, 55), "flatten": u(0.8, 1.1), "y_mm": u(-40, 30),
                "fat": u(0.15, 0.35), "bone_mm": u(9, 13)}  # fmt: skip
    return BodyDraw(u(8, 20), u(6, 16), u(5, 50), u(0.4, 1.0), u(1.5, 3.0), u(20, 60), table, arms)


def fill(draw: BodyDraw, distance, axes, spacing, rng, hu_of: dict, filler: dict, texture) -> tuple[np.ndarray, ...]:
    """HU of everything no structure labels (float32) and the body weight (1 inside the skin).

    distance: signed distance to the core on the output grid (mm); hu_of: muscle, fat, air, gas
    HU; texture: a smooth field (HU) for the fat."""
    shape = distance.shape
    h = float(min(spacing))
    y = np.asarray(axes[1], np.float32)[None, :, None]
    posterior = draw.fat_posterior + (1 - draw.fat_posterior) * soft_step(y, 120.0)
    fat = draw.fat_mm * posterior * np.clip(1 + 0.35 * smooth_field(rng, shape, spacing, 120.0), 0.3, 2.0)
    outer = draw.wall_mm + fat
    soft = soft_step(smooth_field(rng, shape, spacing, filler["soft_cell_mm"]) - filler["soft_threshold"], 0.4)
    gas = soft_step(smooth_field(rng, shape, spacing, 10.0) - filler["gas_threshold"], 0.4) * soft
    visceral = lerp(lerp(hu_of["fat"] + texture, filler["soft_hu"], soft), hu_of["gas"], gas)
    visceral = lerp(visceral, hu_of["muscle"], soft_step(distance + filler["inner_muscle_mm"], h))
    body = soft_step(outer - distance, h)
    hu = lerp(np.float32(hu_of["air"]), draw.skin_hu, body)
    hu = lerp(hu, hu_of["fat"] + texture, soft_step(outer - draw.skin_mm - distance, h))
    hu = lerp(hu, hu_of["muscle"], soft_step(draw.wall_mm - distance, h))
    return lerp(hu, visceral, soft_step(-distance, h)), body


def lerp(a, b, weight):
    return a + (np.float32(b) - a) * weight


def add_table_and_arms(hu, body, draw: BodyDraw, axes, spacing, hu_of: dict) -> None:
    """Paint the table under the back and arms beside the body, outside the body only (in place)."""
    x = np.asarray(axes[0], np.float32)[:, None]
    y = np.asarray(axes[1], np.float32)[None, :]
    inside = body > 0.5
    if not inside.any():
        return
    h = float(min(spacing))
    outside = 1 - body
    if draw.table:
        t = draw.table
        back = float(y[0, np.flatnonzero(inside.any(axis=(0, 2)))[0]])
        depth = back - t["gap_mm"] + t["rise_mm"] * (x / 200) ** 2 - y  # mm below the table's top surface
        width = soft_step(t["half_width_mm"] - np.abs(x), h)
        shell, core = t["shell_mm"], t["depth_mm"]
        layers = ((t["shell_hu"], 0, shell), (t["foam_hu"], shell, shell + core),
                  (t["shell_hu"], shell + core, 2 * shell + core))  # fmt: skip
        for value, top, bottom in layers:
            weight = ((soft_step(depth - top, h) - soft_step(depth - bottom, h)) * width)[:, :, None] * outside
            hu += (np.float32(value) - hu) * weight
    if draw.arms:
        a = draw.arms
        occupied_x = x[np.flatnonzero(inside.any(axis=(1, 2))), 0]
        for side, edge in ((1, occupied_x.max()), (-1, occupied_x.min())):
            r = a["radius_mm"]
            cx = edge + side * (a["gap_mm"] + r)
            rho = np.sqrt(((x - cx) / r) ** 2 + ((y - a["y_mm"]) / (r * a["flatten"])) ** 2)
            bone = np.hypot(x - cx, y - a["y_mm"])
            arm = lerp(np.float32(hu_of["fat"]), hu_of["muscle"], soft_step(1 - a["fat"] - rho, h / r))
            arm = lerp(arm, hu_of["cortical"], soft_step(a["bone_mm"] - bone, h))
            arm = lerp(arm, hu_of["cancellous"], soft_step(a["bone_mm"] - 3 - bone, h))
            weight = soft_step(1 - rho, h / r)[:, :, None] * outside
            hu += (arm[:, :, None] - hu) * weight
