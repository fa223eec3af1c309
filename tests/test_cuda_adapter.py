"""The CUDA adapter: which binding is chosen, and the errors without one or without a driver, for real here;
the stream / pinned buffer / copy / event sequence through every installed binding on a GPU (`gpu`)."""

from __future__ import annotations

import importlib.util
import subprocess

import numpy as np
import pytest

from liverkd.deploy.backends import RunnerError
from liverkd.deploy.backends import cuda_adapter as A
from liverkd.deploy.cuda_preflight import preflight


@pytest.mark.parametrize(
    ("installed", "chosen"),
    [
        (["cuda-python", "pycuda"], "cuda-python"),
        (["pycuda", "cuda-python"], "cuda-python"),  # the order of BINDINGS decides, not the list's
        (["pycuda"], "pycuda"),
        (["cuda-python"], "cuda-python"),
    ],
)
def test_auto_takes_cuda_python_first_then_pycuda(installed, chosen):
    assert A.choose_binding("auto", installed) == chosen


def test_neither_binding_is_one_line_naming_both():
    with pytest.raises(RunnerError) as e:
        A.choose_binding("auto", [])
    text = str(e.value)
    assert "\n" not in text and text.startswith("no CUDA binding")
    assert "pip install cuda-python" in text and "pycuda" in text and "JetPack" in text and "R580" in text


def test_an_asked_for_binding_must_be_installed():
    assert A.choose_binding("pycuda", ["cuda-python", "pycuda"]) == "pycuda"
    with pytest.raises(RunnerError, match=r"--cuda-binding pycuda: pycuda is not installed; pip install pycuda"):
        A.choose_binding("pycuda", ["cuda-python"])
    with pytest.raises(RunnerError, match=r"--cuda-binding 'cupy': choose from auto, cuda-python, pycuda"):
        A.choose_binding("cupy", ["cuda-python"])


def test_installed_bindings_are_the_findable_ones():
    found = A.installed_bindings()
    assert found == [b for b in A.BINDINGS if b in found]  # in the order auto tries them
    assert ("pycuda" in found) == (importlib.util.find_spec("pycuda") is not None)


def test_without_a_driver_opening_cuda_is_one_line():
    if preflight().ok:
        pytest.skip("a CUDA driver and GPU are present here")
    for binding in A.CHOICES:  # the driver is asked before any binding is chosen or imported
        with pytest.raises(RunnerError) as e:
            A.open_cuda(binding)
        assert "no CUDA driver" in str(e.value) or "no GPU" in str(e.value) or "cuInit" in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("binding", "binding_cuda", "driver_cuda", "problem"),
    [
        ("cuda-python", "13.0", "12.2", "pip install 'cuda-python>=12,<13'"),
        ("cuda-python", "13.1", "12.6", "CUDA 13.1 but the driver supports CUDA 12.6"),
        ("pycuda", "13.0", "12.6", "rebuild pycuda"),
        ("cuda-python", "12.9", "12.2", None),  # a newer minor runs on the driver of its major
        ("cuda-python", "12.6", "13.0", None),  # a newer driver runs older majors
        ("cuda-python", None, "12.2", None),  # not read: not held against it
    ],
)
def test_driver_mismatch_names_both_versions(binding, binding_cuda, driver_cuda, problem):
    why = A.driver_mismatch(binding, binding_cuda, driver_cuda)
    if problem is None:
        assert why is None
    else:
        assert problem in why and binding_cuda in why and driver_cuda in why and "R580" in why


def test_binding_cuda_version_of_an_absent_binding_is_none():
    for binding in set(A.BINDINGS) - set(A.installed_bindings()):
        assert A.binding_cuda_version(binding) is None


def test_cli_cuda_binding_not_installed_is_one_line(tmp_path, liverkd_cmd):
    if "pycuda" in A.installed_bindings():
        pytest.skip("pycuda is installed here")
    source = tmp_path / "m.onnx"
    source.write_bytes(b"not read: the backend is chosen first")
    cmd = [*liverkd_cmd, "build-engine", str(source), "--backend", "tensorrt", "--cuda-binding", "pycuda"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: --backend tensorrt: --cuda-binding pycuda: pycuda is not installed")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- on a GPU


def gpu_with(binding: str) -> tuple[bool, str]:
    pre = preflight()
    if not pre.ok:
        return False, f"needs a CUDA GPU: {pre.reason}"
    if binding not in A.installed_bindings():
        return False, f"{binding} is not installed"
    return True, ""


@pytest.mark.gpu
@pytest.mark.parametrize("binding", A.BINDINGS)
@pytest.mark.parametrize("mapped", [False, True])
def test_stream_buffers_copies_and_events(binding, mapped):
    """The sequence the TensorRT runner makes around execute_async_v3, through each installed binding:
    pinned (or mapped) host buffers, a device buffer, async h2d and d2h on the stream, events timing them."""
    ok, why = gpu_with(binding)
    if not ok:
        pytest.skip(why)
    with A.open_cuda(binding) as cuda:
        facts = cuda.facts
        assert facts.name and facts.compute_capability.count(".") == 1 and facts.sm_count > 0
        assert facts.binding.startswith(binding) and facts.driver_cuda.count(".") == 1
        assert isinstance(cuda.stream, int)  # what execute_async_v3 takes
        x = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
        host_in = cuda.pinned(x.shape, np.float32, mapped=mapped)
        host_out = cuda.pinned(x.shape, np.float32)
        host_in.array[...] = x
        device = cuda.device_buffer(x.nbytes)
        e0, e1, e2 = cuda.event(), cuda.event(), cuda.event()
        cuda.record(e0)
        cuda.h2d(device, host_in.array)
        cuda.record(e1)
        cuda.d2h(host_out.array, device)
        cuda.record(e2)
        cuda.wait(e2)
        assert np.array_equal(host_out.array, x)
        assert cuda.elapsed_ms(e0, e1) >= 0 and cuda.elapsed_ms(e1, e2) >= 0
        if mapped and facts.can_map_host_memory:  # the device address is the same memory: copy into it
            assert host_in.device_ptr is not None
            host_in.array[...] = 0
            cuda.h2d(host_in.device_ptr, host_out.array)
            cuda.synchronize()
            assert np.array_equal(host_in.array, x)
        else:
            assert host_in.device_ptr is None or mapped
