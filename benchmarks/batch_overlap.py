"""Batch inference with and without read/write overlap (liverkd.deploy.batch.run), in one process.

    .venv/bin/python benchmarks/batch_overlap.py [--n 8] [--repeats 3] [--engine NAME_OR_DIR] [--stats] [--preview]

N phantoms (a 3 mm synthetic CT resampled to 256x256x128 at 1.5 x 1.5 x 2.5 mm, int16 .nii.gz)
go through `liverkd infer`'s pipeline twice per repeat, alternating: sequential (read, segment,
write one volume after the other) and overlapped (the next volume read and the last mask written
on worker threads while one is segmented). Per volume: the time between two finished volumes;
printed are its median, the wall time over N, the ratio sequential / overlapped, and the stage
medians of the sequential run (the most overlap can hide is read + write). The masks of both modes
are compared. No asserts: numbers to read, with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd import models
from liverkd.core.synth import scanner_grid_case
from liverkd.deploy import batch
from liverkd.deploy.segment import Segmenter, output_path_for

SHAPE, SPACING = (256, 256, 128), (1.5, 1.5, 2.5)


def phantom(path: Path, seed: int) -> Path:
    nib.save(nib.Nifti1Image(*scanner_grid_case(seed, SHAPE, SPACING)), path)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def one_pass(seg: Segmenter, inputs: list[Path], out: Path, *, overlap: bool, stats: bool, preview: bool) -> dict:
    out.mkdir()
    jobs = [batch.FileJob(p, output_path_for(p, out), stats=stats, preview=preview) for p in inputs]
    finished, results, errors = [], [], []

    def done(job, result, error, notes):
        finished.append(time.perf_counter())
        results.append(result)
        if error is not None:
            errors.append(f"{job.input.name}: {error}")

    start = time.perf_counter()
    batch.run(jobs, *batch.file_stages(seg), done, overlap=overlap)
    if errors:
        raise RuntimeError("; ".join(errors))
    gaps = np.diff([start, *finished])
    return {"gaps": list(gaps), "wall": finished[-1] - start, "timings": [r.timings for r in results]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="phantoms per pass")
    ap.add_argument("--repeats", type=int, default=3, help="passes per mode, alternating")
    ap.add_argument("--engine", default=models.DEFAULT, help="bundle folder or packaged model name")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--stats", action="store_true", help="also write the stats JSON of each volume")
    ap.add_argument("--preview", action="store_true", help="also write the preview PNG of each volume (matplotlib)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Segmenter.load(models.resolve(args.engine), args.backend) as seg:
        tmp = Path(tmp)
        t = time.perf_counter()
        (tmp / "in").mkdir()
        inputs = [phantom(tmp / "in" / f"phantom{i:02d}.nii.gz", seed=100 + i) for i in range(args.n)]
        size = sum(p.stat().st_size for p in inputs) / len(inputs) / 1e6
        print(f"{args.n} phantoms {'x'.join(map(str, SHAPE))} ({size:.1f} MB each) in {time.perf_counter() - t:.0f} s")
        print(f"engine: {seg.describe()}", flush=True)
        seg.segment_file(inputs[0], tmp / "warm.nii.gz")  # first-call costs out of the numbers
        runs: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
        for r in range(args.repeats):
            for mode in runs:
                res = one_pass(seg, inputs, tmp / f"{mode}{r}", overlap=mode == "overlapped", stats=args.stats,
                               preview=args.preview)  # fmt: skip
                runs[mode].append(res)
                print(f"  pass {r + 1} {mode:>10}: {1000 * res['wall'] / args.n:6.0f} ms per volume", flush=True)
        same = all(
            np.array_equal(
                np.asarray(nib.load(tmp / f"sequential0/{p.name[:-7]}_liver.nii.gz").dataobj),
                np.asarray(nib.load(tmp / f"overlapped0/{p.name[:-7]}_liver.nii.gz").dataobj),
            )
            for p in inputs
        )
    medians = {m: statistics.median(g for res in rs for g in res["gaps"]) for m, rs in runs.items()}
    walls = {m: statistics.median(res["wall"] for res in rs) / args.n for m, rs in runs.items()}
    timings = [t for res in runs["sequential"] for t in res["timings"]]
    stage = {s: statistics.median(t.get(s, 0.0) for t in timings) for s in timings[0]}
    cores = f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"
    machine = f"{platform.machine()} {cpu_name()}, {cores}"
    extras = "".join(f" + {name}" for name, on in (("stats", args.stats), ("preview", args.preview)) if on)
    print(f"\nmachine: {machine}; backend {args.backend}; {args.n} volumes x {args.repeats} passes per mode; "
          f"outputs: mask{extras}")  # fmt: skip
    print("| mode | median per volume (ms) | wall / N (ms) |")
    print("|---|---:|---:|")
    for m in runs:
        print(f"| {m} | {1000 * medians[m]:.0f} | {1000 * walls[m]:.0f} |")
    print(f"ratio sequential / overlapped: {medians['sequential'] / medians['overlapped']:.2f} (median), "
          f"{walls['sequential'] / walls['overlapped']:.2f} (wall)")  # fmt: skip
    print("sequential stage medians (ms): " + ", ".join(f"{k} {1000 * v:.0f}" for k, v in stage.items()))
    print(f"masks of both modes identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
