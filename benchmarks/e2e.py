"""End to end on the CPU: `liverkd infer`'s in-process path, fast vs plain, stage by stage.

    .venv/bin/python benchmarks/e2e.py [--engine NAME_OR_DIR] [--repeats 5] [--png FILE] [--results docs/results.md]

For each input (the real CTs in ../shared/data when present, and phantoms of 256x256x128 and
512x512x300 written to a temp folder), in the same process and alternating:
- plain: the reference path, numpy/scipy/zlib only (liverkd.core.accel.plain());
- fast: what `liverkd infer` does by default (ISA-L gzip, cc3d, when installed).
Both are the same Segmenter.segment_file (read, segment, write a .nii.gz); per-stage medians
over --repeats, the ratio plain/fast, and the time Python's own `gzip.decompress` takes on
the same file as a yardstick (the goal: fast total <= 1.5x that). The masks of the two paths
are compared (Dice). Peak RSS of a `liverkd infer` subprocess on the largest input is
reported too. --png: total time against voxels, both paths and the yardstick.
No asserts: numbers to read, with the machine they came from.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _results import replace_block

from liverkd import models
from liverkd.core import accel
from liverkd.core.synth import scanner_grid_case
from liverkd.core.timing import STAGES
from liverkd.deploy.segment import Segmenter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REAL = ("real_ct/ircad01_ct.nii.gz", "real_ct/ircad07_ct.nii.gz", "real_ct/tsexample_ct.nii.gz",
        "totalseg_example/ct_3mm.nii.gz")  # fmt: skip
PHANTOMS = {
    "phantom 256x256x128": ((256, 256, 128), (1.5, 1.5, 2.5)),
    "phantom 512x512x300": ((512, 512, 300), (0.75, 0.75, 1.0)),
}


def phantom(path: Path, shape, spacing, seed: int = 3) -> Path:
    nib.save(nib.Nifti1Image(*scanner_grid_case(seed, shape, spacing)), path)
    return path


def gunzip_seconds(path: Path, repeats: int) -> float:
    data = path.read_bytes()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gzip.decompress(data)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(seg: Segmenter, path: Path, out: Path, repeats: int) -> dict:
    """Alternate plain and fast `repeats` times; per-stage medians (s) and the last masks."""
    timings = {"plain": [], "fast": []}
    masks = {}
    for _ in range(repeats):
        for mode in ("plain", "fast"):
            with accel.plain() if mode == "plain" else contextlib.nullcontext():
                result = seg.segment_file(path, out / f"{mode}.nii.gz")
            timings[mode].append(result.timings)
            masks[mode] = out / f"{mode}.nii.gz"
    medians = {mode: {s: statistics.median(t.get(s, 0.0) for t in ts) for s in [*STAGES, "total"]}
               for mode, ts in timings.items()}  # fmt: skip
    a = np.asanyarray(nib.load(masks["plain"]).dataobj).astype(bool)
    b = np.asanyarray(nib.load(masks["fast"]).dataobj).astype(bool)
    total = a.sum() + b.sum()
    medians["dice"] = float(2 * (a & b).sum() / total) if total else 1.0
    medians["differing_voxels"] = int((a != b).sum())
    return medians


def peak_rss_mb(path: Path, engine: str, out: Path) -> float:
    """Maximum resident set size of one `liverkd infer` subprocess (MB)."""
    liverkd = str(Path(sys.executable).with_name("liverkd"))
    cmd = [liverkd, "infer", str(path), "-o", str(out / "rss.nii.gz"), "--overwrite", "--engine", engine]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return usage.ru_maxrss / 1024.0  # KiB on Linux


def markdown(rows: list[dict], machine: str, rss: tuple[str, float] | None) -> str:
    stages = [s for s in STAGES if any(r["fast"][s] or r["plain"][s] for r in rows)]
    lines = [
        f"Machine: {machine}; medians of the stated repeats; ms. Per stage: plain / fast.",
        "",
        "| input | voxels | " + " | ".join(stages) + " | total plain | total fast | plain/fast | "
        "gzip.decompress | fast/gzip | Dice plain vs fast |",
        "|---|---:|" + "---:|" * len(stages) + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{1000 * r['plain'][s]:.0f} / {1000 * r['fast'][s]:.0f}" for s in stages]
        lines.append(
            f"| {r['name']} | {r['voxels'] / 1e6:.1f} M | " + " | ".join(cells) + f" | {1000 * r['plain']['total']:.0f}"
            f" | {1000 * r['fast']['total']:.0f} | {r['plain']['total'] / r['fast']['total']:.1f}x"
            f" | {1000 * r['gunzip']:.0f} | {r['fast']['total'] / r['gunzip']:.2f}x | {r['dice']:.4f} |"
        )
    if rss:
        lines += ["", f"Peak RSS of `liverkd infer` on {rss[0]} (subprocess, fast path): {rss[1]:.0f} MB."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    from liverkd.viz import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    order = sorted(rows, key=lambda r: r["voxels"])
    x = [r["voxels"] / 1e6 for r in order]
    for key, label, style in (("plain", "plain (numpy/scipy/zlib)", "o-"), ("fast", "fast (default)", "s-")):
        ax.plot(x, [1000 * r[key]["total"] for r in order], style, label=label)
    ax.plot(x, [1000 * r["gunzip"] for r in order], "k--", label="gzip.decompress of the file")
    ax.set_xlabel("input voxels (millions)")
    ax.set_ylabel("ms per volume, file to file")
    ax.set_title("liverkd infer in-process, by volume size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default=models.DEFAULT, help="bundle folder or packaged model name")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--no-phantoms", action="store_true", help="only the real CTs")
    ap.add_argument("--png", type=Path, help="total ms against voxels")
    ap.add_argument("--results", type=Path, help="markdown file whose e2e block gets the table")
    args = ap.parse_args(argv)
    print(f"accelerators: {accel.available()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Segmenter.load(models.resolve(args.engine), args.backend) as seg:
        tmp = Path(tmp)
        inputs = {Path(p).name.removesuffix(".nii.gz"): args.shared / p for p in REAL if (args.shared / p).is_file()}
        if not inputs:
            print(f"no real CTs under {args.shared} (not part of a clone): phantoms only")
        if not args.no_phantoms:
            for name, (shape, spacing) in PHANTOMS.items():
                inputs[name] = phantom(tmp / f"{name.replace(' ', '_')}.nii.gz", shape, spacing)
        seg.segment_file(next(iter(inputs.values())), tmp / "warm.nii.gz")  # first-call costs out of the numbers
        rows = []
        for name, path in inputs.items():
            r = run(seg, path, tmp, args.repeats)
            voxels = int(np.prod(nib.load(path).shape[:3]))
            r.update(name=name, voxels=voxels, gunzip=gunzip_seconds(path, args.repeats))
            rows.append(r)
            print(
                f"{name:>22}: plain {1000 * r['plain']['total']:7.0f} ms  fast {1000 * r['fast']['total']:6.0f} ms  "
                f"({r['plain']['total'] / r['fast']['total']:.1f}x)  gzip.decompress {1000 * r['gunzip']:5.0f} ms  "
                f"fast/gzip {r['fast']['total'] / r['gunzip']:.2f}x  Dice {r['dice']:.4f}",
                flush=True,
            )
        largest = max(rows, key=lambda r: r["voxels"])
        rss = (largest["name"], peak_rss_mb(inputs[largest["name"]], str(models.resolve(args.engine)), tmp))
    cpu = platform.processor() or "CPU"
    machine = f"{platform.machine()} {cpu}, {os.cpu_count()} cores, backend {args.backend}, {args.repeats} repeats"
    table = markdown(rows, machine, rss)
    print(table)
    if args.png:
        plot(rows, args.png)
        print(f"wrote {args.png}")
    if args.results:
        replace_block(args.results, "e2e", table)
        print(f"table written into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
