"""The Runner interface and the registry of backends.

The registry is a table of lazy import paths (Polygraphy's way with optional packages): this
module imports no backend, and a backend module imports its runtime only when a runner is built.
A Runner is built from one model file (a ModelFile: path + recorded size and sha256) and the
facts it needs; the bundle decides which file serves which backend (Bundle.model_for).
"""

from __future__ import annotations

import abc
import importlib
import os
import time

import numpy as np

from liverkd.core.errors import LiverkdError
from liverkd.deploy.bundle import ModelFile

RUNNERS = {
    "onnxruntime": "liverkd.deploy.backends.onnxruntime:OnnxRuntimeRunner",
    "tensorrt": "liverkd.deploy.backends.tensorrt:TensorRTRunner",
    "torch": "liverkd.deploy.backends.torch:TorchRunner",
    "openvino": "liverkd.deploy.backends.openvino:OpenVINORunner",
}
"""Backend name -> "module:Runner class", imported on first use."""
BACKENDS = ("auto", *RUNNERS)
AUTO_ORDER = ("tensorrt", "onnxruntime")
TENSORRT_OPTIONS = ("cuda_binding", "zero_copy")
"""`--backend auto` takes the first of these that can run the bundle here."""


class RunnerError(LiverkdError, RuntimeError):
    """A backend that cannot run here (missing package, no GPU, incompatible plan, wrong shape)."""


THREADS_ENV = "LIVERKD_THREADS"
"""Threads for the CPU runtimes (ONNX Runtime, OpenVINO) when no `threads` option is given."""


def default_threads() -> int:
    """$LIVERKD_THREADS if set, else the CPUs this process may run on: its affinity (taskset, a
    container's cpuset), not os.cpu_count(), which counts the whole machine (64 threads in a
    4-core container, each one fighting the others for the same 4 cores)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise RunnerError(f"{THREADS_ENV}={value!r}: give a whole number of threads >= 1")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        return os.cpu_count() or 1


def require(module: str, install: str):
    """Import a backend's runtime, or a one-line RunnerError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RunnerError(f"{module} is not installed ({e}); {install}") from None


class Runner(abc.ABC):
    """Runs one model file: float32 (1, 1, X, Y, Z) in, logits (1, C, X, Y, Z) out.

    `infer` returns host numpy arrays. Backends that own a device also fill
    `last_timings` with the seconds spent in "h2d", "network" and "d2h" (GPU runners
    time them with CUDA events); host-only backends report all of it as "network".
    Subclasses load the model in __init__, from the verified bytes of `model.read()`.
    """

    name: str = "?"

    def __init__(self, model: ModelFile, *, precision: str = "fp32", input_shape=None):
        self.model = model
        self.precision = precision
        self.expected_input_shape = tuple(input_shape) if input_shape is not None else None
        """engine.json's input shape, when built from a bundle."""
        self.input_shape: tuple[int | None, ...] | None = None
        """The model's own input shape (None for a dynamic axis), once loaded."""
        self.device = "cpu"
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, **options) -> Runner:
        """This backend's runner for the file `bundle` names for it (Bundle.model_for)."""
        precision = precision or bundle.precision
        model = bundle.model_for(cls.name, precision)
        return cls(model, precision=precision, input_shape=bundle.input_shape, **options)

    @classmethod
    def usable(cls, bundle) -> tuple[bool, str]:
        """(can `--backend auto` choose this backend for `bundle` here, why not)."""
        return True, ""

    @abc.abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray: ...

    def accept_input_shape(self, declared) -> None:
        """Record the model's declared input shape; RunnerError if it is not engine.json's."""
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in declared)
        expected = self.expected_input_shape
        if expected is not None:
            fixed = [d if isinstance(d, int) else None for d in expected]
            if len(shape) != len(fixed) or any(a and b and a != b for a, b in zip(shape, fixed)):
                shown = [d if d is not None else "?" for d in shape]
                raise RunnerError(f"{self.model.path}: the model's input shape {shown} is not engine.json's {fixed}")
        self.input_shape = shape

    def infer(self, x: np.ndarray) -> np.ndarray:
        shape = self.input_shape
        if shape is not None and (x.ndim != len(shape) or any(d and d != n for d, n in zip(shape, x.shape))):
            raise RunnerError(f"{self.model.path}: input of shape {tuple(x.shape)}; the model takes {list(shape)}")
        self.last_timings = {}
        t0 = time.perf_counter()
        out = self._infer(x)
        if not self.last_timings:  # host-only backend: all of it is network time
            self.last_timings = {"h2d": 0.0, "network": time.perf_counter() - t0, "d2h": 0.0}
        return out

    def infer_device(self, x):
        """A CuPy array in (the volume already on the GPU), a CuPy array out. This default goes
        through the host, one download and one upload of a window; backends that can read and
        write device memory (torch via DLPack, ONNX Runtime's CUDA provider via IO binding)
        override it so the window never leaves the GPU."""
        from liverkd.core import xp

        return xp.like(self.infer(xp.to_host(x)), x)

    def close(self) -> None:  # noqa: B027 (optional hook: most runners hold nothing to release)
        pass

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def runner_class(backend: str) -> type[Runner]:
    """The Runner class registered for `backend` (its module imported now)."""
    if backend not in RUNNERS:
        raise RunnerError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    module, _, name = RUNNERS[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def auto_backend(bundle) -> str:
    """TensorRT when the bundle has a plan usable on this GPU, else ONNX Runtime."""
    for backend in AUTO_ORDER:
        if runner_class(backend).usable(bundle)[0]:
            return backend
    return AUTO_ORDER[-1]


def open_runner(bundle, backend: str = "auto", *, precision: str | None = None, **options) -> Runner:
    """A runner for `bundle` on `backend` (auto: see auto_backend), at `precision` (default: the bundle's)."""
    if backend == "auto":  # a plan serves the bundle's own precision only
        backend = auto_backend(bundle) if precision in (None, bundle.precision) else "onnxruntime"
        if backend != "tensorrt":  # TensorRT's own options mean nothing to the runner auto fell back to
            options = {k: v for k, v in options.items() if k not in TENSORRT_OPTIONS}
    return runner_class(backend).from_bundle(bundle, precision, **options)
