"""One case, noise-free: an anatomy source + an appearance + a placement -> HU on the output grid,
the liver label and the body weight (what the scanner model then acquires).

Partial volume: each tissue's HU is painted on the source's own grid (1.5 mm for a
TotalSegmentator subject), averaged down in whole blocks to about the output voxel size and
interpolated linearly through the deformation, together with the fraction of each output voxel
that is labelled; the rest of the voxel takes the body model's HU. Tissue ids on the output grid
(nearest neighbour) give the liver label and say where textures, lesions, vessels and gas go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverkd.core.synth import body as B
from liverkd.core.synth.fields import smooth_field, soft_step
from liverkd.core.synth.randomize import Appearance
from liverkd.core.synth.tissues import ID, LIVER, N_IDS
from liverkd.core.synth.variants import Variants, fill_stomach, grow_left_lobe, paint_masses

UNLABELLED = (0, ID["viscera"])


@dataclass
class Rendered:
    hu: np.ndarray  # float32
    liver: np.ndarray  # bool
    body: np.ndarray  # float32 weight, 1 inside the skin


def grid_axes(shape, spacing) -> list[np.ndarray]:
    """World coordinates (mm) of the voxel centres along each axis, the field of view centred on 0."""
    return [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]


def block_mean(array: np.ndarray, k) -> np.ndarray:
    """Mean over k[0] x k[1] x k[2] blocks (a last partial block is dropped)."""
    if np.all(np.asarray(k) == 1):
        return array
    array = array[tuple(slice(0, n - n % kk) for n, kk in zip(array.shape, k))]
    s = array.shape
    return array.reshape(s[0] // k[0], k[0], s[1] // k[1], k[1], s[2] // k[2], k[2]).mean(axis=(1, 3, 5))


def render(anatomy, look: Appearance, placement, body: B.BodyDraw, shape, spacing, rng,
           variants: Variants | None = None) -> Rendered:  # fmt: skip
    spacing = np.asarray(spacing, float)
    axes = grid_axes(shape, spacing)
    lo, hi = placement.anatomy_box(np.asarray(shape) * spacing / 2, margin_mm=body.closing_mm + 10)
    source_spacing = max(1.5, 0.75 * float(spacing.min()))  # used by a procedural source only
    tissue, affine = anatomy.crop(lo, hi, source_spacing)
    displaced = placement.displaced_axes(axes)
    coords = _fold_z(placement.voxel_coordinates(displaced, affine), tissue.shape[2])
    del displaced

    tissue_out = ndimage.map_coordinates(tissue, coords, order=0, mode="constant")
    source_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    k = np.maximum(np.floor(spacing / placement.scale / source_spacing + 1e-6).astype(int), 1)
    known_lut = np.ones(N_IDS, np.float32)
    known_lut[list(UNLABELLED)] = 0
    pooled_coords = (coords - ((k - 1) / 2)[:, None, None, None]) / k[:, None, None, None]
    pooled_hu = block_mean((look.hu * known_lut)[tissue], k)
    pooled_coords = _fold_z(pooled_coords, pooled_hu.shape[2])
    hu_known = _sample(pooled_hu, pooled_coords)
    known = _sample(block_mean(known_lut[tissue], k), pooled_coords)
    del pooled_coords

    distance, core_affine = B.core_distance(tissue, affine, body.closing_mm, lo, hi)
    core_coords = _rescale(coords, affine, core_affine)
    distance_out = _sample(distance, _fold_z(core_coords, distance.shape[2]), mode="nearest")
    del coords, core_coords

    coarse = smooth_field(rng, shape, spacing, look.texture_cells_mm[0])
    fine = smooth_field(rng, shape, spacing, look.texture_cells_mm[1])
    hu_of = {name: look[name] for name in ("muscle", "fat", "cortical", "cancellous")}
    hu_of.update(air=-1000.0, gas=look["airway"])
    fat_texture = look.texture[ID["fat"], 0] * coarse + look.texture[ID["fat"], 1] * fine
    filled, body_weight = B.fill(body, distance_out, axes, spacing, rng, hu_of, look.filler, fat_texture)
    hu = hu_known + (1 - known) * filled
    del hu_known, filled
    variants = variants or Variants()
    hu[grow_left_lobe(tissue_out, body_weight, variants.left_lobe, spacing)] = look["liver"]
    hu += look.texture[tissue_out, 0] * coarse + look.texture[tissue_out, 1] * fine
    del coarse, fine

    gas_field = smooth_field(rng, shape, spacing, look.gas_cell_mm)
    fill_stomach(hu, tissue_out, look["liver"], variants, gas_field)
    _paint_hollow_organs(hu, tissue_out, look, gas_field, axes, spacing)
    liver = tissue_out == LIVER
    if liver.any():
        _paint_liver(hu, liver, look, axes, spacing, rng)
        paint_masses(hu, tissue_out, body_weight, variants, look["liver"], axes, spacing, rng)
    B.add_table_and_arms(hu, body_weight, body, axes, spacing, hu_of)
    return Rendered(hu, liver, body_weight)


def _sample(array, coords, mode: str = "constant") -> np.ndarray:
    return ndimage.map_coordinates(array.astype(np.float32, copy=False), coords, order=1, mode=mode, prefilter=False)


def _fold_z(coords: np.ndarray, n: int) -> np.ndarray:
    """Mirror z voxel coordinates into [0, n - 1] (in place): beyond the ends of a label map's scan
    the body goes on as a mirror image, rather than stopping where the scan did. In-plane there
    is no mirroring: past the edges of the map there is nothing."""
    if n < 2:
        coords[2] = 0
        return coords
    if coords[2].min() >= 0 and coords[2].max() <= n - 1:
        return coords
    period = 2 * (n - 1)
    z = np.mod(coords[2], period)
    coords[2] = np.where(z > n - 1, period - z, z)
    return coords


def _rescale(coords, affine, coarse_affine) -> np.ndarray:
    """Voxel coordinates in `affine`'s grid -> the same points in `coarse_affine`'s grid."""
    m = np.linalg.inv(coarse_affine) @ affine
    out = np.empty_like(coords)
    for i in range(3):
        out[i] = m[i, 0] * coords[0] + m[i, 1] * coords[1] + m[i, 2] * coords[2] + m[i, 3]
    return out


def _paint_hollow_organs(hu, tissue_out, look: Appearance, gas_field, axes, spacing) -> None:
    """Gas pockets and oral contrast in bowel, an air-fluid level in the stomach, vessels in lung."""
    gas_hu = np.float32(look["airway"])
    bowel = tissue_out == ID["bowel"]
    if bowel.any():
        gas = soft_step(gas_field[bowel] - look.bowel_gas, 0.4)
        values = hu[bowel]
        if look.bowel_contrast_hu is not None:
            values += (look.bowel_contrast_hu - values) * soft_step(-gas_field[bowel] - 0.3, 0.4)
        hu[bowel] = values + (gas_hu - values) * gas
    stomach = np.nonzero(tissue_out == ID["stomach"])
    if look.stomach_gas > 0 and len(stomach[0]):
        y = axes[1][stomach[1]]
        level = y.max() - look.stomach_gas * (y.max() - y.min())
        hu[stomach] += (gas_hu - hu[stomach]) * soft_step(y - level, float(spacing[1]))
    lung = tissue_out == ID["lung"]
    if lung.any():
        hu[lung] += (np.float32(look["vein"]) - hu[lung]) * 0.6 * soft_step(gas_field[lung] - 1.4, 0.5)


def _paint_liver(hu, liver, look: Appearance, axes, spacing, rng) -> None:
    """Vessels (tubes where two smooth fields are both near zero) and lesions, inside the liver label."""
    index = np.argwhere(liver)
    box = tuple(slice(a, b + 1) for a, b in zip(index.min(axis=0), index.max(axis=0)))
    sub_shape = tuple(s.stop - s.start for s in box)
    inside = liver[box]
    region = hu[box]
    f1 = smooth_field(rng, sub_shape, spacing, look.vessel_cell_mm)
    f2 = smooth_field(rng, sub_shape, spacing, look.vessel_cell_mm)
    tube = soft_step(look.vessel_width - np.sqrt(f1 * f1 + f2 * f2), 0.6 * look.vessel_width)
    region += (np.float32(look.vessel_hu) - region) * (0.9 * tube * inside)
    centres = index[rng.choice(len(index), size=len(look.lesions))] if look.lesions else []
    sub_axes = [a[s] for a, s in zip(axes, box)]
    for lesion, centre in zip(look.lesions, centres):
        c = [axes[i][centre[i]] for i in range(3)]
        radii = np.asarray(lesion.axes) * lesion.radius_mm
        near = tuple(slice(np.searchsorted(a, ci - 1.6 * r), np.searchsorted(a, ci + 1.6 * r, "right"))
                     for a, ci, r in zip(sub_axes, c, radii))  # fmt: skip
        grids = np.meshgrid(*[(a[s] - ci) / r for a, s, ci, r in zip(sub_axes, near, c, radii)], indexing="ij")
        d = np.sqrt(sum(g * g for g in grids))
        weight = soft_step(1 - d, lesion.edge) * inside[near]
        patch = region[near]
        patch += (np.float32(lesion.hu) - patch) * weight
        if lesion.rim_hu:
            patch += lesion.rim_hu * np.exp(-(((d - 1) / 0.15) ** 2)) * inside[near]
