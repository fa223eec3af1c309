"""liverkd build-engine: bundles from a checkpoint or ONNX, calibration, the accuracy gate, atomicity."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from liverkd.core.atomic import sha256_file
from liverkd.core.synth import write_dataset
from liverkd.deploy.backends import open_runner
from liverkd.deploy.build import BuildError, build_engine
from liverkd.deploy.bundle import FORMAT_VERSION, Bundle, BundleError
from liverkd.deploy.calibrate import CalibrationError, phantom_input
from liverkd.deploy.compare import compare, run
from tests._checkpoints import SPEC, make_checkpoint, threshold_checkpoint


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    write_dataset(folder / "calib_data", 6, seed=11, shape=(32, 32, 32))
    make_checkpoint(folder / "s30.pt")
    threshold_checkpoint(folder / "edge.pt")
    return folder


def test_fp32_bundle_from_checkpoint(work, tmp_path):
    bundle = build_engine(work / "s30.pt", tmp_path / "engines" / "s30", "fp32", backend="onnxruntime", log=quiet)
    meta = json.loads((tmp_path / "engines" / "s30" / "engine.json").read_text())
    assert meta["format"] == "liverkd-engine" and meta["format_version"] == FORMAT_VERSION
    assert meta["precision"] == "fp32" and meta["backend"] == "onnxruntime"
    assert meta["spec"] == SPEC.to_dict()
    assert meta["input"] == {"name": "input", "shape": [1, 1, 32, 32, 32], "dtype": "float32"}
    assert meta["output"]["shape"] == [1, 2, 32, 32, 32]
    assert meta["source"]["checkpoint"] == "s30.pt" and meta["source"]["sha256"] == sha256_file(work / "s30.pt")
    assert meta["calibration"] is None and meta["tensorrt"] is None
    assert meta["accuracy"]["passed"] and meta["accuracy"]["dice_min"] == 1.0
    assert meta["accuracy"]["argmax_agreement"] == 1.0 and meta["accuracy"]["max_abs_logit_error"] == 0.0
    assert len(meta["accuracy"]["volumes"]) == 2  # phantoms: nothing held out without calibration data
    assert sorted(meta["files"]) == ["checkpoint", "onnx"]
    for record in meta["files"].values():  # every file with its size and sha256
        path = bundle.path / record["path"]
        assert record["size"] == path.stat().st_size and record["sha256"] == sha256_file(path)
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["s30"]  # no temp folder left
    x = phantom_input(SPEC, 5)
    with open_runner(bundle, "onnxruntime") as ort_runner, open_runner(bundle, "torch") as torch_runner:
        a, b = ort_runner.infer(x), torch_runner.infer(x)
        assert (ort_runner.model.path.name, torch_runner.model.path.name) == ("model.onnx", "model.pt")
    assert a.shape == (1, 2, 32, 32, 32) and np.abs(a - b).max() < 1e-4
    assert a.std() > 0  # the network answers something, not the head's bias alone


def test_int8_bundle_records_calibration_and_gate(work, tmp_path):
    out = tmp_path / "s30-int8"
    bundle = build_engine(
        work / "s30.pt",
        out,
        "int8",
        calib_data=work / "calib_data",
        calib_method="minmax",
        min_agreement=0.5,
        log=quiet,
    )
    meta = bundle.meta
    cal = meta.calibration
    assert cal.method == "minmax" and cal.n == 5 and cal.held_out == ("phantom_004.nii.gz",)
    assert "phantom_004.nii.gz" not in cal.files
    assert meta.accuracy.volumes == ("phantom_004.nii.gz",)
    assert meta.accuracy.max_abs_logit_error > 0  # int8 really ran, it is not the fp32 file
    assert 0.0 < meta.accuracy.argmax_agreement <= 1.0
    assert meta.accuracy.runner == "onnxruntime on cpu (int8)"
    assert sorted(meta.files) == ["calibration", "checkpoint", "data_loader", "onnx", "onnx_int8"]
    for role in meta.files:
        assert bundle.model_file(role).read()  # present, and matching its size and sha256
    assert bundle.model_for("onnxruntime").path.name == "model.int8.onnx"
    assert bundle.model_for("openvino").path.name == "model.int8.onnx"
    assert bundle.model_for("onnxruntime", "fp32").path.name == "model.onnx"
    assert bundle.model_for("torch").path.name == "model.pt"
    with pytest.raises(BundleError, match="no onnx_fp16 file"):
        bundle.model_for("onnxruntime", "fp16")
    assert meta.speed.fp32_ms > 0 and meta.speed.built_ms > 0
    with open_runner(bundle) as runner:
        assert runner.precision == "int8" and runner.name == "onnxruntime"
        assert runner.model.path.name == "model.int8.onnx"
        assert runner.infer(phantom_input(SPEC, 5)).shape == (1, 2, 32, 32, 32)
    with open_runner(bundle, "onnxruntime", precision="fp32") as runner:
        assert runner.model.path.name == "model.onnx" and runner.precision == "fp32"


def test_compare_measures_logits_argmax_and_dice():
    ref = np.zeros((1, 2, 4, 4, 4), np.float32)
    ref[:, 1, :2] = 1.0  # liver in half the voxels
    out = ref.copy()
    out[0, 1, 0, 0, 0] = -0.5  # one liver voxel lost, by a logit change of 1.5
    agreement = compare([ref, ref], [ref, out], label=1)
    assert agreement.max_abs_error == pytest.approx(1.5)
    assert agreement.argmax_agreement == pytest.approx(1 - 1 / 128)
    assert agreement.dice == (1.0, pytest.approx(2 * 31 / 63))
    with pytest.raises(ValueError, match="differs from the reference"):
        compare([ref], [ref[:, :, :2]])


def test_compare_run_interleaves_and_keeps_one_output_per_input():
    calls = []

    def runner(tag):
        return lambda x: calls.append((tag, float(x.flat[0]))) or x * 2

    inputs = [np.full((1, 1, 2, 2, 2), v, np.float32) for v in (1.0, 2.0)]
    runs = run({"a": runner("a"), "b": runner("b")}, inputs, rounds=3, warmup=1)
    assert [tag for tag, _ in calls] == ["a", "b"] * 4  # one call of each per round: 1 warm-up + 3 timed
    assert [v for _, v in calls[2::2]] == [1.0, 2.0, 1.0]  # the timed rounds cycle through the inputs
    assert [float(y.flat[0]) for y in runs["a"].outputs] == [2.0, 4.0]
    assert len(runs["b"].ms) == 3 and runs["b"].median_ms >= 0 and runs["b"].network_ms == []


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
    accuracy = bundle.meta.accuracy
    assert 0.5 <= accuracy.dice_min < 1.0
    assert accuracy.max_abs_logit_error > 0.01 and accuracy.argmax_agreement < 1.0


def test_fp16_bundle_runs_on_onnxruntime(work, tmp_path):
    import onnx

    bundle = build_engine(work / "s30.pt", tmp_path / "s30-fp16", "fp16", log=quiet)
    model = onnx.load(str(bundle.file("onnx_fp16")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert bundle.meta.accuracy.passed and bundle.meta.accuracy.runner == "onnxruntime on cpu (fp16)"
    with open_runner(bundle, "onnxruntime") as runner:
        assert runner.model.path.name == "model.fp16.onnx"
        assert runner.infer(phantom_input(SPEC, 5)).dtype == np.float32


def test_bundle_from_exported_onnx(work, tmp_path):
    from liverkd.deploy.export import export_onnx

    onnx_path = export_onnx(work / "s30.pt", tmp_path / "s30.onnx").path
    bundle = build_engine(onnx_path, tmp_path / "from-onnx", "fp32", log=quiet)
    assert bundle.spec == SPEC
    source = bundle.meta.source
    assert source.onnx == "s30.onnx" and source.checkpoint == "s30.pt" and source.onnx_sha256 == sha256_file(onnx_path)
    assert "checkpoint" not in bundle.meta.files


def test_rebuild_replaces_the_bundle(work, tmp_path):
    out = tmp_path / "again"
    first = build_engine(work / "s30.pt", out, "fp32", log=quiet).meta.built_at
    (out / "stale.txt").write_text("from the first build")
    build_engine(work / "s30.pt", out, "fp32", log=quiet)
    assert not (out / "stale.txt").exists() and Bundle.load(out).meta.built_at >= first
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
    assert "argmax agreement" in done.stdout
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
