"""Segmenter: one volume along the whole way of DESIGN.md, every stage timed.

    seg = Segmenter.load("engines/NAME", backend="auto")
    out = seg.segment(nib_image)                # Segmentation: .image (uint8, the input's shape
                                                # and affine), .mask, .timings, .warnings, .liver_ml
    result = seg.segment_file("ct.nii.gz")      # read + segment + atomic write -> SegmentResult

The stages are liverkd.core.timing.STAGES; the pipeline itself is
liverkd.core.inference.segment_volume, the same function training evaluation calls with a
torch predictor. profile and the runner reuse this class; there is no second copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core import xp
from liverkd.core.atomic import write_text
from liverkd.core.inference import THRESHOLD, segment_probability
from liverkd.core.timing import RUNNER_STAGES, STAGES, Clock
from liverkd.deploy.backends.base import open_runner
from liverkd.deploy.bundle import Bundle

__all__ = ["STAGES", "Segmentation", "SegmentResult", "Segmenter", "segment", "stats_record"]
CT_DTYPES = {np.dtype(t) for t in ("int16", "uint16", "int32", "float32")}
DEVICES = ("cpu", "cuda")
ANISOTROPY_WARN = 3.0
"""Warn when the largest voxel side is more than this times the smallest."""


@dataclass
class Segmentation:
    """What `Segmenter.segment*` returns for one volume held in memory."""

    mask: np.ndarray
    """uint8 (1 = liver) on the input's voxel grid."""
    volume: V.Volume
    timings: dict[str, float]
    warnings: list[str]
    probability: np.ndarray | None = None
    """float32 liver probability on the input's voxel grid (only when asked for: a full-size float array)."""

    @property
    def image(self) -> nib.Nifti1Image:
        return mask_image(self.mask, self.volume)

    @functools.cached_property  # a full-resolution pass: read by the result and the stats
    def liver_voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def liver_ml(self) -> float:
        return self.liver_voxels * float(np.prod(self.volume.spacing)) / 1000.0

    @functools.cached_property  # a full-resolution pass: read by the result and the stats
    def mean_hu(self) -> float | None:
        """Mean input intensity inside the mask (HU for CT); None when the mask is empty."""
        voxels = self.liver_voxels
        if not voxels:
            return None
        return float(np.sum(self.volume.array, where=self.mask.view(bool), dtype=np.float64)) / voxels


STATS_FORMAT, STATS_VERSION = "liverkd-stats", 1


def stats_record(seg: Segmentation, *, input: str, output: str, engine: str, timings: dict, **extra) -> dict:
    """The one stats JSON schema, for `infer --stats` and the runner (which adds its own `extra` keys)."""
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "input": input,
        "output": output,
        "engine": engine,
        "liver_ml": seg.liver_ml,
        "liver_voxels": seg.liver_voxels,
        "mean_hu": seg.mean_hu,
        "spacing_mm": list(seg.volume.spacing),
        "warnings": list(seg.warnings),
        "timings": {k: round(v, 6) for k, v in timings.items()},  # in pipeline order (STAGES)
        **extra,
    }


@dataclass
class SegmentResult:
    input: str
    output: str | None
    liver_ml: float
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    liver_voxels: int = 0
    mean_hu: float | None = None
    """Mean input intensity inside the mask (HU for CT); None when the mask is empty."""
    stats: str | None = None
    preview: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii.bz2", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_path_for(input_path, out_dir=None) -> Path:
    """`<input>_liver.nii.gz`, beside the input or in `out_dir` (a DICOM folder is named after itself)."""
    input_path = Path(input_path)
    name = strip_nifti_suffix(input_path.name) + "_liver.nii.gz"
    return (Path(out_dir) if out_dir is not None else input_path.parent) / name


def sidecar_path(out_path, ext: str) -> Path:
    """`ct_liver.nii.gz` -> `ct_liver.json` / `ct_liver.png`; `x_liver_seg.dcm` -> `x_liver_seg.json`."""
    out_path = Path(out_path)
    name = out_path.name
    base = name[:-4] if name.lower().endswith(".dcm") else strip_nifti_suffix(name)
    return out_path.with_name(base + ext)


def read_input(path, grid_spacing=None) -> V.Volume:
    """A NIfTI file, or a folder holding one DICOM series (converted in memory). `grid_spacing`: the
    spacing it will be resampled to; that grid is held to V.MAX_GRID_VOXELS before any voxel is read."""
    path = Path(path)
    if not path.is_dir():
        return V.load(path, grid_spacing=grid_spacing)
    from liverkd.deploy.dicom import read_series

    vol, _ = dicom_volume(lambda: (read_series(path, grid_spacing=grid_spacing), None), path, grid_spacing)
    return vol


def dicom_volume(load, folder, grid_spacing=None, notes=()) -> tuple[V.Volume, object]:
    """`load()` -> (nibabel image of a DICOM series in `folder`, anything else it returns) as a
    checked Volume whose warnings hold `notes` and what reading noted (DICOM's own VolumeWarnings,
    without the folder's name); every warning raised is passed on as well."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, extra = load()
    vol = V.from_image(img, folder, grid_spacing=grid_spacing)
    prefix = f"{folder}: "
    read = [str(w.message).removeprefix(prefix) for w in caught if issubclass(w.category, V.VolumeWarning)]
    vol.warnings[:0] = [*notes, *read]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return vol, extra


def mask_image(mask: np.ndarray, vol: V.Volume) -> nib.Nifti1Image:
    """The mask on `vol`'s geometry, with none of the input header's extensions, free text or intent
    (V.to_nifti). The input's display range (cal_min/max) describes CT intensities, not a 0/1 label
    map (a viewer would show the mask black), so it is reset."""
    img = V.to_nifti(mask, vol.affine, vol.header)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return img


def input_ids(path) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of a file, or of every file in a folder (a DICOM series): what no output may replace.

    Identities, not names: a hard link, a symlink or a bind mount of an input is the input."""
    path = Path(path)
    try:
        files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    except OSError:
        return set()
    ids = set()
    for p in files:
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def check_output(out_path, in_path=None, *, overwrite: bool = True, inputs=frozenset()) -> Path:
    """Refuse an output that cannot or must not be written, before any work is done.

    Never the input (`in_path`) or any file in `inputs` (input_ids of the run's other inputs), even
    with `overwrite`; another existing file only with `overwrite` (`liverkd infer` says no by default)."""
    out_path = Path(out_path)
    folder = out_path.parent
    if not folder.is_dir():
        raise V.VolumeError(out_path, f"output folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise V.VolumeError(out_path, f"output folder {folder} is not writable")
    if out_path.is_dir():
        raise V.VolumeError(out_path, "output path is a folder")
    try:
        st = os.stat(out_path)
    except FileNotFoundError:
        return out_path
    if (st.st_dev, st.st_ino) in set(inputs) | (input_ids(in_path) if in_path is not None else set()):
        raise V.VolumeError(out_path, "output would overwrite an input of this run (the same file); never done")
    if not overwrite:
        raise V.VolumeError(out_path, "output exists; not overwritten (--overwrite replaces it)")
    return out_path


class Segmenter:
    """A loaded engine bundle + Runner, and the way from a CT volume to a liver mask."""

    def __init__(self, bundle: Bundle, runner, *, overlap: float = 0.25, device: str = "cpu"):
        """`device`: where the pre- and post-processing run. "cuda": the volume is uploaded once
        (CuPy) and stays on the GPU until the uint8 mask comes back; the same functions as on
        the CPU, through liverkd.core.xp."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if device == "cuda":
            from liverkd.deploy.backends.base import require

            require("cupy", "--device cuda needs CuPy for the GPU pre- and post-processing: pip install cupy-cuda12x")
        self.device = device
        self.bundle = bundle
        self.runner = runner
        self.spec = bundle.spec
        self.overlap = overlap
        self.liver_label = int(self.spec.labels.get("liver", 1))
        shape = bundle.input_shape[-3:]  # a dynamic engine names its axes: then the spec's shape
        self.roi_size = tuple(shape) if all(isinstance(s, int) for s in shape) else self.spec.input_shape

    @classmethod
    def load(cls, path, backend: str = "auto", *, overlap: float = 0.25, device: str = "cpu",
             **runner_options) -> Segmenter:  # fmt: skip
        """Open an engine bundle folder (or a Bundle) on `backend`: auto, onnxruntime, tensorrt, torch, openvino."""
        bundle = path if isinstance(path, Bundle) else Bundle.load(path)
        return cls(bundle, open_runner(bundle, backend, **runner_options), overlap=overlap, device=device)

    def describe(self) -> str:
        return f"{self.bundle.name} ({self.bundle.path}) on {self.runner.describe()}"

    # ------------------------------------------------------------ public API

    def segment(self, source, *, probability: bool = False) -> Segmentation:
        """A CT in -> Segmentation (`.image`: uint8 mask with exactly the input's shape and affine).

        `source`: a path (NIfTI file or DICOM series folder), a nibabel image, or an
        (array, affine) pair (voxels in memory, affine voxel -> RAS mm). `probability`: also
        return the liver probability on the input's voxels (`.probability`, float32)."""
        if isinstance(source, tuple):
            if len(source) != 2:
                raise TypeError("segment((array, affine)): a pair, the voxels and their 4x4 affine")
            return self.segment_array(*source, probability=probability)
        clock = Clock()
        with clock.stage("read"):  # voxels out of the image and validated; ~0 for in-memory arrays
            if isinstance(source, (str, os.PathLike)):
                vol = read_input(source, self.spec.spacing)
            elif isinstance(source, nib.spatialimages.SpatialImage):
                vol = V.from_image(source, source.get_filename() or "<image>", grid_spacing=self.spec.spacing)
            else:
                kind = type(source).__name__
                raise TypeError(f"segment() takes a path, a nibabel image or (array, affine), not {kind}")
        return self._segment(vol, clock, probability=probability)

    def segment_array(self, array, affine, *, probability: bool = False) -> Segmentation:
        """Voxels already in memory (an intervention system's volume) -> Segmentation: the same
        checks as a file (V.from_image), no NIfTI encoding or decoding on the way."""
        clock = Clock()
        with clock.stage("read"):
            img = nib.Nifti1Image(np.asanyarray(array), np.asarray(affine, dtype=np.float64))
            vol = V.from_image(img, "<array>", grid_spacing=self.spec.spacing)
        return self._segment(vol, clock, probability=probability)

    def segment_volume(self, vol: V.Volume, *, probability: bool = False, clock: Clock | None = None) -> Segmentation:
        """Volume in -> Segmentation (mask on the volume's grid, timings, warnings); the stages
        are added to `clock` when given (one that already timed the read)."""
        return self._segment(vol, clock or Clock(), probability=probability)

    def segment_file(
        self, in_path, out_path=None, stats: bool = False, preview: bool = False, *, overwrite=True, inputs=()
    ) -> SegmentResult:
        """Read a NIfTI file (or DICOM series folder), segment, and write the mask atomically.

        Default output: `<input>_liver.nii.gz` beside the input. With `stats`, a JSON beside
        the mask (liver volume, mean HU, warnings, timings); with `preview`, a PNG.
        No output replaces the input or a file in `inputs` (input_ids of the other inputs of a run);
        an existing file only with `overwrite` (check_output).
        Raises liverkd.core.volume.VolumeError on a bad input or an unwritable output; nothing
        is left behind then.
        """
        in_path = Path(in_path)
        out_path = Path(out_path) if out_path is not None else output_path_for(in_path)
        return self.segment_to(
            lambda: read_input(in_path, self.spec.spacing),
            out_path,
            label=str(in_path),
            title=in_path.name,
            stats=stats,
            preview=preview,
            protect=lambda path: check_output(path, in_path, overwrite=overwrite, inputs=inputs),
        )

    def segment_to(
        self, read, out_path, *, label: str, title: str, stats=False, preview=False, protect=None, write=None, **extra
    ) -> SegmentResult:
        """segment_file's way for any source: `read()` -> Volume (timed as "read"), segment, then
        `write(seg, out_path)` (default: the NIfTI mask, V.save: atomic), the stats JSON
        (`extra` keys added to stats_record) and the preview PNG beside it. `protect(path)` is
        called on every output before reading and again before writing (check_output: raises
        VolumeError for a path that must not be written)."""
        clock = Clock()
        out_path = Path(out_path)
        sidecars = {ext: sidecar_path(out_path, ext) for ext, wanted in ((".json", stats), (".png", preview)) if wanted}

        def check_outputs():
            for path in (out_path, *sidecars.values()):
                if protect is not None:
                    protect(path)

        check_outputs()
        with clock.stage("read"):
            vol = read()
        seg = self._segment(vol, clock)
        return self.write_outputs(seg, out_path, clock=clock, label=label, title=title, stats=stats,
                                  preview=preview, protect=check_outputs, write=write, **extra)  # fmt: skip

    def write_outputs(
        self, seg: Segmentation, out_path, *, clock: Clock, label: str, title: str, stats=False, preview=False,
        protect=None, write=None, **extra,
    ) -> SegmentResult:  # fmt: skip
        """The second half of segment_to, for a Segmentation in hand (the batch pipeline writes on
        its own thread): the mask (`write(seg, out_path)`, default V.save of the NIfTI), the
        preview and the stats JSON, timed into `clock`. `protect()` is called just before writing
        (raises VolumeError when an output must not be written any more)."""
        out_path = Path(out_path)
        with clock.stage("resample_back"):
            img = seg.image if write is None else None
        with clock.stage("postprocess"):
            result = SegmentResult(
                input=label,
                output=str(out_path),
                liver_ml=seg.liver_ml,
                warnings=seg.warnings,
                liver_voxels=seg.liver_voxels,
                mean_hu=seg.mean_hu,
            )
        with clock.stage("write"):
            if protect is not None:
                protect()  # again: a file may have appeared there while this one was segmented
            if write is None:
                V.save(img, out_path)
            else:
                write(seg, out_path)
            vol = seg.volume
            if preview:
                from liverkd.viz import write_preview

                window = self.spec.hu_window if V.looks_like_ct(vol.array)[0] else None
                png = sidecar_path(out_path, ".png")
                result.preview = str(write_preview(vol.array, seg.mask, vol.affine, png, window=window, title=title))
            if stats:
                result.stats = str(sidecar_path(out_path, ".json"))
        result.timings = clock.timings()
        if stats:
            facts = stats_record(seg, input=result.input, output=result.output, engine=self.describe(),
                                 timings=result.timings, preview=result.preview, **extra)  # fmt: skip
            write_text(result.stats, json.dumps(facts, indent=2) + "\n")  # unsorted: stages in pipeline order
        return result

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the pipeline

    def predictor(self, clock: Clock):
        """The Runner as a `predict` for liverkd.core.inference, adding its own stage split to `clock`."""

        def predict(x):
            if xp.is_device(x):
                out = self.runner.infer_device(x)
            else:
                out = self.runner.infer(np.ascontiguousarray(x, dtype=np.float32))
            for stage in RUNNER_STAGES:
                clock.add(stage, float(self.runner.last_timings.get(stage, 0.0)))
            return out

        return predict

    def _segment(self, vol: V.Volume, clock: Clock, *, probability: bool = False) -> Segmentation:
        notes = list(vol.warnings)
        with clock.stage("read"):  # checking the input is part of reading it
            for message in self._input_warnings(vol):
                self._warn(notes, vol.path, message)
        on_device = dataclasses.replace(vol, array=xp.to_device(vol.array)) if self.device == "cuda" else vol
        p, inverse = segment_probability(
            on_device,
            self.spec,
            self.predictor(clock),
            roi_size=self.roi_size,
            overlap=self.overlap,
            label=self.liver_label,
            clock=clock,
        )
        with clock.stage("resample_back"):  # segment_volume's last step, and the probability if asked for
            mask = xp.to_host(inverse.mask(p, THRESHOLD))  # the one download on a GPU
            full = xp.to_host(inverse(p)) if probability else None
        if not mask.any():
            self._warn(notes, vol.path, "no liver found: the mask is empty")
        return Segmentation(mask, vol, clock.timings(), notes, full)

    def _input_warnings(self, vol: V.Volume) -> list[str]:
        """Valid but odd inputs: they run, and the user is told."""
        out = []
        codes = "".join(nib.aff2axcodes(vol.affine))
        if codes != "RAS":
            out.append(f"orientation {codes}, not RAS: turned to RAS for the network and back for the mask")
        spacing = vol.spacing
        if max(spacing) > ANISOTROPY_WARN * min(spacing):
            sizes = "x".join(f"{s:.2g}" for s in spacing)
            out.append(f"strongly anisotropic voxels ({sizes} mm); resampled to {self.spec.spacing} mm")
        dtype = vol.header.get_data_dtype() if vol.header is not None else vol.array.dtype
        if np.dtype(dtype) not in CT_DTYPES:
            out.append(f"voxel type {np.dtype(dtype)} is unusual for CT")
        is_ct, why = V.looks_like_ct(vol.array)
        if not is_ct:
            out.append(f"{why}; the mask is likely wrong")
        return out

    @staticmethod
    def _warn(notes: list[str], path, message: str) -> None:
        notes.append(message)
        warnings.warn(f"{path}: {message}", V.VolumeWarning, stacklevel=3)


@functools.lru_cache(maxsize=4)
def _default_segmenter(engine: str, backend: str) -> Segmenter:
    from liverkd import models

    return Segmenter.load(models.resolve(engine), backend)


def segment(source, *, engine: str | None = None, backend: str = "auto", probability: bool = False):
    """One call: a CT (path, nibabel image, or (array, affine)) -> the liver mask as a Nifti1Image
    with exactly the input's shape and affine (uint8, 1 = liver). `engine`: a bundle folder or a
    packaged model's name (default: the packaged default). With `probability`, returns
    (mask image, float32 probability image). The Segmenter is kept for the next call with the
    same engine (warm); hold a Segmenter yourself to control its lifetime."""
    from liverkd import models

    seg = _default_segmenter(str(engine or models.DEFAULT), backend).segment(source, probability=probability)
    if not probability:
        return seg.image
    prob = V.to_nifti(seg.probability.astype(np.float32, copy=False), seg.volume.affine, seg.volume.header)
    return seg.image, prob
