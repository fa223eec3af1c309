"""TensorRT plans: the checks that need no GPU run here for real; building and running are `gpu`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from liverkd.core.atomic import sha256_file
from liverkd.deploy.backends import RunnerError, open_runner
from liverkd.deploy.backends import tensorrt as T
from liverkd.deploy.bundle import Bundle, BundleError, FileRecord, TensorRTTarget
from liverkd.deploy.cuda_preflight import preflight

BUILT_FOR = TensorRTTarget(version="10.3.0", gpu_name="Orin", compute_capability="8.7", sm_count=16, driver="12.2")
PLAN = bytes(range(256)) * 64


def trt_and_gpu() -> tuple[bool, str]:
    return T.tensorrt_available()


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    from liverkd.deploy.build import build_engine
    from tests._checkpoints import make_checkpoint

    folder = tmp_path_factory.mktemp("trt")
    make_checkpoint(folder / "m.pt")
    return build_engine(folder / "m.pt", folder / "engines" / "m", "fp32", backend="onnxruntime", log=lambda s: None)


def with_plan(bundle: Bundle, folder, on_disk: bytes, recorded: bytes = PLAN) -> Bundle:
    """A copy of `bundle` holding `on_disk` as model.plan; engine.json records `recorded`'s size and sha256."""
    dest = folder / "with-plan"
    shutil.copytree(bundle.path, dest)
    (dest / "model.plan").write_bytes(recorded)
    plan = FileRecord.of(dest, "model.plan")
    (dest / "model.plan").write_bytes(on_disk)
    Bundle(dest, bundle.meta.replace(files={**bundle.meta.files, "plan": plan}, tensorrt=BUILT_FOR)).save()
    return Bundle.load(dest)


def test_preflight_answers_without_crashing():
    result = preflight()
    if result.ok:
        assert result.device.name and result.device.compute_capability.count(".") == 1
        assert result.device.sm_count > 0
    else:
        assert result.reason and "\n" not in result.reason


def test_truncated_plan_is_refused(fp32_bundle, tmp_path):
    bundle = with_plan(fp32_bundle, tmp_path, PLAN[:1000])
    ok, why = T.plan_usable(bundle)
    assert not ok and "truncated" in why and "1,000 bytes" in why
    with pytest.raises(BundleError, match="truncated"):  # checked before TensorRT is imported
        open_runner(bundle, "tensorrt")


def test_foreign_plan_is_refused(fp32_bundle, tmp_path):
    bundle = with_plan(fp32_bundle, tmp_path, bytes(reversed(PLAN)))  # same size, other content
    ok, why = T.plan_usable(bundle)
    assert not ok and "sha256 differs" in why and str(bundle.file("plan")) in why


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(tensorrt=None), "come together"),
        (lambda m: m["files"]["plan"].pop("sha256"), "KeyError: 'files.plan.sha256'"),
        (lambda m: m["files"]["plan"].pop("size"), "KeyError: 'files.plan.size'"),
        (lambda m: m["tensorrt"].pop("gpu_name"), "KeyError: 'tensorrt.gpu_name'"),
    ],
)
def test_plan_without_its_facts_in_engine_json_is_refused(fp32_bundle, tmp_path, edit, problem):
    bundle = with_plan(fp32_bundle, tmp_path, PLAN)
    meta = json.loads((bundle.path / "engine.json").read_text())
    edit(meta)
    (bundle.path / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle.path)
    assert problem in str(e.value) and str(bundle.path / "engine.json") in str(e.value)


def test_intact_plan_still_needs_tensorrt_and_gpu(fp32_bundle, tmp_path):
    ok_here, reason_here = trt_and_gpu()
    if ok_here:
        pytest.skip("TensorRT and a GPU are present: the target check decides instead")
    bundle = with_plan(fp32_bundle, tmp_path, PLAN)
    ok, why = T.plan_usable(bundle)
    assert not ok and (reason_here in why or "TensorRT" in why)
    with pytest.raises(RunnerError):
        open_runner(bundle, "tensorrt")


def test_auto_falls_back_to_onnxruntime(fp32_bundle, tmp_path):
    bundle = with_plan(fp32_bundle, tmp_path, PLAN[:100])
    with open_runner(bundle, "auto") as runner:
        assert runner.name == "onnxruntime" and runner.model.path.name == "model.onnx"
        assert runner.infer(np.zeros(bundle.input_shape, np.float32)).shape[1] == 2


def test_target_mismatch_messages():
    here = BUILT_FOR
    assert T.check_target(BUILT_FOR, here) is None
    why = T.check_target(BUILT_FOR, dataclasses.replace(here, version="10.13.0"))
    assert "TensorRT 10.3.0" in why and "10.13.0" in why
    h100 = dataclasses.replace(here, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", sm_count=132)
    why = T.check_target(BUILT_FOR, h100)
    assert "built for Orin (compute 8.7, 16 SMs)" in why and "H100" in why
    why = T.check_target(BUILT_FOR, dataclasses.replace(here, sm_count=8))  # same name and compute, fewer SMs
    assert why is not None and "8 SMs" in why
    assert T.check_target(BUILT_FOR, dataclasses.replace(here, sm_count=None)) is None  # not read: not held against it


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_build_and_run(tmp_path, precision):
    ok, why = trt_and_gpu()
    if not ok:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    from liverkd.core.synth import write_dataset
    from liverkd.deploy.build import build_engine
    from liverkd.deploy.calibrate import phantom_input
    from tests._checkpoints import SPEC, threshold_checkpoint

    threshold_checkpoint(tmp_path / "m.pt")
    write_dataset(tmp_path / "calib", 6, seed=3, shape=(32, 32, 32))
    bundle = build_engine(
        tmp_path / "m.pt",
        tmp_path / "e",
        precision,
        calib_data=tmp_path / "calib",
        backend="tensorrt",
        min_agreement=0.5,  # this test builds and runs; the gate's bound is tested on the CPU (test_build)
        log=lambda s: None,
    )
    assert bundle.meta.files["plan"].sha256 == sha256_file(bundle.file("plan"))
    assert bundle.meta.tensorrt.sm_count == preflight().device.sm_count
    assert T.plan_usable(bundle) == (True, "")
    with open_runner(bundle, "auto") as runner:
        assert runner.name == "tensorrt"
        out = runner.infer(phantom_input(SPEC, 1))
        assert out.shape == (1, 2, *SPEC.input_shape)
        assert set(runner.last_timings) == {"h2d", "network", "d2h"}
        assert all(v > 0 for v in runner.last_timings.values())


def cuda_python() -> tuple[bool, str]:
    if not preflight().ok:
        return False, f"needs a CUDA GPU: {preflight().reason}"
    try:
        T._cudart()
    except RunnerError as e:
        return False, str(e)
    return True, ""


@pytest.mark.gpu
def test_cuda_calls_the_tensorrt_runner_makes(tmp_path):
    """The runner's device plumbing without a plan: stream, buffers, async copies, events.

    Runs wherever CUDA and cuda-python are (TensorRT not needed), so the calls the runner
    makes around execute_async_v3 are checked on GPU machines that lack TensorRT."""
    ok, why = cuda_python()
    if not ok:
        pytest.skip(why)
    cudart = T._cudart()
    call = T.cuda_call
    x = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
    back = np.empty_like(x)
    stream = call(cudart.cudaStreamCreate())
    assert isinstance(int(stream), int)  # execute_async_v3 takes the stream as an int
    buf = call(cudart.cudaMalloc(x.nbytes))
    events = [call(cudart.cudaEventCreate()) for _ in range(3)]
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    call(cudart.cudaEventRecord(events[0], stream))
    call(cudart.cudaMemcpyAsync(buf, x.ctypes.data, x.nbytes, h2d, stream))
    call(cudart.cudaEventRecord(events[1], stream))
    call(cudart.cudaMemcpyAsync(back.ctypes.data, buf, x.nbytes, d2h, stream))
    call(cudart.cudaEventRecord(events[2], stream))
    call(cudart.cudaEventSynchronize(events[2]))
    ms = [call(cudart.cudaEventElapsedTime(a, b)) for a, b in zip(events, events[1:])]
    assert np.array_equal(back, x) and all(m >= 0 for m in ms)
    call(cudart.cudaFree(buf))
    call(cudart.cudaStreamDestroy(stream))
