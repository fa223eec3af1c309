"""calib_data -> network inputs (the inference preprocessing) -> INT8 Q/DQ ONNX + statistics.

The Q/DQ file is what TensorRT >= 10 builds INT8 from (strongly typed networks; the implicit
calibrators are deprecated and gone in TensorRT 11) and what ONNX Runtime runs as INT8.
Settings follow TensorRT's needs: symmetric INT8 activations and weights (zero point 0),
per-channel weights, biases left in float (TensorRT refuses INT32 DequantizeLinear), opset 17.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from liverkd.core import volume as V
from liverkd.core.atomic import atomic_path, write_text
from liverkd.core.preprocess import prepare
from liverkd.core.spec import PreprocessSpec

METHODS = ("minmax", "entropy", "percentile")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class CalibrationError(ValueError):
    """Unusable calibration data. str() is one line naming the folder or file."""


def network_input(vol: V.Volume, spec: PreprocessSpec) -> np.ndarray:
    """One volume as the network sees it (liverkd.core.preprocess.prepare), its centre window
    when the grid is larger than the input -> float32 (1, 1, X, Y, Z)."""
    x = prepare(vol, spec).x
    x = V.crop_pad(x, V.plan_crop_pad(x.shape, spec.input_shape))
    return x[None, None].astype(np.float32, copy=False)


def phantom_input(spec: PreprocessSpec, seed: int) -> np.ndarray:
    """A synthetic CT (liverkd.core.synth.phantom) at the network's input shape, preprocessed as inference does."""
    from liverkd.core.synth.phantom import synth_case

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


def load_inputs(files, spec: PreprocessSpec) -> list[np.ndarray]:
    """Network inputs for `files`; a file that cannot be read raises CalibrationError naming it."""
    inputs = []
    for path in files:
        try:
            inputs.append(network_input(V.load(path), spec))
        except V.VolumeError as e:
            raise CalibrationError(f"calibration volume {e}") from None
    return inputs


def split_held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibrate, held out): every fifth volume is held out for the accuracy gate, when there are >= 3."""
    if len(files) < 3:
        return list(files), []
    held = files[4::5] or files[-1:]
    return [f for f in files if f not in held], held


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over in-memory inputs."""

    def __init__(self, input_name: str, inputs: list[np.ndarray]):
        self.input_name = input_name
        self.inputs = inputs
        self._it = iter(inputs)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self):
        self._it = iter(self.inputs)

    def __len__(self):
        return len(self.inputs)


CALIBRATOR_OPTIONS = {
    "minmax": {"symmetric": True},
    # KL search as TensorRT's entropy calibrator: 2048-bin histograms, 128 levels. ORT's default
    # (128 bins for 128 levels) leaves one candidate, i.e. plain min/max. Measured on a trained
    # 100k student: entropy clips too hard (Dice vs fp32 0.65), minmax 0.998: minmax is the default.
    "entropy": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
}


def quantize_int8(onnx_in, onnx_out, inputs: list[np.ndarray], method: str, stats_out) -> None:
    """Calibrate on `inputs` (ranges saved to `stats_out`, ONNX Runtime's calibration-cache JSON),
    then write the Q/DQ INT8 ONNX from those ranges."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if not inputs:
        raise CalibrationError("no calibration inputs")
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise CalibrationError(
            f"onnxruntime {onnxruntime.__version__} cannot quantize from saved ranges "
            "(quantize_static has no calibration_cache_path); INT8 calibration needs a newer onnxruntime"
        )
    reader_cls = type("CalibReader", (_Reader, CalibrationDataReader), {})
    input_name = onnx.load(str(onnx_in), load_external_data=False).graph.input[0].name
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with _quiet(), tempfile.TemporaryDirectory(prefix="liverkd-calib-") as work:
        calibrator = create_calibrator(
            Path(onnx_in),
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=calibrate_method,
            extra_options=CALIBRATOR_OPTIONS[method],
        )
        calibrator.collect_data(reader_cls(input_name, inputs))
        ranges = calibrator.compute_data()
        with atomic_path(stats_out, suffix=".json") as tmp:
            save_tensors_data(ranges, tmp)
        quantize_static(
            str(onnx_in),
            str(onnx_out),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            calibration_cache_path=str(stats_out),
        )
    model = onnx.load(str(onnx_out), load_external_data=False)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opset.get("ai.onnx") != 17:
        raise CalibrationError(f"{onnx_out}: quantized model has opsets {opset}, expected ai.onnx 17")


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's calibrators print progress, and quantize_static logs pre-processing advice."""
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
    quantize_int8(onnx_in, onnx_out, load_inputs(calib_files, spec), method, stats_out)
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
