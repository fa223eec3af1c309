"""Per-case appearance draws: a mean HU and a texture strength per tissue, liver lesions and
vessels, the body filler's tissues. SynthSeg's idea (Billot et al., MedIA 2023) with CT priors:
the network sees HU windowed to [-175, 250], so each tissue's mean is drawn from a wide range a
real scan could show, instead of SynthSeg's fully arbitrary intensities.

Contrast phase ties the enhancing tissues together (an arterial aorta with a bright kidney
cortex); one case in six draws every tissue independently over the union of its phase ranges
instead, so that no fixed ordering between neighbours (liver brighter than spleen, ...) is a cue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from liverkd.core.synth.tissues import ID, LIVER, N_IDS

PHASES = {"native": 0.25, "arterial": 0.15, "portal": 0.5, "delayed": 0.1}

PRIORS = {
    # tissue: native HU (lo, hi), then enhancement (lo, hi) added in the arterial, portal, delayed phase
    "spleen": ((35, 55), (40, 110), (50, 90), (30, 60)),
    "kidney": ((25, 40), (90, 200), (100, 170), (60, 150)),
    "cyst": ((-5, 20), (0, 0), (0, 0), (0, 0)),
    "pancreas": ((30, 50), (50, 110), (30, 80), (20, 50)),
    "gland": ((25, 55), (20, 70), (20, 60), (10, 40)),
    "stomach": ((5, 45), (5, 40), (10, 50), (5, 30)),
    "bowel": ((0, 45), (5, 40), (10, 50), (5, 30)),
    "gallbladder": ((-5, 30), (0, 0), (0, 0), (0, 0)),
    "bladder": ((-5, 20), (0, 0), (0, 0), (0, 150)),
    "artery": ((30, 55), (150, 400), (80, 180), (50, 120)),
    "vein": ((30, 55), (0, 60), (70, 150), (50, 110)),
    "portal": ((30, 55), (20, 80), (100, 180), (60, 120)),
    "heart": ((30, 55), (100, 350), (70, 160), (40, 110)),
    "lung": ((-920, -780), (0, 0), (0, 0), (0, 0)),
    "airway": ((-1010, -960), (0, 0), (0, 0), (0, 0)),
    "esophagus": ((25, 55), (5, 30), (10, 40), (5, 30)),
    "muscle": ((35, 65), (0, 15), (5, 20), (5, 15)),
    "cortical": ((450, 1100), (0, 0), (0, 0), (0, 0)),
    "cancellous": ((120, 350), (0, 0), (0, 0), (0, 0)),
    "cartilage": ((70, 180), (0, 0), (0, 0), (0, 0)),
    "neural": ((20, 45), (0, 0), (0, 0), (0, 0)),
    "fat": ((-130, -70), (0, 0), (0, 0), (0, 0)),
}
LIVER_NATIVE = {"normal": (0.7, (45, 70)), "fatty": (0.2, (-30, 45)), "dense": (0.1, (70, 90))}
LIVER_ENHANCEMENT = {"native": (0, 0), "arterial": (5, 25), "portal": (20, 70), "delayed": (15, 45)}
TEXTURE_HU = {"bowel": (5, 35), "stomach": (5, 30), "lung": (0, 40), "cortical": (20, 120), "cancellous": (10, 80),
              "fat": (0, 12)}  # fmt: skip
"""Within-tissue texture (sd of a smooth modulation, HU); every other tissue: (0, 10)."""


@dataclass
class Lesion:
    radius_mm: float
    axes: tuple[float, float, float]  # relative lengths
    kind: str  # hypo | hyper | cyst
    hu: float  # absolute HU at the centre
    edge: float  # soft fraction of the radius
    rim_hu: float  # added on a shell at the border (a rim of enhancement, or a halo)


@dataclass
class Appearance:
    phase: str
    mode: str  # phase | independent
    liver_kind: str
    hu: np.ndarray  # (N_IDS,) mean HU per tissue id; 0 and viscera unused
    texture: np.ndarray  # (N_IDS, 2) texture sd (HU) on a coarse and a fine field
    texture_cells_mm: tuple[float, float]
    lesions: list[Lesion] = field(default_factory=list)
    vessel_hu: float = 0.0
    vessel_width: float = 0.15  # tube half-width in field units
    vessel_cell_mm: float = 35.0
    stomach_gas: float = 0.0  # fraction of the stomach's height above the air-fluid level
    bowel_gas: float = 2.0  # gas where the gas field exceeds this (higher: less gas)
    gas_cell_mm: float = 15.0
    bowel_contrast_hu: float | None = None  # positive oral contrast in some loops
    filler: dict = field(default_factory=dict)

    def __getitem__(self, tissue: str) -> float:
        return float(self.hu[ID[tissue]])

    def describe(self) -> dict:
        return {
            "phase": self.phase,
            "intensity_mode": self.mode,
            "liver_kind": self.liver_kind,
            "liver_hu": round(self["liver"], 1),
            "spleen_hu": round(self["spleen"], 1),
            "lesions": [f"{les.kind} {2 * les.radius_mm:.0f}mm {les.hu:.0f}HU" for les in self.lesions],
        }


def _pick(rng, table: dict):
    names = list(table)
    weights = np.array([table[n] if np.isscalar(table[n]) else table[n][0] for n in names], float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def draw_appearance(rng: np.random.Generator) -> Appearance:
    u = rng.uniform
    phase = _pick(rng, PHASES)
    mode = "independent" if u() < 1 / 6 else "phase"
    column = list(PHASES).index(phase)  # PRIORS[...][column]: this phase's enhancement (0: native, none)
    hu = np.zeros(N_IDS, np.float32)
    for name, prior in PRIORS.items():
        if mode == "phase":
            lo, hi = prior[0]
            e_lo, e_hi = prior[column] if column > 0 else (0, 0)
            hu[ID[name]] = u(lo, hi) + u(e_lo, e_hi)
        else:
            hu[ID[name]] = u(prior[0][0], prior[0][1] + max(p[1] for p in prior[1:]))
    liver_kind = _pick(rng, LIVER_NATIVE)
    enhancement = LIVER_ENHANCEMENT[phase] if mode == "phase" else (0, 70)
    hu[LIVER] = u(*LIVER_NATIVE[liver_kind][1]) + u(*enhancement)
    if u() < 0.35:  # a spleen that looks like the liver
        hu[ID["spleen"]] = hu[LIVER] + u(-12, 12)

    texture = np.zeros((N_IDS, 2), np.float32)
    for name, tissue_id in ID.items():
        amplitude = u(*TEXTURE_HU.get(name, (0, 10)))
        split = u(0.2, 0.8)
        texture[tissue_id] = (amplitude * np.sqrt(1 - split), amplitude * np.sqrt(split))

    liver = float(hu[LIVER])
    return Appearance(
        phase=phase,
        mode=mode,
        liver_kind=liver_kind,
        hu=hu,
        texture=texture,
        texture_cells_mm=(u(20, 45), u(6, 14)),
        lesions=[_draw_lesion(rng, liver) for _ in range(int(rng.choice([0, 0, 0, 1, 1, 2, 3, 5, 8])))],
        vessel_hu=float(u(0.7, 1.0) * hu[ID["portal"]] + u(-10, 10)),
        vessel_width=u(0.08, 0.22),
        vessel_cell_mm=u(25, 45),
        stomach_gas=u(0.0, 0.6) if u() < 0.7 else 0.0,
        bowel_gas=u(0.6, 2.6),
        gas_cell_mm=u(10, 22),
        bowel_contrast_hu=u(150, 450) if u() < 0.15 else None,
        filler=_draw_filler(rng, hu),
    )


def _draw_lesion(rng, liver_hu: float) -> Lesion:
    u = rng.uniform
    kind = _pick(rng, {"hypo": 0.6, "hyper": 0.2, "cyst": 0.2})
    hu = {"hypo": liver_hu - u(15, 90), "hyper": liver_hu + u(15, 80), "cyst": u(-5, 20)}[kind]
    return Lesion(
        radius_mm=float(np.exp(u(np.log(3), np.log(30)))),
        axes=tuple(u(0.75, 1.3, 3)),
        kind=kind,
        hu=float(hu),
        edge=u(0.05, 0.2) if kind == "cyst" else u(0.1, 0.5),
        rim_hu=u(-20, 40) if kind != "cyst" and u() < 0.3 else 0.0,
    )


def _draw_filler(rng, hu: np.ndarray) -> dict:
    """What fills the space no structure labels: visceral fat with soft-tissue strands
    (mesentery, bowel wall, unlabelled muscle and nodes) and gas, inside the body."""
    u = rng.uniform
    return {
        "fat_hu": float(hu[ID["fat"]]),
        "soft_hu": u(10, 55),
        "soft_threshold": u(-0.6, 1.4),  # soft tissue where a smooth field exceeds this
        "soft_cell_mm": u(12, 30),
        "gas_threshold": u(2.2, 3.5),
        "inner_muscle_mm": u(0, 8),  # intercostals, diaphragm, peritoneum lining the cavity
    }
