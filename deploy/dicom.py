"""A DICOM series folder -> a nibabel image in memory (pydicom; the optional extra `dicom`).

DICOM positions are in LPS millimetres; NIfTI world space is RAS, so x and y flip sign.
The array is indexed [column, row, slice] so that its first axis follows the image rows'
direction (ImageOrientationPatient[:3]) like a NIfTI written by dcm2niix.

A series whose geometry cannot be trusted is refused, never guessed: an unreadable file, a
missing slice, uneven spacing, several CT series of one size. Sizes are checked before pixels
are decoded (liverkd.core.volume.check_geometry) and a deflated file before it is inflated.
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core.volume import MAX_VOXELS, VolumeError, VolumeWarning, check_geometry

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
MISSING_SLICE_GAP = 1.5
"""A gap larger than this many median slice steps means slices are missing: refused."""
UNEVEN_TOLERANCE = 0.1
"""Slice gaps may differ from the median by this fraction of it (more is refused; over 1%, a warning)."""
MAX_FILE_BYTES = 64 * 2**20
"""A deflated DICOM file may inflate to this much (a 512 x 512 CT slice is 0.5 MiB)."""
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files, not an image


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


def read_series(folder, *, max_voxels: int = MAX_VOXELS, grid_spacing=None) -> nib.Nifti1Image:
    """The CT series in `folder` as a NIfTI image (rescale slope/intercept applied).

    Raises VolumeError (one line naming the folder or file) when there is no usable CT series,
    when it is ambiguous which one is meant, or when the slices do not make an even 3-D grid;
    warns (VolumeWarning) when other series were left out or the spacing is slightly uneven.
    `max_voxels` and `grid_spacing` are volume.check_geometry's, checked before any pixel is read.
    """
    folder = Path(folder)
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise VolumeError(folder, "reading DICOM needs pydicom (pip install 'liverkd[dicom]')") from None

    slices = _pick_ct_series(folder, _read_headers(folder))
    if len(slices) < 2:
        raise VolumeError(folder, "a single DICOM slice; a 3-D series is needed")
    for path, ds in slices:
        missing = [tag for tag in _GEOMETRY_TAGS if tag not in ds]
        if missing:
            raise VolumeError(path, f"no {', '.join(missing)}: the slice cannot be placed in the series")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise VolumeError(path, "multi-frame or colour DICOM image; one grey slice per file is needed")

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
    _check_slice_gaps(folder, np.diff(positions @ normal))

    row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row: column index i
    lps[:3, 1] = col_dir * row_spacing  # down a column: row index j
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    check_geometry(folder, (cols, rows, len(slices)), affine, max_voxels=max_voxels, grid_spacing=grid_spacing)

    data = _read_pixels([p for p, _ in slices], cols, rows)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner-based anatomical coordinates
    img.set_sform(affine, code=1)
    return img


def _read_headers(folder: Path) -> dict[str, list]:
    """SeriesInstanceUID -> [(path, dataset without pixels)] of every DICOM file in `folder`.

    Files that are not DICOM (notes, thumbnails) and a DICOMDIR are left out; a DICOM file that
    cannot be read is an error, since the series it belongs to would silently lose a slice."""
    import pydicom

    series: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not looks_like_dicom(path):
            continue
        try:
            _check_inflated_size(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except VolumeError:
            raise
        except Exception as e:  # pydicom raises many types on a damaged file
            raise VolumeError(path, f"unreadable DICOM file ({_first_line(e)}); the series would miss it") from None
        if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_DIRECTORY:
            continue
        if "SeriesInstanceUID" not in ds:  # pydicom stops quietly where a file is cut short
            raise VolumeError(path, "unreadable DICOM file (no SeriesInstanceUID); the series would miss it")
        series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not series:
        raise VolumeError(folder, "no DICOM images in this folder")
    return series


def _check_inflated_size(path: Path) -> None:
    """Refuse a deflated file that inflates to more than MAX_FILE_BYTES, counting as it inflates
    (pydicom inflates the whole file into memory first: a 4 MB file can hold gigabytes)."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    budget = MAX_FILE_BYTES
    with open(path, "rb") as f:
        f.seek(132 + 12 + int(meta.FileMetaInformationGroupLength))  # preamble, group length element, meta
        data = f.read(1 << 16)
        while data and not inflater.eof:
            budget -= len(inflater.decompress(data, 1 << 20))
            if budget < 0:
                raise VolumeError(path, f"deflated DICOM data inflates to over {MAX_FILE_BYTES:,} bytes; not read")
            data = inflater.unconsumed_tail or f.read(1 << 16)


def _pick_ct_series(folder: Path, series: dict[str, list]) -> list:
    """The one CT series: Modality CT, not a localizer (scout); ORIGINAL before DERIVED, then the
    most slices. Never a SEG, RTSTRUCT or other non-CT series; a tie is refused, not guessed."""

    def rank(slices) -> tuple[bool, int]:
        return (_image_type(slices[0][1])[:1] == ["ORIGINAL"], len(slices))

    def is_ct(slices) -> bool:
        ds = slices[0][1]
        return str(ds.get("Modality", "")).upper() == "CT" and "LOCALIZER" not in _image_type(ds)

    found = ", ".join(f"{s[0][1].get('Modality', 'no modality')} ({len(s)} files)" for s in series.values())
    candidates = sorted((s for s in series.values() if is_ct(s)), key=rank, reverse=True)
    if not candidates:
        raise VolumeError(folder, f"no CT image series in this folder (found: {found})")
    best = candidates[0]
    ties = sum(rank(s) == rank(best) for s in candidates)
    if ties > 1:
        raise VolumeError(folder, f"{ties} CT series of {len(best)} slices each ({found}): ambiguous; one per folder")
    if len(series) > 1:
        uid = best[0][1].get("SeriesInstanceUID", "")
        message = f"{len(series)} DICOM series ({found}); using the CT series {uid} ({len(best)} slices)"
        warnings.warn(f"{folder}: {message}", VolumeWarning, stacklevel=3)
    return list(best)


def _image_type(ds) -> list[str]:
    value = ds.get("ImageType", [])
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def _check_slice_gaps(folder: Path, gaps: np.ndarray) -> None:
    """Slices must be distinct, none missing, evenly spaced: the affine has one slice step."""
    if np.any(gaps < 1e-3):
        raise VolumeError(folder, "two slices share one position (duplicate or mixed series)")
    step = float(np.median(gaps))
    spread = f"slice gaps {gaps.min():.4g}..{gaps.max():.4g} mm, median {step:.4g}"
    if gaps.max() > MISSING_SLICE_GAP * step:
        raise VolumeError(folder, f"missing slices ({spread}); a series with gaps is not read")
    if np.abs(gaps - step).max() > UNEVEN_TOLERANCE * step:
        raise VolumeError(folder, f"uneven slice spacing ({spread}); over {UNEVEN_TOLERANCE:.0%} is not read")
    if gaps.max() - gaps.min() > 0.01 * step + 1e-3:
        warnings.warn(f"{folder}: slightly uneven slice spacing ({spread}); using the mean", VolumeWarning, 3)


def _read_pixels(paths: list[Path], cols: int, rows: int) -> np.ndarray:
    import pydicom

    data = None
    for k, path in enumerate(paths):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as e:  # decoders raise many types (missing handler, corrupt data, ...)
            raise VolumeError(path, f"cannot decode DICOM pixel data ({_first_line(e)})") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
