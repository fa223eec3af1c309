"""Volume = array + affine (+ the NIfTI header it came with), and the geometric steps
a volume goes through: canonical orientation, resampling, HU window, crop/pad.

Every step has its inverse here, so a mask mapped back lands on exactly the input's
shape and affine.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import unicodedata
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from liverkd.core import accel, xp
from liverkd.core.atomic import atomic_path
from liverkd.core.errors import LiverkdError

# Limits on an input, all checked on the header, before a voxel is read (docs/security.md, "Inputs").
MAX_VOXELS = 2**30
"""Voxels of the input (1024^3; a 512 x 512 x 3000 whole-body CT is 0.8e9)."""
MAX_DATA_BYTES = 4 * 2**30
"""Bytes of voxel data (offset included) a header may claim: what reading the file allocates."""
MAX_GRID_VOXELS = 2**27
"""Voxels after resampling to the engine's spacing (512^3; a 0.5 x 0.5 x 2 m body at 3 mm is 19e6)."""
SPACING_RANGE_MM = (0.05, 20.0)
"""Voxel sides outside this are a wrong header (units, pixdim), not a CT: refused."""
MAX_ABS_VALUE = 1e30
"""Larger float voxels are not HU, and would overflow the float32 arithmetic of resampling."""
MM_PER_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
"""NIfTI xyzt_units & 7: unknown (taken as mm, as every reader does), metre, mm, micrometre."""
COMPRESSION_MAX_RATIO = {".gz": 1100, ".bz2": None, ".zst": None}
"""How many bytes a file of N bytes can hold, over N, by its suffix (1 for .nii): deflate cannot expand
data by more than ~1032x; bzip2 and zstd have no such bound (MAX_DATA_BYTES alone applies)."""
_HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control and format characters, lone surrogates, line breaks
_HEADER_FIXES = logging.getLogger("liverkd.nibabel_header_fixes")
_HEADER_FIXES.addHandler(logging.NullHandler())  # nibabel would print the fields it fixes to stderr
_HEADER_FIXES.propagate = False


def printable(text) -> str:
    """`text` for a one-line message: control characters (newline, tab, ESC...), format characters and
    undecodable bytes of a file name escaped as ascii() writes them; everything else as it is."""
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in _UNPRINTABLE else c for c in str(text))


class VolumeError(LiverkdError, ValueError):
    """Bad input volume. str() is one line: '<path>: <problem>'."""

    def __init__(self, path, problem: str):
        super().__init__(printable(path), printable(problem))


class VolumeWarning(UserWarning):
    """Valid but odd input (4-D, oblique, not CT-like, ...)."""


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: str | None = None
    warnings: list[str] = field(default_factory=list)
    pooled: tuple | None = field(default=None, repr=False, compare=False)
    """(array, spacing, _block_mean's result): the block mean of this array's canonical view for
    `spacing`, summed by load while the file inflated; resample takes it instead of summing again."""

    def block_mean_for(self, spacing):
        """load's block mean for `spacing`, if it has one for this very array (else None)."""
        if self.pooled is None or self.pooled[0] is not self.array or not np.allclose(self.pooled[1], spacing):
            return None
        return self.pooled[2]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def to_nifti(self, dtype=None) -> nib.Nifti1Image:
        return to_nifti(self.array if dtype is None else self.array.astype(dtype), self.affine, self.header)

    @classmethod
    def from_nifti(cls, img: nib.spatialimages.SpatialImage, path=None) -> Volume:
        return from_image(img, path if path is not None else img.get_filename() or "<image>")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _warn(vol_warnings: list[str], path, message: str) -> None:
    vol_warnings.append(message)
    warnings.warn(f"{path}: {message}", VolumeWarning, stacklevel=3)


# ---------------------------------------------------------------- load / save


def load(path, max_voxels: int = MAX_VOXELS, *, grid_spacing=None) -> Volume:
    """Load a 3-D NIfTI (scl_slope/inter applied, spatial units turned into mm) with every check of a bad input.

    `grid_spacing`: the spacing (mm) the volume will be resampled to; its grid is held to MAX_GRID_VOXELS.
    Every size is checked on the header before a voxel is read; header extensions are never read.
    Raises VolumeError (one line naming the file and the problem); warns (VolumeWarning)
    on valid but odd inputs.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file")
    if path.is_dir():
        raise VolumeError(path, "is a folder, not a NIfTI file")
    if not stat.S_ISREG(path.stat().st_mode):
        raise VolumeError(path, "not a regular file (a device, pipe or socket)")
    if not os.access(path, os.R_OK):
        raise VolumeError(path, "not readable (permission denied)")
    if path.stat().st_size == 0:
        raise VolumeError(path, "empty file")
    header = _read_header(path)
    _check_data_size(path, header)
    try:
        affine = header.get_best_affine()
    except (HeaderDataError, ValueError) as e:
        raise VolumeError(path, f"invalid affine in the header ({_first_line(e)})") from None
    if path.suffix.lower() != ".gz":
        return _volume(path, ArrayProxy(str(path), header), affine, header, max_voxels, grid_spacing)
    stream = _block_mean_stream(path, header, affine, max_voxels, grid_spacing)
    dataobj, pooled = _gz_voxels(path, header, stream)
    vol = _volume(path, dataobj, affine, header, max_voxels, grid_spacing)
    if pooled is not None and vol.array is dataobj:
        vol.pooled = (vol.array, tuple(float(g) for g in grid_spacing), pooled)
    return vol


GZ_PIECE_BYTES = 1 << 20
"""Compressed bytes inflated at a time, each piece then stored and its blocks summed on a second thread."""


def _gz_voxels(path: Path, header, stream=None) -> tuple[np.ndarray, tuple | None]:
    """The voxels of a .nii.gz in one pass: the file read whole, decompressed by accel.gunzip
    (ISA-L where installed, about 2x zlib) no further than the voxels end, and viewed in place
    (F order, as stored: no copy). Scaling as nibabel's ArrayProxy applies it. Read-only.

    With `stream` (array -> BlockMeanStream, from _block_mean_stream) the file inflates in
    pieces while a second thread stores each piece and sums the blocks it completes: the block
    mean resample needs is ready when the last piece is (returned second; else None)."""
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    offset = int(header.get_data_offset())
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize
    pooled = None
    try:
        data = path.read_bytes()
        if stream is None:
            raw = accel.gunzip(data, need)
            have = len(raw)
            array = np.frombuffer(raw, dtype, count, offset).reshape(shape, order="F") if have >= need else None
        else:
            buffer = np.empty(need, np.uint8)
            array = buffer[offset:].view(dtype).reshape(shape, order="F")
            blocks = stream(array)
            have = _inflate_into(buffer, data, blocks, offset)
            array.flags.writeable = False
            if have >= need:
                pooled = blocks.result()
    except (OSError, ValueError) as e:
        raise VolumeError(path, f"corrupt or truncated data ({_first_line(e)})") from None
    if have < need:
        have = max(0, have - offset)
        raise VolumeError(path, f"corrupt or truncated data (voxels end after {have:,} of {need - offset:,} bytes)")
    slope, inter = header.get_slope_inter()
    return apply_read_scaling(array, slope, inter), pooled


def _inflate_into(buffer: np.ndarray, data, blocks, voxels_at: int) -> int:
    """Inflate gzip `data` into `buffer` (at most its size); a second thread stores the pieces and
    tells `blocks` (a BlockMeanStream) how far the voxels (from byte `voxels_at`) are.
    Returns the bytes inflated."""
    from concurrent.futures import ThreadPoolExecutor

    def store(at: int, piece: bytes) -> None:
        buffer[at : at + len(piece)] = np.frombuffer(piece, np.uint8)
        blocks.filled(at + len(piece) - voxels_at)

    at = 0
    with ThreadPoolExecutor(1, thread_name_prefix="liverkd-inflate") as worker:
        jobs = []
        for piece in accel.gunzip_chunks(data, buffer.size, GZ_PIECE_BYTES):
            jobs.append(worker.submit(store, at, piece))
            at += len(piece)
        for job in jobs:
            job.result()
    return at


def _block_mean_stream(path, header, affine, max_voxels: int, grid_spacing):
    """For load: `array -> BlockMeanStream` of the array's canonical view at `grid_spacing`, or None
    where that is not needed (no grid spacing, no downsampling, the plain path) or the voxels are
    not used as stored (4-D, scaled). The geometry is checked here, before a voxel is read."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if grid_spacing is None or accel.is_plain() or len(shape) != 3:
        return None
    slope, inter = header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return None
    affine_mm, _ = _affine_in_mm(path, affine, header)
    check_geometry(path, shape, affine_mm, max_voxels=max_voxels, grid_spacing=grid_spacing)
    axes = nib.orientations.io_orientation(affine_mm)[:, 0].astype(int)  # input axis -> canonical axis
    step = np.asarray(grid_spacing, dtype=np.float64)[axes] / np.asarray(spacing_of(affine_mm))
    if np.all(np.floor(step) <= 1):
        return None  # no blocks to sum (a 3 mm CT): one plain inflate, no second thread

    def start(array: np.ndarray):
        view, canonical_affine, _ = to_canonical(array, affine_mm)
        return BlockMeanStream(
            view, np.asarray(grid_spacing, dtype=np.float64) / np.asarray(spacing_of(canonical_affine))
        )

    return start


def _read_header(path: Path) -> nib.Nifti1Header:
    """The NIfTI-1 or -2 header, checked and fixed as nibabel does, and nothing after it: its extensions
    are never read (they can be any size, they can carry patient data, and no output keeps them)."""
    try:
        with ImageOpener(str(path)) as f:
            block = f.read(540)
    except gzip.BadGzipFile:
        raise VolumeError(path, "not a NIfTI image (not a gzip file, though named .gz)") from None
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise VolumeError(path, f"corrupt or truncated file ({_first_line(e)})") from None
    klass = _HEADER_CLASSES.get(int.from_bytes(block[:4], "little")) or _HEADER_CLASSES.get(
        int.from_bytes(block[:4], "big")
    )
    if klass is None:
        raise VolumeError(path, "not a NIfTI image (no NIfTI-1 or NIfTI-2 header)")
    if len(block) < klass.template_dtype.itemsize:
        raise VolumeError(path, f"truncated: the file ends inside its header ({len(block)} bytes)")
    try:
        header = klass(block[: klass.template_dtype.itemsize], check=False)
        header.check_fix(logger=_HEADER_FIXES, error_level=40)
        dtype = header.get_data_dtype()
        header.get_data_offset()  # an int: not NaN or infinite
    except (HeaderDataError, KeyError, ValueError, OverflowError) as e:
        raise VolumeError(path, f"invalid NIfTI header ({_first_line(e)})") from None
    if not _is_supported(dtype):
        raise VolumeError(path, f"unsupported voxel type {dtype} (datatype {int(header['datatype'])})")
    return header


def _is_supported(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind in "iub" or (dtype.kind == "f" and dtype.itemsize <= 8)


def _check_data_size(path: Path, header) -> None:
    """Refuse a header that claims more voxel data than the file can hold, or than MAX_DATA_BYTES,
    before nibabel allocates a buffer of the claimed size (a 100-byte file must not cost gigabytes)."""
    n_bytes = float(np.prod(header.get_data_shape(), dtype=np.float64)) * header.get_data_dtype().itemsize
    need = header.get_data_offset() + n_bytes
    size = path.stat().st_size
    ratio = COMPRESSION_MAX_RATIO.get(path.suffix.lower(), 1)
    claim = f"header claims {n_bytes:,.0f} bytes of voxels" if n_bytes < 1e15 else f"header claims {n_bytes:.3g} bytes"
    if need > MAX_DATA_BYTES:
        raise VolumeError(path, f"{claim}, over the limit of {MAX_DATA_BYTES:,}")
    if ratio == 1 and need > size:
        raise VolumeError(path, f"truncated: {claim}, the file has {size:,} in all")
    if ratio is not None and need > ratio * size:
        raise VolumeError(path, f"{claim}, more than a {size:,}-byte {path.suffix} file holds")


def from_image(img, path="<image>", max_voxels: int = MAX_VOXELS, *, grid_spacing=None) -> Volume:
    """Validate an in-memory nibabel image and turn it into a Volume (see load)."""
    return _volume(path, img.dataobj, img.affine, img.header, max_voxels, grid_spacing)


def _volume(path, dataobj, affine, header, max_voxels: int, grid_spacing) -> Volume:
    """Check the geometry (before reading a voxel), read the voxels, check them."""
    notes: list[str] = []
    shape = tuple(int(s) for s in dataobj.shape)
    affine, unit = _affine_in_mm(path, affine, header)
    check_geometry(path, shape, affine, max_voxels=max_voxels, grid_spacing=grid_spacing)
    try:
        if len(shape) > 3:
            extra = int(np.prod(shape[3:]))
            _warn(notes, path, f"{len(shape)}-D image with {extra} volumes; using the first")
            array = np.asarray(dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
        else:
            array = np.asarray(dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise VolumeError(path, f"corrupt or truncated data ({_first_line(e)})") from None
    if not _is_supported(array.dtype):
        raise VolumeError(path, f"unsupported voxel type {array.dtype}")
    _check_values(path, array)
    if is_oblique(affine):
        _warn(notes, path, "oblique affine; axes are taken as the closest canonical ones")
    header = header.copy() if isinstance(header, nib.Nifti1Header) else None
    if header is not None and unit != 1.0:
        header["xyzt_units"] = (int(header["xyzt_units"]) & ~7) | 2  # the affine is in mm now; time units kept
    return Volume(array=array, affine=affine, header=header, path=str(path), warnings=notes)


def _affine_in_mm(path, affine, header) -> tuple[np.ndarray, float]:
    """The affine in millimetres (NIfTI headers may say metres or micrometres in xyzt_units), and the factor."""
    if affine is None:
        raise VolumeError(path, "no affine (voxel positions unknown)")
    affine = np.asarray(affine, dtype=np.float64)
    if not isinstance(header, nib.Nifti1Header):
        return affine, 1.0
    code = int(header["xyzt_units"]) & 7
    if code not in MM_PER_UNIT:
        raise VolumeError(path, f"unknown spatial unit code {code} in xyzt_units")
    return np.diag([MM_PER_UNIT[code]] * 3 + [1.0]) @ affine, MM_PER_UNIT[code]


def check_geometry(path, shape, affine, *, max_voxels: int = MAX_VOXELS, grid_spacing=None) -> None:
    """Refuse, before any voxel is read, a volume that is not 3-D, is too large (MAX_VOXELS, and
    MAX_GRID_VOXELS once resampled to `grid_spacing`), has no usable affine or absurd voxel sizes."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise VolumeError(path, f"zero-sized axis in shape {shape}" if 0 in shape else f"negative size in {shape}")
    extent = sum(s > 1 for s in shape[:3])
    if extent < 3:
        what = ("a single voxel", "1-D line of voxels", "2-D image")[extent]
        raise VolumeError(path, f"{what} (shape {shape}); a 3-D volume is needed")
    n_vox = int(np.prod(shape[:3], dtype=np.int64))
    if n_vox > max_voxels:
        raise VolumeError(path, f"header claims {shape[:3]} = {n_vox:,} voxels, over the limit of {max_voxels:,}")
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "invalid affine (singular or not finite)")
    spacing = spacing_of(affine)
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= s <= hi for s in spacing):
        sizes = " x ".join(f"{s:.3g}" for s in spacing)
        raise VolumeError(path, f"voxel size {sizes} mm is outside {lo}..{hi} mm: check pixdim and xyzt_units")
    if grid_spacing is not None:
        axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # input axis -> canonical axis
        grid = resampled_shape(shape[:3], spacing, np.asarray(grid_spacing, dtype=np.float64)[axes])
        n_grid = int(np.prod(grid, dtype=np.int64))
        if n_grid > MAX_GRID_VOXELS:
            where = f"resampled to {tuple(grid_spacing)} mm it is {grid} = {n_grid:,} voxels"
            raise VolumeError(path, f"{where}, over the limit of {MAX_GRID_VOXELS:,}")


def _check_values(path, array: np.ndarray) -> None:
    """Float voxels must be finite and within MAX_ABS_VALUE (min and max: no copy of the array)."""
    if array.dtype.kind != "f":
        return
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise VolumeError(path, f"{bad:,} NaN or infinite voxels")
    if max(-lo, hi) > MAX_ABS_VALUE:
        raise VolumeError(path, f"voxel values {lo:.3g}..{hi:.3g}: beyond +-{MAX_ABS_VALUE:.0e}, not CT intensities")


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    rot = np.asarray(affine)[:3, :3] / np.array(spacing_of(affine))
    return bool(np.any((np.abs(rot) > tol) & (np.abs(rot) < 1 - tol)))


def to_nifti(array: np.ndarray, affine: np.ndarray, header=None) -> nib.Nifti1Image:
    """A NIfTI image with the reference header's qform/sform codes and exactly `affine`, and nothing of
    the reference that can carry patient data (see without_private_fields)."""
    header = without_private_fields(header) if header is not None else None
    img = nib.Nifti1Image(array, affine, header=header)
    # A header that already describes `affine` is kept verbatim: recomputing its quaternion
    # from the affine would add float noise to the qform of an input we mean to copy.
    if header is not None and not np.array_equal(header.get_best_affine(), affine):
        qcode = int(header["qform_code"])
        scode = int(header["sform_code"])
        img.set_qform(affine, code=qcode)
        img.set_sform(affine, code=scode)
    img.header.set_data_dtype(array.dtype)
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    return img


FREE_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "data_type")


def without_private_fields(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """A copy of `header` without its extensions (a DICOM extension holds the patient's name, birth date,
    ...), its free-text fields and its intent: an output copies the input's geometry, nothing else."""
    header = header.copy()
    header.extensions.clear()
    for name in FREE_TEXT_FIELDS:
        if name in header.keys():
            header[name] = b""
    header.set_intent("none")
    header.set_data_offset(header.single_vox_offset)  # no extensions left to skip
    return header


MASK_GZIP_LEVEL = 1
"""gzip level of what liverkd writes: a mask compresses ~30x even at level 1, and level 1 is
what nibabel uses by default too."""


def save(img: nib.Nifti1Image, path, *, level: int = MASK_GZIP_LEVEL) -> Path:
    """Write atomically: temp file in the target folder, fsync, then rename. A .nii.gz is
    serialised once in memory (F order, as NIfTI stores it) and compressed by accel.gzip_compress
    (ISA-L where installed: ~10x zlib on a mask); other suffixes go through nibabel."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise VolumeError(path, f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise VolumeError(path, f"output folder {folder} is not writable")
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() in COMPRESSION_MAX_RATIO else path.suffix
    with atomic_path(path, suffix=suffix or ".nii.gz") as tmp:
        if path.name.lower().endswith(".nii.gz"):
            Path(tmp).write_bytes(accel.gzip_compress([img.to_bytes()], level))
        else:
            nib.save(img, tmp)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How an array was turned to canonical RAS, so it can be turned back."""

    ornt: np.ndarray  # nibabel orientation transform, original -> RAS
    shape: tuple[int, int, int]
    affine: np.ndarray


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Orientation]:
    """Reorder/flip axes to RAS (closest canonical for oblique affines). No resampling, and no
    copy: the result is a view (strided, maybe negatively) that resample reads in memory order."""
    start = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    ornt = nib.orientations.ornt_transform(start, ras)
    out = _apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return out, new_affine, Orientation(ornt, tuple(array.shape[:3]), affine)


def _apply_orientation(array, ornt):
    """nibabel's apply_orientation as views (flips, then a transpose), for numpy and CuPy alike."""
    out = array
    for axis, flip in enumerate(np.asarray(ornt)[:, 1]):
        if flip == -1:
            out = out[(slice(None),) * axis + (slice(None, None, -1),)]
    order = list(range(out.ndim))
    order[: len(ornt)] = np.argsort(np.asarray(ornt)[:, 0]).tolist()
    return out.transpose(order)


def from_canonical(array: np.ndarray, orientation: Orientation, *, flipped: bool = False) -> np.ndarray:
    """Inverse of to_canonical: an array back in the original axis order, as a copy in the
    array's own memory order (an F-order mask stays F order: NIfTI's, written without a transpose).

    `flipped`: the array already has the flips of canonical_flips(orientation) (resample_mask
    wrote it that way); only the axes are put back in order, and a contiguous result is not copied."""
    back = _back_ornt(orientation)
    if flipped:
        back = back.copy()
        back[:, 1] = 1
    out = _apply_orientation(array, back)
    if out.shape[:3] != orientation.shape:
        raise AssertionError(f"orientation round trip gave {out.shape}, expected {orientation.shape}")
    if flipped and (out.flags.f_contiguous or out.flags.c_contiguous):
        return out
    return out.copy(order="K")


def canonical_flips(orientation: Orientation) -> tuple[bool, bool, bool]:
    """Which canonical axes from_canonical reverses on the way back to the input's orientation."""
    return tuple(bool(f == -1) for f in _back_ornt(orientation)[:, 1])


def _back_ornt(orientation: Orientation) -> np.ndarray:
    return nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(orientation.affine)
    )


# ---------------------------------------------------------------- resampling


def resampled_shape(shape, spacing, new_spacing) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


GAUSS_TRUNCATE = 4.0
"""Anti-aliasing kernels reach this many sigmas (scipy's default); radius int(4 sigma + 0.5)."""


def resample(
    array: np.ndarray,
    spacing,
    new_spacing,
    *,
    label: bool = False,
    out_shape=None,
    dtype=np.float32,
    pooled=None,
) -> np.ndarray:
    """Resample to `new_spacing`, voxel (0,0,0) staying where it is.

    Linear for images (Gaussian anti-aliasing along axes that shrink), nearest for labels.
    Passing the original shape and spacing back gives the exact inverse geometry.
    `pooled`: `_block_mean(array, ...)`'s result when it is already known (Volume.block_mean_for).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    new_spacing = np.asarray(new_spacing, dtype=np.float64)
    if out_shape is None:
        out_shape = resampled_shape(array.shape, spacing, new_spacing)
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(array.shape) == out_shape and np.allclose(spacing, new_spacing):
        return array.astype(dtype if not label else array.dtype, copy=False)
    step = new_spacing / spacing  # source voxels per target voxel
    if label:
        return _nearest(array, step, out_shape)
    src, step, offset = pooled if pooled is not None else _block_mean(array, step)
    nd = xp.ndimage_of(src)
    sigma = np.where(step > 1, (step - 1) / 2, 0)
    sigma[np.floor(GAUSS_TRUNCATE * sigma + 0.5) < 1] = 0  # a kernel of radius 0 is [1.0]: skip the pass
    if np.any(sigma > 0):
        src = nd.gaussian_filter(src, sigma=tuple(sigma), mode="nearest", truncate=GAUSS_TRUNCATE)
    out = xp.of(src).empty(out_shape, dtype=dtype)
    nd.affine_transform(src, xp.like(step, src), offset=tuple(offset), output_shape=out_shape, output=out, order=1,
                        mode="nearest", prefilter=False)  # fmt: skip
    return out


def resample_mask(grid: np.ndarray, spacing, new_spacing, out_shape, threshold: float, *, flip=None) -> np.ndarray:
    """`resample(grid, spacing, new_spacing, out_shape=out_shape) > threshold` as uint8, with the
    interpolation computed only where it decides something.

    Upsampling (every axis finer) is trilinear, so an output voxel is a convex combination of
    the 8 grid values around it: where all 8 are above the threshold it is above, where none
    is it is not. Only voxels in cells that straddle the threshold (the liver's surface, a few
    per cent of a CT) are interpolated; the others are looked up per cell. Same mask, several
    times faster and without a full-size float array. Downsampling axes (thicker slices than
    the grid) and the plain path (accel.plain) resample everything.

    The mask comes out in F order, NIfTI's own: computed on the transposed grid (a view).
    `flip` (one bool per axis): the mask comes out reversed along those axes, written that way
    rather than copied afterwards (from_canonical(..., flipped=True) then only reorders axes)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    step = np.asarray(new_spacing, dtype=np.float64) / spacing
    flip = tuple(bool(f) for f in (flip or (False, False, False)))
    same_grid = tuple(grid.shape) == tuple(out_shape) and np.allclose(step, 1.0)
    if accel.is_plain() or same_grid or np.any(step > 1) or min(grid.shape) < 2:
        out = (resample(grid, spacing, new_spacing, out_shape=out_shape) > threshold).view(np.uint8)
        for axis in (a for a in range(3) if flip[a]):
            out = out[(slice(None),) * axis + (slice(None, None, -1),)]
        return out
    return _threshold_upsampled(grid.T, step[::-1], tuple(int(n) for n in out_shape)[::-1], threshold, flip[::-1]).T


def _threshold_upsampled(grid: np.ndarray, step, out_shape, threshold: float, flip) -> np.ndarray:
    """resample_mask's fast path for an upsampling `step` (target voxel i at source coordinate i*step;
    along a `flip` axis, stored at n - 1 - i)."""
    a = xp.of(grid)
    grid = grid.astype(np.float32, copy=False)
    above = grid > threshold
    corners = [above[p : p + above.shape[0] - 1, q : q + above.shape[1] - 1, r : r + above.shape[2] - 1]
               for p in (0, 1) for q in (0, 1) for r in (0, 1)]  # fmt: skip
    every, some = corners[0].copy(), corners[0].copy()
    for corner in corners[1:]:
        every &= corner
        some |= corner
    # Per axis: the cell (between grid voxels c and c+1) each target voxel falls in, and where in
    # it (0..1; beyond the last grid voxel 1, as mode="nearest" clamps).
    coord = [np.arange(n) * st for n, st in zip(out_shape, step)]
    cell = [np.minimum(np.floor(x).astype(np.intp), m - 2) for x, m in zip(coord, grid.shape)]
    frac = [xp.like(np.minimum(x - c, 1.0), grid) for x, c in zip(coord, cell)]
    out = every.view(np.uint8)
    for axis in (2, 0, 1):  # the innermost axis first, while the array is small: then whole rows copy
        out = out.take(xp.like(cell[axis][::-1] if flip[axis] else cell[axis], grid), axis=axis)
    # Each straddling cell's target voxels are a box (cells rise monotonically along each axis):
    # first[axis][c] .. first[axis][c] + count[axis][c]. Cells with the same box size are done
    # together, their boxes broadcast; the trilinear value is three lerps, one axis at a time.
    first = [np.searchsorted(c, np.arange(m - 1), "left") for c, m in zip(cell, grid.shape)]
    count = [np.searchsorted(c, np.arange(m - 1), "right") - f for c, f, m in zip(cell, first, grid.shape)]
    s = a.nonzero(some & ~every)
    sizes = [xp.like(n, grid)[s[axis]] for axis, n in enumerate(count)]
    top = max(int(n.max()) for n in count) + 1
    key = (sizes[0] * top + sizes[1]) * top + sizes[2]
    for k in xp.to_host(a.unique(key)).tolist():
        shape = (k // (top * top), k // top % top, k % top)
        pick = a.nonzero(key == k)[0]
        c = [s[axis][pick] for axis in range(3)]
        index = []
        for axis, n in enumerate(shape):
            along = [1, 1, 1]
            along[axis] = n
            start = xp.like(first[axis], grid)[c[axis]]
            index.append((start[:, None] + a.arange(n)[None]).reshape(-1, *along))
        f = [frac[axis][index[axis]] for axis in range(3)]
        # float64, as scipy interpolates: the fast and plain masks then differ at most where a
        # value is within ~1e-15 of the threshold
        v = [[[grid[c[0] + p, c[1] + q, c[2] + r].astype(np.float64).reshape(-1, 1, 1, 1) for r in (0, 1)]
              for q in (0, 1)] for p in (0, 1)]  # fmt: skip
        e = [[v[p][q][0] + (v[p][q][1] - v[p][q][0]) * f[2] for q in (0, 1)] for p in (0, 1)]
        d = [e[p][0] + (e[p][1] - e[p][0]) * f[1] for p in (0, 1)]
        at = [out_shape[axis] - 1 - index[axis] if flip[axis] else index[axis] for axis in range(3)]
        out[at[0], at[1], at[2]] = d[0] + (d[1] - d[0]) * f[0] > threshold
    return out


def _nearest(array: np.ndarray, step, out_shape) -> np.ndarray:
    """Nearest-neighbour resampling of an axis-aligned grid: one index per axis, no 3-D interpolation."""
    out = array
    for axis, (n_in, n_out, st) in enumerate(zip(array.shape, out_shape, step)):
        index = np.clip(np.floor(np.arange(n_out) * st + 0.5).astype(np.intp), 0, n_in - 1)
        out = out.take(xp.like(index, out), axis=axis)
    return xp.of(out).ascontiguousarray(out)


def _block_mean(array: np.ndarray, step):
    """Average k x k x k blocks (k = whole source voxels per target voxel, per axis) as float32.

    A box filter is the bulk of the anti-aliasing a large downsampling needs, and it shrinks
    the volume before the Gaussian and the interpolation run. Returns the pooled array and the
    step and offset that map target voxels into it.

    The blocks are summed in the array's memory order, whatever view `array` is (to_canonical's
    flips and transposes of nibabel's F-order voxels): one strided add per block offset along
    the fastest axis first, so nothing is copied to C order first (on a 512x512x129 CT this is
    the difference between ~40 ms and ~300 ms). Blocks start at index 0 of each axis of `array`;
    a last partial block is left out (voxels at the edge of the field of view: interpolation
    clamps to the nearest whole block).
    """
    plan = _BlockPlan(array, step)
    if plan.identity:
        return array.astype(np.float32, copy=False), step, np.zeros(3)
    return plan.finish([plan.blocks(0, plan.n_blocks)])


class _BlockPlan:
    """_block_mean of `array` in pieces: blocks along the slowest memory axis can be summed as soon
    as their voxels are there (BlockMeanStream, while a file inflates); `finish` joins them."""

    def __init__(self, array: np.ndarray, step):
        self.step = np.asarray(step, dtype=np.float64)
        # At most the axis' length: a 50-voxel axis at 0.006 mm going to 3 mm must not be padded to 500 voxels.
        self.k = np.clip(np.floor(self.step).astype(int), 1, array.shape)
        self.identity = bool(np.all(self.k == 1))
        self.view, self.order, self.flipped = _memory_order(array)
        self.kk = [int(self.k[self.order[axis]]) for axis in range(3)]  # per view axis
        # block 0 of `array` is at the end of a flipped view axis: blocks start `first` voxels in
        self.first = [n % kk if flip else 0 for n, kk, flip in zip(self.view.shape, self.kk, self.flipped)]
        self.n_blocks = (self.view.shape[0] - self.first[0]) // self.kk[0]

    def rows_for(self, blocks: int) -> int:
        """Rows of the view's slowest axis that `blocks` whole blocks take."""
        return self.first[0] + blocks * self.kk[0]

    def blocks(self, b0: int, b1: int) -> np.ndarray:
        """Sums (float32) of blocks b0..b1 along the slowest memory axis, in the view's axis order."""
        pooled = self.view[self.rows_for(b0) : self.rows_for(b1)]
        first = [0, *self.first[1:]]
        for axis in sorted(range(3), key=lambda a: abs(self.view.strides[a])):  # fastest first
            kk = self.kk[axis]
            if kk == 1:
                continue
            stop = first[axis] + ((pooled.shape[axis] - first[axis]) // kk) * kk
            take = [slice(None)] * 3
            take[axis] = slice(first[axis], stop, kk)
            acc = pooled[tuple(take)].astype(np.float32)
            for i in range(1, kk):
                take[axis] = slice(first[axis] + i, stop, kk)
                acc += pooled[tuple(take)]
            pooled = acc
        return pooled

    def finish(self, parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block sums of all blocks, in order -> _block_mean's (pooled, step, offset)."""
        pooled = parts[0] if len(parts) == 1 else xp.of(parts[0]).concatenate(parts, axis=0)
        pooled = pooled.astype(np.float32, copy=False) * np.float32(1.0 / np.prod(self.k))
        # Back to the caller's axis order and directions (a view of the small pooled array).
        for axis in range(3):
            if self.flipped[axis]:
                pooled = pooled[(slice(None),) * axis + (slice(None, None, -1),)]
        pooled = xp.of(pooled).ascontiguousarray(pooled.transpose(np.argsort(self.order).tolist()))
        # pooled voxel j is centred on source index j*k + (k-1)/2
        return pooled, self.step / self.k, -(self.k - 1) / (2 * self.k)


class BlockMeanStream:
    """_block_mean of an array that is being filled in memory order (a .nii.gz inflating):
    `filled(n)` after the first n bytes of its memory are written sums the blocks those bytes
    complete; `result()` is then _block_mean's result, the same bytes. One thread may fill the
    array while another calls `filled` (numpy and ISA-L release the GIL)."""

    def __init__(self, array: np.ndarray, step):
        self.plan = _BlockPlan(array, step)
        self.row_bytes = self.plan.view[0].nbytes if self.plan.view.size else 1
        self.parts: list[np.ndarray] = []
        self.done = 0

    def filled(self, n_bytes: int) -> None:
        blocks = min(self.plan.n_blocks, max(0, (n_bytes // self.row_bytes - self.plan.first[0]) // self.plan.kk[0]))
        if blocks > self.done:
            self.parts.append(self.plan.blocks(self.done, blocks))
            self.done = blocks

    def result(self):
        if self.done != self.plan.n_blocks:
            raise AssertionError(f"block mean of {self.done} of {self.plan.n_blocks} blocks")
        return self.plan.finish(self.parts)


def _memory_order(array: np.ndarray):
    """A view of `array` whose axes are in decreasing stride order with positive strides, the
    axis of `array` each view axis is (order), and which view axes were flipped."""
    order = sorted(range(3), key=lambda a: -abs(array.strides[a]))
    view = array.transpose(order)
    flipped = [view.strides[a] < 0 for a in range(3)]
    for axis in range(3):
        if flipped[axis]:
            view = view[(slice(None),) * axis + (slice(None, None, -1),)]
    return view, order, flipped


def scaled_affine(affine: np.ndarray, spacing, new_spacing) -> np.ndarray:
    """Affine of a volume resampled by `resample` (same origin, new voxel size)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] * (np.asarray(new_spacing) / np.asarray(spacing))
    return out


# ---------------------------------------------------------------- intensities


def hu_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and scale to [0, 1] as float32."""
    lo, hi = window
    out = xp.of(array).clip(array.astype(np.float32, copy=False), lo, hi)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def looks_like_ct(array: np.ndarray) -> tuple[bool, str]:
    """Heuristic: CT in HU has air near -1000 and soft tissue around 0..100."""
    sample = array[::4, ::4, ::4] if array.size > 1_000_000 else array
    p1, p50 = np.percentile(sample, [1, 50])
    if p1 > -500:
        return False, f"intensities do not look like CT in HU (1st percentile {p1:.0f}, no air near -1000)"
    if p50 > 3000:
        return False, f"intensities do not look like CT in HU (median {p50:.0f})"
    return True, ""


# ---------------------------------------------------------------- crop / pad


@dataclass(frozen=True)
class CropPad:
    """Where an array of `source_shape` was cut from / placed into an array of `target_shape`."""

    source_shape: tuple[int, int, int]
    target_shape: tuple[int, int, int]
    src_start: tuple[int, int, int]
    dst_start: tuple[int, int, int]
    size: tuple[int, int, int]

    def src_slices(self):
        return tuple(slice(a, a + n) for a, n in zip(self.src_start, self.size))

    def dst_slices(self):
        return tuple(slice(a, a + n) for a, n in zip(self.dst_start, self.size))


def plan_crop_pad(source_shape, target_shape, center=None) -> CropPad:
    """Centre (or `center`, in source voxels) the target box on the source."""
    source_shape = tuple(int(s) for s in source_shape)
    target_shape = tuple(int(s) for s in target_shape)
    if center is None:
        center = [s / 2 for s in source_shape]
    src_start, dst_start, size = [], [], []
    for n, t, c in zip(source_shape, target_shape, center):
        if n >= t:  # crop: a window of t inside n
            a = int(round(c - t / 2))
            a = min(max(a, 0), n - t)
            src_start.append(a)
            dst_start.append(0)
            size.append(t)
        else:  # pad: all of n placed in the middle of t
            src_start.append(0)
            dst_start.append((t - n) // 2)
            size.append(n)
    return CropPad(source_shape, target_shape, tuple(src_start), tuple(dst_start), tuple(size))


def crop_pad(array: np.ndarray, plan: CropPad, fill=0) -> np.ndarray:
    out = xp.of(array).full(plan.target_shape, fill, dtype=array.dtype)
    out[plan.dst_slices()] = array[plan.src_slices()]
    return out


def uncrop_pad(array: np.ndarray, plan: CropPad, fill=0) -> np.ndarray:
    """Inverse of crop_pad: back to source_shape; voxels outside the box get `fill`."""
    out = xp.of(array).full(plan.source_shape + tuple(array.shape[3:]), fill, dtype=array.dtype)
    out[plan.src_slices()] = array[plan.dst_slices()]
    return out
