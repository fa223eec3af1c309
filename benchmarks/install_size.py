"""The base install's size and the CLI's start-up time, from a wheel (issue 16).

Builds the wheel from a copy of the sources, installs it with its base dependencies only (the
versions of constraints.txt) into a temp --target folder, and reports `du` of that folder, the
packages in it, and, run with `python -S` so that nothing else is importable, the import time of
`liverkd.cli` (-X importtime, cumulative) and the wall time of `liverkd infer -h` (medians).

    .venv/bin/python benchmarks/install_size.py [--constraints constraints.txt] [--runs 7] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("liverkd", "distill", "deploy", "configs", "pyproject.toml", "README.md", "LICENSE")


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)]
    subprocess.run(pip, check=True)
    (wheel,) = tmp.glob("liverkd-*.whl")
    return wheel


def du_mib(path: Path) -> float:
    """What `du -sh` shows (disk usage, MiB)."""
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0]) / 1024


def timings(site: Path, runs: int) -> tuple[float, float]:
    """(median ms to import liverkd.cli, median ms of `liverkd infer -h`), nothing but `site` on the path."""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    py = [sys.executable, "-S"]
    imports, walls = [], []
    for _ in range(runs):
        proc = subprocess.run([*py, "-X", "importtime", "-c", "import liverkd.cli"], env=env, capture_output=True,
                              text=True, cwd=site.parent, check=True)  # fmt: skip
        (line,) = [x for x in proc.stderr.splitlines() if x.rstrip().endswith("| liverkd.cli")]
        imports.append(int(line.split("|")[1]) / 1000)
        t0 = time.perf_counter()
        code = "import sys; sys.argv = ['liverkd', 'infer', '-h']; from liverkd.cli import main; main()"
        subprocess.run([*py, "-c", code], env=env, capture_output=True, cwd=site.parent, check=True)
        walls.append((time.perf_counter() - t0) * 1000)
    return statistics.median(imports), statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--keep", type=Path, help="install here (kept) instead of a temp folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = build_wheel(tmp)
        site = args.keep or tmp / "site"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "-c", str(args.constraints)]
        subprocess.run([*pip, str(wheel)], check=True)
        packages = sorted(p.name.removesuffix(".dist-info") for p in site.glob("*.dist-info"))
        import_ms, help_ms = timings(site, args.runs)
        print(f"base install: {du_mib(site):.0f} MiB (du -sh) in {len(packages)} distributions: {', '.join(packages)}")
        print(f"import liverkd.cli: {import_ms:.0f} ms; liverkd infer -h: {help_ms:.0f} ms (medians of {args.runs})")


if __name__ == "__main__":
    main()
