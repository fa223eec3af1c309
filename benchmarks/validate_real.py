"""Dice / HD95 / ASSD of engine bundles on the real CTs in ../shared/data, at native resolution.

    .venv/bin/python benchmarks/validate_real.py [--engine NAME_OR_DIR ...] [--out DIR] [--results docs/results.md]

Default engines: every packaged model (liverkd/models). Cases: ../shared/data/real_ct
(3D-IRCADb-01 patients 1 and 7, manual masks; TotalSegmentator's example CT, its own mask) and
../shared/data/totalseg_example/ct_3mm. These are VALIDATION data only (see their
PROVENANCE.md): never trained on, never copied into the project. Without ../shared the script
says so and exits 0 (a user's clone has none).

Each case goes through the Segmenter's own path (liverkd.core.inference). Two ways back to the
input's voxels are scored from the same network output: the probability resampled linearly and
thresholded at native resolution (what `liverkd infer` does), and the 3 mm mask resampled
nearest-neighbour (what it did before). A PNG per case and engine (prediction in red, reference
in green) is written to --out. With --results, the table replaces the block between
`<!-- real-ct:begin -->` and `<!-- real-ct:end -->` in that file.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _results import replace_block

from liverkd import models
from liverkd.core import volume as V
from liverkd.core.datasets import real_validation_cases
from liverkd.core.inference import THRESHOLD, segment_probability
from liverkd.core.metrics import evaluate_masks
from liverkd.core.timing import Clock
from liverkd.deploy.segment import Segmenter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cases(shared: Path) -> dict[str, tuple[Path, Path]]:
    return {c.case_id: (c.image, c.label) for c in real_validation_cases(shared)}


def score(seg: Segmenter, image: V.Volume, ref: np.ndarray) -> dict:
    """Metrics of both ways back, from one network pass."""
    t0 = time.perf_counter()
    p, inverse = segment_probability(
        image, seg.spec, seg.predictor(Clock()), roi_size=seg.roi_size, overlap=seg.overlap, label=seg.liver_label
    )
    probability = inverse.mask(p, THRESHOLD)
    seconds = time.perf_counter() - t0
    nearest = inverse((p > THRESHOLD).view(np.uint8), label=True)
    return {
        "mask": probability,
        "seconds": seconds,
        "probability": evaluate_masks(probability, ref, image.spacing),
        "nearest": evaluate_masks(nearest, ref, image.spacing),
    }


def markdown(rows: list[dict], machine: str) -> str:
    lines = [
        f"`python benchmarks/validate_real.py` on {machine}. Dice, HD95 and ASSD at the input's native resolution; "
        "'nearest' is the old way back (3 mm mask, nearest neighbour), scored from the same network output.",
        "",
        "| engine | case | Dice | HD95 mm | ASSD mm | Dice (nearest) | HD95 (nearest) | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, n = r["probability"], r["nearest"]
        lines.append(
            f"| {r['engine']} | {r['case']} | {p['dice']:.3f} | {p['hd95']:.1f} | {p['assd']:.1f} | "
            f"{n['dice']:.3f} | {n['hd95']:.1f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="append", help="bundle folder or packaged model name (repeat)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_ct")
    ap.add_argument("--results", type=Path, help="markdown file whose real-ct block gets the table")
    args = ap.parse_args(argv)
    found = cases(args.shared)
    if not found:
        print(f"skipped: no real validation CTs under {args.shared} (they are not part of a clone)")
        return 0
    engines = args.engine or models.names()
    if not engines:
        print("error: no --engine given and no packaged model", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    from liverkd.viz import write_preview

    rows = []
    for engine in engines:
        with Segmenter.load(models.resolve(engine), backend=args.backend) as seg:
            for case, (ct, label) in found.items():
                image, ref = V.load(ct), V.load(label).array > 0
                r = score(seg, image, ref)
                p = r["probability"]
                title = f"{engine} {case}: Dice {p['dice']:.3f}, HD95 {p['hd95']:.1f} mm (green: reference)"
                png = args.out / f"{Path(str(engine)).name}_{case}.png"
                write_preview(
                    image.array, r.pop("mask"), image.affine, png, window=seg.spec.hu_window, title=title, reference=ref
                )
                rows.append({"engine": Path(str(engine)).name, "case": case, **r})
                n = r["nearest"]
                print(
                    f"{rows[-1]['engine']:>14} {case:>10}: Dice {p['dice']:.3f} HD95 {p['hd95']:6.1f} mm "
                    f"ASSD {p['assd']:5.1f} mm | nearest Dice {n['dice']:.3f} | {r['seconds']:.1f} s | {png}",
                    flush=True,
                )
    machine = f"{platform.machine()}, {platform.processor() or 'CPU'}, backend {args.backend}"
    table = markdown(rows, machine)
    print(table)
    if args.results:
        replace_block(args.results, "real-ct", table)
        print(f"table written into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
