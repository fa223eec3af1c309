"""Calibration: the inference preprocessing, Q/DQ INT8 the way TensorRT reads it, statistics, loader."""

from __future__ import annotations

import json
import runpy

import nibabel as nib
import numpy as np
import onnx
import pytest
from liverkd.deploy import calibrate as C
from onnx import numpy_helper

from liverkd.core import volume as V
from liverkd.core.synth.phantom import synth_case, write_dataset
from tests._checkpoints import SPEC, make_checkpoint


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    write_dataset(folder, 4, seed=7, shape=(40, 36, 32), progress=False)  # not the input shape: crop/pad runs
    return folder


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from liverkd.deploy.export import export_onnx

    folder = tmp_path_factory.mktemp("model")
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
def test_quantize_writes_tensorrt_style_qdq(tmp_path, calib_dir, fp32_onnx, method):
    files = C.calibration_files(calib_dir)
    info = C.calibrate(fp32_onnx, tmp_path / "m.int8.onnx", files, SPEC, method, tmp_path / "stats.json")
    assert info["method"] == method and info["n"] == 4
    model = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero_point = consts[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), f"{node.name}: not symmetric int8"
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            assert consts[node.input[0]].dtype == np.int8, f"{node.name}: TensorRT refuses non-int8 DQ"
    producers = {o: n for n in model.graph.node for o in n.output}
    conv_weights = [producers[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert all(consts[w.input[1]].size > 1 for w in conv_weights), "weights must be per-channel"
    stats = json.loads((tmp_path / "stats.json").read_text())  # ONNX Runtime's calibration cache
    ranges = stats["data"]
    assert ranges and all(bound(r, "lowest") <= bound(r, "highest") for r in ranges.values())
    assert any(bound(r, "highest") > 0 for r in ranges.values())


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


def test_unknown_method_is_refused(tmp_path, fp32_onnx):
    with pytest.raises(C.CalibrationError, match="unknown calibration method"):
        C.quantize_int8(
            fp32_onnx, tmp_path / "q.onnx", [np.zeros((1, 1, 32, 32, 32), np.float32)], "kl", tmp_path / "s"
        )
    assert list(tmp_path.iterdir()) == []


def test_polygraphy_data_loader_yields_the_inputs(tmp_path, calib_dir):
    files = C.calibration_files(calib_dir)
    script = C.write_data_loader(tmp_path / "loader.py", files, SPEC, "input")
    batches = list(runpy.run_path(str(script))["load_data"]())
    assert len(batches) == len(files)
    expected = C.load_inputs(files, SPEC)
    for batch, x in zip(batches, expected, strict=True):
        assert list(batch) == ["input"]
        np.testing.assert_array_equal(batch["input"], x)
