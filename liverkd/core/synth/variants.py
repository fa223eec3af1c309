"""Anatomical variants and liver look-alikes, painted on the output grid after the label map is
sampled: a long left lateral lobe, soft-tissue masses outside the liver with the liver's density,
and a stomach full of food.

Why these: the first models trained on our synthesis failed on real CT in exactly these three
ways (docs/method.md, "What the first model got wrong"). Each is a common finding, not a rarity:
a left lobe reaching over the stomach to the spleen (the "beaver tail" variant), masses next to
the liver (renal and adrenal tumours, nodes, duodenum, colon with content) and a fed stomach, all
of which a CT can show at the liver's HU. A network that learned "liver = this density in the
right upper quadrant" takes the masses and the stomach and misses the long lobe; these draws
make density alone a wrong answer, so that shape and boundaries have to carry the decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from liverkd.core.synth.fields import smooth_field, soft_step
from liverkd.core.synth.tissues import ID, LIVER, N_IDS

LOBE_PROBABILITY = 0.3
FOOD_PROBABILITY = 0.3
MASS_COUNTS = (0, 0, 0, 1, 1, 2, 3)
APART_BORDERS = {"none": 0.4, "fat": 0.4, "enhancing": 0.2}
ADJACENT_BORDERS = {"fat": 2 / 3, "enhancing": 1 / 3}
"""A mass touching the liver is always told from it by a border, a fat plane or an enhancing
rim that is painted where the two meet (paint_masses). Up to synthesis version 3, 40 % of
them had none and the rims were never painted on the contact face, so at the liver's density
nothing in the image said where the liver ended and the label did: a boundary the network
cannot see, which teaches it to doubt the liver's edge everywhere (the variant-trained models
under-segmented the synthetic held-out livers, docs/results.md). Elsewhere in the abdomen the
shape alone tells a mass from the liver, so there a border may be absent."""

_LUT = np.zeros(N_IDS, bool)
_LUT[[0, ID["viscera"], ID["fat"]]] = True
LOBE_CAN_REPLACE = _LUT
"""A lobe grows through fat and unlabelled space only: where it meets the stomach, bowel, spleen,
wall, heart, lung or bone it stops, so it lies over the stomach's anterior surface and never in
it (it drapes, it does not pierce). Synthesis version 2 let it claim stomach and bowel voxels:
those cases then called stomach liver in the label, the very error the variant was drawn to cure
(docs/results.md, "Synthesis variants")."""

_LUT = np.zeros(N_IDS, bool)
_LUT[[0, ID["viscera"], ID["fat"], ID["stomach"], ID["bowel"], ID["kidney"], ID["cyst"], ID["gland"],
      ID["gallbladder"], ID["pancreas"], ID["muscle"]]] = True  # fmt: skip
MASS_CAN_REPLACE = _LUT
"""Masses push aside soft tissue; bone, lung, vessels, heart and the liver itself stay."""
del _LUT


@dataclass
class LeftLobe:
    length_mm: float  # how much longer the lobe gets beyond the liver's left tip
    part: float  # the fraction of the liver's volume, counted from its left tip, that is stretched
    drift: tuple[float, float]  # (posterior, inferior) mm per mm beyond the old tip: it follows the dome


@dataclass
class Mass:
    radius_mm: float
    axes: tuple[float, float, float]
    adjacent: bool  # touching the liver (True) or elsewhere in the abdomen
    hu_offset: float  # HU relative to the liver's mean
    texture_hu: float
    rim: str  # none | fat | enhancing
    rim_hu: float


@dataclass
class Variants:
    left_lobe: LeftLobe | None = None
    masses: list[Mass] = field(default_factory=list)
    stomach_food_offset: float | None = None  # the food's HU relative to the liver's mean

    def describe(self) -> dict:
        return {
            "left_lobe_mm": round(self.left_lobe.length_mm) if self.left_lobe else 0,
            "masses": [_describe(m) for m in self.masses],
            "stomach_food": self.stomach_food_offset is not None,
        }


def _describe(m: Mass) -> str:
    return f"{2 * m.radius_mm:.0f}mm {m.hu_offset:+.0f}HU {'adjacent' if m.adjacent else 'apart'} {m.rim}"


def draw_variants(rng: np.random.Generator) -> Variants:
    """Left lobe in 30 % of cases (10-25 % of the liver stretched 30-100 mm beyond the tip);
    0-3 masses of 3-10 cm, 60 % touching the liver, within 35 HU of it; food in 30 % of
    stomachs, within 30 HU of the liver. A mass that touches the liver always has a border
    (ADJACENT_BORDERS); one elsewhere may have none."""
    u = rng.uniform
    lobe = None
    if u() < LOBE_PROBABILITY:
        lobe = LeftLobe(u(30, 100), u(0.1, 0.25), (u(0.0, 0.5), u(0.0, 0.4)))
    masses = []
    for _ in range(int(rng.choice(MASS_COUNTS))):
        adjacent = bool(u() < 0.6)
        borders = ADJACENT_BORDERS if adjacent else APART_BORDERS
        rim = str(rng.choice(list(borders), p=list(borders.values())))
        masses.append(Mass(
            radius_mm=float(np.exp(u(np.log(15), np.log(50)))),
            axes=tuple(float(a) for a in u(0.7, 1.3, 3)),
            adjacent=adjacent,
            hu_offset=u(-35, 35),
            texture_hu=u(0, 20),
            rim=rim,
            rim_hu={"none": 0.0, "fat": u(-120, -60), "enhancing": u(15, 50)}[rim],
        ))  # fmt: skip
    food = u(-30, 30) if u() < FOOD_PROBABILITY else None
    return Variants(lobe, masses, food)


def grow_left_lobe(tissue: np.ndarray, body: np.ndarray, lobe: LeftLobe | None, spacing) -> np.ndarray:
    """Make the liver's left lobe longer, in place; returns the voxels that became liver.

    The leftmost `part` of the liver label (by volume) is stretched along -x (RAS+ x points to the
    patient's right) so that it reaches `length_mm` further, keeping its tapering profile, and
    drifts back and down beyond the old tip. It only claims LOBE_CAN_REPLACE tissue inside the
    body; voxels that were liver stay liver (the lobe is only ever made longer)."""
    grown = np.zeros(tissue.shape, bool)
    if lobe is None:
        return grown
    liver = tissue == LIVER
    per_column = liver.sum(axis=(1, 2))
    columns = np.flatnonzero(per_column)
    if len(columns) < 2:
        return grown
    sx, sy, sz = (float(s) for s in spacing)
    tip = int(columns[0])
    pivot = int(np.searchsorted(np.cumsum(per_column), lobe.part * per_column.sum()))
    pivot = int(np.clip(pivot, tip + 1, columns[-1]))
    stretch = (pivot - tip + lobe.length_mm / sx) / (pivot - tip)
    open_ = LOBE_CAN_REPLACE[tissue] & (body > 0.5)
    for x in range(pivot - 1, max(-1, int(pivot - (pivot - tip) * stretch) - 1), -1):
        source = int(round(pivot - (pivot - x) / stretch))
        beyond_mm = max(0, tip - x) * sx
        shift = (-int(round(lobe.drift[0] * beyond_mm / sy)), -int(round(lobe.drift[1] * beyond_mm / sz)))
        section = _shift2d(liver[source], shift)
        grown[x] = section & open_[x] & ~liver[x]
    tissue[grown] = LIVER
    return grown


def _shift2d(a: np.ndarray, shift) -> np.ndarray:
    out = np.zeros_like(a)
    dy, dz = (int(s) for s in shift)
    ny, nz = a.shape
    out[max(0, dy) : ny + min(0, dy), max(0, dz) : nz + min(0, dz)] = a[
        max(0, -dy) : ny - max(0, dy), max(0, -dz) : nz - max(0, dz)
    ]
    return out


def fill_stomach(hu: np.ndarray, tissue: np.ndarray, liver_hu: float, variants: Variants, mottle) -> None:
    """Food: the stomach's content at the liver's density with a mottled texture (in place);
    the air-fluid level is painted afterwards, on top."""
    if variants.stomach_food_offset is None:
        return
    stomach = tissue == ID["stomach"]
    if stomach.any():
        hu[stomach] = liver_hu + variants.stomach_food_offset + 12.0 * mottle[stomach]


def paint_masses(hu, tissue, body, variants: Variants, liver_hu: float, axes, spacing, rng) -> None:
    """Ellipsoid masses at about the liver's HU outside it (in place; the label is not touched).
    A border is painted on the mass's surface and, where it touches the liver, on the contact
    face: the mass is clipped by the liver, so its ellipsoid surface there lies inside the
    liver and would leave the contact unmarked."""
    if not variants.masses:
        return
    liver = tissue == LIVER
    if not liver.any():
        return
    spacing = np.asarray(spacing, float)
    outside = ndimage.distance_transform_edt(~liver, sampling=spacing).astype(np.float32)
    allowed = MASS_CAN_REPLACE[tissue] & (body > 0.5)
    step = float(spacing.max())  # the first voxels outside the liver lie about one voxel from it
    for mass in variants.masses:
        r = mass.radius_mm
        near = (outside >= 0.5 * r) & (outside <= 1.1 * r) if mass.adjacent else (outside > r) & (outside < 120)
        candidates = np.argwhere(near & allowed)
        if len(candidates) == 0:
            continue
        centre = candidates[int(rng.integers(len(candidates)))]
        radii = np.asarray(mass.axes) * r
        box = tuple(
            slice(max(0, int(c - 1.3 * rr / s)), min(n, int(c + 1.3 * rr / s) + 2))
            for c, rr, s, n in zip(centre, radii, spacing, hu.shape)
        )
        grids = np.meshgrid(*[(a[b] - a[c]) / rr for a, b, c, rr in zip(axes, box, centre, radii)], indexing="ij")
        d = np.sqrt(sum(g * g for g in grids))
        keep = allowed[box] & ~liver[box]
        texture = mass.texture_hu * smooth_field(rng, d.shape, spacing, 8.0)
        weight = soft_step(1 - d, 0.15) * keep
        region = hu[box]
        region += (np.float32(liver_hu + mass.hu_offset) + texture - region) * weight
        if mass.rim != "none":
            shell = np.exp(-(((d - 1) * r / 2.5) ** 2))
            contact = np.exp(-((np.maximum(outside[box] - step, 0) / 2.5) ** 2)) * (weight > 0.05)
            shell = np.maximum(shell, contact).astype(np.float32) * keep
            region += (np.float32(_border_hu(mass, liver_hu)) - region) * 0.8 * shell


def _border_hu(mass: Mass, liver_hu: float) -> float:
    """A fat plane at its own HU; an enhancing rim 15-50 HU above the liver and the mass alike."""
    if mass.rim == "fat":
        return mass.rim_hu
    return liver_hu + max(mass.hu_offset, 0.0) + mass.rim_hu
