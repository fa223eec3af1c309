from __future__ import annotations

import abc
import time

import numpy as np

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "openvino")


class RunnerError(RuntimeError):
    """A backend that cannot run here (missing package, no GPU, incompatible plan)."""


class Runner(abc.ABC):
    """Runs one engine bundle's network: float32 (1, 1, X, Y, Z) in, logits (1, C, X, Y, Z) out.

    `infer` returns host numpy arrays. Backends that own a device also fill
    `last_timings` with the seconds spent in "h2d", "network" and "d2h" (GPU runners
    time them with CUDA events); host-only backends report all of it as "network".
    """

    name: str = "?"

    def __init__(self):
        self.device = "cpu"
        self.precision = "fp32"
        self.last_timings: dict[str, float] = {}

    @abc.abstractmethod
    def load(self, bundle) -> Runner: ...

    @abc.abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray: ...

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.last_timings = {}
        t0 = time.perf_counter()
        out = self._infer(x)
        if not self.last_timings:  # host-only backend: all of it is network time
            self.last_timings = {"h2d": 0.0, "network": time.perf_counter() - t0, "d2h": 0.0}
        return out

    def close(self) -> None:  # noqa: B027 (optional hook: most runners hold nothing to release)
        pass

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_runner(bundle, backend: str = "auto", **options) -> Runner:
    """Load `bundle` on `backend`. `auto`: TensorRT when a plan for this GPU exists, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnxruntime"
        plan = bundle.file("plan")
        if plan is not None and plan.is_file():
            from liverkd.deploy.backends import tensorrt as trt_backend

            ok, _why = trt_backend.plan_usable(bundle)
            if ok:
                backend = "tensorrt"
    if backend == "onnxruntime":
        from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(**options).load(bundle)
    if backend == "tensorrt":
        from liverkd.deploy.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(**options).load(bundle)
    if backend == "openvino":
        from liverkd.deploy.backends.openvino import OpenVINORunner

        return OpenVINORunner(**options).load(bundle)
    from liverkd.deploy.backends.torch import TorchRunner

    return TorchRunner(**options).load(bundle)
