"""Volume = array + affine (+ the NIfTI header it came with), and the geometric steps
a volume goes through: canonical orientation, resampling, HU window, crop/pad.

Every step has its inverse here, so a mask mapped back lands on exactly the input's
shape and affine.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from liverkd.core.atomic import atomic_path
from liverkd.core.errors import LiverkdError

MAX_VOXELS = 2_000_000_000
"""Refuse headers that claim more voxels than this (2e9 voxels = 8 GB as float32)."""


class VolumeError(LiverkdError, ValueError):
    """Bad input volume. str() is one line: '<path>: <problem>'."""

    def __init__(self, path, problem: str):
        super().__init__(path, problem)


class VolumeWarning(UserWarning):
    """Valid but odd input (4-D, oblique, not CT-like, ...)."""


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: str | None = None
    warnings: list[str] = field(default_factory=list)

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


def load(path, max_voxels: int = MAX_VOXELS) -> Volume:
    """Load a 3-D NIfTI (scl_slope/inter applied) with every check of a bad input.

    Raises VolumeError (one line naming the file and the problem); warns (VolumeWarning)
    on valid but odd inputs.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file")
    if path.is_dir():
        raise VolumeError(path, "is a folder, not a NIfTI file")
    if not os.access(path, os.R_OK):
        raise VolumeError(path, "not readable (permission denied)")
    if path.stat().st_size == 0:
        raise VolumeError(path, "empty file")
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, ValueError) as e:
        raise VolumeError(path, f"not a NIfTI image ({_first_line(e)})") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise VolumeError(path, f"corrupt or truncated file ({_first_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
    _check_data_size(path, img)
    return from_image(img, path, max_voxels=max_voxels)


GZIP_MAX_RATIO = 1100
"""Deflate cannot expand data by more than ~1032x, so a .nii.gz of N bytes holds at most this * N."""


def _check_data_size(path: Path, img) -> None:
    """Refuse a header that claims more voxel data than the file can hold, before nibabel
    allocates a buffer of the claimed size (a 100-byte file must not cost gigabytes)."""
    n_bytes = int(np.prod(img.shape, dtype=np.float64)) * img.header.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        if n_bytes > GZIP_MAX_RATIO * size:
            raise VolumeError(path, f"header claims {n_bytes:,} bytes of voxels, more than a {size:,}-byte gzip holds")
    elif size < int(img.header.get_data_offset()) + n_bytes:
        raise VolumeError(path, f"truncated: header claims {n_bytes:,} bytes of voxels, the file has {size:,} in all")


def from_image(img, path="<image>", max_voxels: int = MAX_VOXELS) -> Volume:
    """Validate an in-memory nibabel image and turn it into a Volume."""
    notes: list[str] = []
    shape = tuple(int(s) for s in img.shape)
    if any(s == 0 for s in shape):
        raise VolumeError(path, f"zero-sized axis in shape {shape}")
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 3:
        raise VolumeError(path, f"2-D image (shape {shape}); a 3-D volume is needed")
    n_vox = int(np.prod(shape[:3], dtype=np.int64))
    if n_vox > max_voxels:
        raise VolumeError(path, f"header claims {shape[:3]} = {n_vox:,} voxels, over the limit of {max_voxels:,}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "invalid affine (singular or not finite)")
    try:
        if len(shape) > 3:
            extra = int(np.prod(shape[3:]))
            _warn(notes, path, f"{len(shape)}-D image with {extra} volumes; using the first")
            index = (slice(None),) * 3 + (0,) * (len(shape) - 3)
            array = np.asarray(img.dataobj[index])
        else:
            array = np.asarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise VolumeError(path, f"corrupt or truncated data ({_first_line(e)})") from None
    if array.dtype.kind not in "iufb":
        raise VolumeError(path, f"unsupported voxel type {array.dtype}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise VolumeError(path, f"{bad:,} NaN or infinite voxels")
    if is_oblique(affine):
        _warn(notes, path, "oblique affine; axes are taken as the closest canonical ones")
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    return Volume(array=array, affine=affine, header=header, path=str(path), warnings=notes)


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    rot = np.asarray(affine)[:3, :3] / np.array(spacing_of(affine))
    return bool(np.any((np.abs(rot) > tol) & (np.abs(rot) < 1 - tol)))


def to_nifti(array: np.ndarray, affine: np.ndarray, header=None) -> nib.Nifti1Image:
    """A NIfTI image with the reference header's qform/sform codes and exactly `affine`."""
    img = nib.Nifti1Image(array, affine, header=header.copy() if header is not None else None)
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


def save(img: nib.Nifti1Image, path) -> Path:
    """Write atomically: temp file in the target folder, fsync, then rename."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise VolumeError(path, f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise VolumeError(path, f"output folder {folder} is not writable")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix or ".nii.gz"
    with atomic_path(path, suffix=suffix) as tmp:
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
    """Reorder/flip axes to RAS (closest canonical for oblique affines). No resampling."""
    start = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    ornt = nib.orientations.ornt_transform(start, ras)
    out = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return np.ascontiguousarray(out), new_affine, Orientation(ornt, tuple(array.shape[:3]), affine)


def from_canonical(array: np.ndarray, orientation: Orientation) -> np.ndarray:
    """Inverse of to_canonical: an array back in the original axis order."""
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(orientation.affine)
    )
    out = nib.orientations.apply_orientation(array, back)
    if out.shape[:3] != orientation.shape:
        raise AssertionError(f"orientation round trip gave {out.shape}, expected {orientation.shape}")
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------- resampling


def resampled_shape(shape, spacing, new_spacing) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample(
    array: np.ndarray,
    spacing,
    new_spacing,
    *,
    label: bool = False,
    out_shape=None,
    dtype=np.float32,
) -> np.ndarray:
    """Resample to `new_spacing`, voxel (0,0,0) staying where it is.

    Linear for images (Gaussian anti-aliasing along axes that shrink), nearest for labels.
    Passing the original shape and spacing back gives the exact inverse geometry.
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
    src, step, offset = _block_mean(array, step)
    sigma = np.where(step > 1, (step - 1) / 2, 0)
    if np.any(sigma > 0):
        src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    out = np.empty(out_shape, dtype=dtype)
    ndimage.affine_transform(
        src, step, offset=offset, output_shape=out_shape, output=out, order=1, mode="nearest", prefilter=False
    )
    return out


def _nearest(array: np.ndarray, step, out_shape) -> np.ndarray:
    """Nearest-neighbour resampling of an axis-aligned grid: one index per axis, no 3-D interpolation."""
    out = array
    for axis, (n_in, n_out, st) in enumerate(zip(array.shape, out_shape, step)):
        index = np.clip(np.floor(np.arange(n_out) * st + 0.5).astype(np.intp), 0, n_in - 1)
        out = out.take(index, axis=axis)
    return np.ascontiguousarray(out)


def _block_mean(array: np.ndarray, step):
    """Average k x k x k blocks (k = whole source voxels per target voxel, per axis) as float32.

    A box filter is the bulk of the anti-aliasing a large downsampling needs, and it shrinks
    the volume before the Gaussian and the interpolation run: on a 512x512x300 CT going to
    3 mm this is several times faster and needs no full-size float32 copy. Returns the pooled
    array and the step and offset that map target voxels into it.
    """
    k = np.maximum(np.floor(step).astype(int), 1)
    if np.all(k == 1):
        return array.astype(np.float32, copy=False), step, np.zeros(3)
    pad = [(0, (-n) % kk) for n, kk in zip(array.shape, k)]
    if any(p for _, p in pad):
        array = np.pad(array, pad, mode="edge")
    blocks = array.reshape(array.shape[0] // k[0], k[0], array.shape[1] // k[1], k[1], array.shape[2] // k[2], k[2])
    pooled = blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    # pooled voxel j is centred on source index j*k + (k-1)/2
    return pooled, step / k, -(k - 1) / (2 * k)


def scaled_affine(affine: np.ndarray, spacing, new_spacing) -> np.ndarray:
    """Affine of a volume resampled by `resample` (same origin, new voxel size)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] * (np.asarray(new_spacing) / np.asarray(spacing))
    return out


# ---------------------------------------------------------------- intensities


def hu_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and scale to [0, 1] as float32."""
    lo, hi = window
    out = np.clip(array.astype(np.float32, copy=False), lo, hi)
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
    out = np.full(plan.target_shape, fill, dtype=array.dtype)
    out[plan.dst_slices()] = array[plan.src_slices()]
    return out


def uncrop_pad(array: np.ndarray, plan: CropPad, fill=0) -> np.ndarray:
    """Inverse of crop_pad: back to source_shape; voxels outside the box get `fill`."""
    out = np.full(plan.source_shape + tuple(array.shape[3:]), fill, dtype=array.dtype)
    out[plan.src_slices()] = array[plan.dst_slices()]
    return out
