"""DICOM out: a liver mask as a DICOM Segmentation (BINARY, highdicom) referencing its source series.

    write_seg(mask, planes, "ct_liver_seg.dcm", model="student-30k", version="0.1.0")

`mask` is on the grid deploy.dicom.load_series built, [column, row, slice], and `planes` are the
sources of its slices, in that order: the SEG's frames reference them by SOP Instance UID (or by
frame number in a multi-frame source) and share their Study, Frame of Reference and patient.
The one segment is coded SNOMED CT "Liver" (10200004) in "Anatomical Structure" (123037004, the
category DICOM CID 7150 and 3D Slicer use), made AUTOMATIC by the algorithm "liverkd" <version>.
Written atomically (temp file, then rename).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from liverkd.core.atomic import atomic_path
from liverkd.core.volume import VolumeError

LIVER = ("10200004", "SCT", "Liver")
ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")
SERIES_NUMBER = 9000
"""The SEG's SeriesNumber: high, so that viewers list it after the CT series."""
REQUIRED = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID")
"""What a SEG must reference; a source series without them is refused."""
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName")  # fmt: skip
"""Attributes a SEG copies from its source that may be empty there; missing ones are added empty."""


def highdicom_missing() -> str | None:
    """None when highdicom imports, else the one line that says how to get it."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return "writing DICOM SEG needs highdicom (pip install 'liverkd[dicom]')"
    return None


def check_referenceable(files) -> None:
    """Refuse, before any pixel is read, a series ([(path, header)]) that a SEG cannot reference."""
    for path, ds in files:
        missing = [tag for tag in REQUIRED if tag not in ds]
        if missing:
            raise VolumeError(path, f"no {', '.join(missing)}: a DICOM SEG cannot reference this image")


def write_seg(mask: np.ndarray, planes, out_path, *, model: str, version: str) -> Path:
    """Write `mask` (uint8, 1 = liver) as a DICOM SEG to `out_path`; VolumeError when it cannot be."""
    out_path = Path(out_path)
    where = planes[0].path.parent
    problem = highdicom_missing()
    if problem:
        raise VolumeError(out_path, problem)
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources, frames = _sources(mask, planes, where)
    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=hd.sr.CodedConcept(*ANATOMICAL_STRUCTURE),
        segmented_property_type=hd.sr.CodedConcept(*LIVER),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="liverkd", family=codes.cid7162.ArtificialIntelligence, version=version, parameters={"model": model}
        ),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[liver],
            series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="liverkd",
            manufacturer_model_name=model,
            software_versions=version,
            device_serial_number="none",
            series_description=f"liverkd liver ({model})",
            content_label="LIVER",
            content_description=f"liver segmented by liverkd {version}, model {model}",
            omit_empty_frames=bool(frames.any()),  # an empty mask keeps its frames (highdicom would say so)
        )
    except Exception as e:  # highdicom checks the sources' attributes; any complaint is this input's error
        lines = str(e).strip().splitlines()
        raise VolumeError(where, f"cannot make a DICOM SEG ({lines[0] if lines else type(e).__name__})") from None
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return out_path


def _sources(mask: np.ndarray, planes, where: Path):
    """(source datasets, frames as (frame, row, column)) in the order highdicom pairs them."""
    files = {p.path for p in planes}
    headers = []
    sources = planes if all(p.frame is None for p in planes) else planes[:1]
    check_referenceable([(p.path, p.header) for p in sources])
    for p in sources:
        ds = copy.deepcopy(p.header)
        for tag in TYPE_2:
            if tag not in ds:
                setattr(ds, tag, None)
        headers.append(ds)
    if all(p.frame is None for p in planes):
        for ds in headers:
            if "SliceThickness" not in ds:
                ds.SliceThickness = _step(planes)
        return headers, np.ascontiguousarray(mask.transpose(2, 1, 0))
    if len(files) != 1:
        raise VolumeError(where, "a DICOM SEG of a series spread over several multi-frame files is not supported")
    frames = np.zeros((len(planes), *mask.shape[1::-1]), dtype=mask.dtype)
    for k, p in enumerate(planes):
        frames[p.frame] = mask[:, :, k].T  # the source's own frame order
    return headers, frames


def _step(planes) -> float:
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    return float(abs(np.dot(planes[-1].position - planes[0].position, normal)) / (len(planes) - 1))
