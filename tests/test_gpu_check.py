"""benchmarks/gpu_check.py runs end to end in its CPU mode (the GPU machine runs the same code)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the GPU check times PyTorch: needs torch")
def test_gpu_check_cpu_mode_writes_a_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--runs", "2", "--size", "16"]
    cmd += ["--presets", "student-30k", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| student-30k |")]
    variants = {line.split("|")[3].strip() for line in rows}
    assert {"torch fp32", "torch fp32 channels_last_3d", "onnxruntime CPU fp32"} <= variants
    for line in rows:
        host_ms = float(line.split("|")[4])
        assert host_ms > 0
    assert "torch fp16: fp16 needs CUDA" in text  # skipped variants say why
    assert "input (1, 1, 16, 16, 16)" in text
    # the end-to-end rows: the packaged model, a 512x512x300 CT in memory and file to file, on the CPU here
    e2e = [line for line in text.splitlines() if line.startswith("| CPU (numpy, ONNX Runtime CPU)")]
    assert len(e2e) == 2 and float(e2e[0].split("|")[2]) > 0, text
    assert float(e2e[0].split("|")[4]) == 1.0  # the reference row agrees with itself


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_conv_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((2, 1, 3, 3, 3), dtype=np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1] * 6)
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 8, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_tensorrt_fp16_row_is_built_from_an_fp16_onnx_where_strongly_typed(tmp_path):
    """TensorRT >= 10 ignores the FP16 flag on a strongly typed network: the fp16 row must come from an fp16 ONNX."""
    import onnx

    gpu_check = _gpu_check_module()
    fp32 = _tiny_conv_onnx(tmp_path / "s.onnx")
    assert gpu_check.tensorrt_source(fp32, "fp16", "8.6.1") == fp32  # weakly typed: fp32 file + FP16 flag
    assert gpu_check.tensorrt_source(fp32, "fp32", "10.3.0") == fp32
    fp16 = gpu_check.tensorrt_source(fp32, "fp16", "10.3.0")
    assert fp16 != fp32 and fp16.is_file()
    model = onnx.load(str(fp16))
    assert {init.data_type for init in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in and out
    assert gpu_check.tensorrt_source(fp32, "fp16", "11.4.0") == fp16
    with pytest.raises(gpu_check.Skip, match="trt_check.py"):
        gpu_check.tensorrt_source(fp32, "int8", "10.3.0")


TRT_CHECK = SCRIPT.with_name("trt_check.py")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    """An onnxruntime fp32 bundle (model.onnx only) of a random 30k student at 32^3."""
    from tests._checkpoints import SPEC
    from tests._segment_bundle import make_bundle

    return make_bundle(tmp_path_factory.mktemp("trt_check") / "m", spec=SPEC)


def test_trt_check_cpu_mode_checks_every_precision(fp32_bundle, tmp_path):
    """The script a Jetson user runs first, end to end with ONNX Runtime in TensorRT's place: the fp16 and
    int8 ONNX files the bundle lacks are made, each precision is compared with the fp32 reference."""
    out = tmp_path / "trt_check.md"
    cmd = [sys.executable, str(TRT_CHECK), str(fp32_bundle), "--backend", "onnxruntime", "--runs", "2"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines() if "| onnxruntime" in line
    }
    assert set(rows) == {"fp32", "fp16", "int8"}
    assert [rows[p][3].strip() for p in ("fp32", "fp16", "int8")] == [
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
    ]
    assert float(rows["fp32"][4]) == 1.0 and float(rows["fp32"][6]) == 0.0  # the reference against itself
    assert 0.0 < float(rows["int8"][6]) < 1.0  # quantized: close, not identical
    assert all(float(row[7]) > 0 for row in rows.values())  # host ms
    assert not list(fp32_bundle.glob("model.int8.onnx"))  # made in a temp folder, not in the bundle


def test_trt_check_without_tensorrt_says_why_in_one_line(fp32_bundle):
    from liverkd.deploy.backends.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT, a CUDA binding and a GPU are present here")
    done = subprocess.run([sys.executable, str(TRT_CHECK), str(fp32_bundle)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {why}"
    assert done.stdout.startswith("CPU: ")  # the machine's facts come first, for the report
