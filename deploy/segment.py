"""Segmenter: one volume along the whole way of DESIGN.md, every stage timed.

    seg = Segmenter.load("engines/NAME", backend="auto")
    mask_img = seg.segment(nib_image)           # uint8, exactly the input's shape and affine
    result = seg.segment_file("ct.nii.gz")      # read + segment + atomic write
    seg.last_timings                            # {"read": s, "reorient_resample": s, ...}

The stages (STAGES, in this order) are: read (file -> validated Volume), reorient_resample
(canonical RAS + resample to the spec spacing), normalize (HU window, then pad/crop to the
engine input), h2d / network / d2h (the Runner's own split, summed over windows),
postprocess (sliding-window blending when used, argmax, largest component, hole filling,
undoing the crop), resample_back (spec grid -> input voxels and orientation, NIfTI image),
write (atomic save, plus stats/preview when asked). "total" is wall clock end to end.
profile and runner reuse this class; there is no second copy of the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from deploy.backends.base import open_runner
from deploy.bundle import Bundle
from deploy.postprocess import clean_mask, labels_from_scores, softmax
from deploy.sliding_window import sliding_window_inference
from liverkd import volume as V
from liverkd.atomic import write_text
from liverkd.preprocess import from_spec_grid, normalize, to_spec_grid

STAGES = ("read", "reorient_resample", "normalize", "h2d", "network", "d2h", "postprocess", "resample_back", "write")
RUNNER_STAGES = ("h2d", "network", "d2h")
CT_DTYPES = {np.dtype(t) for t in ("int16", "uint16", "int32", "float32")}
ANISOTROPY_WARN = 3.0
"""Warn when the largest voxel side is more than this times the smallest."""


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
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_path_for(input_path, out_dir=None) -> Path:
    """`<input>_liver.nii.gz`, beside the input or in `out_dir` (a DICOM folder is named after itself)."""
    input_path = Path(input_path)
    name = strip_nifti_suffix(input_path.name) + "_liver.nii.gz"
    return (Path(out_dir) if out_dir is not None else input_path.parent) / name


def sidecar_path(out_path, ext: str) -> Path:
    """`ct_liver.nii.gz` -> `ct_liver.json` / `ct_liver.png`."""
    out_path = Path(out_path)
    return out_path.with_name(strip_nifti_suffix(out_path.name) + ext)


def read_input(path) -> V.Volume:
    """A NIfTI file, or a folder holding one DICOM series (converted in memory)."""
    path = Path(path)
    if not path.is_dir():
        return V.load(path)
    from deploy.dicom import read_series

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = read_series(path)
    vol = V.from_image(img, path)
    for w in caught:  # pass them on, and keep DICOM's own notes with the volume
        if issubclass(w.category, V.VolumeWarning):
            vol.warnings.insert(0, str(w.message).removeprefix(f"{path}: "))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return vol


def mask_image(mask: np.ndarray, vol: V.Volume) -> nib.Nifti1Image:
    """The mask on `vol`'s geometry. The input's display range (cal_min/max) and intent describe
    CT intensities, not a 0/1 label map (a viewer would show the mask black), so they are reset."""
    img = V.to_nifti(mask, vol.affine, vol.header)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    img.header.set_intent("none")
    return img


def check_output(out_path, in_path=None) -> Path:
    """Refuse an output that cannot be written, before any work is done."""
    out_path = Path(out_path)
    folder = out_path.parent
    if not folder.is_dir():
        raise V.VolumeError(out_path, f"output folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise V.VolumeError(out_path, f"output folder {folder} is not writable")
    if out_path.is_dir():
        raise V.VolumeError(out_path, "output path is a folder")
    if in_path is not None and Path(in_path).exists() and out_path.resolve() == Path(in_path).resolve():
        raise V.VolumeError(out_path, "output would overwrite the input")
    return out_path


class _Clock:
    """Accumulates seconds per stage; `timings()` lists them in STAGES order plus "total"."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def timings(self) -> dict[str, float]:
        out = {s: self.seconds[s] for s in STAGES if s in self.seconds}
        out["total"] = time.perf_counter() - self.start
        return out


class Segmenter:
    """A loaded engine bundle + Runner, and the way from a CT volume to a liver mask."""

    def __init__(self, bundle: Bundle, runner, *, overlap: float = 0.25):
        self.bundle = bundle
        self.runner = runner
        self.spec = bundle.spec
        self.overlap = overlap
        self.liver_label = int(self.spec.labels.get("liver", 1))
        shape = bundle.input_shape[-3:]  # a dynamic engine names its axes: then the spec's shape
        self.roi_size = tuple(shape) if all(isinstance(s, int) for s in shape) else self.spec.input_shape
        self.last_timings: dict[str, float] = {}
        self.last_warnings: list[str] = []

    @classmethod
    def load(cls, path, backend: str = "auto", *, overlap: float = 0.25, **runner_options) -> Segmenter:
        """Open an engine bundle folder (or a Bundle) on `backend`: auto, onnxruntime, tensorrt, torch, openvino."""
        bundle = path if isinstance(path, Bundle) else Bundle.load(path)
        return cls(bundle, open_runner(bundle, backend, **runner_options), overlap=overlap)

    def describe(self) -> str:
        return f"{self.bundle.name} ({self.bundle.path}) on {self.runner.describe()}"

    # ------------------------------------------------------------ public API

    def segment(self, img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
        """nibabel image in -> uint8 liver mask image with exactly its shape and affine."""
        clock = _Clock()
        with clock.stage("read"):  # voxels out of the image and validated; ~0 for in-memory arrays
            vol = V.from_image(img, img.get_filename() or "<image>")
        mask = self._segment(vol, clock)
        with clock.stage("resample_back"):
            out = mask_image(mask, vol)
        self.last_timings = clock.timings()
        return out

    def segment_volume(self, vol: V.Volume) -> V.Volume:
        """Volume in -> mask Volume (uint8, input's affine and header); warnings in its .warnings."""
        clock = _Clock()
        mask = self._segment(vol, clock)
        self.last_timings = clock.timings()
        return V.Volume(mask, vol.affine, vol.header, path=vol.path, warnings=list(self.last_warnings))

    def segment_file(self, in_path, out_path=None, stats: bool = False, preview: bool = False) -> SegmentResult:
        """Read a NIfTI file (or DICOM series folder), segment, and write the mask atomically.

        Default output: `<input>_liver.nii.gz` beside the input. With `stats`, a JSON beside
        the mask (liver volume, mean HU, warnings, timings); with `preview`, a PNG.
        Raises liverkd.volume.VolumeError on a bad input or an unwritable output; nothing
        is left behind then.
        """
        clock = _Clock()
        in_path = Path(in_path)
        out_path = check_output(Path(out_path) if out_path is not None else output_path_for(in_path), in_path)
        with clock.stage("read"):
            vol = read_input(in_path)
        mask = self._segment(vol, clock)
        with clock.stage("resample_back"):
            img = mask_image(mask, vol)
        with clock.stage("postprocess"):
            voxels = int(np.count_nonzero(mask))
            result = SegmentResult(
                input=str(in_path),
                output=str(out_path),
                liver_ml=voxels * float(np.prod(vol.spacing)) / 1000.0,
                warnings=list(self.last_warnings),
                liver_voxels=voxels,
                mean_hu=float(np.sum(vol.array, where=mask.view(bool), dtype=np.float64)) / voxels if voxels else None,
            )
        with clock.stage("write"):
            V.save(img, out_path)
            if preview:
                from deploy.preview import write_preview

                window = self.spec.hu_window if V.looks_like_ct(vol.array)[0] else None
                png = sidecar_path(out_path, ".png")
                result.preview = str(write_preview(vol.array, mask, vol.affine, png, window=window, title=in_path.name))
            if stats:
                result.stats = str(sidecar_path(out_path, ".json"))
        result.timings = self.last_timings = clock.timings()
        if stats:
            facts = {**result.to_dict(), "engine": self.describe(), "spacing_mm": list(vol.spacing)}
            write_text(result.stats, json.dumps(facts, indent=2) + "\n")  # unsorted: stages in pipeline order
        return result

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the pipeline

    def _segment(self, vol: V.Volume, clock: _Clock) -> np.ndarray:
        """The one pipeline. Returns the uint8 mask on `vol`'s voxel grid."""
        notes = list(vol.warnings)
        with clock.stage("read"):  # checking the input is part of reading it
            for message in self._input_warnings(vol):
                self._warn(notes, vol.path, message)
        with clock.stage("reorient_resample"):
            grid, geometry = to_spec_grid(vol, self.spec)
        with clock.stage("normalize"):
            x = normalize(grid, self.spec)
            del grid
            fits = all(g <= r for g, r in zip(x.shape, self.roi_size))
            if fits:
                plan = V.plan_crop_pad(x.shape, self.roi_size)
                x = V.crop_pad(x, plan, fill=0.0)[None, None]  # 0.0 = air after the HU window
        if fits:
            scores = self._infer(x, clock)
            with clock.stage("postprocess"):
                foreground = V.uncrop_pad(labels_from_scores(scores, self.liver_label), plan, fill=False)
        else:
            t0 = time.perf_counter()
            before = sum(clock.seconds.get(s, 0.0) for s in RUNNER_STAGES)
            scores = sliding_window_inference(
                x, self.roi_size, lambda w: softmax(self._infer(w, clock)), overlap=self.overlap
            )
            in_runner = sum(clock.seconds.get(s, 0.0) for s in RUNNER_STAGES) - before
            clock.add("postprocess", time.perf_counter() - t0 - in_runner)  # windowing + blending
            with clock.stage("postprocess"):
                foreground = labels_from_scores(scores, self.liver_label)
        del x, scores
        with clock.stage("postprocess"):
            mask_grid = clean_mask(foreground)
        with clock.stage("resample_back"):
            mask = from_spec_grid(mask_grid, geometry)
        if not mask.any():
            self._warn(notes, vol.path, "no liver found: the mask is empty")
        self.last_warnings = notes
        return mask

    def _infer(self, x: np.ndarray, clock: _Clock) -> np.ndarray:
        out = self.runner.infer(np.ascontiguousarray(x, dtype=np.float32))
        for stage in RUNNER_STAGES:
            clock.add(stage, float(self.runner.last_timings.get(stage, 0.0)))
        return out

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
