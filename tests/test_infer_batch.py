"""Job arrays: `liverkd infer --shard K/N --skip-existing`, and the read/segment/write pipeline
(liverkd.deploy.batch). Real files, the real CLI in a subprocess, the packaged default model."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverkd.core import volume as V
from liverkd.core.synth.dataset import synth
from liverkd.deploy import batch

N_VOLUMES = 10


def run(cmd, *args, cwd=None):
    return subprocess.run([*cmd, "infer", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def write_phantoms(folder: Path, n: int, shape=(32, 32, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        vol, _, _ = synth(i, shape, spacing=8.0)
        paths.append(V.save(vol.to_nifti(), folder / f"case{i:02d}.nii.gz"))
    return paths


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("batch") / "cases", N_VOLUMES)[0].parent


def masks(folder: Path) -> dict[str, np.ndarray]:
    """Every finished mask in `folder` (not the hidden temp files a killed run leaves)."""
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("[!.]*_liver.nii.gz"))}


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def names(recs, *, skipped: bool) -> set[str]:
    return {Path(r["output"]).name for r in recs if bool(r.get("skipped")) == skipped and r.get("output")}


# ------------------------------------------------------------------ shards


def test_parse_shard_is_0_based_and_strict():
    assert batch.parse_shard("0/1") == (0, 1)
    assert batch.parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0", "1/2/3", ""):
        with pytest.raises(ValueError, match="0 <= K < N"):
            batch.parse_shard(bad)


def test_shards_partition_the_volumes_whatever_the_listing_order(tmp_path):
    outputs = [tmp_path / f"ct{i:03d}_liver.nii.gz" for i in range(200)]
    for n in (1, 2, 3, 7):
        shuffled = random.Random(n).sample(outputs, len(outputs))
        owners = {}
        for listing in (outputs, shuffled):
            for path in listing:
                mine = [k for k in range(n) if batch.in_shard(batch.shard_key(path), k, n)]
                assert len(mine) == 1  # exactly one shard
                assert owners.setdefault(path, mine[0]) == mine[0]  # the same in any order
        sizes = np.bincount(list(owners.values()), minlength=n)
        assert sizes.sum() == len(outputs) and sizes.min() > len(outputs) / n / 2  # no shard starves


def test_shard_key_is_the_same_for_any_spelling_of_the_folder(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    spellings = ["out/a_liver.nii.gz", "./out/a_liver.nii.gz", str(tmp_path / "out/a_liver.nii.gz"),
                 "link/a_liver.nii.gz", "out/../out/a_liver.nii.gz"]  # fmt: skip
    assert len({batch.shard_key(Path(s)) for s in spellings}) == 1


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "x/2", "1", "0/0"])
def test_a_bad_shard_is_a_one_line_usage_error(liverkd_cmd, tmp_path, shard):
    proc = run(liverkd_cmd, tmp_path, f"--shard={shard}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "0 <= K < N" in proc.stderr


def test_skip_existing_and_overwrite_are_exclusive(liverkd_cmd, tmp_path):
    proc = run(liverkd_cmd, tmp_path, "--skip-existing", "--overwrite")
    assert proc.returncode == 2 and "give one" in proc.stderr


# ------------------------------------------------------------------ the acceptance run


def _run_until(cmd, args, cwd, kill_after: int) -> tuple[list[dict], bool]:
    """Start `liverkd infer ARGS --json`; SIGKILL it once `kill_after` volumes are reported (if it
    gets that far). Returns what it reported and whether it was killed."""
    proc = subprocess.Popen([*cmd, "infer", *map(str, args), "--json"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    timer = threading.Timer(300, proc.kill)
    timer.start()
    reported, killed = [], False
    try:
        for line in proc.stdout:
            reported.append(json.loads(line))
            if len(reported) == kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    finally:
        timer.cancel()
        proc.stdout.close()
        proc.wait()
    assert killed or proc.returncode == 0
    return reported, killed


def test_two_shards_one_killed_and_resumed_give_the_single_runs_masks(liverkd_cmd, cases, tmp_path):
    single = run(liverkd_cmd, cases, "-o", tmp_path / "single", "--json")
    assert single.returncode == 0, single.stderr
    reference = masks(tmp_path / "single")
    assert len(reference) == N_VOLUMES

    # Shard 0 names the folder, shard 1 the files one by one in another order and spelling: the same split.
    files = sorted(cases.glob("*.nii.gz"), reverse=True)
    inputs = {0: [cases], 1: [os.path.relpath(f, tmp_path) for f in files]}
    out = tmp_path / "sharded"
    before: dict[int, set[str]] = {}
    killed_any = False
    for k in (0, 1):
        # Kill a shard after 2 volumes; one too small to get there (at most 2 of 10) simply finishes.
        args = [*inputs[k], "-o", "sharded" if k else out, "--shard", f"{k}/2"]
        reported, killed = _run_until(liverkd_cmd, args, tmp_path, kill_after=2)
        killed_any |= killed
        before[k] = {p.name for p in out.glob("[!.]*_liver.nii.gz")} - set().union(*before.values())
        assert names(reported, skipped=False) <= before[k]  # what it reported is on disk
    assert killed_any  # 10 volumes in 2 shards: one has at least 5

    done: dict[int, set[str]] = {}
    for k in (0, 1):
        args = [*inputs[k], "-o", out, "--shard", f"{k}/2", "--skip-existing", "--json"]
        proc = run(liverkd_cmd, *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        recs = records(proc.stdout)
        skipped, done[k] = names(recs, skipped=True), names(recs, skipped=False)
        assert skipped == before[k]  # every mask that existed at the kill is trusted...
        assert not done[k] & before[k]  # ...and none of them is done again
        assert f"shard {k}/2: {len(recs)} of {N_VOLUMES} volumes" in proc.stderr
    shard_of = {name: k for k in (0, 1) for name in before[k] | done[k]}
    assert len(shard_of) == N_VOLUMES  # disjoint shards, together every volume

    got = masks(out)
    assert got.keys() == reference.keys()
    for name, mask in reference.items():
        assert np.array_equal(got[name], mask), name
        a, b = nib.load(out / name), nib.load(tmp_path / "single" / name)
        assert np.array_equal(a.affine, b.affine) and a.shape == b.shape


def test_an_incomplete_or_foreign_output_is_done_again_never_trusted(liverkd_cmd, tmp_path):
    src = tmp_path / "cases"
    write_phantoms(src, 5)
    other = write_phantoms(tmp_path / "other", 1, shape=(36, 32, 32))[0]  # a mask of another volume's shape
    out = tmp_path / "out"
    first = run(liverkd_cmd, src, "-o", out, "--stats", "--json")
    assert first.returncode == 0, first.stderr
    good = {n: (out / n).read_bytes() for n in os.listdir(out)}

    whole = (out / "case00_liver.nii.gz").read_bytes()
    (out / "case00_liver.nii.gz").write_bytes(whole[: len(whole) // 2])  # cut short
    (out / "case01_liver.nii.gz").write_bytes(b"not a NIfTI at all")
    assert run(liverkd_cmd, other, "-o", out / "case02_liver.nii.gz", "--overwrite").returncode == 0
    (out / "case03_liver.json").unlink()  # the mask whole, its stats missing
    # case04: untouched

    proc = run(liverkd_cmd, src, "-o", out, "--stats", "--skip-existing", "--json")
    assert proc.returncode == 0, proc.stderr
    recs = records(proc.stdout)
    assert names(recs, skipped=True) == {"case04_liver.nii.gz"}
    assert names(recs, skipped=False) == {f"case0{i}_liver.nii.gz" for i in range(4)}
    warned = [line for line in proc.stderr.splitlines() if "segmenting again" in line]
    assert len(warned) == 3 and any("truncated" in w for w in warned) and any("shape" in w for w in warned)
    assert "1 skipped" in proc.stderr
    for name, data in good.items():  # all as the first run wrote them (stats: but for their timings)
        if name.endswith(".nii.gz"):
            first_mask = nib.Nifti1Image.from_bytes(gzip.decompress(data))
            assert np.array_equal(np.asarray(nib.load(out / name).dataobj), np.asarray(first_mask.dataobj)), name
        else:
            assert json.loads((out / name).read_text())["liver_voxels"] == json.loads(data)["liver_voxels"]

    # Without --stats the sidecars are not asked for: all five are complete.
    again = run(liverkd_cmd, src, "-o", out, "--skip-existing")
    assert again.returncode == 0 and "0 of 5 volumes segmented, 5 skipped" in again.stderr
    assert again.stdout.count("complete, skipped") == 5


def test_dicom_outputs_are_checked_too(liverkd_cmd, tmp_path):
    pytest.importorskip("highdicom", reason="the optional extra `dicom` (highdicom) is not installed")
    from test_dicom import write_series

    vol, _, _ = synth(0, (32, 32, 24), spacing=8.0)
    folder = write_series(tmp_path / "ct", (vol.array + 1024).astype(np.uint16), spacing=(8.0, 8.0), step=8.0)
    for fmt, name in (("dicom-seg", "ct_liver_seg.dcm"), ("nifti", "ct_liver.nii.gz")):
        assert run(liverkd_cmd, folder, "--format", fmt).returncode == 0
        whole = (tmp_path / name).read_bytes()
        proc = run(liverkd_cmd, folder, "--format", fmt, "--skip-existing")
        assert proc.returncode == 0 and "complete, skipped" in proc.stdout, proc.stderr
        (tmp_path / name).write_bytes(whole[: len(whole) * 2 // 3])
        proc = run(liverkd_cmd, folder, "--format", fmt, "--skip-existing")
        assert proc.returncode == 0 and "segmenting again" in proc.stderr and "skipped" not in proc.stdout
        assert batch.output_problem(tmp_path / name) is None


def test_sigterm_stops_cleanly_with_every_written_mask_whole(liverkd_cmd, cases, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*liverkd_cmd, "infer", str(cases), "-o", str(out), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    reported = records(first + stdout)
    if proc.returncode == 0:  # finished before the signal arrived: nothing to check
        pytest.skip("the run ended before SIGTERM")
    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    assert sorted(os.listdir(out)) == sorted(names(reported, skipped=False))  # no temp file, none unreported
    for name in os.listdir(out):
        assert batch.output_problem(out / name, cases / name.replace("_liver", "")) is None


def test_output_problem_reads_headers_and_trailers(tmp_path):
    vol, _, _ = synth(0, (24, 20, 16), spacing=8.0)
    header = vol.to_nifti().header.copy()
    header["xyzt_units"] = 1  # metres: the mask's affine is in mm, 1000 times larger
    ct = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(vol.array, np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ vol.affine, header), ct)
    loaded = V.load(ct)
    mask = tmp_path / "ct_liver.nii.gz"
    V.save(V.to_nifti(np.zeros(loaded.array.shape, np.uint8), loaded.affine, loaded.header), mask)
    assert batch.output_problem(mask, ct) is None
    assert batch.output_problem(mask) is None
    assert batch.output_problem(tmp_path / "none.nii.gz") == "missing"
    plain = tmp_path / "plain_liver.nii"
    nib.save(nib.load(mask), plain)
    assert batch.output_problem(plain, ct) is None
    plain.write_bytes(plain.read_bytes()[:-10])
    assert "truncated" in batch.output_problem(plain, ct)
    (tmp_path / "a.json").write_text('{"liver_ml": 1.0')
    assert "unreadable" in batch.output_problem(tmp_path / "a.json")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40)
    assert batch.output_problem(tmp_path / "a.png") == "not a complete PNG"


# ------------------------------------------------------------------ the pipeline


class Stages:
    """Fake read/compute/write that log what runs when, and fail where told."""

    def __init__(self, fail=(), interrupt_at=None):
        self.log, self.lock, self.fail, self.interrupt_at = [], threading.Lock(), dict(fail), interrupt_at
        self.loaded = self.most_loaded = 0
        self.finished = []

    def note(self, what, item):
        with self.lock:
            self.log.append((what, item))

    def read(self, item):
        self.note("read", item)
        if self.fail.get(item) == "read":
            raise ValueError(f"cannot read {item}")
        with self.lock:
            self.loaded += 1
            self.most_loaded = max(self.most_loaded, self.loaded)
        return f"vol{item}"

    def compute(self, item, got):
        self.note("compute", item)
        if item == self.interrupt_at:
            raise KeyboardInterrupt
        assert got == f"vol{item}"
        if self.fail.get(item) == "compute":
            with self.lock:
                self.loaded -= 1  # dropped with the error
            raise RuntimeError(f"network failed on {item}")
        return f"mask{item}"

    def write(self, item, computed):
        self.note("write", item)
        with self.lock:
            self.loaded -= 1
        if self.fail.get(item) == "write":
            raise OSError(f"disk full at {item}")
        return f"out{item}"

    def done(self, item, result, error, notes):
        self.finished.append((item, result, None if error is None else str(error)))


@pytest.mark.parametrize("overlap", [True, False])
def test_the_pipeline_keeps_order_and_per_input_errors(overlap):
    st = Stages(fail={1: "read", 3: "compute", 4: "write"})
    items = list(range(7))
    batch.run(items, st.read, st.compute, st.write, st.done, overlap=overlap)
    assert [i for i, _, _ in st.finished] == items
    errors = {i: e for i, _, e in st.finished if e}
    assert errors == {1: "cannot read 1", 3: "network failed on 3", 4: "disk full at 4"}
    assert [r for _, r, _ in st.finished if r] == ["out0", "out2", "out5", "out6"]
    if overlap:
        assert st.most_loaded <= 3  # one read ahead, one segmented, one being written


def test_the_pipeline_reads_ahead_and_writes_behind():
    """The read of i+1 and the write of i-1 are submitted before compute(i) ends (no timing: the
    order in which the stages are entered, with compute waiting until its neighbours ran)."""
    seen = threading.Condition()
    log = []

    def read(i):
        with seen:
            log.append(("read", i))
            seen.notify_all()
        return i

    def compute(i, got):
        with seen:
            log.append(("compute", i))
            want = [("read", i + 1)] if i < 3 else []
            want += [("write", i - 1)] if i > 0 else []
            assert seen.wait_for(lambda: all(w in log for w in want), timeout=30), (i, log)
        return i

    def write(i, computed):
        with seen:
            log.append(("write", i))
            seen.notify_all()
        return i

    done = []
    batch.run(list(range(4)), read, compute, write, lambda *a: done.append(a[0]))
    assert done == [0, 1, 2, 3]
    for at, (what, i) in enumerate(log):  # never more than one volume read ahead of the engine
        if what == "compute":
            assert max(j for w, j in log[:at] if w == "read") <= i + 1, log


def test_an_interrupt_lets_the_write_in_flight_finish_and_stops_the_rest():
    st = Stages(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        batch.run(list(range(8)), st.read, st.compute, st.write, st.done)
    assert [i for i, _, _ in st.finished] == [0, 1, 2]  # 2 was being written: finished and reported
    assert ("compute", 4) not in st.log and ("write", 3) not in st.log
    assert not [i for what, i in st.log if what == "read" and i > 4]  # nothing read beyond one ahead


def test_warnings_go_to_the_input_that_raised_them():
    import warnings

    def read(i):
        if i == 1:
            warnings.warn("odd header", UserWarning, stacklevel=1)
        warnings.warn("a volume note", V.VolumeWarning, stacklevel=1)  # carried by the result itself
        return i

    def compute(i, got):
        if i == 2:
            warnings.warn("odd values", RuntimeWarning, stacklevel=1)
        return i

    got = {}
    batch.run([0, 1, 2], read, compute, lambda i, c: c, lambda i, r, e, notes: got.setdefault(i, list(notes)))
    assert got == {0: [], 1: ["odd header"], 2: ["odd values"]}
