"""One DICOM series -> a liver mask file: NIfTI, or a DICOM SEG that references the series.

    for s in pick_image_series(find_series("export/"), "export/"):
        segment_series(segmenter, s, output_path("export/", s.uid, fmt="dicom-seg"), fmt="dicom-seg")

The DICOM counterpart of Segmenter.segment_file (which takes a NIfTI file, or a folder's one CT
series): the series is found and chosen by deploy.dicom, segmented by the same Segmenter, and
written with the same output checks (check_output: never an input, an existing file only with
overwrite), the same atomic writes, result, stats JSON and preview.
"""

from __future__ import annotations

import os
from pathlib import Path

from liverkd import __version__
from liverkd.core import volume as V
from liverkd.deploy.dicom import Series, load_series
from liverkd.deploy.dicom_seg import check_referenceable, write_seg
from liverkd.deploy.segment import SegmentResult, check_output, dicom_volume, input_ids, strip_nifti_suffix

FORMATS = ("nifti", "dicom-seg")
SUFFIXES = {"nifti": "_liver.nii.gz", "dicom-seg": "_liver_seg.dcm"}


def output_path(input_path, series_uid: str | None = None, *, fmt: str = "nifti", out_dir=None) -> Path:
    """`<input>_liver.nii.gz` or `<input>_liver_seg.dcm` beside the input (or in `out_dir`), where
    <input> is the folder's or file's name (without .dcm); `<input>_<SeriesInstanceUID>_liver...`
    when the input holds several image series (`series_uid`)."""
    input_path = Path(input_path)
    if not input_path.name:  # "." or "/"
        input_path = Path(os.path.abspath(input_path))
    name = input_path.name
    base = name[:-4] if name.lower().endswith(".dcm") else strip_nifti_suffix(name)
    if series_uid:
        base += f"_{series_uid}"
    return (Path(out_dir) if out_dir is not None else input_path.parent) / (base + SUFFIXES[fmt])


def series_ids(series: Series) -> set[tuple[int, int]]:
    """The identities of the series' files: no output may replace one of them."""
    return set().union(*(input_ids(path) for path, _ in series.files))


def segment_series(
    segmenter,
    series: Series,
    out_path,
    *,
    fmt: str = "nifti",
    stats: bool = False,
    preview: bool = False,
    overwrite: bool = True,
    inputs=(),
    label: str | None = None,
) -> SegmentResult:
    """Read `series`, segment it with `segmenter` (a deploy.segment.Segmenter) and write the mask to
    `out_path` as `fmt` (FORMATS). Raises VolumeError on a bad series or an unwritable output; nothing
    is left behind then."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    protected = set(inputs) | series_ids(series)
    if fmt == "dicom-seg":
        check_referenceable(series.files)
    planes = []

    def read() -> V.Volume:
        vol, found = _read(series, segmenter.spec.spacing)
        planes[:] = found
        return vol

    def write_dicom_seg(seg, path) -> None:
        write_seg(seg.mask, planes, path, model=segmenter.bundle.name, version=__version__)

    return segmenter.segment_to(
        read,
        out_path,
        label=label or str(series.folder),
        title=series.uid,
        stats=stats,
        preview=preview,
        protect=lambda path: check_output(path, overwrite=overwrite, inputs=protected),
        write=None if fmt == "nifti" else write_dicom_seg,
        series=series.uid,
    )


def _read(series: Series, grid_spacing):
    """The series as a Volume, with what reading it noted (and the selection's notes) in its warnings."""
    return dicom_volume(lambda: load_series(series, grid_spacing=grid_spacing), series.folder, grid_spacing,
                        series.notes)  # fmt: skip
