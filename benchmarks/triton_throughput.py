"""Volumes per second through a real Triton server with 1, 2 and 4 concurrent clients (issue 17).

Starts the tritonserver bundled in nvidia-pytriton on loopback (or uses --url), serving
`export-triton --network python`'s repository for the packaged model, and sends the same
volumes from N client threads at once (each its own HTTP connection), R rounds each. Prints,
per N: volumes/s over the wall clock, and the median and p90 of one volume's round trip; and
for comparison the in-process Segmenter (`liverkd infer`'s path, one stream, no HTTP). Asserts
nothing. Run it in .venv-triton (`make test-triton` makes it; the wheel needs numpy < 2):

    .venv-triton/bin/python benchmarks/triton_throughput.py                    # 4 phantoms, 3 rounds
    .venv-triton/bin/python benchmarks/triton_throughput.py --real             # + the real CT of ../shared
    .venv-triton/bin/python benchmarks/triton_throughput.py --url host:8000    # a server already running
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib

from liverkd import models
from liverkd.core import volume as V
from liverkd.core.synth.dataset import synth_case

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "totalseg_example" / "ct_3mm.nii.gz"


def volumes(folder: Path, n: int, real: bool) -> list[tuple[str, bytes]]:
    out = []
    for seed in range(31, 31 + n):
        image, _ = synth_case(seed)
        path = folder / f"phantom{seed}.nii.gz"
        nib.save(V.to_nifti(image.array, image.affine, image.header), path)
        out.append((path.name, path.read_bytes()))
    if real and REAL_CT.is_file():
        out.append((REAL_CT.name, REAL_CT.read_bytes()))
    return out


def clients_run(url: str, data: list[tuple[str, bytes]], clients: int, rounds: int) -> dict:
    from liverkd.deploy.triton.client import TritonSegmenter

    latencies, errors = [], []
    barrier = threading.Barrier(clients + 1)

    def client(k: int):
        with TritonSegmenter(url) as c:
            barrier.wait()
            for _ in range(rounds):
                for i in range(len(data)):
                    name, payload = data[(i + k) % len(data)]  # clients out of step: different volumes at once
                    t0 = time.perf_counter()
                    try:
                        c.segment_bytes(payload, name)
                    except Exception as e:  # counted, printed below
                        errors.append(f"{name}: {e}")
                        continue
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "volumes": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "volumes_per_s": len(latencies) / wall,
        "median_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def in_process(data: list[tuple[str, bytes]], rounds: int, folder: Path) -> dict:
    from liverkd.deploy.segment import Segmenter

    paths = []
    for name, payload in data:
        (folder / f"in_{name}").write_bytes(payload)
        paths.append(folder / f"in_{name}")
    with Segmenter.load(models.path()) as seg:
        seg.segment(paths[0])  # warm
        t0 = time.perf_counter()
        n = 0
        for _ in range(rounds):
            for p in paths:
                seg.segment_file(p, folder / "out.nii.gz")
                n += 1
        wall = time.perf_counter() - t0
    return {"volumes": n, "wall_s": wall, "volumes_per_s": n / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server with export-triton's repository (default: start one here)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also send the real CT of ../shared/data/totalseg_example")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    warnings.simplefilter("ignore", V.VolumeWarning)

    with tempfile.TemporaryDirectory(prefix="liverkd-triton-bench-") as tmp:
        tmp = Path(tmp)
        data = volumes(tmp, args.phantoms, args.real)
        server = None
        if args.url is None:
            from liverkd.deploy.triton.repository import export_repository
            from liverkd.deploy.triton.server import LocalTriton

            export_repository(models.path(), tmp / "repo", network="python")
            server = LocalTriton(tmp / "repo").start()
        url = args.url or server.url
        try:
            clients_run(url, data[:1], 1, 1)  # warm: the models' first run
            rows = [clients_run(url, data, n, args.rounds) for n in args.clients]
        finally:
            if server is not None:
                server.stop()
        baseline = in_process(data, args.rounds, tmp)

    cpu = platform.processor() or platform.machine()
    print(f"# Triton throughput: {len(data)} volumes x {args.rounds} rounds per client; {os.cpu_count()} CPUs ({cpu})")
    print("| clients | volumes | volumes/s | median s/volume | p90 s/volume | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['volumes']} | {r['volumes_per_s']:.2f} | {r['median_s']:.2f} | "
              f"{r['p90_s']:.2f} | {len(r['errors'])} |")  # fmt: skip
    print(f"| in-process Segmenter (no server) | {baseline['volumes']} | {baseline['volumes_per_s']:.2f} | | | |")
    for r in rows:
        for e in r["errors"][:3]:
            print(f"error ({r['clients']} clients): {e}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "in_process": baseline}, indent=2) + "\n")


if __name__ == "__main__":
    main()
