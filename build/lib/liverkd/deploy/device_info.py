"""Facts about the machine a timing was taken on, for the header of every latency report.

Everything is read, never assumed: a fact that cannot be read here is "unknown".
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

UNKNOWN = "unknown"
_GPU_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "memory.total", "pstate")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")
_PACKAGES = ("numpy", "scipy", "nibabel", "onnxruntime", "tensorrt", "torch", "cuda-python", "cuda-bindings", "pycuda")


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a command, or None when it is absent, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or UNKNOWN


def cpu_facts() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "model": cpu_model(),
        "arch": platform.machine() or UNKNOWN,
        "threads": os.cpu_count(),
        "threads_usable": usable,
    }


def gpu_facts() -> list[dict]:
    """One dict per GPU from nvidia-smi (clocks in MHz, memory in MiB); [] when there is none."""
    out = _run(["nvidia-smi", f"--query-gpu={','.join(_GPU_FIELDS)}", "--format=csv,noheader,nounits"])
    if not out:
        return []
    gpus = []
    for line in out.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) == len(_GPU_FIELDS):
            gpus.append({k.replace(".", "_"): v for k, v in zip(_GPU_FIELDS, values, strict=True)})
    return gpus


def gpu_memory_used_mib(pid: int | None = None) -> float | None:
    """GPU memory held by process `pid` (default: this one), from nvidia-smi; None without a GPU."""
    pid = os.getpid() if pid is None else pid
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    if out is None:
        return None
    used = 0.0
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                used += float(parts[1])
            except ValueError:
                pass
    return used


def cuda_facts() -> list[dict]:
    """One dict per GPU the CUDA driver sees (ctypes, no binding; also where nvidia-smi is absent); [] when none."""
    from liverkd.deploy.cuda_preflight import preflight

    return [
        {
            "name": d.name,
            "compute_capability": d.compute_capability,
            "sm_count": d.sm_count,
            "integrated": d.integrated,
            "driver_cuda": d.driver_version,
        }
        for d in preflight().devices
    ]


def is_jetson() -> bool:
    model = _read("/proc/device-tree/model") or ""
    return Path("/etc/nv_tegra_release").exists() or "jetson" in model.lower()


def jetson_facts() -> dict | None:
    """Board, nvpmodel mode and jetson_clocks state on a Jetson; None elsewhere."""
    if not is_jetson():
        return None
    board = _read("/proc/device-tree/model") or UNKNOWN
    mode = UNKNOWN
    out = _run(["nvpmodel", "-q"])
    if out:
        for line in out.splitlines():
            if "Power Mode" in line:
                mode = line.split(":", 1)[-1].strip() or UNKNOWN
                break
    return {"board": board, "nvpmodel": mode, "jetson_clocks": _jetson_clocks_state()}


def _jetson_clocks_state() -> str:
    """jetson_clocks pins every CPU's minimum frequency to its maximum: read that from sysfs."""
    cpus = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"))
    pinned = []
    for folder in cpus:
        lo, hi = _read(str(folder / "scaling_min_freq")), _read(str(folder / "scaling_max_freq"))
        if lo is None or hi is None:
            return UNKNOWN
        pinned.append(lo == hi)
    if not pinned:
        return UNKNOWN
    return "on" if all(pinned) else "off"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_facts() -> dict:
    """The report header: host, CPU, GPUs, Jetson state, library versions, thread settings."""
    return {
        "host": platform.node() or UNKNOWN,
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "gpus": gpu_facts(),
        "cuda": cuda_facts(),
        "jetson": jetson_facts(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "env": {k: os.environ[k] for k in _THREAD_VARS if k in os.environ},
    }


def describe(facts: dict) -> list[str]:
    """Short human lines for a report header."""
    cpu = facts["cpu"]
    lines = [f"CPU: {cpu['model']} ({cpu['arch']}), {cpu['threads_usable']} of {cpu['threads']} threads usable"]
    if facts["gpus"]:
        for g in facts["gpus"]:
            lines.append(
                f"GPU: {g['name']}, driver {g['driver_version']}, SM {g['clocks_sm']}/{g['clocks_max_sm']} MHz, "
                f"mem clock {g['clocks_mem']} MHz, {g['memory_total']} MiB, {g['pstate']}"
            )
    else:
        lines.append("GPU: none (nvidia-smi not found or no GPU)")
    for c in facts.get("cuda", []):
        kind = "integrated" if c["integrated"] else "discrete"
        lines.append(
            f"CUDA: {c['name']}, compute {c['compute_capability']}, {c['sm_count']} SMs, {kind}, "
            f"driver CUDA {c['driver_cuda']}"
        )
    if facts["jetson"]:
        j = facts["jetson"]
        lines.append(f"Jetson: {j['board']}, nvpmodel {j['nvpmodel']}, jetson_clocks {j['jetson_clocks']}")
    pk = facts["packages"]
    lines.append(
        f"Python {facts['python']}, numpy {pk['numpy']}, onnxruntime {pk['onnxruntime']}, tensorrt {pk['tensorrt']}"
    )
    bindings = [
        f"{p} {pk[p]}"
        for p in ("cuda-python", "cuda-bindings", "pycuda")
        if pk.get(p, "not installed") != "not installed"
    ]
    lines.append(f"CUDA bindings: {', '.join(bindings) or 'none installed'}")
    if facts["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in facts["env"].items()))
    return lines
