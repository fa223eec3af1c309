"""liverkd build-engine: bundles from a checkpoint or ONNX, calibration, the accuracy gate, atomicity."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from liverkd.deploy.backends import open_runner
from liverkd.deploy.build import BuildError, build_engine
from liverkd.deploy.bundle import Bundle
from liverkd.deploy.calibrate import CalibrationError, phantom_input

from liverkd.core.synth.phantom import write_dataset
from tests._checkpoints import SPEC, make_checkpoint, threshold_checkpoint


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    write_dataset(folder / "calib_data", 6, seed=11, shape=(32, 32, 32), progress=False)
    make_checkpoint(folder / "s30.pt")
    threshold_checkpoint(folder / "edge.pt")
    return folder


def test_fp32_bundle_from_checkpoint(work, tmp_path):
    bundle = build_engine(work / "s30.pt", tmp_path / "engines" / "s30", "fp32", backend="onnxruntime", log=quiet)
    meta = json.loads((tmp_path / "engines" / "s30" / "engine.json").read_text())
    assert meta["precision"] == "fp32" and meta["backend"] == "onnxruntime"
    assert meta["spec"] == SPEC.to_dict()
    assert meta["input"] == {"name": "input", "shape": [1, 1, 32, 32, 32], "dtype": "float32"}
    assert meta["output"]["shape"] == [1, 2, 32, 32, 32]
    assert meta["source"]["checkpoint"] == "s30.pt" and len(meta["source"]["sha256"]) == 64
    assert meta["calibration"] is None and meta["tensorrt"] is None
    assert meta["accuracy"]["passed"] and meta["accuracy"]["dice_min"] == 1.0
    assert len(meta["accuracy"]["volumes"]) == 2  # phantoms: nothing held out without calibration data
    assert sorted(meta["files"]) == ["checkpoint", "onnx"]
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["s30"]  # no temp folder left
    x = phantom_input(SPEC, 5)
    with open_runner(bundle, "onnxruntime") as ort_runner, open_runner(bundle, "torch") as torch_runner:
        a, b = ort_runner.infer(x), torch_runner.infer(x)
    assert a.shape == (1, 2, 32, 32, 32) and np.abs(a - b).max() < 1e-4


def test_int8_bundle_records_calibration_and_gate(work, tmp_path):
    out = tmp_path / "s30-int8"
    bundle = build_engine(
        work / "s30.pt", out, "int8", calib_data=work / "calib_data", calib_method="minmax", log=quiet
    )
    meta = bundle.meta
    cal = meta["calibration"]
    assert cal["method"] == "minmax" and cal["n"] == 5 and cal["held_out"] == ["phantom_004.nii.gz"]
    assert "phantom_004.nii.gz" not in cal["files"]
    assert meta["accuracy"]["volumes"] == ["phantom_004.nii.gz"]
    assert meta["accuracy"]["max_abs_logit_error"] > 0  # int8 really ran, it is not the fp32 file
    for key in ("onnx", "onnx_int8", "calibration", "data_loader", "checkpoint"):
        assert (out / meta["files"][key]).is_file()
    assert bundle.onnx_for_runtime.name == "model.int8.onnx"
    assert meta["speed"]["fp32_ms"] > 0 and meta["speed"]["built_ms"] > 0
    with open_runner(bundle) as runner:
        assert runner.precision == "int8" and runner.name == "onnxruntime"
        assert runner.infer(phantom_input(SPEC, 5)).shape == (1, 2, 32, 32, 32)


def test_gate_refuses_and_leaves_nothing(work, tmp_path):
    with pytest.raises(BuildError, match="accuracy gate failed"):
        build_engine(
            work / "edge.pt",
            tmp_path / "edge-int8",
            "int8",
            calib_data=work / "calib_data",
            min_agreement=0.9999,
            log=quiet,
        )
    assert list(tmp_path.iterdir()) == []


def test_gate_measures_real_disagreement(work, tmp_path):
    """The threshold model's INT8 mask differs from fp32 at the boundary: Dice < 1 is what the gate saw."""
    bundle = build_engine(
        work / "edge.pt", tmp_path / "edge-int8", "int8", calib_data=work / "calib_data", min_agreement=0.5, log=quiet
    )
    assert 0.5 <= bundle.meta["accuracy"]["dice_min"] < 1.0
    assert bundle.meta["accuracy"]["max_abs_logit_error"] > 0.01


def test_fp16_bundle_runs_on_onnxruntime(work, tmp_path):
    import onnx

    bundle = build_engine(work / "s30.pt", tmp_path / "s30-fp16", "fp16", log=quiet)
    model = onnx.load(str(bundle.file("onnx_fp16")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert bundle.meta["accuracy"]["passed"]
    with open_runner(bundle, "onnxruntime") as runner:
        assert runner.infer(phantom_input(SPEC, 5)).dtype == np.float32


def test_bundle_from_exported_onnx(work, tmp_path):
    from liverkd.deploy.export import export_onnx

    onnx_path = export_onnx(work / "s30.pt", tmp_path / "s30.onnx").path
    bundle = build_engine(onnx_path, tmp_path / "from-onnx", "fp32", log=quiet)
    assert bundle.spec == SPEC
    assert bundle.meta["source"]["onnx"] == "s30.onnx" and bundle.meta["source"]["checkpoint"] == "s30.pt"
    assert "checkpoint" not in bundle.meta["files"]


def test_rebuild_replaces_the_bundle(work, tmp_path):
    out = tmp_path / "again"
    first = build_engine(work / "s30.pt", out, "fp32", log=quiet).meta["built_at"]
    (out / "stale.txt").write_text("from the first build")
    build_engine(work / "s30.pt", out, "fp32", log=quiet)
    assert not (out / "stale.txt").exists() and Bundle.load(out).meta["built_at"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_refusals_are_one_line_and_write_nothing(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./calib_data here
    with pytest.raises(BuildError, match="needs --calib-data"):
        build_engine(work / "s30.pt", tmp_path / "a", "int8", log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no NIfTI volumes"):
        build_engine(work / "s30.pt", tmp_path / "b", "int8", calib_data=tmp_path / "empty", log=quiet)
    with pytest.raises(BuildError, match="--backend tensorrt"):
        build_engine(work / "s30.pt", tmp_path / "c", "fp32", backend="tensorrt", log=quiet)
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "x").write_text("keep me")
    with pytest.raises(BuildError, match="not an engine bundle"):
        build_engine(work / "s30.pt", tmp_path / "notabundle", "fp32", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notabundle"]


def test_cli_int8_from_synthesised_calib_data(work, tmp_path, liverkd_cmd):
    calib = tmp_path / "calib_data"
    synth = [*liverkd_cmd, "data", "synth", "--out", str(calib), "--n", "4", "--shape", "32", "32", "32", "--seed", "5"]
    done = subprocess.run(synth, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "engines" / "cli-int8"
    cmd = [*liverkd_cmd, "build-engine", str(work / "s30.pt"), "--precision", "int8"]
    cmd += ["--calib-data", str(calib), "--calib-method", "percentile", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "backend: onnxruntime" in done.stdout and "accuracy gate" in done.stdout
    meta = json.loads((out / "engine.json").read_text())
    assert meta["calibration"]["method"] == "percentile" and meta["accuracy"]["passed"]
    assert meta["calibration"]["n"] == 3 and meta["calibration"]["held_out"] == ["phantom_003.nii.gz"]


def test_cli_tensorrt_without_tensorrt_fails_with_reason(work, tmp_path, liverkd_cmd):
    from liverkd.deploy.backends.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a GPU are present here")
    cmd = [*liverkd_cmd, "build-engine", str(work / "s30.pt"), "--backend", "tensorrt", "--out", str(tmp_path / "t")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: --backend tensorrt: {why}"
    assert not (tmp_path / "t").exists()
