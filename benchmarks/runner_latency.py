"""Drop-to-claim latency of `liverkd runner`: the poll alone, then the inotify watch, same machine.

For each mode a runner subprocess is started (RunnerConfig straight to serve: `watch` is no CLI
option yet) and N phantoms are dropped one at a time as NAME.part + rename, each after a random
pause (so that drops fall anywhere in a poll interval) once the previous one is segmented. The
claim is the runner's rename of NAME into work/, seen as IN_MOVED_FROM by this process's own
inotify watch on the inbox. Prints the median and p90 of each mode and the ratio of the medians;
asserts nothing about speed.

    .venv/bin/python benchmarks/runner_latency.py                  # N=20, the runner's defaults
    .venv/bin/python benchmarks/runner_latency.py --n 40 --poll-s 0.05 --settle-s 0.1 --engine engines/NAME

Without --engine it builds a random-init student-30k bundle (as benchmarks/runner_soak.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from liverkd.core.synth import synth_case
from liverkd.deploy.service.watch import IN_MOVED_FROM, inotify, read_events

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """
import sys
from pathlib import Path
from liverkd.deploy.service import RunnerConfig, serve
engine, inbox, outbox, log, watch, poll_s, settle_s = sys.argv[1:]
sys.exit(serve(RunnerConfig(engine=Path(engine), inbox=Path(inbox), outbox=Path(outbox), log=Path(log),
                            watch=watch, poll_s=float(poll_s), settle_s=float(settle_s), delete_done=True)))
"""


def records(log: Path, event: str) -> list[dict]:
    if not log.is_file():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["event"] == event]


def wait_until(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise SystemExit(f"the runner exited (rc {proc.returncode}): {proc.stderr.read()[-800:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"timed out after {timeout_s:.0f} s")
        time.sleep(0.02)


def measure(root: Path, engine: Path, watch: str, n: int, poll_s: float, settle_s: float, data: bytes, seed: int):
    """Drop-to-claim seconds of `n` drops, and the mode the runner said it watches with."""
    inbox, outbox, log = root / watch / "inbox", root / watch / "outbox", root / watch / "runner.log"
    inbox.mkdir(parents=True)
    args = [str(engine), str(inbox), str(outbox), str(log), watch, str(poll_s), str(settle_s)]
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    fd = inotify(inbox, IN_MOVED_FROM)
    rng = random.Random(seed)
    out = []
    try:
        wait_until(lambda: records(log, "watch"), proc)
        mode = records(log, "watch")[0]["mode"]
        for i in range(n):
            time.sleep(rng.uniform(0, poll_s))
            name = f"case_{i:03d}.nii.gz"
            part = inbox / (name + ".part")
            part.write_bytes(data)
            t_drop = time.perf_counter()
            os.rename(part, inbox / name)
            while not any(mask & IN_MOVED_FROM and ev == name for mask, ev in read_events(fd)):
                if not select.select([fd], [], [], 5.0)[0] and proc.poll() is not None:
                    raise SystemExit(f"the runner exited (rc {proc.returncode}): {proc.stderr.read()[-800:]}")
            out.append(time.perf_counter() - t_drop)
            wait_until(lambda i=i: len(records(log, "volume")) > i, proc)  # segmented: the runner waits again
    finally:
        os.close(fd)
        proc.terminate()
        proc.wait(timeout=120)
    return out, mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="drops per mode")
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--settle-s", type=float, default=1.0)
    ap.add_argument("--engine", type=Path, help="engine bundle (default: build a random-init student-30k)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    img = synth_case(0, shape=(32, 32, 32))[0].to_nifti()
    data = gzip.compress(img.to_bytes(), compresslevel=1)
    with tempfile.TemporaryDirectory(prefix="runner-latency-") as tmp:
        root = Path(tmp)
        engine = args.engine
        if engine is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from runner_soak import make_test_bundle

            engine = make_test_bundle(root / "engine")
        medians = {}
        print(f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
              f"poll_s {args.poll_s}, settle_s {args.settle_s}, n {args.n}, drops by rename")  # fmt: skip
        for watch in ("poll", "auto"):
            seconds, mode = measure(root, engine, watch, args.n, args.poll_s, args.settle_s, data, args.seed)
            ms = sorted(1000 * s for s in seconds)
            medians[mode] = statistics.median(ms)
            p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
            print(f"  watch {watch:4} ({mode:7}): drop-to-claim median {medians[mode]:8.2f} ms, "
                  f"p90 {p90:8.2f} ms, min {ms[0]:7.2f} ms, max {ms[-1]:8.2f} ms")  # fmt: skip
        if "inotify" in medians and "poll" in medians:
            print(f"  ratio poll / inotify (medians): {medians['poll'] / medians['inotify']:.1f}x")
        else:
            print("  no inotify here: the runner fell back to the poll")


if __name__ == "__main__":
    main()
