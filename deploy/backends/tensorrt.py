"""TensorRT: build a plan from ONNX, and run a plan (cuda-python device buffers, execute_async_v3).

A plan only runs on the GPU model and TensorRT version it was built for, so engine.json
records both, with the plan's size and sha256. Every check that needs neither TensorRT nor
a GPU runs first; the CUDA preflight runs before anything touches trt.Runtime.

Precision on TensorRT >= 10 lives in the ONNX file (strongly typed networks: model.fp16.onnx,
model.int8.onnx with Q/DQ); TensorRT 8.x/9.x builds the fp32 or Q/DQ file with the FP16/INT8
builder flags instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from liverkd.deploy.backends.base import Runner, RunnerError
from liverkd.deploy.cuda_preflight import preflight

from liverkd.core.atomic import atomic_path, sha256_file


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RunnerError(f"TensorRT is not installed ({e})") from None
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(TensorRT importable and a GPU present, why not)."""
    try:
        import_tensorrt()
    except RunnerError as e:
        return False, str(e)
    pre = preflight()
    return (True, "") if pre.ok else (False, pre.reason)


def _major(version: str) -> int:
    return int(version.split(".")[0])


# ---------------------------------------------------------------- plan checks


def check_plan_file(plan: Path, built: dict) -> str | None:
    """Why the plan file is not the one engine.json describes (missing, truncated, foreign); None if it is."""
    if not plan.is_file():
        return f"{plan}: missing"
    size = plan.stat().st_size
    want = built.get("plan_bytes")
    if want is not None and size != want:
        kind = "truncated" if size < want else "larger than recorded"
        return f"{plan}: {kind} ({size:,} bytes, engine.json says {want:,})"
    if built.get("plan_sha256") and sha256_file(plan) != built["plan_sha256"]:
        return f"{plan}: sha256 differs from engine.json (not the plan this bundle was built with)"
    return None


def check_target(built: dict, here: dict) -> str | None:
    """Why a plan built for `built` (engine.json "tensorrt") cannot run `here`; None if it can."""
    if built.get("version") != here.get("version"):
        return f"plan built with TensorRT {built.get('version')}, this machine has TensorRT {here.get('version')}"
    if built.get("gpu_name") != here.get("gpu_name") or built.get("compute_capability") != here.get(
        "compute_capability"
    ):
        return (
            f"plan built for {built.get('gpu_name')} (compute {built.get('compute_capability')}), "
            f"this machine has {here.get('gpu_name')} (compute {here.get('compute_capability')})"
        )
    return None


def target_here() -> dict:
    """TensorRT version, GPU name and compute capability of this machine; RunnerError if no TensorRT/GPU."""
    trt = import_tensorrt()
    pre = preflight()
    if not pre.ok:
        raise RunnerError(f"TensorRT needs a GPU: {pre.reason}")
    dev = pre.device
    return {
        "version": trt.__version__,
        "gpu_name": dev.name,
        "compute_capability": dev.compute_capability,
        "driver": dev.driver_version,
    }


def plan_usable(bundle) -> tuple[bool, str]:
    """(can this bundle's model.plan run here, why not). Cheap checks first; never touches trt.Runtime."""
    plan = bundle.file("plan")
    if plan is None:
        return False, f"{bundle.path}: no TensorRT plan in this bundle"
    built = bundle.meta.get("tensorrt") or {}
    if not built:
        return False, f"{bundle.path}/engine.json: no 'tensorrt' entry describing {plan.name}"
    why = check_plan_file(plan, built)
    if why:
        return False, why
    try:
        here = target_here()
    except RunnerError as e:
        return False, str(e)
    why = check_target(built, here)
    return (False, f"{plan}: {why}") if why else (True, "")


# ---------------------------------------------------------------- build


def build_plan(onnx_path, plan_path, precision: str, *, workspace_mib: int = 1024, timing_cache=None) -> dict:
    """ONNX -> serialized plan at `plan_path`; returns engine.json's "tensorrt" entry."""
    trt = import_tensorrt()
    here = target_here()
    strongly_typed = _major(trt.__version__) >= 10
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = "STRONGLY_TYPED" if strongly_typed else "EXPLICIT_BATCH"
    network = builder.create_network(1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag)))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError(f"{onnx_path}: TensorRT's ONNX parser refused it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not strongly_typed:
        if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    _refuse_dynamic_shapes(network)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # a cache from another GPU/version: start afresh
        config.set_timing_cache(cache, ignore_mismatch=False)
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
    return {
        **here,
        "strongly_typed": strongly_typed,
        "builder_flags": [] if strongly_typed else _flags_set(trt, config),
        "workspace_mib": int(workspace_mib),
        "plan_bytes": Path(plan_path).stat().st_size,
        "plan_sha256": sha256_file(plan_path),
    }


def _flags_set(trt, config) -> list[str]:
    return [name for name in ("FP16", "INT8") if config.get_flag(getattr(trt.BuilderFlag, name))]


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


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise RunnerError(f"cuda-python is not installed ({e}); the TensorRT runner needs it") from None
    return cudart


class TensorRTRunner(Runner):
    """One plan, one execution context, device buffers and a stream; timings by CUDA events."""

    name = "tensorrt"

    def __init__(self):
        super().__init__()
        self.engine = self.context = self.stream = None
        self._buffers: list[int] = []
        self._events: list = []

    def load(self, bundle) -> TensorRTRunner:
        ok, why = plan_usable(bundle)  # preflight included: trt.Runtime is touched only after it
        if not ok:
            raise RunnerError(why)
        trt = import_tensorrt()
        self.cudart = cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(bundle.file("plan").read_bytes())
        if self.engine is None:
            raise RunnerError(f"{bundle.file('plan')}: TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunnerError(f"{bundle.file('plan')}: expected one input and one output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.output_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output = np.empty(self.output_shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.stream = self._call(cudart.cudaStreamCreate())
        for name, nbytes in (
            (self.input_name, int(np.prod(self.input_shape)) * self.input_dtype.itemsize),
            (self.output_name, self.output.nbytes),
        ):
            ptr = self._call(cudart.cudaMalloc(nbytes))
            self._buffers.append(ptr)
            self.context.set_tensor_address(name, int(ptr))
        self._events = [self._call(cudart.cudaEventCreate()) for _ in range(4)]
        self.device = f"cuda:0 ({bundle.meta['tensorrt'].get('gpu_name')})"
        self.precision = bundle.precision
        return self

    def _call(self, result):
        err, *rest = result
        if int(err) != 0:
            raise RunnerError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if x.shape != self.input_shape:
            raise RunnerError(f"input shape {x.shape} != engine input {self.input_shape}")
        e0, e1, e2, e3 = self._events
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(cudart.cudaEventRecord(e0, self.stream))
        self._call(cudart.cudaMemcpyAsync(self._buffers[0], x.ctypes.data, x.nbytes, h2d, self.stream))
        self._call(cudart.cudaEventRecord(e1, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RunnerError("TensorRT execute_async_v3 failed")
        self._call(cudart.cudaEventRecord(e2, self.stream))
        self._call(
            cudart.cudaMemcpyAsync(self.output.ctypes.data, self._buffers[1], self.output.nbytes, d2h, self.stream)
        )
        self._call(cudart.cudaEventRecord(e3, self.stream))
        self._call(cudart.cudaEventSynchronize(e3))
        ms = [self._call(cudart.cudaEventElapsedTime(a, b)) for a, b in ((e0, e1), (e1, e2), (e2, e3))]
        self.last_timings = {"h2d": ms[0] / 1e3, "network": ms[1] / 1e3, "d2h": ms[2] / 1e3}
        return self.output.astype(np.float32, copy=True)

    def close(self) -> None:
        if self.engine is None:
            return
        cudart = self.cudart
        for ptr in self._buffers:
            cudart.cudaFree(ptr)
        for ev in self._events:
            cudart.cudaEventDestroy(ev)
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
        self._buffers, self._events = [], []
        self.context = self.engine = self.stream = None
