"""The platform checks (docs/deploy.md, "Platforms") on the version facts of each platform of the matrix,
and on this machine's real facts."""

from __future__ import annotations

import sys

import pytest

from liverkd.deploy.backends import RunnerError
from liverkd.deploy.backends import tensorrt as T
from liverkd.deploy.backends.tensorrt import PlatformFacts, check_platform

JETPACK_6_0 = PlatformFacts(python=(3, 10), tensorrt="8.6.2.3", jetson=True, driver_cuda="12.2")
JETPACK_6_2 = PlatformFacts(
    python=(3, 10), tensorrt="10.3.0.30", jetson=True, driver_cuda="12.6", binding="cuda-python", binding_cuda="12.6"
)
JETPACK_7 = PlatformFacts(
    python=(3, 12), tensorrt="10.13.3.9", jetson=True, driver_cuda="13.0", binding="cuda-python", binding_cuda="13.0"
)
WORKSTATION_10 = PlatformFacts(
    python=(3, 11),
    tensorrt="10.13.0.35",
    tensorrt_wheels=("tensorrt-cu12-libs",),
    driver_cuda="12.4",
    binding="pycuda",
    binding_cuda="12.4",
)
WORKSTATION_11 = PlatformFacts(
    python=(3, 12),
    tensorrt="11.4.0.106",
    tensorrt_wheels=("tensorrt-cu13-libs",),
    driver_cuda="13.1",
    binding="cuda-python",
    binding_cuda="13.0",
)
JETPACK_5 = PlatformFacts(python=(3, 8), tensorrt="8.5.2.2", jetson=True, driver_cuda="11.4")


@pytest.mark.parametrize("facts", [JETPACK_6_0, JETPACK_6_2, JETPACK_7, WORKSTATION_10, WORKSTATION_11])
def test_supported_platforms_pass(facts):
    assert check_platform(facts) == []


def test_jetpack_5_is_refused_for_python_and_tensorrt():
    problems = check_platform(JETPACK_5)
    assert len(problems) == 2
    assert problems[0].startswith("Python 3.8: liverkd needs Python >= 3.10") and "JetPack 5" in problems[0]
    assert problems[1].startswith("TensorRT 8.5.2.2: liverkd needs TensorRT >= 8.6")
    assert all("\n" not in p for p in problems)


def test_cuda_python_13_on_a_cuda_12_driver_names_both():
    facts = PlatformFacts(
        python=(3, 10), tensorrt="10.3.0", jetson=True, driver_cuda="12.6", binding="cuda-python", binding_cuda="13.0"
    )
    (problem,) = check_platform(facts)
    assert "cuda-python is built for CUDA 13.0 but the driver supports CUDA 12.6" in problem
    assert "pip install 'cuda-python>=12,<13'" in problem


def test_tensorrt_from_pypi_is_refused_on_a_jetson_only():
    wheels = ("tensorrt-cu12-libs",)
    on_jetson = PlatformFacts(python=(3, 10), tensorrt="10.3.0", jetson=True, tensorrt_wheels=wheels)
    (problem,) = check_platform(on_jetson)
    assert "TensorRT from PyPI (tensorrt-cu12-libs) on a Jetson" in problem and "--system-site-packages" in problem
    assert check_platform(PlatformFacts(python=(3, 10), tensorrt="10.3.0", tensorrt_wheels=wheels)) == []


def test_versions_are_compared_as_numbers():
    assert check_platform(PlatformFacts(python=(3, 10), tensorrt="8.10.0")) == []  # not "8.10" < "8.6" as text
    assert check_platform(PlatformFacts(python=(3, 9), tensorrt=None))[0].startswith("Python 3.9")


def test_the_facts_of_this_machine():
    facts = T.platform_facts(None, None, None)
    assert facts.python == tuple(sys.version_info[:2]) and facts.binding_cuda is None
    assert all(w.startswith("tensorrt") and w.endswith("-libs") for w in facts.tensorrt_wheels)
    assert check_platform(facts) == []  # this interpreter runs liverkd (requires-python >= 3.10)


def test_no_tensorrt_and_no_binding_is_one_line_naming_all():
    if T.tensorrt_available()[0]:
        pytest.skip("TensorRT, a binding and a GPU are present here")
    with pytest.raises(RunnerError) as e:
        T.target_here("auto")
    text = str(e.value)
    assert "\n" not in text
    from liverkd.deploy.backends.cuda_adapter import installed_bindings

    if not installed_bindings():
        assert text.startswith("no CUDA binding: pip install cuda-python") and "or pycuda" in text
