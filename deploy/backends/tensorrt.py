"""TensorRT: build a plan from ONNX, and run a plan (cuda-python device buffers, execute_async_v3).

A plan only runs on the GPU model and TensorRT version it was built for, so engine.json
records both (EngineMeta.tensorrt: version, GPU name, compute capability, SM count), and the
plan's size and sha256 (files.plan). Every check that needs neither TensorRT nor a GPU runs
first; the CUDA preflight runs before anything touches trt.Runtime.

Precision on TensorRT >= 10 lives in the ONNX file (strongly typed networks: model.fp16.onnx,
model.int8.onnx with Q/DQ); TensorRT 8.x/9.x builds the fp32 or Q/DQ file with the FP16/INT8
builder flags instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from liverkd.core.atomic import atomic_path
from liverkd.deploy.backends.base import Runner, RunnerError, require
from liverkd.deploy.bundle import BundleError, ModelFile, TensorRTTarget
from liverkd.deploy.cuda_preflight import preflight


def import_tensorrt():
    return require("tensorrt", "on a Jetson it comes with JetPack; elsewhere pip install 'liverkd[trt]'")


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


def target_here() -> TensorRTTarget:
    """TensorRT version, GPU name, compute capability and SM count here; RunnerError if no TensorRT/GPU."""
    trt = import_tensorrt()
    pre = preflight()
    if not pre.ok:
        raise RunnerError(f"TensorRT needs a GPU: {pre.reason}")
    dev = pre.device
    return TensorRTTarget(trt.__version__, dev.name, dev.compute_capability, dev.sm_count or None, dev.driver_version)


def plan_usable(bundle) -> tuple[bool, str]:
    """(can this bundle's model.plan run here, why not). Cheap checks first; never touches trt.Runtime."""
    if bundle.meta.tensorrt is None:
        return False, f"{bundle.path}: no TensorRT plan in this bundle"
    try:
        bundle.model_file("plan").read()
        why = check_target(bundle.meta.tensorrt, target_here())
    except (BundleError, RunnerError) as e:
        return False, str(e)
    return (False, f"{bundle.file('plan')}: {why}") if why else (True, "")


# ---------------------------------------------------------------- build


def build_plan(onnx_path, plan_path, precision: str, *, workspace_mib: int = 1024, timing_cache=None) -> TensorRTTarget:
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
    return dataclasses.replace(
        here,
        strongly_typed=strongly_typed,
        builder_flags=() if strongly_typed else _flags_set(trt, config),
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


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise RunnerError(f"cuda-python is not installed ({e}); the TensorRT runner needs it") from None
    return cudart


def cuda_call(result):
    """A cuda-python call's (error, value...) -> value; RunnerError on an error."""
    err, *rest = result
    if int(err) != 0:
        raise RunnerError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else None


class TensorRTRunner(Runner):
    """One plan, one execution context, device buffers and a stream; timings by CUDA events.

    `built_for` is what engine.json says the plan was built with; the plan runs only where
    target_here() is the same (check_target)."""

    name = "tensorrt"

    def __init__(self, plan: ModelFile, *, precision: str, input_shape=None, built_for: TensorRTTarget):
        super().__init__(plan, precision=precision, input_shape=input_shape)
        self.engine = self.context = self.stream = None
        self._buffers: list[int] = []
        self._events: list = []
        data = plan.read()  # size and sha256 first: they need neither TensorRT nor a GPU
        here = target_here()  # the CUDA preflight: trt.Runtime is touched only after it
        why = check_target(built_for, here)
        if why:
            raise RunnerError(f"{plan.path}: {why}")
        trt = import_tensorrt()
        self.cudart = cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RunnerError(f"{plan.path}: TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunnerError(f"{plan.path}: expected one input and one output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.accept_input_shape(tuple(self.engine.get_tensor_shape(self.input_name)))
        if None in self.input_shape:
            raise RunnerError(f"{plan.path}: the plan has dynamic input axes; liverkd builds fixed-shape plans")
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        output_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        self.output = np.empty(output_shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.stream = cuda_call(cudart.cudaStreamCreate())
        for name, nbytes in (
            (self.input_name, int(np.prod(self.input_shape)) * self.input_dtype.itemsize),
            (self.output_name, self.output.nbytes),
        ):
            ptr = cuda_call(cudart.cudaMalloc(nbytes))
            self._buffers.append(ptr)
            self.context.set_tensor_address(name, int(ptr))
        self._events = [cuda_call(cudart.cudaEventCreate()) for _ in range(4)]
        self.device = f"cuda:0 ({here.gpu_name})"

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
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        e0, e1, e2, e3 = self._events
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaEventRecord(e0, self.stream))
        cuda_call(cudart.cudaMemcpyAsync(self._buffers[0], x.ctypes.data, x.nbytes, h2d, self.stream))
        cuda_call(cudart.cudaEventRecord(e1, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RunnerError("TensorRT execute_async_v3 failed")
        cuda_call(cudart.cudaEventRecord(e2, self.stream))
        cuda_call(
            cudart.cudaMemcpyAsync(self.output.ctypes.data, self._buffers[1], self.output.nbytes, d2h, self.stream)
        )
        cuda_call(cudart.cudaEventRecord(e3, self.stream))
        cuda_call(cudart.cudaEventSynchronize(e3))
        ms = [cuda_call(cudart.cudaEventElapsedTime(a, b)) for a, b in ((e0, e1), (e1, e2), (e2, e3))]
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
