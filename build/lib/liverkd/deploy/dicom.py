"""DICOM in: find the CT image series under a folder (or of one file), read one as a nibabel image.

    found = find_series("export/")            # every series below, PATIENT/STUDY/SERIES nested or flat
    chosen = pick_image_series(found, "export/")   # the CT image series among them (or series=UID)
    img, planes = load_series(chosen[0])      # NIfTI image in memory; `planes`: its slices' sources
    img = read_series("export/")              # the one CT series, as Segmenter.segment_file reads it

DICOM positions are in LPS millimetres; NIfTI world space is RAS, so x and y flip sign.
The array is indexed [column, row, slice] so that its first axis follows the image rows'
direction (ImageOrientationPatient[:3]) like a NIfTI written by dcm2niix. A plane is one 2-D
image: a single-frame file, or one frame of a multi-frame (Enhanced CT) file, placed by its
per-frame functional groups.

Not an image series, never segmented: another Modality (SEG, RTSTRUCT, MR, ...), a localizer, a
series whose ImageType or SeriesDescription marks it as a segmentation or mask, and a series
whose stored pixel values are only 0 and 1 (or 0 and 255): a label map saved as CT. Series that
share a folder compete: an ORIGINAL series there leaves DERIVED ones out, and two of the same
number of slices are refused as ambiguous (--series picks one).

A series whose geometry cannot be trusted is refused, never guessed: an unreadable file, a
missing slice, uneven spacing. Sizes are checked before pixels are decoded
(liverkd.core.volume.check_geometry) and a deflated file before it is inflated.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
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
LABEL_SAMPLES = 8
"""Slices of each candidate series decoded to tell a label map from a CT by its pixel values."""
LABEL_LEVELS = (1, 255)
"""A series whose stored values are only 0 and one of these is a label map, not an image."""
MAX_SAMPLE_PIXELS = 2**26
"""Larger slices are not decoded to be sampled (the series' own read checks its size first)."""
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files, not an image
_MARKED_TYPES = {"SEGMENTATION", "MASK", "LABEL", "LABELMAP"}
_MARKED_WORDS = re.compile(r"\b(seg|segmentation|mask|masks|label|labels|labelmap|contours?|rtstruct)\b", re.I)


@dataclass
class Series:
    """One SeriesInstanceUID's files (headers only, no pixels) and the folder they are in."""

    uid: str
    folder: Path
    files: list = field(default_factory=list)
    """[(path, pydicom Dataset without pixel data)], sorted by path."""
    notes: list[str] = field(default_factory=list)
    """What choosing it left out (other series), for the user."""

    @property
    def header(self):
        return self.files[0][1]

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "")).upper()

    @property
    def n_planes(self) -> int:
        return sum(_frames(ds) for _, ds in self.files)

    @property
    def is_original(self) -> bool:
        return _image_type(self.header)[:1] == ["ORIGINAL"]

    def name(self) -> str:
        """`series UID ('description')`: how messages name it."""
        description = str(self.header.get("SeriesDescription", "") or "").strip()
        return f"series {self.uid}" + (f" ({description!r})" if description else "")

    def summary(self) -> str:
        return f"{self.modality or 'no modality'} ({len(self.files)} files)"


@dataclass
class Plane:
    """One 2-D image of a series: a single-frame file, or frame `frame` of a multi-frame file."""

    path: Path
    frame: int | None
    header: object
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    """PixelSpacing: (between rows, between columns) in mm."""
    rescale: tuple[float, float]
    """(slope, intercept) from stored values to HU."""


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
    """True when one of the first `probe` files in `folder` or a folder below it is a DICOM file."""
    return any(looks_like_dicom(p) for p in _files_below(Path(folder), per_folder=probe))


def _files_below(folder: Path, per_folder: int | None = None):
    """Files in `folder` and the folders below it, in name order; hidden ones (.*) and links to
    folders left out (a link could loop or leave the tree)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(f for f in files if not f.startswith("."))
        for name in names[:per_folder]:
            path = Path(root) / name
            if path.is_file():
                yield path


# ------------------------------------------------------------ finding and choosing series


def find_series(path) -> list[Series]:
    """Every DICOM series in the folder `path` and below it, or the series of the DICOM file `path`.

    A multi-frame file is a series of its own; a single-slice file stands for its series: the files
    beside it with its SeriesInstanceUID. A DICOMDIR and files that are not DICOM are left out; a
    DICOM file that cannot be read is an error (its series would silently lose a slice).
    """
    path = Path(path)
    _need_pydicom(path)
    if path.is_dir():
        series = _group(_read_headers(_files_below(path)), path)
        if not series:
            raise VolumeError(path, "no DICOM images in this folder")
        return series
    if not path.is_file():
        raise VolumeError(path, "no such file or folder")
    if not looks_like_dicom(path):
        raise VolumeError(path, "not a DICOM file (no DICM marker)")
    headers = _read_headers([path])
    if not headers:
        raise VolumeError(path, "a DICOMDIR (an index of files), not an image; give its folder")
    ((uid, files),) = headers.items()
    if _frames(files[0][1]) > 1:
        return [Series(uid, path.parent, files)]
    siblings = _read_headers(p for p in sorted(path.parent.iterdir()) if p.is_file() and looks_like_dicom(p))
    return [Series(uid, path.parent, siblings[uid])]


def pick_image_series(found: list[Series], where, series: str | None = None) -> list[Series]:
    """The CT image series among `found` (under the input `where`), each with its notes; or the one
    whose SeriesInstanceUID is `series`. Raises VolumeError when there is none, when the chosen one
    is not an image series, or when two in one folder could both be meant."""
    where = Path(where)
    listing = ", ".join(s.summary() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            uids = ", ".join(s.uid for s in found)
            raise VolumeError(where, f"no series {series} here (found: {uids})")
        why = _not_an_image(chosen[0])
        if why:
            raise VolumeError(where, f"{chosen[0].name()} is not a CT image series: {why}")
        return chosen
    images, left_out = [], []
    for s in found:
        why = _not_an_image(s)
        if why:
            left_out.append(f"{s.name()}: {why}")
        else:
            images.append(s)
    if not images:
        reasons = "; ".join(left_out)
        raise VolumeError(where, f"no CT image series in this folder (found: {listing}); {reasons}")
    kept = []
    by_folder = defaultdict(list)
    for s in images:
        by_folder[s.folder].append(s)
    for folder, group in by_folder.items():
        if any(s.is_original for s in group):
            left_out += [f"{s.name()}: DERIVED beside an ORIGINAL series" for s in group if not s.is_original]
            group = [s for s in group if s.is_original]
        for s in group:
            twins = [t for t in group if t.n_planes == s.n_planes]
            if len(twins) > 1:
                names = ", ".join(t.name() for t in twins)
                raise VolumeError(
                    folder,
                    f"{len(twins)} CT series of {s.n_planes} slices each ({names}): ambiguous; pick one (--series UID)",
                )
        kept += group
    if len(kept) == 1 and len(found) > 1:
        left = f"; left out {'; '.join(left_out)}" if left_out else ""
        kept[0].notes.append(f"{len(found)} DICOM series ({listing}){left}; using the CT series {kept[0].uid} "
                             f"({kept[0].n_planes} slices)")  # fmt: skip
    elif left_out:  # several outputs, each named by its series: only what was left out needs saying
        for s in kept:
            s.notes.append(f"{len(found)} DICOM series; left out {'; '.join(left_out)}")
    return kept


def _not_an_image(s: Series) -> str | None:
    """Why the series is not a CT image series, or None."""
    kinds = _image_type(s.header)
    if s.modality != "CT":
        return f"Modality {s.modality or 'missing'}"
    if "LOCALIZER" in kinds:
        return "a localizer (scout)"
    description = str(s.header.get("SeriesDescription", "") or "")
    marks = sorted(_MARKED_TYPES & set(kinds)) + _MARKED_WORDS.findall(description)
    if marks:
        return f"marked as a segmentation ({', '.join(marks)})"
    level = _label_level(_sampled_pixels(s))
    if level:
        return f"pixel values only 0 and {level}: a label map, not a CT image"
    return None


def _sampled_pixels(s: Series):
    """Stored pixels of up to LABEL_SAMPLES single-frame files spread over the series (a multi-frame
    file is checked when it is read)."""
    single = [path for path, ds in s.files if _frames(ds) == 1 and 0 < _pixels(ds) <= MAX_SAMPLE_PIXELS]
    picks = sorted({single[round(i)] for i in np.linspace(0, len(single) - 1, min(LABEL_SAMPLES, len(single)))})
    return (_decode(path) for path in picks)


def _level(a: np.ndarray) -> int | None:
    """0, or v in LABEL_LEVELS, when the stored values of `a` are within {0, v}; else None."""
    top = int(a.max()) if a.size else 0
    if top not in (0, *LABEL_LEVELS) or a.min() < 0 or not np.all((a == 0) | (a == top)):
        return None
    return top


def _label_level(arrays) -> int | None:
    """v when the stored values of all `arrays` together are exactly {0, v} (v in LABEL_LEVELS), else None."""
    seen = set()
    for a in arrays:
        level = _level(a)
        if level is None:
            return None
        seen.add(level)
    return max(seen) if len(seen) == 2 and 0 in seen else None


# ------------------------------------------------------------ reading one series


def read_series(folder, *, series: str | None = None, max_voxels: int = MAX_VOXELS, grid_spacing=None):
    """The CT series in `folder` (or below it) as a NIfTI image (rescale slope/intercept applied).

    With several image series, the one with the most slices (equal sizes are refused), or the one
    whose SeriesInstanceUID is `series`. Raises VolumeError (one line naming the folder or file)
    when there is no usable CT series, when it is ambiguous which one is meant, or when the slices
    do not make an even 3-D grid; warns (VolumeWarning) when other series were left out or the
    spacing is slightly uneven. `max_voxels` and `grid_spacing` are volume.check_geometry's,
    checked before any pixel is read.
    """
    folder = Path(folder)
    chosen = pick_image_series(find_series(folder), folder, series)
    chosen.sort(key=lambda s: s.n_planes, reverse=True)
    best = chosen[0]
    if len(chosen) > 1:
        if best.n_planes == chosen[1].n_planes:
            raise VolumeError(folder, f"{len(chosen)} CT series of {best.n_planes} slices each: ambiguous")
        listing = ", ".join(s.summary() for s in chosen)
        best.notes.append(f"{len(chosen)} CT image series ({listing}); using the CT series {best.uid} "
                          f"({best.n_planes} slices), the one with the most")  # fmt: skip
    for note in best.notes:
        warnings.warn(f"{folder}: {note}", VolumeWarning, stacklevel=2)
    img, _ = load_series(best, max_voxels=max_voxels, grid_spacing=grid_spacing)
    return img


def load_series(series: Series, *, max_voxels: int = MAX_VOXELS, grid_spacing=None):
    """(NIfTI image, planes in slice order: the source of each slice of the image's third axis)."""
    where = series.folder
    planes = [p for path, ds in series.files for p in _planes(path, ds)]
    if len(planes) < 2:
        raise VolumeError(series.files[0][0], "a single DICOM slice; a 3-D series is needed")
    first = planes[0]
    rows, cols = int(first.header.Rows), int(first.header.Columns)
    for p in planes:
        same_size = (int(p.header.Rows), int(p.header.Columns)) == (rows, cols)
        if not same_size or not np.allclose(p.orientation, first.orientation, atol=1e-4):
            raise VolumeError(p.path, "slice size or orientation differs from the rest of the series")
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    planes.sort(key=lambda p: float(np.dot(p.position, normal)))
    positions = np.array([p.position for p in planes])
    _check_slice_gaps(where, np.diff(positions @ normal))

    row_spacing, col_spacing = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * col_spacing  # along a row: column index i
    lps[:3, 1] = first.orientation[3:] * row_spacing  # down a column: row index j
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(planes) - 1)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    check_geometry(where, (cols, rows, len(planes)), affine, max_voxels=max_voxels, grid_spacing=grid_spacing)

    data = _read_pixels(where, planes, cols, rows)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner-based anatomical coordinates
    img.set_sform(affine, code=1)
    return img, planes


def _planes(path: Path, ds) -> list[Plane]:
    """The planes of one file: itself, or each frame placed by its (per-frame or shared) functional groups."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(path, "colour DICOM image; grey CT slices are needed")
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if _frames(ds) != 1:
            raise VolumeError(path, "multi-frame DICOM without per-frame functional groups; not supported")
        missing = [tag for tag in _GEOMETRY_TAGS if tag not in ds]
        if missing:
            raise VolumeError(path, f"no {', '.join(missing)}: the slice cannot be placed in the series")
        return [_plane(path, None, ds, ds, ds, ds, ds)]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != _frames(ds):
        raise VolumeError(path, f"{_frames(ds)} frames but {len(per_frame)} per-frame functional groups")
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    planes = []
    for f, group in enumerate(per_frame):
        position = _macro((group, shared), "PlanePositionSequence", "ImagePositionPatient")
        orientation = _macro((group, shared), "PlaneOrientationSequence", "ImageOrientationPatient")
        measures = _macro((group, shared), "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or measures is None or "Rows" not in ds:
            raise VolumeError(path, f"frame {f + 1} has no plane position, orientation or pixel spacing")
        rescale = _macro((group, shared), "PixelValueTransformationSequence", "RescaleSlope") or ds
        planes.append(_plane(path, f, ds, position, orientation, measures, rescale))
    return planes


def _macro(groups, sequence: str, tag: str):
    """The first item of `sequence` holding `tag` in the per-frame group, else in the shared one."""
    for group in groups:
        items = group.get(sequence) if group is not None else None
        if items and tag in items[0]:
            return items[0]
    return None


def _plane(path, frame, ds, position, orientation, measures, rescale) -> Plane:
    try:
        return Plane(
            path,
            frame,
            ds,
            np.array([float(v) for v in position.ImagePositionPatient]),
            np.array([float(v) for v in orientation.ImageOrientationPatient]),
            tuple(float(v) for v in measures.PixelSpacing),
            (float(rescale.get("RescaleSlope", 1) or 1), float(rescale.get("RescaleIntercept", 0) or 0)),
        )
    except (TypeError, ValueError) as e:
        raise VolumeError(path, f"unusable geometry tags ({_first_line(e)})") from None


def _read_pixels(where: Path, planes: list[Plane], cols: int, rows: int) -> np.ndarray:
    """[column, row, slice] values (HU); refused when the stored values make a label map."""
    data = None
    frames_of: dict[Path, np.ndarray] = {}  # a multi-frame file is decoded once
    levels: set[int] | None = set()  # of the stored values, while they could still be a label map
    for k, plane in enumerate(planes):
        if plane.frame is None:
            pixels = _decode(plane.path)
        else:
            if plane.path not in frames_of:
                frames_of = {plane.path: _decode(plane.path, multi_frame=True)}
            pixels = frames_of[plane.path][plane.frame]
        if pixels.shape != (rows, cols):
            raise VolumeError(plane.path, f"pixel data of shape {pixels.shape}, expected {(rows, cols)}")
        if levels is not None:
            level = _level(pixels)
            levels = None if level is None else levels | {level}
        slope, intercept = plane.rescale
        values = pixels.astype(np.float32) * slope + intercept if (slope, intercept) != (1.0, 0.0) else pixels
        integral = slope.is_integer() and intercept.is_integer() and pixels.dtype.kind in "iu"
        if data is None:
            data = np.empty((cols, rows, len(planes)), dtype=np.int16 if integral else np.float32)
        if data.dtype == np.int16 and (not integral or values.min() < -32768 or values.max() > 32767):
            data = data.astype(np.float32)
        data[:, :, k] = values.T
    if levels is not None and len(levels) == 2 and 0 in levels:
        raise VolumeError(where, f"pixel values only 0 and {max(levels)}: a label map, not a CT image")
    return data


def _decode(path: Path, multi_frame: bool = False) -> np.ndarray:
    """Stored pixel values of a file: (rows, cols), or (frames, rows, cols) for a multi-frame file."""
    import pydicom

    try:
        pixels = pydicom.dcmread(path).pixel_array
    except Exception as e:  # decoders raise many types (missing handler, corrupt data, ...)
        raise VolumeError(path, f"cannot decode DICOM pixel data ({_first_line(e)})") from None
    return pixels[None] if multi_frame and pixels.ndim == 2 else pixels


# ------------------------------------------------------------ headers


def _need_pydicom(path) -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise VolumeError(path, "reading DICOM needs pydicom (pip install 'liverkd[dicom]')") from None


def _read_headers(paths) -> dict[str, list]:
    """SeriesInstanceUID -> [(path, dataset without pixels)] of the DICOM files among `paths`."""
    import pydicom

    series: dict[str, list] = defaultdict(list)
    for path in paths:
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
    return series


def _group(headers: dict[str, list], top: Path) -> list[Series]:
    """Series in the order of their first file; each in the folder its files share."""
    out = []
    for uid, files in sorted(headers.items(), key=lambda kv: str(kv[1][0][0])):
        files.sort(key=lambda f: str(f[0]))
        folder = Path(os.path.commonpath([str(p.parent) for p, _ in files])) if files else top
        out.append(Series(uid, folder, files))
    return out


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


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _pixels(ds) -> int:
    try:
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        return 0


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
