"""Real anatomy: a TotalSegmentator-style subject folder (one binary NIfTI per structure) read
into one tissue label map (tissues.ID), the other anatomy source besides the procedural Patient.

The TotalSegmentator data set (Wasserthal et al., Radiology: AI 2023, doi 10.1148/ryai.230024;
CC BY 4.0) ships each subject as `<structure>.nii.gz` masks on the CT's grid. Structures map to
tissues by name prefix (v1 and v2 names); bone is split into a cortical shell and cancellous
interior here, once per subject, so that ribs and vertebrae get a bright rim. An unknown name is
kept as generic soft tissue (`gland`) and listed in LabelMap.unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from liverkd.core.synth.tissues import ID, LIVER
from liverkd.core.volume import VolumeError

STRUCTURE_TISSUE = (
    ("liver", "liver"), ("spleen", "spleen"), ("kidney_cyst", "cyst"), ("kidney", "kidney"),
    ("pancreas", "pancreas"), ("adrenal_gland", "gland"), ("thyroid_gland", "gland"), ("prostate", "gland"),
    ("stomach", "stomach"), ("small_bowel", "bowel"), ("duodenum", "bowel"), ("colon", "bowel"),
    ("gallbladder", "gallbladder"), ("urinary_bladder", "bladder"),
    ("aorta", "artery"), ("iliac_artery", "artery"), ("brachiocephalic_trunk", "artery"),
    ("subclavian_artery", "artery"), ("common_carotid_artery", "artery"), ("pulmonary_artery", "artery"),
    ("inferior_vena_cava", "vein"), ("superior_vena_cava", "vein"), ("iliac_vena", "vein"),
    ("brachiocephalic_vein", "vein"), ("portal_vein", "portal"),
    ("heart", "heart"), ("atrial_appendage", "heart"), ("pulmonary_vein", "heart"),
    ("lung", "lung"), ("trachea", "airway"), ("esophagus", "esophagus"),
    ("autochthon", "muscle"), ("iliopsoas", "muscle"), ("gluteus", "muscle"),
    ("costal_cartilages", "cartilage"), ("spinal_cord", "neural"), ("brain", "neural"),
    ("vertebrae", "bone"), ("rib", "bone"), ("hip", "bone"), ("sacrum", "bone"), ("femur", "bone"),
    ("humerus", "bone"), ("scapula", "bone"), ("clavicula", "bone"), ("sternum", "bone"), ("skull", "bone"),
)  # fmt: skip
"""(name prefix, tissue) in the order they are tried; `bone` becomes cortical + cancellous."""


def tissue_of(structure: str) -> str | None:
    """The tissue a structure name maps to (None: not a known name)."""
    for prefix, tissue in STRUCTURE_TISSUE:
        if structure == prefix or structure.startswith(prefix + "_"):
            return tissue
    return None


def structure_name(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


@dataclass
class LabelMap:
    """One subject as a tissue label map on its own grid (world mm via `affine`, RAS)."""

    name: str
    tissue: np.ndarray  # uint8 tissue ids
    affine: np.ndarray
    structures: list[str] = field(default_factory=list)  # the non-empty ones
    unknown: list[str] = field(default_factory=list)

    def __post_init__(self):
        liver = np.argwhere(self.tissue == LIVER)
        if len(liver) == 0:
            raise VolumeError(self.name, "label map has no liver voxels")
        corners = self._world(np.array([liver.min(axis=0) - 1, liver.max(axis=0) + 1]))
        self._liver_box = (corners.min(axis=0), corners.max(axis=0))
        # In-plane body centre: the labelled structures in the liver's slices.
        z = liver[:, 2]
        occupied = np.argwhere(self.tissue[::4, ::4, z.min() : z.max() + 1 : 4] > 0) * (4, 4, 4) + (0, 0, z.min())
        box = self._world(np.array([occupied.min(axis=0), occupied.max(axis=0)]))
        self.centre_xy = tuple(float(v) for v in box[:, :2].mean(axis=0))
        ends = self._world(np.array([[0, 0, 0], np.array(self.tissue.shape) - 1]))
        self.coverage_z = (float(ends[:, 2].min()), float(ends[:, 2].max()))
        self.has_humerus = any(s.startswith("humerus") for s in self.structures)

    def _world(self, ijk: np.ndarray) -> np.ndarray:
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def liver_box(self) -> tuple[np.ndarray, np.ndarray]:
        return self._liver_box

    def crop(self, lo, hi, spacing: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The part of the map that covers the world box [lo, hi] (a view) and its affine.
        `spacing` is ignored: a label map has its own."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = (corners - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T
        start = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, np.array(self.tissue.shape) - 1)
        stop = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, start + 1, self.tissue.shape)
        affine = self.affine.copy()
        affine[:3, 3] = self._world(start[None])[0]
        return self.tissue[tuple(slice(a, b) for a, b in zip(start, stop))], affine

    def describe(self) -> dict:
        return {"anatomy": self.name}


def is_subject(folder: Path) -> bool:
    return (Path(folder) / "liver.nii.gz").is_file()


def find_subjects(folder) -> list[Path]:
    """Subject folders under `folder` (or `folder` itself when it is one), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "label map folder not found" if not folder.exists() else "not a folder")
    if is_subject(folder):
        return [folder]
    subjects = sorted(p for p in folder.iterdir() if p.is_dir() and is_subject(p))
    if not subjects:
        raise VolumeError(folder, "no subject folders with a liver.nii.gz (TotalSegmentator layout)")
    return subjects


def load_labelmap(folder) -> LabelMap:
    """Merge a subject's structure masks into one tissue map (the liver painted last, so the
    liver label is exactly the subject's liver mask)."""
    folder = Path(folder)
    liver_path = folder / "liver.nii.gz"
    if not liver_path.is_file():
        raise VolumeError(liver_path, "no such file (a subject folder needs liver.nii.gz)")
    reference = _read_header(liver_path)
    shape, affine = reference.shape[:3], reference.affine
    # NIfTI data come in Fortran order: build the map in that order too (mixed orders are ~10x slower).
    tissue = np.zeros(shape, np.uint8, order="F")
    bone = np.zeros(shape, bool, order="F")
    structures, unknown = [], []
    paths = sorted(p for p in folder.glob("*.nii.gz") if p.name != "liver.nii.gz") + [liver_path]
    for path in paths:
        mask = _read_mask(path, shape, affine)
        if mask is None:
            continue
        name = structure_name(path)
        structures.append(name)
        kind = tissue_of(name)
        if kind is None:
            unknown.append(name)
            kind = "gland"
        if kind == "bone":
            bone |= mask
        np.copyto(tissue, ID["cancellous"] if kind == "bone" else ID[kind], where=mask)
    tissue[bone & ~ndimage.binary_erosion(bone) & (tissue == ID["cancellous"])] = ID["cortical"]
    return LabelMap(folder.name, np.ascontiguousarray(tissue), np.asarray(affine, np.float64), structures, unknown)


def _read_header(path: Path):
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VolumeError(path, f"not a readable NIfTI ({reason})") from None
    if len(img.shape) < 3:
        raise VolumeError(path, f"not a 3-D mask (shape {img.shape})")
    return img


def _read_mask(path: Path, shape, affine) -> np.ndarray | None:
    """The structure's voxels (bool), None when it is empty; the grid must be the liver's."""
    img = _read_header(path)
    if img.shape[:3] != shape or not np.allclose(img.affine, affine, atol=1e-3):
        raise VolumeError(path, f"grid {img.shape[:3]} differs from liver.nii.gz's {shape} (or its affine does)")
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise VolumeError(path, f"corrupt or truncated data ({type(e).__name__})") from None
    mask = data.reshape(shape) > 0 if data.ndim == 3 else data[..., 0] > 0
    return mask if mask.any() else None
