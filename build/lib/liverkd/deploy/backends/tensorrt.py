"""TensorRT: build a plan from ONNX, and run a plan (pinned host buffers, device buffers, execute_async_v3).

A plan only runs on the GPU model and TensorRT version it was built for, so engine.json
records both (EngineMeta.tensorrt: version, GPU name, compute capability, SM count), and the
plan's size and sha256 (files.plan). Every check that needs neither TensorRT nor a GPU runs
first; the CUDA preflight runs before anything touches trt.Runtime. Device memory, copies and
timing go through the CUDA adapter (cuda_adapter: cuda-python or pycuda).

Precision on TensorRT >= 10 lives in the ONNX file (strongly typed networks: model.fp16.onnx,
model.int8.onnx with Q/DQ; TensorRT 11 has no other kind); TensorRT 8.6 builds the fp32 or Q/DQ
file with the FP16/INT8 builder flags instead.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from liverkd.core.atomic import atomic_path
from liverkd.deploy.backends.base import Runner, RunnerError, require
from liverkd.deploy.backends.cuda_adapter import (
    binding_cuda_version,
    choose_binding,
    driver_mismatch,
    installed_bindings,
    open_cuda,
)
from liverkd.deploy.bundle import BundleError, ModelFile, TensorRTTarget
from liverkd.deploy.cuda_preflight import preflight
from liverkd.deploy.device_info import is_jetson

MIN_PYTHON = (3, 10)
MIN_TENSORRT = (8, 6)
"""The oldest TensorRT on a platform liverkd supports (JetPack 6.0); see docs/deploy.md, "Platforms"."""


def import_tensorrt():
    return require("tensorrt", "on a Jetson it comes with JetPack; elsewhere pip install 'liverkd[trt]'")


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# ---------------------------------------------------------------- platform checks


@dataclasses.dataclass(frozen=True)
class PlatformFacts:
    """The versions the platform checks read (platform_facts() reads them here)."""

    python: tuple[int, int]
    tensorrt: str | None = None
    tensorrt_wheels: tuple[str, ...] = ()
    """TensorRT's PyPI library wheels installed (tensorrt-cu12-libs, ...): JetPack's TensorRT has none."""
    jetson: bool = False
    driver_cuda: str | None = None
    """The CUDA version the driver supports ("12.2")."""
    binding: str | None = None
    binding_cuda: str | None = None
    """The CUDA version the binding was built for ("12.6")."""


def check_platform(facts: PlatformFacts) -> list[str]:
    """What keeps liverkd's TensorRT path from running on this platform, one line each; [] when nothing."""
    problems = []
    if tuple(facts.python) < MIN_PYTHON:
        problems.append(
            f"Python {'.'.join(map(str, facts.python))}: liverkd needs Python >= 3.10 "
            "(JetPack 5 ships Python 3.8 and TensorRT 8.5 and is not supported: use JetPack 6 or 7)"
        )
    if facts.tensorrt and _version_tuple(facts.tensorrt) < MIN_TENSORRT:
        problems.append(
            f"TensorRT {facts.tensorrt}: liverkd needs TensorRT >= 8.6 "
            "(JetPack 6.0 or newer; on a workstation pip install 'liverkd[trt]')"
        )
    if facts.jetson and facts.tensorrt_wheels:
        problems.append(
            f"TensorRT from PyPI ({', '.join(facts.tensorrt_wheels)}) on a Jetson: use JetPack's "
            "(pip uninstall those wheels and tensorrt; a venv made with --system-site-packages sees JetPack's)"
        )
    if facts.binding:
        why = driver_mismatch(facts.binding, facts.binding_cuda, facts.driver_cuda)
        if why:
            problems.append(why)
    return problems


def platform_facts(tensorrt_version: str | None, binding: str | None, driver_cuda: str | None) -> PlatformFacts:
    return PlatformFacts(
        python=tuple(sys.version_info[:2]),
        tensorrt=tensorrt_version,
        tensorrt_wheels=_tensorrt_wheels(),
        jetson=is_jetson(),
        driver_cuda=driver_cuda,
        binding=binding,
        binding_cuda=binding_cuda_version(binding) if binding else None,
    )


def _tensorrt_wheels() -> tuple[str, ...]:
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
    return tuple(sorted(n for n in names if re.fullmatch(r"tensorrt(-cu\d+)?-libs", n)))


# ---------------------------------------------------------------- what is here


def target_here(cuda_binding: str | None = "auto") -> TensorRTTarget:
    """TensorRT version, GPU name, compute capability and SM count here; RunnerError (one line) if they cannot
    serve. `cuda_binding`: the CUDA binding the runner will use (None: not needed, as for a build)."""
    missing, binding = [], None
    if cuda_binding is not None:
        try:
            binding = choose_binding(cuda_binding, installed_bindings())
        except RunnerError as e:
            missing.append(str(e))
    try:
        trt = import_tensorrt()
    except RunnerError as e:
        missing.append(str(e))
    if missing:
        raise RunnerError("; ".join(missing))
    pre = preflight()
    if not pre.ok:
        raise RunnerError(f"TensorRT needs a GPU: {pre.reason}")
    dev = pre.device
    problems = check_platform(platform_facts(trt.__version__, binding, dev.driver_version))
    if problems:
        raise RunnerError("; ".join(problems))
    return TensorRTTarget(trt.__version__, dev.name, dev.compute_capability, dev.sm_count or None, dev.driver_version)


def tensorrt_available(cuda_binding: str = "auto") -> tuple[bool, str]:
    """(TensorRT, a CUDA binding and a GPU present, and the platform supported; why not)."""
    try:
        target_here(cuda_binding)
    except RunnerError as e:
        return False, str(e)
    return True, ""


# ---------------------------------------------------------------- plan checks


def check_target(built: TensorRTTarget, here: TensorRTTarget) -> str | None:
    """Why a plan built for `built` cannot run `here`; None if it can."""
    if built.version != here.version:
        return f"plan built with TensorRT {built.version}, this machine has TensorRT {here.version}"
    same_sms = built.sm_count is None or here.sm_count is None or built.sm_count == here.sm_count
    if built.gpu_name != here.gpu_name or built.compute_capability != here.compute_capability or not same_sms:
        return f"plan built for {_gpu(built)}, this machine has {_gpu(here)}"
    return None


def _gpu(t: TensorRTTarget) -> str:
    sms = f", {t.sm_count} SMs" if t.sm_count else ""
    return f"{t.gpu_name} (compute {t.compute_capability}{sms})"


def plan_usable(bundle, cuda_binding: str = "auto") -> tuple[bool, str]:
    """(can this bundle's model.plan run here, why not). Cheap checks first; never touches trt.Runtime."""
    if bundle.meta.tensorrt is None:
        return False, f"{bundle.path}: no TensorRT plan in this bundle"
    try:
        bundle.model_file("plan").read()
        why = check_target(bundle.meta.tensorrt, target_here(cuda_binding))
    except (BundleError, RunnerError) as e:
        return False, str(e)
    return (False, f"{bundle.file('plan')}: {why}") if why else (True, "")


# ---------------------------------------------------------------- build


def strongly_typed(tensorrt_version: str) -> bool:
    """TensorRT >= 10 builds strongly typed networks: the ONNX file's types are the precision."""
    return _major(tensorrt_version) >= 10


def plan_onnx_role(precision: str, tensorrt_version: str) -> str:
    """The bundle file ("onnx", "onnx_fp16", "onnx_int8") a `precision` plan is built from on that TensorRT."""
    if precision == "int8":
        return "onnx_int8"
    if precision == "fp16" and strongly_typed(tensorrt_version):
        return "onnx_fp16"
    return "onnx"  # fp32, or fp16 by builder flag on TensorRT 8.6


def timing_cache_file(folder, tensorrt_version: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU architecture: .trt-timing-10.3.0-sm87.cache."""
    return Path(folder) / f".trt-timing-{tensorrt_version}-sm{compute_capability.replace('.', '')}.cache"


_WARNED: set[str] = set()


def attach_timing_cache(path: Path | None, create: Callable, attach: Callable) -> str:
    """Give the builder the timing cache in `path`: "loaded", or "empty" (no file, or none asked for), or
    "replaced" (a file TensorRT refused: corrupt, or from another version or GPU; warned once per file).

    `create(bytes) -> cache` and `attach(cache) -> bool` are TensorRT's IBuilderConfig.create_timing_cache
    and set_timing_cache(cache, ignore_mismatch=False); TensorRT may raise, answer None or answer False."""
    data = _read(path)
    if data:
        try:
            cache = create(data)
            if cache is not None and attach(cache):
                return "loaded"
            why = "TensorRT refused it"
        except Exception as e:  # TensorRT's own exception types
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            warnings.warn(f"{path}: timing cache not usable ({why}); building with an empty one", stacklevel=2)
    if not attach(create(b"")):
        raise RunnerError("TensorRT refused an empty timing cache")
    return "replaced" if data else "empty"


def _read(path: Path | None) -> bytes:
    try:
        return Path(path).read_bytes() if path else b""
    except OSError:
        return b""


def build_plan(
    onnx_path, plan_path, precision: str, *, workspace_mib: int = 1024, timing_cache_dir=None
) -> TensorRTTarget:
    """ONNX -> serialized plan at `plan_path`; returns engine.json's "tensorrt" entry.

    `timing_cache_dir`: where the timing cache of this TensorRT version and GPU is kept (timing_cache_file)."""
    trt = import_tensorrt()
    here = target_here(cuda_binding=None)
    typed = strongly_typed(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = "STRONGLY_TYPED" if typed else "EXPLICIT_BATCH"  # 11 keeps STRONGLY_TYPED (ignored), drops the other
    network = builder.create_network(1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag)))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError(f"{onnx_path}: TensorRT's ONNX parser refused it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not typed:  # TensorRT 8.6: precision by builder flag
        if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    _refuse_dynamic_shapes(network)
    cache_path = (
        timing_cache_file(timing_cache_dir, trt.__version__, here.compute_capability) if timing_cache_dir else None
    )
    attach = lambda cache: config.set_timing_cache(cache, ignore_mismatch=False)  # False: from another GPU
    attach_timing_cache(cache_path, config.create_timing_cache, attach)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RunnerError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            with open(tmp, "wb") as f:
                f.write(config.get_timing_cache().serialize())
    return dataclasses.replace(
        here,
        strongly_typed=typed,
        builder_flags=() if typed else _flags_set(trt, config),
        workspace_mib=int(workspace_mib),
        onnx=Path(onnx_path).name,
    )


def _flags_set(trt, config) -> tuple[str, ...]:
    return tuple(name for name in ("FP16", "INT8") if config.get_flag(getattr(trt.BuilderFlag, name)))


def _refuse_dynamic_shapes(network) -> None:
    """Plans are built for the spec's fixed input shape (larger volumes go through a sliding window)."""
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            raise RunnerError(
                f"input {tensor.name!r} has dynamic axes {tuple(tensor.shape)}; build TensorRT engines "
                "from a fixed-shape export (liverkd export without --dynamic)"
            )


# ---------------------------------------------------------------- run


class TensorRTRunner(Runner):
    """One plan, one execution context, pinned host buffers, device buffers and a stream; CUDA-event timings.

    `built_for` is what engine.json says the plan was built with; the plan runs only where
    target_here() is the same (check_target). `cuda_binding`: auto, cuda-python or pycuda.
    `zero_copy` (default: on an integrated GPU, a Jetson) hands TensorRT mapped host memory
    instead of device buffers: no copies, h2d and d2h are then ~0."""

    name = "tensorrt"

    def __init__(
        self,
        plan: ModelFile,
        *,
        precision: str,
        input_shape=None,
        built_for: TensorRTTarget,
        cuda_binding: str = "auto",
        zero_copy: bool | None = None,
    ):
        super().__init__(plan, precision=precision, input_shape=input_shape)
        self.engine = self.context = self.runtime = self.cuda = None
        data = plan.read()  # size and sha256 first: they need neither TensorRT nor a GPU
        here = target_here(cuda_binding)  # binding, TensorRT, CUDA preflight, platform: before trt.Runtime
        why = check_target(built_for, here)
        if why:
            raise RunnerError(f"{plan.path}: {why}")
        trt = import_tensorrt()
        self.cuda = open_cuda(cuda_binding)  # its context is current before TensorRT allocates anything
        try:
            self._load(trt, data, zero_copy)
        except BaseException:
            self.close()
            raise
        self.device = f"cuda:0 ({here.gpu_name}, {self.cuda.facts.binding}{', zero-copy' if self.zero_copy else ''})"

    def _load(self, trt, data: bytes, zero_copy: bool | None) -> None:
        path, cuda = self.model.path, self.cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RunnerError(f"{path}: TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunnerError(f"{path}: expected one input and one output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.accept_input_shape(tuple(self.engine.get_tensor_shape(self.input_name)))
        if None in self.input_shape:
            raise RunnerError(f"{path}: the plan has dynamic input axes; liverkd builds fixed-shape plans")
        self.zero_copy = cuda.facts.integrated if zero_copy is None else bool(zero_copy)
        self.zero_copy = self.zero_copy and cuda.facts.can_map_host_memory
        self.host_in, self.device_in = self._buffers(trt, self.input_name)
        self.host_out, self.device_out = self._buffers(trt, self.output_name)
        self._events = [cuda.event() for _ in range(4)]

    def _buffers(self, trt, name: str):
        """(pinned host array, the device address TensorRT reads or writes) for tensor `name`."""
        shape = tuple(self.engine.get_tensor_shape(name))
        host = self.cuda.pinned(shape, trt.nptype(self.engine.get_tensor_dtype(name)), mapped=self.zero_copy)
        device = host.device_ptr if self.zero_copy else self.cuda.device_buffer(host.array.nbytes)
        self.context.set_tensor_address(name, int(device))
        return host, device

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, **options) -> TensorRTRunner:
        if bundle.meta.tensorrt is None:
            raise RunnerError(f"{bundle.path}: no TensorRT plan in this bundle")
        plan = bundle.model_for(cls.name, precision)
        meta = bundle.meta
        return cls(plan, precision=meta.precision, input_shape=meta.input.shape, built_for=meta.tensorrt, **options)

    @classmethod
    def usable(cls, bundle) -> tuple[bool, str]:
        return plan_usable(bundle)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        cuda, (e0, e1, e2, e3) = self.cuda, self._events
        np.copyto(self.host_in.array, x, casting="same_kind")  # staging into pinned memory: before the timing
        cuda.record(e0)
        if not self.zero_copy:
            cuda.h2d(self.device_in, self.host_in.array)
        cuda.record(e1)
        if not self.context.execute_async_v3(cuda.stream):
            raise RunnerError("TensorRT execute_async_v3 failed")
        cuda.record(e2)
        if not self.zero_copy:
            cuda.d2h(self.host_out.array, self.device_out)
        cuda.record(e3)
        cuda.wait(e3)
        ms = [cuda.elapsed_ms(a, b) for a, b in ((e0, e1), (e1, e2), (e2, e3))]
        self.last_timings = {"h2d": ms[0] / 1e3, "network": ms[1] / 1e3, "d2h": ms[2] / 1e3}
        return self.host_out.array.astype(np.float32, copy=True)

    def close(self) -> None:
        self.context = self.engine = self.runtime = None  # TensorRT's objects go before the memory and context
        if self.cuda is not None:
            self.cuda.close()
            self.cuda = None
