"""Is there a working CUDA driver and GPU here? Asked through libcuda with ctypes, no packages.

It needs no CUDA binding, so it runs before either is imported (backends/cuda_adapter.py).

TensorRT must not be touched without this: on a machine with no driver,
`trt.Runtime(...).deserialize_cuda_engine` can crash the process instead of raising.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
_CU_DEVICE_ATTRIBUTE_INTEGRATED = 18
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "9.0"
    driver_version: str  # "12.4"
    sm_count: int = 0  # streaming multiprocessors (0: not read)
    integrated: bool = False  # the GPU shares the host's memory (a Jetson)


@dataclass(frozen=True)
class Preflight:
    ok: bool
    reason: str
    """Why not, in one line (empty when ok)."""
    devices: tuple[CudaDevice, ...] = ()

    @property
    def device(self) -> CudaDevice | None:
        return self.devices[0] if self.devices else None


def _libcuda():
    for name in _LIBCUDA_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def preflight() -> Preflight:
    """cuInit + cuDeviceGetCount + name, compute capability, SM count, integrated of each device; never raises."""
    lib = _libcuda()
    if lib is None:
        return Preflight(
            False, "no CUDA driver (libcuda.so.1 not found: it comes with the NVIDIA driver, on a Jetson with JetPack)"
        )
    try:
        err = lib.cuInit(0)
        if err != 0:
            return Preflight(False, f"CUDA driver present but cuInit failed (CUresult {err}: {_error_name(lib, err)})")
        version = ctypes.c_int(0)
        lib.cuDriverGetVersion(ctypes.byref(version))
        driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
        count = ctypes.c_int(0)
        err = lib.cuDeviceGetCount(ctypes.byref(count))
        if err != 0 or count.value == 0:
            return Preflight(False, f"CUDA driver {driver} present but no GPU visible")
        devices = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            lib.cuDeviceGet(ctypes.byref(dev), i)
            name = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(name, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
            lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
            sms, integrated = ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGetAttribute(ctypes.byref(sms), _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
            lib.cuDeviceGetAttribute(ctypes.byref(integrated), _CU_DEVICE_ATTRIBUTE_INTEGRATED, dev)
            label = name.value.decode(errors="replace")
            cc = f"{major.value}.{minor.value}"
            devices.append(CudaDevice(i, label, cc, driver, sms.value, bool(integrated.value)))
        return Preflight(True, "", tuple(devices))
    except (AttributeError, OSError) as e:  # a libcuda without these symbols
        return Preflight(False, f"unusable CUDA driver library ({e})")


def _error_name(lib, err: int) -> str:
    text = ctypes.c_char_p()
    try:
        if lib.cuGetErrorName(err, ctypes.byref(text)) == 0 and text.value:
            return text.value.decode()
    except AttributeError:
        pass
    return "unknown error"
