"""A DICOM series folder -> a nibabel image in memory (pydicom; the optional extra `dicom`).

DICOM positions are in LPS millimetres; NIfTI world space is RAS, so x and y flip sign.
The array is indexed [column, row, slice] so that its first axis follows the image rows'
direction (ImageOrientationPatient[:3]) like a NIfTI written by dcm2niix.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core.volume import VolumeError, VolumeWarning

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def looks_like_dicom(path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_folder(folder, probe: int = 20) -> bool:
    """True when one of the first `probe` files in `folder` is a DICOM file."""
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file()][:probe]
    return any(looks_like_dicom(p) for p in files)


def read_series(folder) -> nib.Nifti1Image:
    """The largest image series in `folder` as a NIfTI image (rescale slope/intercept applied).

    Raises VolumeError (one line naming the folder) when there is no usable series; warns
    (VolumeWarning) when several series are present or the slices are unevenly spaced.
    """
    folder = Path(folder)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise VolumeError(folder, "reading DICOM needs pydicom (pip install 'liverkd[dicom]')") from None

    series: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            continue
        if all(tag in ds for tag in _GEOMETRY_TAGS):
            series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if not series:
        raise VolumeError(folder, "no DICOM images with patient geometry in this folder")
    uid, slices = max(series.items(), key=lambda kv: len(kv[1]))
    if len(series) > 1:
        warnings.warn(
            f"{folder}: {len(series)} DICOM series; using the largest ({len(slices)} slices, {uid})",
            VolumeWarning,
            stacklevel=2,
        )
    if len(slices) < 2:
        raise VolumeError(folder, "a single DICOM slice; a 3-D series is needed")

    iop = np.array([float(v) for v in slices[0][1].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    rows, cols = int(slices[0][1].Rows), int(slices[0][1].Columns)
    for path, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or not np.allclose(
            [float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4
        ):
            raise VolumeError(path, "slice size or orientation differs from the rest of the series")
    slices.sort(key=lambda s: float(np.dot([float(v) for v in s[1].ImagePositionPatient], normal)))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    gaps = np.diff(positions @ normal)
    if np.any(gaps < 1e-3):
        raise VolumeError(folder, "two slices share one position (duplicate or mixed series)")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        warnings.warn(
            f"{folder}: uneven slice spacing ({gaps.min():.3g}..{gaps.max():.3g} mm); using the mean",
            VolumeWarning,
            stacklevel=2,
        )

    row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row: column index i
    lps[:3, 1] = col_dir * row_spacing  # down a column: row index j
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps

    data = _read_pixels(folder, [p for p, _ in slices], cols, rows)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner-based anatomical coordinates
    img.set_sform(affine, code=1)
    return img


def _read_pixels(folder: Path, paths: list[Path], cols: int, rows: int) -> np.ndarray:
    import pydicom

    data = None
    for k, path in enumerate(paths):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as e:  # decoders raise many types (missing handler, corrupt data, ...)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise VolumeError(path, f"cannot decode DICOM pixel data ({why})") from None
        if pixels.shape != (rows, cols):
            raise VolumeError(path, f"pixel data of shape {pixels.shape}, expected {(rows, cols)}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = pixels.astype(np.float32) * slope + intercept if (slope, intercept) != (1.0, 0.0) else pixels
        integral = slope.is_integer() and intercept.is_integer() and pixels.dtype.kind in "iu"
        if data is None:
            data = np.empty((cols, rows, len(paths)), dtype=np.int16 if integral else np.float32)
        if data.dtype == np.int16 and (not integral or values.min() < -32768 or values.max() > 32767):
            data = data.astype(np.float32)
        data[:, :, k] = values.T
    return data
