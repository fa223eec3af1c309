"""One small CUDA adapter: the few calls the TensorRT runner and the GPU checks make, through
cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6) or pycuda (`pycuda.driver`).

    cuda = open_cuda("auto")                    # cuda-python first, pycuda second (RunnerError: one line)
    cuda.facts                                  # name, compute capability, SMs, integrated, driver, binding
    host = cuda.pinned((1, 1, 64, 64, 64), np.float32, mapped=cuda.facts.integrated)
    device = host.device_ptr or cuda.device_buffer(host.array.nbytes)   # zero-copy where mapped
    start, end = cuda.event(), cuda.event()
    cuda.record(start); cuda.h2d(device, host.array); cuda.record(end)
    cuda.wait(end); cuda.elapsed_ms(start, end)
    cuda.stream                                 # int: what TensorRT's execute_async_v3 takes
    cuda.close()                                # frees everything it made, then lets go of the context

One Cuda is one device and one stream; everything it allocates is its own and is freed by close().
Host buffers are page-locked (pinned), so the timed copies are DMA transfers, not staging through a
driver buffer; `mapped=True` maps them into the device's address space (cudaHostAllocMapped /
pycuda's DEVICEMAP), which on a Jetson (integrated GPU, one memory) needs no copy at all.
Bindings are imported only here, only when a Cuda is opened; the driver is asked (cuda_preflight,
ctypes) before either is imported.
"""

from __future__ import annotations

import abc
import ctypes
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from liverkd.deploy.backends.base import RunnerError
from liverkd.deploy.cuda_preflight import preflight

BINDINGS = ("cuda-python", "pycuda")
"""In the order `auto` tries them."""
CHOICES = ("auto", *BINDINGS)
_MODULES = {"cuda-python": ("cuda.bindings.runtime", "cuda.cudart"), "pycuda": ("pycuda.driver",)}
INSTALL = {
    "cuda-python": "pip install 'cuda-python>=12,<13' (its major must be your driver's CUDA major; 13 needs R580+)",
    "pycuda": "pip install pycuda (it builds from source: on a Jetson against JetPack's CUDA)",
}
NO_BINDING = (
    "no CUDA binding: pip install cuda-python (matching your driver's CUDA major: 'cuda-python>=12,<13' for "
    "CUDA 12, 13.x needs an R580+ driver) or pycuda (on a Jetson: build it from source against JetPack's CUDA)"
)


@dataclass(frozen=True)
class CudaFacts:
    name: str
    compute_capability: str  # "8.7"
    sm_count: int
    integrated: bool  # a Jetson: the GPU shares the host's memory
    can_map_host_memory: bool
    driver_cuda: str  # the CUDA version the driver supports, "12.2"
    binding: str  # "cuda-python 12.6.2"
    binding_cuda: str  # the CUDA version the binding was built for, "12.6"


@dataclass
class PinnedArray:
    """Page-locked host memory seen as a numpy array; `device_ptr` is its mapped device address, or None."""

    array: np.ndarray
    device_ptr: int | None = None


# ---------------------------------------------------------------- which binding


def installed_bindings() -> list[str]:
    """The bindings whose modules can be found here (found, not imported: pycuda.driver loads libcuda)."""
    return [name for name in BINDINGS if any(_findable(m) for m in _MODULES[name])]


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


def choose_binding(requested: str, installed: Sequence[str]) -> str:
    """The binding to use: `requested` ("auto": the first of BINDINGS installed); RunnerError (one line) if none."""
    if requested not in CHOICES:
        raise RunnerError(f"--cuda-binding {requested!r}: choose from {', '.join(CHOICES)}")
    if requested == "auto":
        for name in BINDINGS:
            if name in installed:
                return name
        raise RunnerError(NO_BINDING)
    if requested not in installed:
        raise RunnerError(f"--cuda-binding {requested}: {requested} is not installed; {INSTALL[requested]}")
    return requested


def binding_cuda_version(binding: str) -> str | None:
    """The CUDA version `binding` was built for ("12.6"); None when it cannot be read.

    cuda-python's version is its CUDA version (cuda-bindings 12.6.x: CUDA 12.6), read from the
    package metadata without importing it; pycuda reports the CUDA it was compiled against."""
    if binding == "cuda-python":
        for dist in ("cuda-bindings", "cuda-python"):
            try:
                return ".".join(metadata.version(dist).split(".")[:2])
            except metadata.PackageNotFoundError:
                continue
        return None
    try:
        return ".".join(str(v) for v in importlib.import_module("pycuda.driver").get_version()[:2])
    except (ImportError, OSError):
        return None


def driver_mismatch(binding: str, binding_cuda: str | None, driver_cuda: str | None) -> str | None:
    """Why `binding` (built for CUDA `binding_cuda`) cannot work with a driver for CUDA `driver_cuda`; None if it can.

    A driver runs every CUDA of its major and below (minor version compatibility), never a newer major."""
    if not binding_cuda or not driver_cuda or _major(binding_cuda) <= _major(driver_cuda):
        return None
    fix = {
        "cuda-python": f"pip install 'cuda-python>={_major(driver_cuda)},<{_major(driver_cuda) + 1}'",
        "pycuda": "rebuild pycuda against the CUDA toolkit the driver supports",
    }[binding]
    return (
        f"{binding} is built for CUDA {binding_cuda} but the driver supports CUDA {driver_cuda} only: "
        f"{fix} (or update the driver: CUDA 13 needs R580+)"
    )


def _major(version: str) -> int:
    return int(version.split(".")[0])


def open_cuda(binding: str = "auto", device: int = 0) -> Cuda:
    """A Cuda on `device` through `binding`. The driver is asked first (a missing libcuda is one line)."""
    pre = preflight()
    if not pre.ok:
        raise RunnerError(f"CUDA: {pre.reason}")
    name = choose_binding(binding, installed_bindings())
    why = driver_mismatch(name, binding_cuda_version(name), pre.devices[0].driver_version)
    if why:
        raise RunnerError(why)
    try:
        return {"cuda-python": CudaPython, "pycuda": PyCuda}[name](device)
    except RunnerError:
        raise
    except Exception as e:  # the binding's own error types (pycuda.driver.Error, ...)
        raise RunnerError(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---------------------------------------------------------------- the interface


class Cuda(abc.ABC):
    """One device, one stream; owns what it allocates (freed by close(), newest first)."""

    binding: str = "?"
    facts: CudaFacts
    stream: int
    """The stream's handle as an int (TensorRT's execute_async_v3 takes it so)."""

    def __init__(self):
        self._release: list = []  # callables that free what this Cuda made

    @abc.abstractmethod
    def device_buffer(self, nbytes: int) -> int:
        """Device memory; its address."""

    @abc.abstractmethod
    def pinned(self, shape, dtype, *, mapped: bool = False) -> PinnedArray:
        """Page-locked host memory; mapped into the device's address space when asked and the device can."""

    @abc.abstractmethod
    def h2d(self, dst: int, src: np.ndarray) -> None:
        """Copy `src` (C-contiguous; pinned for a truly asynchronous copy) to device address `dst`, on the stream."""

    @abc.abstractmethod
    def d2h(self, dst: np.ndarray, src: int) -> None:
        """Copy dst.nbytes from device address `src` into `dst`, on the stream."""

    @abc.abstractmethod
    def event(self):
        """A timing event (opaque)."""

    @abc.abstractmethod
    def record(self, event) -> None:
        """Record `event` on the stream."""

    @abc.abstractmethod
    def wait(self, event) -> None:
        """Block the host until `event` has happened."""

    @abc.abstractmethod
    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two recorded events."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the host until the stream is idle."""

    def _let_go(self) -> None:  # noqa: B027 (a hook: pycuda pops its context)
        """After everything is freed: release the context, where the binding holds one."""

    def close(self) -> None:
        release, self._release = self._release, []
        for free in reversed(release):
            try:
                free()
            except Exception:  # noqa: BLE001 (closing must free the rest whatever one free says)
                pass
        self._let_go()

    def describe(self) -> str:
        f = self.facts
        return (
            f"{f.name} (compute {f.compute_capability}, {f.sm_count} SMs) via {f.binding}, driver CUDA {f.driver_cuda}"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _host_array(address: int, shape, dtype) -> np.ndarray:
    """A numpy view of `nbytes` of host memory at `address` (memory this process owns)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = (ctypes.c_ubyte * max(nbytes, 1)).from_address(address)
    return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


def _version_text(encoded: int) -> str:
    """CUDA's 12020 -> "12.2"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


# ---------------------------------------------------------------- cuda-python


def _import_cudart():
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6 (and 13)
    except ImportError:
        try:
            return importlib.import_module("cuda.cudart")  # older cuda-python 12.x
        except ImportError as e:
            raise RunnerError(f"cuda-python is not installed ({e}); {INSTALL['cuda-python']}") from None


class CudaPython(Cuda):
    """cuda-python's runtime API: every call returns (cudaError_t, value...)."""

    binding = "cuda-python"

    def __init__(self, device: int = 0):
        super().__init__()
        self.rt = rt = _import_cudart()
        self._call(rt.cudaSetDevice(device))
        attr = rt.cudaDeviceAttr

        def read(a) -> int:
            return int(self._call(rt.cudaDeviceGetAttribute(a, device)))

        name = self._call(rt.cudaGetDeviceProperties(device)).name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        cc = f"{read(attr.cudaDevAttrComputeCapabilityMajor)}.{read(attr.cudaDevAttrComputeCapabilityMinor)}"
        version = binding_cuda_version("cuda-python") or _version_text(self._call(rt.cudaRuntimeGetVersion()))
        self.facts = CudaFacts(
            name=name.split("\x00")[0],
            compute_capability=cc,
            sm_count=read(attr.cudaDevAttrMultiProcessorCount),
            integrated=bool(read(attr.cudaDevAttrIntegrated)),
            can_map_host_memory=bool(read(attr.cudaDevAttrCanMapHostMemory)),
            driver_cuda=_version_text(self._call(rt.cudaDriverGetVersion())),
            binding=f"cuda-python {_dist_version('cuda-bindings') or _dist_version('cuda-python')}",
            binding_cuda=version,
        )
        self._stream = self._call(rt.cudaStreamCreate())
        self._release.append(lambda: rt.cudaStreamDestroy(self._stream))
        self.stream = int(self._stream)

    def _call(self, result):
        err, *rest = result
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            hint = " (the driver is older than this cuda-python's CUDA)" if "InsufficientDriver" in name else ""
            raise RunnerError(f"CUDA error {name}{hint}")
        return rest[0] if len(rest) == 1 else None

    def device_buffer(self, nbytes: int) -> int:
        ptr = self._call(self.rt.cudaMalloc(int(nbytes)))
        self._release.append(lambda: self.rt.cudaFree(ptr))
        return int(ptr)

    def pinned(self, shape, dtype, *, mapped: bool = False) -> PinnedArray:
        rt = self.rt
        mapped = mapped and self.facts.can_map_host_memory
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        flags = rt.cudaHostAllocMapped if mapped else rt.cudaHostAllocDefault
        host = int(self._call(rt.cudaHostAlloc(max(nbytes, 1), flags)))
        self._release.append(lambda: rt.cudaFreeHost(host))
        device = int(self._call(rt.cudaHostGetDevicePointer(host, 0))) if mapped else None
        return PinnedArray(_host_array(host, shape, dtype), device)

    def h2d(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream))

    def d2h(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream))

    def event(self):
        ev = self._call(self.rt.cudaEventCreate())
        self._release.append(lambda: self.rt.cudaEventDestroy(ev))
        return ev

    def record(self, event) -> None:
        self._call(self.rt.cudaEventRecord(event, self._stream))

    def wait(self, event) -> None:
        self._call(self.rt.cudaEventSynchronize(event))

    def elapsed_ms(self, start, end) -> float:
        return float(self._call(self.rt.cudaEventElapsedTime(start, end)))

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self._stream))


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- pycuda


class PyCuda(Cuda):
    """pycuda's driver API, in the device's primary context: the one TensorRT's runtime calls use.

    The context is made current here (push) and popped by close(); pycuda contexts are per
    thread, so a PyCuda is used from the thread that opened it."""

    binding = "pycuda"

    def __init__(self, device: int = 0):
        super().__init__()
        try:
            self.drv = drv = importlib.import_module("pycuda.driver")
        except ImportError as e:
            raise RunnerError(f"pycuda is not installed ({e}); {INSTALL['pycuda']}") from None
        drv.init()
        dev = drv.Device(device)
        self._stream, self._context = None, dev.retain_primary_context()
        self._context.push()
        try:
            self.facts = self._facts(drv, dev)
            self._stream = drv.Stream()
        except BaseException:
            self.close()  # pops the context pushed above
            raise
        self.stream = int(self._stream.handle)

    @staticmethod
    def _facts(drv, dev) -> CudaFacts:
        a = drv.device_attribute
        major, minor = dev.compute_capability()
        return CudaFacts(
            name=dev.name(),
            compute_capability=f"{major}.{minor}",
            sm_count=dev.get_attribute(a.MULTIPROCESSOR_COUNT),
            integrated=bool(dev.get_attribute(a.INTEGRATED)),
            can_map_host_memory=bool(dev.get_attribute(a.CAN_MAP_HOST_MEMORY)),
            driver_cuda=_version_text(drv.get_driver_version()),
            binding=f"pycuda {_dist_version('pycuda') or '?'}",
            binding_cuda=".".join(str(v) for v in drv.get_version()[:2]),
        )

    def device_buffer(self, nbytes: int) -> int:
        allocation = self.drv.mem_alloc(max(int(nbytes), 1))
        self._release.append(allocation.free)
        return int(allocation)

    def pinned(self, shape, dtype, *, mapped: bool = False) -> PinnedArray:
        mapped = mapped and self.facts.can_map_host_memory
        flags = self.drv.host_alloc_flags.DEVICEMAP if mapped else 0
        array = self.drv.pagelocked_empty(shape, dtype, mem_flags=flags)
        self._release.append(array.base.free)
        return PinnedArray(array, int(array.base.get_device_pointer()) if mapped else None)

    def h2d(self, dst: int, src: np.ndarray) -> None:
        self.drv.memcpy_htod_async(dst, src, self._stream)

    def d2h(self, dst: np.ndarray, src: int) -> None:
        self.drv.memcpy_dtoh_async(dst, src, self._stream)

    def event(self):
        return self.drv.Event()

    def record(self, event) -> None:
        event.record(self._stream)

    def wait(self, event) -> None:
        event.synchronize()

    def elapsed_ms(self, start, end) -> float:
        return float(end.time_since(start))

    def synchronize(self) -> None:
        self._stream.synchronize()

    def _let_go(self) -> None:
        if self._context is not None:
            self._stream = None
            self._context.pop()
            self._context.detach()
            self._context = None
