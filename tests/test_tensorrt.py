"""TensorRT plans: the checks that need no GPU run here for real; building and running are `gpu`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

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


def test_tensorrt_runner_without_a_binding_is_one_line(fp32_bundle, tmp_path):
    """`--backend tensorrt` at inference: the plan is intact, then the missing binding (and TensorRT) in one line."""
    from liverkd.deploy.backends.cuda_adapter import installed_bindings

    if installed_bindings():
        pytest.skip(f"a CUDA binding is installed here: {installed_bindings()}")
    bundle = with_plan(fp32_bundle, tmp_path, PLAN)
    with pytest.raises(RunnerError) as e:
        open_runner(bundle, "tensorrt")
    assert str(e.value).startswith("no CUDA binding: pip install cuda-python") and "\n" not in str(e.value)
    with pytest.raises(RunnerError, match="--cuda-binding pycuda: pycuda is not installed"):
        open_runner(bundle, "tensorrt", cuda_binding="pycuda")


@pytest.mark.parametrize(
    ("precision", "version", "role"),
    [
        ("fp32", "8.6.1", "onnx"),
        ("fp16", "8.6.1", "onnx"),  # weakly typed: the FP16 builder flag
        ("fp16", "10.3.0", "onnx_fp16"),  # strongly typed: the FP16 flag would be ignored
        ("fp16", "11.4.0", "onnx_fp16"),
        ("int8", "8.6.1", "onnx_int8"),
        ("int8", "10.13.0", "onnx_int8"),
    ],
)
def test_the_onnx_each_plan_is_built_from(precision, version, role):
    assert T.plan_onnx_role(precision, version) == role


def test_timing_cache_is_named_by_tensorrt_version_and_gpu():
    name = T.timing_cache_file("engines", "10.3.0", "8.7")
    assert name == Path("engines/.trt-timing-10.3.0-sm87.cache")
    assert (
        len({name, T.timing_cache_file("engines", "10.13.0", "8.7"), T.timing_cache_file("engines", "10.3.0", "9.0")})
        == 3
    )


class TimingCaches:
    """What the fallback is handed in place of IBuilderConfig: create(bytes) parses a cache (a blob that
    does not start with MAGIC is refused, as TensorRT refuses a corrupt or foreign one), attach() records."""

    MAGIC = b"cache:"

    def __init__(self, refuse_attach: bool = False):
        self.attached, self.refuse_attach = [], refuse_attach

    def create(self, data: bytes):
        if data and not data.startswith(self.MAGIC):
            raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
        return data

    def attach(self, cache) -> bool:
        self.attached.append(cache)
        return not (self.refuse_attach and cache)


def test_garbage_timing_cache_falls_back_to_an_empty_one_warning_once(tmp_path):
    cache_file = tmp_path / ".trt-timing-10.3.0-sm87.cache"
    cache_file.write_bytes(b"\x00garbage from another version")
    caches = TimingCaches()
    with pytest.warns(UserWarning, match="timing cache not usable .*magicTagRead.*building with an empty one"):
        assert T.attach_timing_cache(cache_file, caches.create, caches.attach) == "replaced"
    assert caches.attached == [b""]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second build with the same file: no second warning
        assert T.attach_timing_cache(cache_file, caches.create, caches.attach) == "replaced"


def test_timing_cache_loaded_missing_or_refused(tmp_path):
    good = tmp_path / "good.cache"
    good.write_bytes(b"cache:tactics")
    caches = TimingCaches()
    assert T.attach_timing_cache(good, caches.create, caches.attach) == "loaded"
    assert T.attach_timing_cache(tmp_path / "absent.cache", caches.create, caches.attach) == "empty"
    assert T.attach_timing_cache(None, caches.create, caches.attach) == "empty"
    assert caches.attached == [b"cache:tactics", b"", b""]
    refusing = TimingCaches(refuse_attach=True)  # set_timing_cache(ignore_mismatch=False) answers False
    with pytest.warns(UserWarning, match="TensorRT refused it"):
        assert T.attach_timing_cache(good, refusing.create, refusing.attach) == "replaced"
    assert refusing.attached == [b"cache:tactics", b""]


def test_tensorrt_speed_check_never_compares_with_onnxruntime_cpu(fp32_bundle):
    """An fp16/int8 plan's "slower than fp32" needs fp32 timed on TensorRT too (build.py builds an fp32 plan)."""
    from liverkd.deploy.build import BuildError, accuracy_gate

    int8_plan = Bundle(fp32_bundle.path, fp32_bundle.meta.replace(precision="int8", backend="tensorrt"))
    with pytest.raises(BuildError, match="the speed check needs an fp32 runner on tensorrt"):
        accuracy_gate(int8_plan, "tensorrt", [np.zeros(fp32_bundle.input_shape, np.float32)], ["zeros"], 0.99)
