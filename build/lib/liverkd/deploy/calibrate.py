"""calib_data -> network inputs (the inference preprocessing) -> INT8 Q/DQ ONNX + statistics.

The Q/DQ file is what TensorRT >= 10 builds INT8 from (strongly typed networks; the implicit
calibrators are deprecated and gone in TensorRT 11) and what ONNX Runtime runs as INT8.
Laid out as TensorRT's explicit quantization wants it (tests/test_qdq_layout.py walks it):
Q/DQ on the inputs of Conv and ConvTranspose only (activation and weight), none on their
outputs, so the logits stay float; symmetric INT8 (zero point 0); weights as float initialisers
through Q -> DQ, per channel on axis 0 (Conv: output channels; ConvTranspose: axis 0, the one
TensorRT's deconvolution takes); biases in float (TensorRT refuses INT32 DequantizeLinear); opset 17.
Statistics are collected volume by volume, so memory does not grow with the calibration set.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from liverkd.core import volume as V
from liverkd.core.atomic import atomic_path, write_text
from liverkd.core.errors import LiverkdError
from liverkd.core.preprocess import prepare
from liverkd.core.spec import PreprocessSpec

METHODS = ("minmax", "entropy", "percentile")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class CalibrationError(LiverkdError, ValueError):
    """Unusable calibration data. str() is one line naming the folder or file."""


def network_input(vol: V.Volume, spec: PreprocessSpec) -> np.ndarray:
    """One volume as the network sees it (liverkd.core.preprocess.prepare), its centre window
    when the grid is larger than the input -> float32 (1, 1, X, Y, Z)."""
    x = prepare(vol, spec).x
    x = V.crop_pad(x, V.plan_crop_pad(x.shape, spec.input_shape))
    return x[None, None].astype(np.float32, copy=False)


def phantom_input(spec: PreprocessSpec, seed: int) -> np.ndarray:
    """A synthetic CT (liverkd.core.synth) at the network's input shape, preprocessed as inference does."""
    from liverkd.core.synth import synth_case

    image, _label = synth_case(seed, shape=tuple(spec.input_shape))
    return network_input(image, spec)


def calibration_files(folder) -> list[Path]:
    """NIfTI images under `folder`, sorted; label folders (labelsTr, labels...) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: calibration folder does not exist")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name.endswith(NIFTI_SUFFIXES)
        and not p.name.startswith(".")
        and not any(part.lower().startswith("label") for part in p.relative_to(folder).parts[:-1])
    )
    if not files:
        raise CalibrationError(f"{folder}: no NIfTI volumes (*.nii, *.nii.gz) to calibrate with")
    return files


def iter_inputs(files, spec: PreprocessSpec) -> Iterator[np.ndarray]:
    """Network inputs for `files`, read one at a time; a file that cannot be read raises CalibrationError naming it."""
    for path in files:
        try:
            yield network_input(V.load(path), spec)
        except V.VolumeError as e:
            raise CalibrationError(f"calibration volume {e}") from None


def load_inputs(files, spec: PreprocessSpec) -> list[np.ndarray]:
    """Network inputs for `files`, all in memory (the accuracy gate's held-out volumes)."""
    return list(iter_inputs(files, spec))


def split_held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibrate, held out): every fifth volume is held out for the accuracy gate, when there are >= 3."""
    if len(files) < 3:
        return list(files), []
    held = files[4::5] or files[-1:]
    return [f for f in files if f not in held], held


class _OneVolume:
    """A CalibrationDataReader over one network input: the calibrators fold each volume into their
    running min/max or histograms and drop its activations before the next volume is run."""

    def __init__(self, feed: dict):
        self.feed = feed

    def get_next(self):
        feed, self.feed = self.feed, None
        return feed


CALIBRATOR_OPTIONS = {
    "minmax": {"symmetric": True},
    # KL search as TensorRT's entropy calibrator: 2048-bin histograms, 128 levels. ORT's default
    # (128 bins for 128 levels) leaves one candidate, i.e. plain min/max. Measured on a trained
    # 100k student: entropy clips too hard (Dice vs fp32 0.65), minmax 0.998: minmax is the default.
    "entropy": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
}
WEIGHTED_OPS = ["Conv", "ConvTranspose"]
"""The layers TensorRT runs in INT8: Q/DQ goes on their inputs (activation and weight) and nowhere else."""


def qdq_options(model) -> dict:
    """ONNX Runtime QDQQuantizer options for the layout TensorRT's explicit quantization wants."""
    deconv_weights = [n.input[1] for n in model.graph.node if n.op_type == "ConvTranspose"]
    return {
        "ActivationSymmetric": True,  # TensorRT: symmetric int8, zero point 0
        "WeightSymmetric": True,
        "QuantizeBias": False,  # biases stay float (TensorRT refuses INT32 DequantizeLinear)
        "QDQDisableWeightAdjustForInt32Bias": True,  # so no weight scale is bent for an int32 bias
        "AddQDQPairToWeight": True,  # float weight -> Q -> DQ (TensorRT <= 8.4 refuses int8 weight -> DQ)
        "OpTypesToExcludeOutputQuantization": WEIGHTED_OPS,  # no requantized outputs; the logits stay float
        "DedicatedQDQPair": True,  # TensorRT: one Q/DQ pair per consumer
        # ORT >= 1.18 quantizes ConvTranspose weights per output channel (axis 1); TensorRT's
        # deconvolution kernels take axis 0 only (NVIDIA/TensorRT#2380), as NVIDIA's quantizers write.
        "TensorQuantOverrides": {w: [{"axis": 0}] for w in deconv_weights},
    }


def quantize_int8(onnx_in, onnx_out, inputs: Iterable[np.ndarray], method: str, stats_out) -> None:
    """Calibrate on `inputs`, one volume at a time (memory: one volume's activations and the
    histograms), save the ranges to `stats_out` (ONNX Runtime's calibration-cache JSON), then write
    the Q/DQ INT8 ONNX from those ranges.

    Uses only ONNX Runtime APIs that 1.23 (the newest with Python 3.10 wheels, JetPack 6) has.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.load(str(onnx_in))
    input_name = model.graph.input[0].name
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with _quiet(), tempfile.TemporaryDirectory(prefix="liverkd-calib-") as work:
        fp32 = Path(work) / "fp32.onnx"  # the calibrator writes a shape-inferred copy beside its input
        onnx.save(model, str(fp32))
        calibrator = create_calibrator(
            fp32,
            WEIGHTED_OPS,
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=calibrate_method,
            extra_options=CALIBRATOR_OPTIONS[method],
        )
        n = 0
        for x in inputs:
            calibrator.collect_data(_OneVolume({input_name: x}))
            n += 1
        if not n:
            raise CalibrationError("no calibration inputs")
        ranges = calibrator.compute_data()
        del calibrator
        # quantize_static(calibration_cache_path=...) appeared in ORT 1.27; its quantizer is this one.
        quantizer = QDQQuantizer(
            model, True, False, QuantType.QInt8, QuantType.QInt8, ranges, [], [], WEIGHTED_OPS, qdq_options(model)
        )
        opset = {o.domain or "ai.onnx": o.version for o in quantizer.quantize_model().opset_import}
    if opset.get("ai.onnx") != 17:
        raise CalibrationError(f"{onnx_out}: quantized model has opsets {opset}, expected ai.onnx 17")
    with atomic_path(onnx_out, suffix=".onnx") as tmp:
        quantizer.model.save_model_to_file(str(tmp))  # sorts the nodes topologically, as parsers need
    write_ranges(ranges, stats_out)


def write_ranges(ranges, path) -> Path:
    """ONNX Runtime's calibration-cache JSON (save_tensors_data's layout, ORT >= 1.27, which its
    load_tensors_data reads), written here so that it is the same file under ORT 1.23."""
    payload = {**ranges.to_dict(), "smooth_quant": False}
    return write_text(path, json.dumps(payload, default=_cache_json))


def _cache_json(obj):
    """json.dumps default for ONNX Runtime's calibration objects (as its CalibrationCacheEncoder)."""
    if isinstance(obj, np.ndarray):
        return {"data": obj.tolist(), "dtype": str(obj.dtype), "CLS": "numpy.array"}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return {"CLS": type(obj).__name__, "value": str(obj)}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot write {type(obj).__name__} to a calibration cache")


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's calibrators print progress, and its quantizer logs pre-processing advice."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def calibrate(onnx_in, onnx_out, calib_files, spec: PreprocessSpec, method: str, stats_out) -> dict:
    """calib files -> Q/DQ ONNX + calibration statistics; returns engine.json's "calibration" entry."""
    quantize_int8(onnx_in, onnx_out, iter_inputs(calib_files, spec), method, stats_out)
    names = [Path(f).name for f in calib_files]
    return {"method": method, "files": names, "n": len(names), "statistics": Path(stats_out).name}


LOADER_TEMPLATE = '''"""Polygraphy data loader: the calibration volumes of this bundle, preprocessed as liverkd infers.

    polygraphy run model.onnx --onnxrt --trt --data-loader-script {script_name}
    polygraphy convert model.onnx --int8 --data-loader-script {script_name} -o model.plan

Needs liverkd importable. Set LIVERKD_CALIB_DATA to read the volumes from another folder.
"""

import json
import os
from pathlib import Path

SPEC = json.loads({spec!r})
INPUT_NAME = {input_name!r}
CALIB_DATA = {folder!r}
FILES = {files!r}


def load_data():
    from liverkd.deploy.calibrate import network_input
    from liverkd.core import volume
    from liverkd.core.spec import PreprocessSpec

    spec = PreprocessSpec.from_dict(SPEC)
    folder = Path(os.environ.get("LIVERKD_CALIB_DATA", CALIB_DATA))
    for name in FILES:
        yield {{INPUT_NAME: network_input(volume.load(folder / name), spec)}}
'''


def write_data_loader(path, calib_files, spec: PreprocessSpec, input_name: str) -> Path:
    """A Polygraphy `--data-loader-script` yielding {input_name: array} for the calibration volumes."""
    calib_files = [Path(f).resolve() for f in calib_files]
    folder = Path(os.path.commonpath([f.parent for f in calib_files]))
    text = LOADER_TEMPLATE.format(
        script_name=Path(path).name,
        spec=spec.to_json(),
        input_name=input_name,
        folder=str(folder),
        files=[str(f.relative_to(folder)) for f in calib_files],
    )
    return write_text(path, text)
