"""Soak test of the embedded device runner (deploy/runner.py), bounded in count and time.

A feeder thread drops N phantom volumes (every tenth one corrupt, in rotating ways) into
the inbox while `python -m liverkd.deploy.runner` runs, each written as NAME.part and renamed.
Afterwards it checks that every input is in done/ or failed/, every good input has
exactly one mask, every failed one an error file, the runner exited 0 on SIGTERM, and
RSS grew less than 5% between volume 20 and volume N (from the runner's own log records).

    .venv/bin/python benchmarks/runner_soak.py                 # 200 volumes of 64^3
    .venv/bin/python benchmarks/runner_soak.py --n 40 --size 32
    .venv/bin/python benchmarks/runner_soak.py --engine engines/NAME

Without --engine it builds a random-init student-30k bundle (deploy.build, ONNX Runtime,
6 mm, 64^3) in the work folder: the runner's behaviour, not the mask quality, is under test here.
tests/test_runner.py runs a small version through soak().
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core.synth.phantom import synth_case

REPO = Path(__file__).resolve().parents[1]
RSS_GROWTH_LIMIT = 5.0  # percent, between volume RSS_FROM and the last one
RSS_FROM = 20


def make_test_bundle(folder, input_shape=(64, 64, 64), spacing=(6.0, 6.0, 6.0), preset="student-30k") -> Path:
    """A random-init student built the `liverkd build-engine` way (ONNX Runtime, fp32); imports torch."""
    import warnings

    import torch
    from liverkd.deploy.build import build_engine
    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    from liverkd.core.spec import PreprocessSpec

    folder = Path(folder)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = PreprocessSpec(spacing=spacing, input_shape=input_shape)
        checkpoint = save_checkpoint(Path(tmp) / "model.pt", create_model(preset), spec, preset=preset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_engine(checkpoint, folder, backend="onnxruntime", log=lambda message: None)
    return folder


def nifti_bytes(img: nib.Nifti1Image, folder: Path) -> bytes:
    path = V.save(img, folder / "tmp.nii.gz")
    data = path.read_bytes()
    path.unlink()
    return data


def make_inputs(n: int, shape, folder: Path, max_voxels: int, distinct: int = 4) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, good) for N inputs; every tenth is corrupt, cycling through five ways."""
    goods = [nifti_bytes(synth_case(seed, shape=shape)[0].to_nifti(), folder) for seed in range(distinct)]
    side = int(round((2 * max_voxels) ** (1 / 3))) + 1
    corrupt = {
        "truncated": goods[0][: len(goods[0]) // 2],
        "not_nifti": b"this is not a NIfTI file\n" * 40,
        "empty": b"",
        "flat_2d": nifti_bytes(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16), np.eye(4)), folder),
        "oversized": nifti_bytes(nib.Nifti1Image(np.zeros((side,) * 3, np.int16), np.eye(4)), folder),
    }
    kinds = list(corrupt)
    out = []
    for i in range(n):
        if i % 10 == 9:
            kind = kinds[(i // 10) % len(kinds)]
            out.append((f"vol_{i:04d}_{kind}.nii.gz", corrupt[kind], False))
        else:
            out.append((f"vol_{i:04d}.nii.gz", goods[i % distinct], True))
    return out


def feed(inbox: Path, inputs, mean_gap_s: float, seed: int = 0) -> None:
    """Write each input as NAME.part, fsync, rename: the protocol docs/runner.md asks of senders."""
    rng = random.Random(seed)
    for name, data, _good in inputs:
        part = inbox / f"{name}.part"
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(part, inbox / name)
        time.sleep(rng.uniform(0, 2 * mean_gap_s))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def soak(
    root,
    n: int = 200,
    size: int = 64,
    engine=None,
    timeout_s: float = 600.0,
    mean_gap_s: float = 0.05,
    poll_ms: int = 50,
) -> dict:
    """Run the soak in `root`; returns figures and a list of failed checks (empty = pass)."""
    root = Path(root)
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir(parents=True)
    engine = Path(engine) if engine else make_test_bundle(root / "engine")
    shape = (size, size, size)
    max_voxels = 4 * size**3
    inputs = make_inputs(n, shape, root, max_voxels)
    log_path, status_path = root / "runner.log", root / "status.json"
    cmd = [
        sys.executable, "-m", "liverkd.deploy.runner", "--engine", str(engine), "--inbox", str(inbox),
        "--outbox", str(outbox), "--log", str(log_path), "--status", str(status_path),
        "--poll-ms", str(poll_ms), "--heartbeat-s", "1", "--max-voxels", str(max_voxels),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LIVERKD_RUNNER_TEST_PAUSE"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    feeder = threading.Thread(target=feed, args=(inbox, inputs, mean_gap_s), daemon=True)
    feeder.start()
    done, failed = inbox / "done", inbox / "failed"
    finished = False
    while time.monotonic() - t0 < timeout_s and proc.poll() is None:
        handled = len(list(done.glob("*.nii.gz"))) + len(list(failed.glob("*.nii.gz"))) if done.is_dir() else 0
        if handled >= n and not feeder.is_alive():
            finished = True
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    feeder.join(timeout=5)

    problems = []
    if not finished:
        problems.append(f"not finished in {timeout_s:.0f} s (runner rc {proc.returncode}): {err.strip()[-300:]}")
    if proc.returncode != 0:
        problems.append(f"runner exit code {proc.returncode} after SIGTERM, expected 0")
    good = {name for name, _d, ok in inputs if ok}
    bad = {name for name, _d, ok in inputs if not ok}
    in_done = {p.name for p in done.glob("*")} if done.is_dir() else set()
    in_failed = {p.name for p in failed.glob("*") if not p.name.endswith(".error.json")} if failed.is_dir() else set()
    errors = {p.name[: -len(".error.json")] for p in failed.glob("*.error.json")} if failed.is_dir() else set()
    masks = sorted(p.name for p in outbox.glob("*_liver.nii.gz")) if outbox.is_dir() else []
    leftovers = [p.name for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")]
    leftovers += [p.name for p in (inbox / "work").glob("*")] if (inbox / "work").is_dir() else []
    if in_done != good:
        problems.append(f"done/ holds {len(in_done)} inputs, expected the {len(good)} good ones")
    if in_failed != bad:
        problems.append(f"failed/ holds {len(in_failed)} inputs, expected the {len(bad)} corrupt ones")
    if errors != in_failed:
        problems.append(f"{len(in_failed ^ errors)} failed inputs without a matching .error.json")
    expected_masks = sorted(name.replace(".nii.gz", "_liver.nii.gz") for name in good)
    if masks != expected_masks:
        problems.append(f"{len(masks)} masks in the outbox, expected exactly one per good input ({len(good)})")
    if leftovers:
        problems.append(f"left in inbox or work/: {leftovers[:5]}")
    if any(p.name.startswith(".") for p in outbox.glob("*")) if outbox.is_dir() else False:
        problems.append("temp files left in the outbox")

    records = read_log(log_path) if log_path.is_file() else []
    volumes = [r for r in records if r.get("event") == "volume"]
    names = [r["name"] for r in volumes]
    if sorted(names) != sorted(name for name, _d, _g in inputs):
        problems.append(f"{len(volumes)} volume records in the log for {n} inputs (or names differ)")
    by_n = {r["n"]: r for r in volumes}
    rss_from = by_n.get(RSS_FROM, {}).get("rss_mb")
    rss_last = by_n.get(len(volumes), {}).get("rss_mb")
    growth = 100.0 * (rss_last - rss_from) / rss_from if rss_from and rss_last else float("nan")
    if not growth < RSS_GROWTH_LIMIT:
        problems.append(
            f"RSS grew {growth:.2f}% between volume {RSS_FROM} and {len(volumes)} (limit {RSS_GROWTH_LIMIT}%)"
        )
    ok_records = [r for r in volumes if r["status"] == "ok"]
    latency = [r["latency_s"] for r in ok_records]
    segment_total = [r["timings"]["total"] for r in ok_records if "timings" in r]
    return {
        "volumes": n,
        "size": size,
        "ok": len(ok_records),
        "failed": len(volumes) - len(ok_records),
        "wall_s": wall,
        "rss_mb_at_20": rss_from,
        "rss_mb_at_end": rss_last,
        "rss_growth_pct": growth,
        "median_latency_s": statistics.median(latency) if latency else float("nan"),
        "median_segment_total_s": statistics.median(segment_total) if segment_total else float("nan"),
        "heartbeats": sum(r.get("event") == "heartbeat" for r in records),
        "runner_rc": proc.returncode,
        "problems": problems,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="volumes to feed (default 200)")
    p.add_argument("--size", type=int, default=64, help="phantom side in voxels (default 64)")
    p.add_argument("--engine", help="engine bundle (default: a random-init student-30k built here)")
    p.add_argument("--timeout-s", type=float, default=600, help="give up after this long (default 600)")
    p.add_argument("--gap-s", type=float, default=0.05, help="mean seconds between fed volumes (default 0.05)")
    p.add_argument("--workdir", help="keep the run here (default: a temp folder, removed)")
    args = p.parse_args(argv)
    if args.n <= RSS_FROM:
        p.error(f"--n must be over {RSS_FROM} (RSS is compared from volume {RSS_FROM})")
    with tempfile.TemporaryDirectory(prefix="runner_soak_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        r = soak(root, n=args.n, size=args.size, engine=args.engine, timeout_s=args.timeout_s, mean_gap_s=args.gap_s)
    print(f"runner soak: {r['volumes']} volumes of {r['size']}^3, {r['ok']} ok, {r['failed']} failed, "
          f"{r['wall_s']:.1f} s wall, {r['heartbeats']} heartbeats")
    print(f"  RSS at volume {RSS_FROM}: {r['rss_mb_at_20']} MB, at volume {r['volumes']}: {r['rss_mb_at_end']} MB, "
          f"growth {r['rss_growth_pct']:+.2f}% (limit {RSS_GROWTH_LIMIT}%)")
    print(f"  median latency (claim -> input in done/): {1000 * r['median_latency_s']:.1f} ms; "
          f"median Segmenter total: {1000 * r['median_segment_total_s']:.1f} ms")
    for problem in r["problems"]:
        print(f"  FAIL: {problem}")
    print("PASS" if not r["problems"] else "FAIL")
    return 0 if not r["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
