"""Soak test of the embedded device runner (`liverkd runner`), bounded in count and time.

A feeder thread drops N phantom volumes into the inbox while `python -m liverkd runner` runs:
most as NAME.part + rename, every sixth good one written straight under its name in slow
chunks (the settle window must wait for it), every seventh under the name of an input sent
a little earlier (same-name inputs must both be kept), every tenth corrupt in rotating ways.
With --kills K the runner is SIGKILLed K times at random moments of the first part of the
run and restarted. Afterwards it checks that every good input is in done/ exactly once (by a
tag in its header), every corrupt one in failed/ with its error file, one mask + stats pair
per good input and no orphan, no temp left, the last runner exited 0 on SIGTERM, and RSS grew
less than 5% between volume 20 and the last volume of the last runner process.

    .venv/bin/python benchmarks/runner_soak.py                     # 200 volumes of 64^3, 3 kills
    .venv/bin/python benchmarks/runner_soak.py --n 40 --size 32 --kills 0
    .venv/bin/python benchmarks/runner_soak.py --engine engines/NAME

Without --engine it builds a random-init student-30k bundle (deploy.build, ONNX Runtime,
6 mm, 64^3) in the work folder: the runner's behaviour, not the mask quality, is under test.
tests/test_service.py runs a small version through soak().
"""

from __future__ import annotations

import argparse
import collections
import gzip
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

from liverkd.core.synth import synth_case

REPO = Path(__file__).resolve().parents[1]
RSS_GROWTH_LIMIT = 5.0  # percent, between volume RSS_FROM and the last one of one runner process
RSS_FROM = 20
TAG = "soak input "


def make_test_bundle(folder, input_shape=(64, 64, 64), spacing=(6.0, 6.0, 6.0), preset="student-30k") -> Path:
    """A random-init student built the `liverkd build-engine` way (ONNX Runtime, fp32); imports torch."""
    import warnings

    import torch

    from liverkd.core.spec import PreprocessSpec
    from liverkd.deploy.build import build_engine
    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    folder = Path(folder)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = PreprocessSpec(spacing=spacing, input_shape=input_shape)
        checkpoint = save_checkpoint(Path(tmp) / "model.pt", create_model(preset), spec, preset=preset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_engine(checkpoint, folder, backend="onnxruntime", log=lambda message: None)
    return folder


def nifti_gz(img: nib.Nifti1Image, tag: str = "") -> bytes:
    img.header["descrip"] = tag.encode()
    return gzip.compress(img.to_bytes(), compresslevel=1)


class Input:
    def __init__(self, i: int, name: str, data: bytes, good: bool, how: str = "rename"):
        self.i, self.name, self.data, self.good, self.how = i, name, data, good, how


def make_inputs(n: int, shape, max_voxels: int, distinct: int = 4) -> list[Input]:
    """N inputs: every tenth corrupt (five ways), the good ones tagged, some slow, some same-named."""
    images = [synth_case(seed, shape=shape)[0].to_nifti() for seed in range(distinct)]
    side = int(round((2 * max_voxels) ** (1 / 3))) + 1
    whole = nifti_gz(images[0])
    corrupt = {
        "truncated": whole[: len(whole) // 2],
        "not_nifti": b"this is not a NIfTI file\n" * 40,
        "empty": b"",
        "flat_2d": nifti_gz(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16), np.eye(4))),
        "oversized": nifti_gz(nib.Nifti1Image(np.zeros((side,) * 3, np.int16), np.eye(4))),
    }
    kinds = list(corrupt)
    out: list[Input] = []
    for i in range(n):
        if i % 10 == 9:
            kind = kinds[(i // 10) % len(kinds)]
            out.append(Input(i, f"vol_{i:04d}_{kind}.nii.gz", corrupt[kind], False))
            continue
        name = f"vol_{i:04d}.nii.gz"
        if i % 7 == 3 and i >= 5 and out[i - 5].good:
            name = out[i - 5].name  # the same name as an input sent a little earlier
        how = "slow" if i % 6 == 1 else "rename"
        out.append(Input(i, name, nifti_gz(images[i % distinct], f"{TAG}{i}"), True, how))
    return out


def feed(inbox: Path, inputs: list[Input], mean_gap_s: float, chunk_gap_s: float, seed: int = 0) -> None:
    """NAME.part + fsync + rename (the handover docs/runner.md asks of senders), or, for the slow
    ones, straight into NAME in four chunks `chunk_gap_s` apart. A name still waiting in the
    inbox is not overwritten (a sender's own clobber, not the runner's business)."""
    rng = random.Random(seed)
    for item in inputs:
        final = inbox / item.name
        while final.exists():
            time.sleep(0.01)
        if item.how == "slow":
            with open(final, "wb") as f:
                step = max(1, len(item.data) // 4)
                for start in range(0, len(item.data), step):
                    f.write(item.data[start : start + step])
                    f.flush()
                    time.sleep(chunk_gap_s)
        else:
            part = inbox / f"{item.name}.part"
            with open(part, "wb") as f:
                f.write(item.data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(part, final)
        time.sleep(rng.uniform(0, 2 * mean_gap_s))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def _handled(done: Path, failed: Path) -> int:
    return len(_files(done)) + sum(not p.name.endswith(".error.json") for p in _files(failed))


def soak(
    root,
    n: int = 200,
    size: int = 64,
    engine=None,
    timeout_s: float = 600.0,
    mean_gap_s: float = 0.05,
    poll_s: float = 0.05,
    settle_s: float = 0.5,
    kills: int = 0,
    seed: int = 0,
) -> dict:
    """Run the soak in `root`; returns figures and a list of failed checks (empty = pass)."""
    root = Path(root)
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir(parents=True)
    engine = Path(engine) if engine else make_test_bundle(root / "engine")
    max_voxels = 4 * size**3
    inputs = make_inputs(n, (size, size, size), max_voxels)
    log_path, status_path = root / "runner.log", root / "status.json"
    cmd = [
        sys.executable, "-m", "liverkd", "runner", "--engine", str(engine), "--inbox", str(inbox),
        "--outbox", str(outbox), "--log", str(log_path), "--status", str(status_path), "--poll-s", str(poll_s),
        "--settle-s", str(settle_s), "--retry-s", "0.5", "--heartbeat-s", "1", "--max-voxels", str(max_voxels),
    ]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    rng = random.Random(seed)
    kill_at = sorted(rng.randint(n // 10, n // 2) for _ in range(kills))  # handled counts, early in the run
    t0 = time.monotonic()
    proc = start()
    feeder = threading.Thread(target=feed, args=(inbox, inputs, mean_gap_s, settle_s / 5, seed), daemon=True)
    feeder.start()
    done, failed = inbox / "done", inbox / "failed"
    finished, killed, early_exits = False, 0, []
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:  # a runner must never exit on its own: note it, keep the soak going
            early_exits.append(f"rc {proc.returncode}: {proc.stderr.read().strip()[-300:]}")
            proc = start()
        handled = _handled(done, failed)
        if handled >= n and not feeder.is_alive():
            finished = True
            break
        if kill_at and handled >= kill_at[0]:
            kill_at.pop(0)
            time.sleep(rng.uniform(0, 0.3))  # anywhere in a volume, or between two
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
            proc = start()
        time.sleep(0.05)
    wall = time.monotonic() - t0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    feeder.join(timeout=5)

    problems = [f"the runner exited by itself ({e})" for e in early_exits]
    if not finished:
        problems.append(f"not finished in {timeout_s:.0f} s (runner rc {proc.returncode}): {err.strip()[-300:]}")
    if proc.returncode != 0:
        problems.append(f"runner exit code {proc.returncode} after SIGTERM, expected 0")
    problems += check_folders(inbox, outbox, inputs)
    records = read_log(log_path) if log_path.is_file() else []
    volumes = [r for r in records if r.get("event") == "volume"]
    claims = {r["claim"] for r in volumes}
    if len(claims) != n:
        problems.append(f"{len(claims)} claims with a volume record in the log for {n} inputs")
    last_start = max((i for i, r in enumerate(records) if r.get("event") == "start"), default=0)
    last_run = [r for r in records[last_start:] if r.get("event") == "volume"]
    by_n = {r["n"]: r for r in last_run}
    rss_from = by_n.get(RSS_FROM, {}).get("rss_mb")
    rss_last = by_n.get(len(last_run), {}).get("rss_mb") if len(last_run) > RSS_FROM else None
    growth = 100.0 * (rss_last - rss_from) / rss_from if rss_from and rss_last else float("nan")
    if growth >= RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew {growth:.2f}% between volume {RSS_FROM} and {len(last_run)} of the last runner")
    ok_records = {r["claim"]: r for r in volumes if r["status"] == "ok"}.values()
    latency = [r["latency_s"] for r in ok_records if "recovered" not in r]
    segment_total = [r["timings"]["total"] for r in ok_records if "timings" in r]
    return {
        "volumes": n,
        "size": size,
        "ok": len(ok_records),
        "failed": len(claims) - len(ok_records),
        "kills": killed,
        "same_name": sum(1 for i in inputs if i.good) - len({i.name for i in inputs if i.good}),
        "slow_writers": sum(i.how == "slow" for i in inputs),
        "recovered_records": sum("recovered" in r for r in volumes),
        "wall_s": wall,
        "last_run_volumes": len(last_run),
        "rss_mb_at_20": rss_from,
        "rss_mb_at_end": rss_last,
        "rss_growth_pct": growth,
        "median_latency_s": statistics.median(latency) if latency else float("nan"),
        "median_segment_total_s": statistics.median(segment_total) if segment_total else float("nan"),
        "heartbeats": sum(r.get("event") == "heartbeat" for r in records),
        "runner_rc": proc.returncode,
        "problems": problems,
    }


def check_folders(inbox: Path, outbox: Path, inputs: list[Input]) -> list[str]:
    """Nothing lost, nothing twice, no orphan output, no temp left."""
    problems = []
    done, failed, work = inbox / "done", inbox / "failed", inbox / "work"
    tags = collections.Counter(nib.load(p).header["descrip"].item().decode() for p in _files(done))
    want = collections.Counter(f"{TAG}{i.i}" for i in inputs if i.good)
    if tags != want:
        lost, twice = want - tags, tags - want
        problems.append(f"done/: {sum(lost.values())} good inputs missing, {sum(twice.values())} extra or twice")
    in_failed = {p.name for p in _files(failed) if not p.name.endswith(".error.json")}
    errors = {p.name.removesuffix(".error.json") for p in _files(failed) if p.name.endswith(".error.json")}
    bad = {i.name for i in inputs if not i.good}
    if in_failed != bad:
        problems.append(f"failed/ holds {len(in_failed)} inputs, expected the {len(bad)} corrupt ones")
    if errors != in_failed:
        problems.append(f"{len(in_failed ^ errors)} failed inputs without a matching .error.json")
    masks = {p.name.removesuffix("_liver.nii.gz") for p in outbox.glob("*_liver.nii.gz")}
    stats = {p.name.removesuffix("_liver.json"): p for p in outbox.glob("*_liver.json")}
    if masks != set(stats):
        problems.append(f"{len(masks ^ set(stats))} masks without stats or stats without a mask")
    sources = collections.Counter(json.loads(p.read_text())["input"] for p in stats.values())
    if sources != collections.Counter(i.name for i in inputs if i.good):
        problems.append(f"{len(masks)} masks in the outbox, expected exactly one per good input")
    left = [p.name for p in _files(inbox) if p.is_file()] + [p.name for p in work.glob("*")]
    if left:
        problems.append(f"left in the inbox or work/: {left[:5]}")
    temps = [p.name for folder in (outbox, done, failed) for p in folder.glob(".*lk*")]
    if temps:
        problems.append(f"temp files left: {temps[:5]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="volumes to feed (default 200)")
    p.add_argument("--size", type=int, default=64, help="phantom side in voxels (default 64)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILL and restart the runner this many times (default 3)")
    p.add_argument("--engine", help="engine bundle (default: a random-init student-30k built here)")
    p.add_argument("--timeout-s", type=float, default=900, help="give up after this long (default 900)")
    p.add_argument("--gap-s", type=float, default=0.05, help="mean seconds between fed volumes (default 0.05)")
    p.add_argument("--workdir", help="keep the run here (default: a temp folder, removed)")
    args = p.parse_args(argv)
    if args.n <= RSS_FROM:
        p.error(f"--n must be over {RSS_FROM} (RSS is compared from volume {RSS_FROM})")
    with tempfile.TemporaryDirectory(prefix="runner_soak_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        r = soak(root, n=args.n, size=args.size, engine=args.engine, timeout_s=args.timeout_s,
                 mean_gap_s=args.gap_s, kills=args.kills)  # fmt: skip
    print(f"runner soak: {r['volumes']} volumes of {r['size']}^3 ({r['same_name']} same-name, {r['slow_writers']} "
          f"slow writers), {r['kills']} SIGKILLs: {r['ok']} ok, {r['failed']} failed, {r['wall_s']:.1f} s wall, "
          f"{r['recovered_records']} recovered records, {r['heartbeats']} heartbeats")  # fmt: skip
    print(
        f"  RSS of the last runner ({r['last_run_volumes']} volumes) at volume {RSS_FROM}: {r['rss_mb_at_20']} MB, "
        f"at its end: {r['rss_mb_at_end']} MB, growth {r['rss_growth_pct']:+.2f}% (limit {RSS_GROWTH_LIMIT}%)"
    )
    print(
        f"  median latency (claim -> input in done/): {1000 * r['median_latency_s']:.1f} ms; "
        f"median Segmenter total: {1000 * r['median_segment_total_s']:.1f} ms"
    )
    for problem in r["problems"]:
        print(f"  FAIL: {problem}")
    print("PASS" if not r["problems"] else "FAIL")
    return 0 if not r["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
