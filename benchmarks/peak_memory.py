"""Peak memory of `liverkd infer` on a full-size CT: 512 x 512 x 300 int16, 0.7 x 0.7 x 1.5 mm.

    .venv/bin/python benchmarks/peak_memory.py [--engine engines/NAME] [--keep DIR]

Measures the maximum resident set size with GNU time (`/usr/bin/time -v`; on Debian/Ubuntu
`apt-get install -y time`). Baseline, measured the same way in the same run: a Python process
that only loads the volume with nibabel. Goal: infer stays under 1.5 GB.
Without --engine it uses the newest bundle in engines/, else builds a random-init
student-30k bundle with the default PreprocessSpec in a temp folder (needs torch; memory
does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

GOAL_BYTES = 1.5e9
TIME = "/usr/bin/time"
SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 1.5)


def synthetic_ct(path: Path, seed: int = 0) -> Path:
    """Air, an elliptic body of soft tissue, a brighter 'liver', noise; written slab by slab."""
    rng = np.random.default_rng(seed)
    x = (np.arange(SHAPE[0]) - SHAPE[0] / 2) / (0.42 * SHAPE[0])
    y = (np.arange(SHAPE[1]) - SHAPE[1] / 2) / (0.34 * SHAPE[1])
    body = (x[:, None] ** 2 + y[None, :] ** 2) < 1
    liver = ((x[:, None] + 0.35) ** 2 / 0.12 + (y[None, :] + 0.1) ** 2 / 0.2) < 1
    ct = np.empty(SHAPE, dtype=np.int16)
    for z in range(SHAPE[2]):
        in_liver = liver & (0.2 < z / SHAPE[2] < 0.7)
        plane = np.where(in_liver, 60, np.where(body, 30, -1000)) + rng.normal(0, 15, SHAPE[:2])
        ct[:, :, z] = plane.astype(np.int16)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -200.0]
    img = nib.Nifti1Image(ct, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def peak_rss(cmd: list[str]) -> tuple[int, str, str]:
    """(max RSS in bytes, stdout, stderr without time's report) of `cmd` under GNU time -v."""
    proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not match:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return int(match.group(1)) * 1024, proc.stdout, proc.stderr


def default_engine(tmp: Path) -> Path:
    from liverkd.deploy.bundle import BundleError, newest_bundle

    try:
        return newest_bundle("engines").path
    except BundleError:
        pass
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _segment_bundle import make_bundle

    from liverkd.core.spec import PreprocessSpec

    print("no bundle in engines/: building a random-init student-30k with the default spec", file=sys.stderr)
    return make_bundle(tmp / "engine", spec=PreprocessSpec())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the synthetic CT and mask in this folder")
    args = parser.parse_args()
    if not Path(TIME).is_file():
        sys.exit(f"{TIME} not found: install GNU time (Debian/Ubuntu: apt-get install -y time)")
    tmp = Path(tempfile.mkdtemp(prefix="liverkd-mem-"))
    try:
        work = args.keep or tmp
        work.mkdir(parents=True, exist_ok=True)
        engine = args.engine or default_engine(tmp)
        ct = synthetic_ct(work / "ct512.nii.gz")
        liverkd = str(Path(sys.executable).parent / "liverkd")
        baseline, _, _ = peak_rss(
            [sys.executable, "-c", f"import numpy as np, nibabel as nib; np.asarray(nib.load({str(ct)!r}).dataobj)"]
        )
        mask = work / "mask.nii.gz"
        peak, out, _ = peak_rss([liverkd, "infer", str(ct), "-o", str(mask), "--engine", str(engine), "--json"])
        result = json.loads(out.splitlines()[-1])
        print(f"input: {ct.name} {SHAPE} int16, {SPACING} mm ({np.prod(SHAPE) * 2 / 1e6:.0f} MB of voxels)")
        print(f"engine: {engine}")
        print(f"baseline (python + nibabel load only): peak RSS {baseline / 1e9:.3f} GB")
        print(f"liverkd infer:                         peak RSS {peak / 1e9:.3f} GB  ({peak / baseline:.2f}x baseline)")
        print(f"goal < {GOAL_BYTES / 1e9:.1f} GB: {'met' if peak < GOAL_BYTES else 'NOT met'}")
        print("stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
