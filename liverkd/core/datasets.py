"""Find image/label pairs in the layouts liver CT data sets come in, and load them.

    MSD Task03_Liver   dataset.json ("training": [{"image": "./imagesTr/liver_0.nii.gz",
                       "label": "./labelsTr/liver_0.nii.gz"}, ...]); labels 1 liver, 2 tumour
    LiTS               volume-N.nii / segmentation-N.nii (or .nii.gz), in any subfolders
    TotalSegmentator   <case>/ct.nii.gz with <case>/segmentations/liver.nii.gz
    a list             CSV with columns image,label (optional id), or a JSON list of
                       {"image", "label"} objects; paths relative to the list file

Liver = label > 0 everywhere (MSD/LiTS tumour, label 2, lies inside the liver).
Files whose names start with "." (the "._" AppleDouble junk of the MSD archives) are ignored.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverkd.core import volume as V
from liverkd.core.errors import LiverkdError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


class DatasetError(LiverkdError, ValueError):
    """A data set that cannot be used as it is. str() is one line: '<path>: <problem>'."""

    def __init__(self, path, problem: str):
        super().__init__(path, problem)


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None


REAL_VALIDATION = {
    "ircad01": ("real_ct/ircad01_ct.nii.gz", "real_ct/ircad01_liver.nii.gz"),
    "ircad07": ("real_ct/ircad07_ct.nii.gz", "real_ct/ircad07_liver.nii.gz"),
    "tsexample": ("real_ct/tsexample_ct.nii.gz", "real_ct/tsexample_liver.nii.gz"),
    "ct_3mm": ("totalseg_example/ct_3mm.nii.gz", "totalseg_example/liver_ref_3mm.nii.gz"),
}
"""The real CTs with liver masks liverkd is validated on, by their place under the shared data
folder (../shared/data; not part of a clone): 3D-IRCADb-01 patients 1 and 7 (manual masks) and
TotalSegmentator's example CT (its own mask), twice. VALIDATION ONLY: never trained on, never
copied into the project (their licences: the PROVENANCE.md files there)."""


def real_validation_cases(root) -> list[Case]:
    """The REAL_VALIDATION cases present under `root` (none where it or they are absent)."""
    root = Path(root)
    return [
        Case(k, root / a, root / b)
        for k, (a, b) in REAL_VALIDATION.items()
        if (root / a).is_file() and (root / b).is_file()
    ]


def discover(path, require_labels: bool = True) -> list[Case]:
    """The cases of a data set folder or list file, layout detected from what is there.

    require_labels: an image without its label is an error (else label=None; MSD "test"
    images are then included too).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "no such file or folder")
    if path.is_file():
        if path.name == "dataset.json":
            return _msd(path.parent, require_labels)
        if path.suffix.lower() == ".csv":
            return _checked(_csv_list(path), require_labels, where=path)
        if path.suffix.lower() == ".json":
            return _checked(_json_list(path), require_labels, where=path)
        raise DatasetError(path, "not a data set folder, dataset.json, .csv or .json list")
    visible = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not visible:
        raise DatasetError(path, "empty folder")
    if (path / "dataset.json").is_file() or (path / "imagesTr").is_dir():
        return _msd(path, require_labels)
    if any((p / "ct.nii.gz").is_file() for p in visible if p.is_dir()):
        return _totalsegmentator(path, require_labels)
    lits = _lits(path, require_labels)
    if lits:
        return lits
    raise DatasetError(
        path,
        "no known data set layout (looked for dataset.json or imagesTr/ (MSD), volume-N.nii (LiTS), "
        "<case>/ct.nii.gz (TotalSegmentator))",
    )


def load_case(case: Case) -> tuple[V.Volume, V.Volume]:
    """(image, liver mask 0/1 uint8), checked to share one voxel grid."""
    if case.label is None:
        raise DatasetError(case.image, f"case {case.case_id} has no label")
    image = V.load(case.image)
    label = V.load(case.label)
    if image.shape != label.shape:
        raise DatasetError(
            case.label, f"label shape {label.shape} does not match image shape {image.shape} ({case.image})"
        )
    if not np.allclose(image.affine, label.affine, rtol=0, atol=1e-3 * max(image.spacing)):
        raise DatasetError(case.label, f"label affine differs from the image's ({case.image}): not the same voxel grid")
    array = label.array
    liver = (array > 0.5) if array.dtype.kind == "f" else (array > 0)
    return image, V.Volume(liver.astype(np.uint8), label.affine, header=label.header, path=label.path)


# ---------------------------------------------------------------- layouts


def _visible_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _checked(cases: list[Case], require_labels: bool, where) -> list[Case]:
    """Every image exists; a missing label is an error, or None where labels are optional."""
    if not cases:
        raise DatasetError(where, "no cases")
    listed = f" (listed in {where})" if Path(where).is_file() else ""
    out = []
    for case in cases:
        if not case.image.is_file():
            raise DatasetError(case.image, f"image of case {case.case_id} does not exist{listed}")
        label = case.label
        if label is not None and not label.is_file():
            if require_labels:
                raise DatasetError(label, f"label of case {case.case_id} does not exist{listed}")
            label = None
        elif label is None and require_labels:
            raise DatasetError(case.image, f"no label given for case {case.case_id}{listed}")
        out.append(Case(case.case_id, case.image, label))
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None


def _msd(root: Path, require_labels: bool) -> list[Case]:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():  # imagesTr/ without dataset.json: pair by file name
        return _msd_by_name(root, require_labels)
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DatasetError(meta_path, 'no "training" list (not an MSD dataset.json)')
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(meta_path, f'training entry {i} has no "image"')
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        cases.append(Case(_stem(image), image, label))
    if not require_labels:
        for entry in meta.get("test", []):
            image = root / (entry if isinstance(entry, str) else entry.get("image", ""))
            cases.append(Case(_stem(image), image, None))
    return _checked(cases, require_labels, where=meta_path)


def _msd_by_name(root: Path, require_labels: bool) -> list[Case]:
    images_dir = root / "imagesTr"
    images = sorted(p for p in images_dir.iterdir() if _visible_nifti(p))
    if not images:
        raise DatasetError(images_dir, "no NIfTI images")
    cases = [Case(_stem(p), p, root / "labelsTr" / p.name) for p in images]
    return _checked(cases, require_labels, where=images_dir)


def _lits(root: Path, require_labels: bool) -> list[Case]:
    volumes: dict[int, Path] = {}
    segmentations: dict[int, Path] = {}
    for p in sorted(root.rglob("*")):
        if not _visible_nifti(p):
            continue
        for pattern, found in ((LITS_VOLUME, volumes), (LITS_SEGMENTATION, segmentations)):
            m = pattern.match(p.name)
            if m:
                n = int(m.group(1))
                if n in found:
                    raise DatasetError(p, f"second file for LiTS case {n} (first: {found[n]})")
                found[n] = p
    if not volumes:
        if segmentations:
            first = segmentations[min(segmentations)]
            raise DatasetError(first, "LiTS segmentation without any volume-N.nii image")
        return []
    for n, seg in sorted(segmentations.items()):
        if n not in volumes:
            raise DatasetError(seg, f"no volume-{n}.nii for this segmentation")
    cases = [
        Case(f"volume-{n}", p, segmentations.get(n, p.with_name(p.name.replace("volume-", "segmentation-", 1))))
        for n, p in sorted(volumes.items())
    ]
    return _checked(cases, require_labels, where=root)


def _totalsegmentator(root: Path, require_labels: bool) -> list[Case]:
    cases = [
        Case(folder.name, folder / "ct.nii.gz", folder / "segmentations" / "liver.nii.gz")
        for folder in sorted(root.iterdir())
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "ct.nii.gz").is_file()
    ]
    return _checked(cases, require_labels, where=root)


def _list_case(list_path: Path, where: str, image, label, case_id) -> Case:
    if not image:
        raise DatasetError(list_path, f"{where}: no image path")
    image_path = (list_path.parent / str(image).strip()).resolve()
    label_path = (list_path.parent / str(label).strip()).resolve() if label and str(label).strip() else None
    return Case(str(case_id).strip() if case_id else _stem(image_path), image_path, label_path)


def _csv_list(path: Path) -> list[Case]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(path, f"cannot read CSV ({e})") from None
    if not rows:
        raise DatasetError(path, "no rows (a header line image,label and one row per case)")
    columns = {c.strip().lower(): c for c in rows[0] if c}
    if "image" not in columns:
        raise DatasetError(path, f"no 'image' column (columns: {', '.join(rows[0]) or 'none'})")
    cases = []
    for line, row in enumerate(rows, start=2):
        get = lambda key: row.get(columns[key]) if key in columns else None  # noqa: B023
        cases.append(_list_case(path, f"line {line}", get("image"), get("label"), get("id") or get("case_id")))
    _check_list(path, cases)
    return cases


def _json_list(path: Path) -> list[Case]:
    entries = _read_json(path)
    if isinstance(entries, dict) and isinstance(entries.get("cases"), list):
        entries = entries["cases"]
    if not isinstance(entries, list):
        raise DatasetError(path, 'expected a JSON list of {"image": ..., "label": ...} objects')
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(path, f'entry {i} is not an object with "image" and "label"')
        cases.append(_list_case(path, f"entry {i}", entry.get("image"), entry.get("label"), entry.get("id")))
    _check_list(path, cases)
    return cases


def _check_list(path: Path, cases: list[Case]) -> None:
    if not cases:
        raise DatasetError(path, "no cases listed")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DatasetError(path, f"case id {case.case_id!r} listed twice ({seen[case.case_id]}, {case.image})")
        seen[case.case_id] = case.image
