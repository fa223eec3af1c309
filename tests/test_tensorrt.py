"""TensorRT plans: the checks that need no GPU run here for real; building and running are `gpu`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from liverkd.deploy.backends import RunnerError, open_runner
from liverkd.deploy.backends import tensorrt as T
from liverkd.deploy.bundle import Bundle
from liverkd.deploy.cuda_preflight import preflight

from liverkd.core.atomic import sha256_file

BUILT_FOR = {"version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "driver": "12.2"}


def trt_and_gpu() -> tuple[bool, str]:
    return T.tensorrt_available()


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    from liverkd.deploy.build import build_engine

    from tests._checkpoints import make_checkpoint

    folder = tmp_path_factory.mktemp("trt")
    make_checkpoint(folder / "m.pt")
    return build_engine(folder / "m.pt", folder / "engines" / "m", "fp32", backend="onnxruntime", log=lambda s: None)


def with_plan(bundle: Bundle, folder, plan_bytes: bytes, built: dict) -> Bundle:
    """A copy of `bundle` holding `plan_bytes` as model.plan, engine.json describing `built`."""
    dest = folder / "with-plan"
    shutil.copytree(bundle.path, dest)
    (dest / "model.plan").write_bytes(plan_bytes)
    meta = {**bundle.meta, "files": {**bundle.meta["files"], "plan": "model.plan"}, "tensorrt": built}
    Bundle(dest, meta).save()
    return Bundle.load(dest)


def plan_facts(data: bytes, folder) -> dict:
    (folder / "p").write_bytes(data)
    return {**BUILT_FOR, "plan_bytes": len(data), "plan_sha256": sha256_file(folder / "p")}


def test_preflight_answers_without_crashing():
    result = preflight()
    if result.ok:
        assert result.device.name and result.device.compute_capability.count(".") == 1
    else:
        assert result.reason and "\n" not in result.reason


def test_truncated_plan_is_refused(fp32_bundle, tmp_path):
    data = bytes(range(256)) * 64
    bundle = with_plan(fp32_bundle, tmp_path, data[:1000], plan_facts(data, tmp_path))
    ok, why = T.plan_usable(bundle)
    assert not ok and "truncated" in why and "1,000 bytes" in why
    with pytest.raises(RunnerError, match="truncated"):
        open_runner(bundle, "tensorrt")


def test_foreign_plan_is_refused(fp32_bundle, tmp_path):
    data = bytes(range(256)) * 64
    other = bytes(reversed(data))  # same size, other content: not the plan engine.json describes
    bundle = with_plan(fp32_bundle, tmp_path, other, plan_facts(data, tmp_path))
    ok, why = T.plan_usable(bundle)
    assert not ok and "sha256 differs" in why


def test_plan_without_engine_json_facts_is_refused(fp32_bundle, tmp_path):
    bundle = with_plan(fp32_bundle, tmp_path, b"plan", {})
    ok, why = T.plan_usable(bundle)
    assert not ok and "no 'tensorrt' entry" in why


def test_intact_plan_still_needs_tensorrt_and_gpu(fp32_bundle, tmp_path):
    ok_here, reason_here = trt_and_gpu()
    if ok_here:
        pytest.skip("TensorRT and a GPU are present: the target check decides instead")
    data = b"\x00" * 4096
    bundle = with_plan(fp32_bundle, tmp_path, data, plan_facts(data, tmp_path))
    ok, why = T.plan_usable(bundle)
    assert not ok and (reason_here in why or "TensorRT" in why)


def test_auto_falls_back_to_onnxruntime(fp32_bundle, tmp_path):
    data = b"\x00" * 4096
    bundle = with_plan(fp32_bundle, tmp_path, data[:100], plan_facts(data, tmp_path))
    with open_runner(bundle, "auto") as runner:
        assert runner.name == "onnxruntime"
        assert runner.infer(np.zeros(bundle.input_shape, np.float32)).shape[1] == 2


def test_target_mismatch_messages():
    here = {**BUILT_FOR}
    assert T.check_target(BUILT_FOR, here) is None
    why = T.check_target(BUILT_FOR, {**here, "version": "10.13.0"})
    assert "TensorRT 10.3.0" in why and "10.13.0" in why
    why = T.check_target(BUILT_FOR, {**here, "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    assert "built for Orin (compute 8.7)" in why and "H100" in why


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_build_and_run(tmp_path, precision):
    ok, why = trt_and_gpu()
    if not ok:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    from liverkd.deploy.build import build_engine
    from liverkd.deploy.calibrate import phantom_input

    from liverkd.core.synth.phantom import write_dataset
    from tests._checkpoints import SPEC, threshold_checkpoint

    threshold_checkpoint(tmp_path / "m.pt")
    write_dataset(tmp_path / "calib", 6, seed=3, shape=(32, 32, 32), progress=False)
    bundle = build_engine(
        tmp_path / "m.pt", tmp_path / "e", precision, calib_data=tmp_path / "calib", backend="tensorrt",
        min_agreement=0.9, log=lambda s: None,
    )  # fmt: skip
    assert bundle.meta["tensorrt"]["plan_sha256"] == sha256_file(bundle.file("plan"))
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
    call = T.TensorRTRunner._call.__get__(T.TensorRTRunner())
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
