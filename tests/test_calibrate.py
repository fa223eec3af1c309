"""Calibration: the inference preprocessing, Q/DQ INT8 the way TensorRT reads it, statistics, loader."""

from __future__ import annotations

import importlib.util
import json
import runpy
import subprocess
import sys

import nibabel as nib
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from liverkd.core import volume as V
from liverkd.core.synth import synth_case, write_dataset
from liverkd.deploy import calibrate as C
from tests._checkpoints import SPEC, make_checkpoint
from tests.test_qdq_layout import unet_onnx


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    write_dataset(folder, 4, seed=7, shape=(40, 36, 32))  # not the input shape: crop/pad runs
    return folder


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    """The exported student-30k; without torch (the Python 3.10 run) the hand-built U-Net."""
    folder = tmp_path_factory.mktemp("model")
    if importlib.util.find_spec("torch") is None:
        return unet_onnx(folder / "m.onnx")
    from liverkd.deploy.export import export_onnx

    return export_onnx(make_checkpoint(folder / "m.pt"), folder / "m.onnx").path


def test_network_input_is_the_inference_preprocessing():
    from liverkd.core.preprocess import normalize, to_spec_grid

    image, _ = synth_case(3, shape=(40, 36, 32))
    x = C.network_input(image, SPEC)
    assert x.shape == (1, 1, 32, 32, 32) and x.dtype == np.float32
    grid = normalize(to_spec_grid(image, SPEC)[0], SPEC)
    plan = V.plan_crop_pad(grid.shape, SPEC.input_shape)
    np.testing.assert_array_equal(x[0, 0], V.crop_pad(grid, plan, fill=0.0))


def test_label_folders_are_not_calibration_images(calib_dir):
    files = C.calibration_files(calib_dir)
    assert len(files) == 4
    assert all(f.parent.name == "imagesTr" for f in files)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(C.CalibrationError, match=str(tmp_path)):
        C.calibration_files(tmp_path)
    with pytest.raises(C.CalibrationError, match="does not exist"):
        C.calibration_files(tmp_path / "missing")


def test_unreadable_volume_is_named(tmp_path):
    good, _ = synth_case(1, shape=(32, 32, 32))
    nib.save(good.to_nifti(), tmp_path / "a.nii.gz")
    (tmp_path / "b.nii.gz").write_bytes(b"\x1f\x8b garbage")
    files = C.calibration_files(tmp_path)
    with pytest.raises(C.CalibrationError) as err:
        C.load_inputs(files, SPEC)
    assert "b.nii.gz" in str(err.value) and "\n" not in str(err.value)


def test_held_out_split_is_disjoint():
    files = [f"v{i}" for i in range(11)]
    used, held = C.split_held_out(files)
    assert held and not set(used) & set(held) and sorted(used + held) == sorted(files)
    assert C.split_held_out(files[:2]) == (files[:2], [])


@pytest.mark.parametrize("method", C.METHODS)
def test_quantize_writes_int8_onnx_and_ranges(tmp_path, calib_dir, fp32_onnx, method):
    """The Q/DQ layout itself is tests/test_qdq_layout.py's."""
    files = C.calibration_files(calib_dir)
    info = C.calibrate(fp32_onnx, tmp_path / "m.int8.onnx", files, SPEC, method, tmp_path / "stats.json")
    assert info["method"] == method and info["n"] == 4
    model = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    stats = json.loads((tmp_path / "stats.json").read_text())  # ONNX Runtime's calibration cache
    ranges = stats["data"]
    assert ranges and all(bound(r, "lowest") <= bound(r, "highest") for r in ranges.values())
    assert any(bound(r, "highest") > 0 for r in ranges.values())
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_scale")}
    name = next(n for n in ranges if f"{n}_scale" in scales)  # the int8 model uses these ranges
    assert np.isclose(scales[f"{name}_scale"], max(abs(bound(ranges[name], k)) for k in ("lowest", "highest")) / 127)


def test_ranges_file_is_onnx_runtimes_calibration_cache(tmp_path, calib_dir, fp32_onnx):
    """Where ONNX Runtime has a cache reader (>= 1.27), it reads our file (written by hand for 1.23)."""
    from onnxruntime.quantization import calibrate as ort_calibrate

    C.calibrate(fp32_onnx, tmp_path / "q.onnx", C.calibration_files(calib_dir)[:2], SPEC, "percentile", tmp_path / "s")
    stats = json.loads((tmp_path / "s").read_text())
    assert stats["CLS"] == "TensorsData" and stats["calibration_method"]["value"] == "CalibrationMethod.Percentile"
    if not hasattr(ort_calibrate, "load_tensors_data"):
        pytest.skip("this onnxruntime has no load_tensors_data (< 1.27)")
    cache = ort_calibrate.load_tensors_data(tmp_path / "s")
    assert cache.calibration_method == ort_calibrate.CalibrationMethod.Percentile
    assert sorted(cache.data) == sorted(stats["data"])


PEAK_RSS_AFTER_CALIBRATION = """
import resource, sys
import numpy as np
from liverkd.deploy import calibrate as C
model, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
inputs = (rng.normal(0.0, 1.0, (1, 1, 64, 64, 64)).astype(np.float32) for _ in range(n))
C.quantize_int8(model, out + ".onnx", inputs, "percentile", out + ".json")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_calibration_memory_does_not_grow_with_the_volumes(tmp_path):
    """Histograms are filled volume by volume: 6 volumes peak as 1 does. (Keeping every volume's
    activations, as ONNX Runtime's calibrators do when handed them all: +100 MiB a volume here.)"""
    model = unet_onnx(tmp_path / "m.onnx", shape=(64, 64, 64), width=8)

    def peak_mib(n):
        argv = [sys.executable, "-c", PEAK_RSS_AFTER_CALIBRATION, str(model), str(n), str(tmp_path / f"q{n}")]
        return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()[-1]) / 1024

    assert peak_mib(6) - peak_mib(1) < 50


def bound(entry: dict, key: str) -> float:
    """One range end from ONNX Runtime's cache JSON (a number, or an array of one)."""
    value = entry[key]
    return float(np.ravel(value["data"] if isinstance(value, dict) else value)[0])


def test_methods_give_different_ranges(tmp_path, calib_dir, fp32_onnx):
    """Entropy and percentile clip outliers: their ranges are not min/max (ORT's entropy default would be)."""
    files = C.calibration_files(calib_dir)
    highest = {}
    for method in C.METHODS:
        C.calibrate(fp32_onnx, tmp_path / f"{method}.onnx", files, SPEC, method, tmp_path / f"{method}.json")
        data = json.loads((tmp_path / f"{method}.json").read_text())["data"]
        highest[method] = np.array([bound(data[k], "highest") for k in sorted(data)])
    assert np.all(highest["entropy"] <= highest["minmax"] + 1e-6)
    assert np.any(highest["entropy"] < 0.99 * highest["minmax"])
    assert np.any(highest["percentile"] < 0.99 * highest["minmax"])


def test_int8_model_tracks_fp32(tmp_path, calib_dir, fp32_onnx):
    import onnxruntime as ort

    files = C.calibration_files(calib_dir)
    C.calibrate(fp32_onnx, tmp_path / "q.onnx", files[:3], SPEC, "minmax", tmp_path / "s.json")
    x = C.load_inputs(files[3:], SPEC)[0]
    ref = ort.InferenceSession(str(fp32_onnx)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"input": x})[0]
    spread = float(ref.max() - ref.min())
    assert np.abs(got - ref).max() < 0.1 * spread + 1e-3


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(C.CalibrationError, match="unknown calibration method"):
        C.quantize_int8(
            tmp_path / "m.onnx", tmp_path / "q.onnx", [np.zeros((1, 1, 32, 32, 32), np.float32)], "kl", tmp_path / "s"
        )
    assert list(tmp_path.iterdir()) == []


def test_no_inputs_is_refused(tmp_path):
    with pytest.raises(C.CalibrationError, match="no calibration inputs"):
        C.quantize_int8(unet_onnx(tmp_path / "m.onnx"), tmp_path / "q.onnx", iter([]), "minmax", tmp_path / "s")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "s").exists()


def test_polygraphy_data_loader_yields_the_inputs(tmp_path, calib_dir):
    files = C.calibration_files(calib_dir)
    script = C.write_data_loader(tmp_path / "loader.py", files, SPEC, "input")
    batches = list(runpy.run_path(str(script))["load_data"]())
    assert len(batches) == len(files)
    expected = C.load_inputs(files, SPEC)
    for batch, x in zip(batches, expected, strict=True):
        assert list(batch) == ["input"]
        np.testing.assert_array_equal(batch["input"], x)
