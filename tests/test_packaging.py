"""The wheel: one top-level package (`liverkd`), every source folder in it under its liverkd.*
name, the configs and the LICENSE in it, a base install without the optional packages, and
`from liverkd import Segmenter` working from a non-editable install without torch."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"liverkd": "liverkd", "distill": "liverkd/distill", "deploy": "liverkd/deploy", "configs": "liverkd/configs"}
OPTIONAL = {"torch", "onnxsim", "onnx", "pyyaml", "matplotlib"}
"""Not needed by `infer` or the runner: extras (train, build, plot), never base dependencies."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources (a build in place would leave build/ in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in [*SOURCES, "pyproject.toml", "README.md", "LICENSE"]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (found,) = tmp.glob("liverkd-*.whl")
    return found


def test_the_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = {n.split("/")[0] for n in names}
        (info,) = [t for t in top_level if t.endswith(".dist-info")]
        assert top_level == {"liverkd", info}
        if f"{info}/top_level.txt" in names:
            assert z.read(f"{info}/top_level.txt").decode().split() == ["liverkd"]
    packaged = [p.relative_to(ROOT).as_posix() for p in (ROOT / "liverkd" / "models").glob("*/*") if p.suffix != ".pt"]
    assert "liverkd/models/student-30k/model.onnx" in packaged and "liverkd/models/MODEL_CARD.md" in names
    for path in packaged:  # the default models ship inside the wheel
        assert path in names, f"{path} is not in the wheel"
    for folder, installed in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    for path in (ROOT / "configs").glob("*.yaml"):  # `liverkd distill run quick` from a wheel
        assert f"liverkd/configs/{path.name}" in names, f"configs/{path.name} is not in the wheel"
    assert f"{info}/licenses/LICENSE" in names


def test_the_base_install_leaves_the_optional_packages_to_extras(wheel):
    import re

    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
    base = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert base and not base & OPTIONAL, base & OPTIONAL
    assert {"numpy", "scipy", "nibabel", "typer", "rich", "onnxruntime", "psutil"} <= base
    ort = [r for r in requires if r.startswith("onnxruntime") and "extra ==" not in r]
    assert "aarch64" in ort[0]  # not over NVIDIA's onnxruntime-gpu wheel on a Jetson
    extras = {r.split("extra ==")[1].strip(" '\""): r for r in requires if "extra ==" in r}
    assert {"train", "plot", "build", "onnxruntime"} <= set(extras)


def test_segmenter_imports_from_the_installed_wheel_without_torch(wheel, tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "import liverkd\n"
        "from liverkd import Segmenter\n"
        "import liverkd.cli\n"
        "from pathlib import Path\n"
        "from liverkd import configs\n"
        "from liverkd.cli.demo import demo_steps\n"
        "assert {'quick', 'default'} <= set(configs.names())\n"
        "(distill,) = [a for _, a, _ in demo_steps('quick', Path('out'), Path('calib')) if a[0] == 'distill']\n"
        "assert Path(distill[2]) == configs.resolve('quick'), distill  # the demo's config, from the package\n"
        "print(liverkd.__file__)\n"
        "print(configs.resolve('quick'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert all(line.startswith(str(target)) for line in lines), "imported the checkout, not the wheel"
