"""Seeded cases and the MSD-layout data set writer.

A case seed spawns independent streams for each kind of draw (source choice, anatomy,
appearance, placement, body, scanner, fields), so the same seed gives the same bytes and
changing one model does not reshuffle the others' draws.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core.atomic import write_json
from liverkd.core.synth.anatomy import Patient
from liverkd.core.synth.body import draw_body
from liverkd.core.synth.labelmaps import LabelMap, find_subjects, load_labelmap
from liverkd.core.synth.placement import draw_placement
from liverkd.core.synth.randomize import draw_appearance
from liverkd.core.synth.render import render
from liverkd.core.synth.scanner import acquire, draw_scanner
from liverkd.core.synth.variants import Variants, draw_variants

FOV_MM = 384.0
"""Default field of view per axis; spacing = FOV_MM / shape (64^3 -> 6 mm voxels)."""

STREAMS = ("source", "anatomy", "appearance", "placement", "body", "scanner", "fields", "extent", "variants")
"""Appended, never reordered: SeedSequence.spawn gives child i the same stream whatever follows it."""

SYNTH_VERSION = 4
"""Bumped whenever the same seed would give different bytes, so that caches keyed on the
settings (distill's phantoms-<hash>) are not reused across synthesis changes.
1: domain-randomised synthesis; 2: + the optional variants (long left lobe, masses, stomach food;
with variants=False the bytes are version 1's: the version still keys the caches, to be safe);
3: the long left lobe no longer grows into the stomach or bowel (variants only); 4: a mass touching
the liver always has a border, painted on the contact face too (variants only)."""


def _grid(shape, spacing, fov_mm=None) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if spacing is not None:
        spacing = (float(spacing),) * 3 if np.ndim(spacing) == 0 else tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"synthetic CT spacing must be positive (one value or three), got {spacing}")
    if fov_mm is not None:
        if spacing is None:
            raise ValueError("a field of view needs a spacing")
        fov = (float(fov_mm),) * 3 if np.ndim(fov_mm) == 0 else tuple(float(f) for f in fov_mm)
        shape = tuple(max(2, int(round(f / s))) for f, s in zip(fov, spacing))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"synthetic CT shape must be three sizes >= 2, got {shape}")
    if spacing is None:
        spacing = tuple(FOV_MM / n for n in shape)
    return shape, spacing


def _affine(shape, spacing) -> np.ndarray:
    """RAS+, field of view centred on world (0, 0, 0)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


def _header(affine, dtype) -> nib.Nifti1Header:
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img.header


def rngs(seed: int) -> dict[str, np.random.Generator]:
    """One generator per kind of draw, all from the case seed."""
    children = np.random.SeedSequence(int(seed)).spawn(len(STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, children)}


def synth(seed: int, shape=(64, 64, 64), spacing=None, labelmap: LabelMap | None = None, fov_mm=None,
          scan_extent: bool = False, variants: bool = False) -> tuple[V.Volume, V.Volume, dict]:  # fmt: skip
    """One case: int16 HU image, uint8 liver label (1 = liver), and what was drawn.

    labelmap: a loaded TotalSegmentator subject (load_labelmap) or None for the procedural
    patient. spacing: None (FOV_MM / shape per axis), one number or three (mm). scan_extent:
    crop the grid to a random scanned region (draw_scan_box), as real series are smaller than
    the network's 384 mm field of view and get padded with air at inference."""
    shape, spacing = _grid(shape, spacing, fov_mm)
    r = rngs(seed)
    anatomy = labelmap if labelmap is not None else Patient(r["anatomy"])
    look = draw_appearance(r["appearance"])
    placement = draw_placement(r["placement"], anatomy, np.asarray(shape) * np.asarray(spacing))
    body = draw_body(r["body"], anatomy.has_humerus)
    scanner = draw_scanner(r["scanner"])
    drawn = draw_variants(r["variants"]) if variants else Variants()
    rendered = render(anatomy, look, placement, body, shape, spacing, r["fields"], drawn)
    image = acquire(rendered.hu, rendered.body, spacing, scanner, r["fields"])
    label = rendered.liver.astype(np.uint8)
    affine = _affine(shape, spacing)
    if scan_extent:
        box = draw_scan_box(r["extent"], label, spacing)
        image, label = image[box], label[box]
        affine = affine.copy()
        affine[:3, 3] += np.asarray([b.start for b in box]) * np.asarray(spacing)
    info = {"seed": int(seed), **anatomy.describe(), **look.describe(), **placement.describe(),
            **body.describe(), **scanner.describe(), **drawn.describe()}  # fmt: skip
    info["fov_cut"] = _cut(label)
    info["liver_ml"] = round(float(label.sum()) * float(np.prod(spacing)) / 1000.0, 1)
    return (
        V.Volume(image, affine, header=_header(affine, np.int16)),
        V.Volume(label, affine, header=_header(affine, np.uint8)),
        info,
    )


SCAN_MIN_MM = (240.0, 240.0, 150.0)
"""Smallest scanned extent per axis: a small-FOV reconstruction in-plane, a liver-only series in z."""
SCAN_CROP_PROBABILITY = 0.7


def draw_scan_box(rng: np.random.Generator, label: np.ndarray, spacing) -> tuple[slice, slice, slice]:
    """A random scanned region of the grid: per axis, with probability 0.7, an extent between
    SCAN_MIN_MM and the whole grid, placed so that it keeps at least half of the liver."""
    shape = label.shape
    for _ in range(8):
        box = []
        for n, s, low in zip(shape, spacing, SCAN_MIN_MM):
            size = n
            if rng.uniform() < SCAN_CROP_PROBABILITY and low / s < n:
                size = int(rng.integers(int(low / s), n + 1))
            start = int(rng.integers(0, n - size + 1))
            box.append(slice(start, start + size))
        box = tuple(box)
        if not label.any() or label[box].sum() >= 0.5 * label.sum():
            return box
    return tuple(slice(0, n) for n in shape)


def _cut(label: np.ndarray) -> str:
    top, bottom = bool(label[:, :, -1].any()), bool(label[:, :, 0].any())
    return {(False, False): "none", (True, False): "top", (False, True): "bottom", (True, True): "both"}[top, bottom]


def scanner_grid_case(seed: int, shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A CT at a scanner's fine grid (e.g. 512 x 512 x 300 at 0.7 mm) for timing and memory
    benchmarks: a procedural case synthesised at 3 mm over the same extent and resampled
    linearly, which takes seconds where synthesising at the fine grid would take minutes.
    Returns (int16 voxels, RAS affine with `spacing` on the diagonal)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    coarse, _, _ = synth(seed, tuple(int(round(e / 3.0)) for e in extent), 3.0)
    fine = V.resample(coarse.array, (3.0, 3.0, 3.0), spacing, out_shape=tuple(shape))
    return np.round(fine).astype(np.int16), np.diag([*spacing, 1.0])


def synth_case(seed: int, shape=(64, 64, 64), spacing=None, labelmap: LabelMap | None = None):
    """One case: (int16 HU image Volume, uint8 liver mask Volume), RAS affine."""
    image, label, _ = synth(seed, shape, spacing, labelmap)
    return image, label


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of a data set; data sets with different seeds share no case."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


class Subjects:
    """The label-map subjects of one write_dataset call, each loaded once, on first use."""

    def __init__(self, folder):
        self.paths = find_subjects(folder)
        self._loaded: dict[Path, LabelMap] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> LabelMap:
        path = self.paths[i]
        if path not in self._loaded:
            self._loaded[path] = load_labelmap(path)
        return self._loaded[path]


def pick_source(seed: int, subjects: Subjects | None, procedural_fraction: float) -> LabelMap | None:
    """The subject a case draws its anatomy from (None: procedural)."""
    if subjects is None:
        return None
    rng = rngs(seed)["source"]
    if rng.uniform() < procedural_fraction:
        return None
    return subjects[int(rng.integers(len(subjects)))]


def write_dataset(out_dir, n: int, seed: int = 0, shape=(64, 64, 64), spacing=None, *, labelmaps=None,
                  procedural_fraction: float = 0.0, fov_mm=None, scan_extent: bool = False, variants: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  workers: int = 1) -> list[tuple[Path, Path]]:  # fmt: skip
    """n synthetic cases in the MSD layout (imagesTr/, labelsTr/, dataset.json). Same seed, same bytes.

    labelmaps: a folder of TotalSegmentator-style subjects (or one subject); each case draws its
    anatomy from one of them, or, with probability procedural_fraction, from the procedural
    patient. None: procedural only. fov_mm with spacing sets the shape; variants adds the
    synthesis variants (see synth); scan_extent crops each
    case to a random scanned region (see synth). progress(done, total)
    is called after each case. Every file is written atomically; dataset.json last, so it only
    lists complete cases. workers > 1: that many processes, each case still a pure function of
    (seed, index), so the bytes are those of one process.
    """
    if n < 1:
        raise ValueError(f"need at least one case, got n={n}")
    if not 0.0 <= procedural_fraction <= 1.0:
        raise ValueError(f"procedural_fraction must be in [0, 1], got {procedural_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    shape, spacing = _grid(shape, spacing, fov_mm)
    subjects = Subjects(labelmaps) if labelmaps is not None else None
    out_dir = Path(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    job = _CaseWriter(out_dir, seed, shape, spacing, labelmaps, procedural_fraction, scan_extent, variants)
    results = []
    if workers == 1 or n == 1:
        job.subjects = subjects
        for i in range(n):
            results.append(job(i))
            if progress:
                progress(i + 1, n)
    else:
        from liverkd.core.processes import spawn_pool

        with spawn_pool(min(workers, n)) as pool:
            for done, result in enumerate(pool.map(job, range(n)), 1):
                results.append(result)
                if progress:
                    progress(done, n)
    pairs = [(image_path, label_path) for image_path, label_path, _ in results]
    records = [record for _, _, record in results]
    write_json(out_dir / "dataset.json", _dataset_json(records, seed, shape, spacing, subjects, procedural_fraction))
    _remove_stale(out_dir, n)
    return pairs


@functools.cache
def _worker_subjects(folder: str) -> Subjects:
    """In a write_dataset worker process: one Subjects per label-map folder, so each subject is
    loaded once per process (the job is unpickled afresh for every case)."""
    return Subjects(folder)


class _CaseWriter:
    """Synthesise and write case i of a data set (write_dataset's loop body, picklable for its
    worker processes; each process loads the label-map subjects it uses once)."""

    def __init__(self, out_dir: Path, seed, shape, spacing, labelmaps, procedural_fraction, scan_extent, variants):
        self.out_dir, self.seed, self.shape, self.spacing = out_dir, seed, shape, spacing
        self.labelmaps, self.procedural_fraction = labelmaps, procedural_fraction
        self.scan_extent, self.variants = scan_extent, variants
        self.subjects = None

    def __getstate__(self):
        return {**self.__dict__, "subjects": None}  # a worker process keeps its own (_worker_subjects)

    def __call__(self, i: int) -> tuple[Path, Path, dict]:
        if self.subjects is None and self.labelmaps is not None:
            self.subjects = _worker_subjects(str(self.labelmaps))
        name = f"phantom_{i:03d}.nii.gz"
        case = case_seed(self.seed, i)
        source = pick_source(case, self.subjects, self.procedural_fraction)
        image, label, info = synth(case, self.shape, self.spacing, source, scan_extent=self.scan_extent,
                                   variants=self.variants)  # fmt: skip
        image_path = V.save(image.to_nifti(), self.out_dir / "imagesTr" / name)
        label_path = V.save(label.to_nifti(), self.out_dir / "labelsTr" / name)
        return image_path, label_path, {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "phantom": info}


def _dataset_json(records: list, seed: int, shape, spacing, subjects: Subjects | None, fraction: float) -> dict:
    synthesis = {"version": SYNTH_VERSION, "seed": int(seed), "shape": list(shape), "spacing": list(spacing)}
    reference = "liverkd.core.synth (procedural anatomy, domain-randomised appearance and scanner)"
    licence = "CC0"
    if subjects is not None:
        synthesis.update(labelmaps=[p.name for p in subjects.paths], procedural_fraction=fraction)
        reference += (
            "; anatomy from TotalSegmentator label maps: Wasserthal et al., Radiology: AI 2023, "
            "doi 10.1148/ryai.230024 (data set doi 10.5281/zenodo.6802613)"
        )
        licence = "CC BY 4.0 (derived from the TotalSegmentator data set)"
    return {
        "name": "liverkd-phantoms",
        "description": "Synthetic abdominal CT with liver masks (liverkd.core.synth)",
        "reference": reference,
        "licence": licence,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "numTraining": len(records),
        "numTest": 0,
        "training": records,
        "test": [],
        "phantom": synthesis,
    }


def _remove_stale(out_dir: Path, n: int) -> None:
    """Cases left from an earlier, larger run would be read by folder scans (calibration)."""
    for sub in ("imagesTr", "labelsTr"):
        for path in (out_dir / sub).glob("phantom_*.nii.gz"):
            index = path.name[len("phantom_") : -len(".nii.gz")]
            if index.isdigit() and int(index) >= n:
                path.unlink()
