"""The embedded device runner (liverkd.deploy.service), run as real subprocesses on real files:
what it makes of good and bad inputs, same names and long names, and kills at known points."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import make_bundle
from _service_box import REPO, Box, blank_bytes, phantom_bytes, stop, unwritable, wait_for


def _load_soak():
    spec = importlib.util.spec_from_file_location("runner_soak", REPO / "benchmarks" / "runner_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A random-init student-30k bundle, 6 mm spacing, 64^3 input."""
    return make_bundle(tmp_path_factory.mktemp("engines") / "student-30k-test")


@pytest.fixture(scope="module")
def phantoms() -> list[bytes]:
    return [phantom_bytes(seed) for seed in range(2)]


def test_once_good_and_corrupt_inputs(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    for i in range(3):
        box.drop(f"good_{i}.nii.gz", phantoms[i % 2])
    box.drop("truncated.nii.gz", phantoms[0][: len(phantoms[0]) // 2])
    box.drop("notes.nii.gz", b"not a NIfTI file\n")
    box.drop("flat.nii.gz", blank_bytes((16, 16, 1)))
    box.drop("huge.nii.gz", blank_bytes((70, 70, 70)))
    (box.inbox / "arriving.nii.gz.part").write_bytes(phantoms[0])
    (box.inbox / ".hidden.nii.gz").write_bytes(phantoms[0])

    out = box.once("--max-voxels", str(300_000))
    assert out.returncode == 0, out.stderr

    good = [f"good_{i}.nii.gz" for i in range(3)]
    bad = ["flat.nii.gz", "huge.nii.gz", "notes.nii.gz", "truncated.nii.gz"]
    assert box.names("done") == good
    assert box.names("failed") == sorted(bad + [f"{b}.error.json" for b in bad])
    assert box.names("work") == []
    assert sorted(p.name for p in box.inbox.iterdir() if p.is_file()) == [
        ".hidden.nii.gz", ".runner.lock", "arriving.nii.gz.part"
    ]  # fmt: skip
    stems = [g.replace(".nii.gz", "") for g in good]
    assert box.outputs() == sorted([f"{s}_liver.nii.gz" for s in stems] + [f"{s}_liver.json" for s in stems])

    mask = nib.load(box.outbox / "good_0_liver.nii.gz")
    image = nib.load(box.inbox / "done" / "good_0.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert mask.get_data_dtype() == np.uint8
    stats = json.loads((box.outbox / "good_0_liver.json").read_text())
    assert stats["input"] == "good_0.nii.gz" and stats["liver_ml"] >= 0 and "network" in stats["timings"]

    errors = {b: json.loads((box.inbox / "failed" / f"{b}.error.json").read_text()) for b in bad}
    for name, err in errors.items():
        assert {"message", "stage", "time", "claim"} <= set(err) and name in err["message"], err
        assert "\n" not in err["message"]
    assert errors["huge.nii.gz"]["stage"] == "read" and "over the limit of 300,000" in errors["huge.nii.gz"]["message"]
    assert errors["truncated.nii.gz"]["stage"] == "read"

    records = box.records()
    assert sorted(r["name"] for r in records) == sorted(good + bad)
    assert all(r["rss_mb"] > 0 and "latency_s" in r for r in records)
    assert all("network" in r["timings"] for r in records if r["status"] == "ok")
    status = box.state()
    assert status["counts"] == {"ok": 3, "failed": 4} and status["state"] == "stopped"
    assert status["mean_latency_s"] > 0 and status["last"]["name"] in good + bad


def test_runner_imports_no_torch(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    box.drop("a.nii.gz", phantoms[0])
    code = (
        "import sys; from liverkd.cli import main; sys.argv = ['liverkd', 'runner', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('liverkd.distill'))\n"
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *box.args("--once")], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
    assert box.names("done") == ["a.nii.gz"]


def test_same_names_never_replace_inputs_or_outputs(tmp_path, engine):
    """Item 1: a second ct.nii.gz, and a.nii beside a.nii.gz, each keep their own input and outputs."""
    box = Box(tmp_path, engine)
    shapes = {"first": (32, 32, 32), "second": (40, 36, 28), "a.nii": (30, 30, 30), "a.nii.gz": (34, 30, 26)}
    box.drop("ct.nii.gz", phantom_bytes(0, shapes["first"]))
    box.drop("a.nii", phantom_bytes(1, shapes["a.nii"], gz=False))
    assert box.once().returncode == 0
    box.drop("ct.nii.gz", phantom_bytes(2, shapes["second"]))
    box.drop("a.nii.gz", phantom_bytes(3, shapes["a.nii.gz"]))
    out = box.once()
    assert out.returncode == 0, out.stderr

    done = box.names("done")
    assert len(done) == 4 and "ct.nii.gz" in done and "a.nii" in done and "a.nii.gz" in done
    (second,) = [n for n in done if n.startswith("ct~")]
    claim = second.removeprefix("ct~").removesuffix(".nii.gz")
    assert sorted(nib.load(box.inbox / "done" / n).shape for n in done) == sorted(shapes.values())

    stats = box.stats()
    assert sorted(s["input"] for s in stats) == ["a.nii", "a.nii.gz", "ct.nii.gz", "ct.nii.gz"]
    masks = sorted(p.name for p in box.outbox.glob("*_liver.nii.gz"))
    assert len(masks) == 4 and masks[:2] == ["a_liver.nii.gz", masks[1]] and masks[1].startswith("a~")
    assert masks[2:] == ["ct_liver.nii.gz", f"ct~{claim}_liver.nii.gz"]
    assert nib.load(box.outbox / "a_liver.nii.gz").shape == shapes["a.nii"]
    assert nib.load(box.outbox / masks[1]).shape == shapes["a.nii.gz"]
    by_claim = {s["claim"]: s for s in stats}
    assert by_claim[claim]["input"] == "ct.nii.gz"
    assert nib.load(box.outbox / f"ct~{claim}_liver.nii.gz").shape == shapes["second"]  # paired with its input
    assert nib.load(box.outbox / "ct_liver.nii.gz").shape == shapes["first"]  # the first one's, untouched


def test_names_at_the_length_limit(tmp_path, engine, phantoms):
    """Item 8: 240- and 255-character names are segmented like any other; outputs and error files fit."""
    box = Box(tmp_path, engine)
    n240 = "n" * 233 + ".nii.gz"
    n255a, n255b = "x" * 247 + "a.nii.gz", "x" * 247 + "b.nii.gz"  # cut to the same output stem
    bad = "b" * 248 + ".nii.gz"
    for name in (n240, n255a, n255b):
        box.drop(name, phantoms[0])
    box.drop(bad, b"not NIfTI\n")
    out = box.once()
    assert out.returncode == 0, out.stderr
    assert box.names("done") == sorted([n240, n255a, n255b])
    assert box.claimed() == []
    cut = "b" * (255 - len(".nii.gz.error.json"))  # a failed input and its error file share one stem
    assert box.names("failed") == [f"{cut}.nii.gz", f"{cut}.nii.gz.error.json"]
    assert json.loads((box.inbox / "failed" / f"{cut}.nii.gz.error.json").read_text())["input"] == bad
    masks = [p for p in box.outbox.glob("*_liver.nii.gz")]
    assert len(masks) == 3 and all(len(p.name) <= 255 for p in masks)
    assert sorted(s["input"] for s in box.stats()) == sorted([n240, n255a, n255b])
    assert (box.outbox / (n240.removesuffix(".nii.gz") + "_liver.nii.gz")).is_file()


@pytest.mark.parametrize("blocked", ["outbox", "done"])
def test_sigkill_mid_volume_then_restart_loses_nothing(tmp_path, engine, phantoms, blocked):
    """Killed while a volume is in hand: before its outputs (outbox blocked) or after them, before
    its input moved (done/ blocked). The restart finishes it, with no duplicate and no needless redo;
    it removes the temps of its own claim and leaves another runner's alone."""
    box = Box(tmp_path, engine)
    proc = box.start()
    wait_for(lambda: box.records("start"), proc)
    folder = box.outbox if blocked == "outbox" else box.inbox / "done"
    with unwritable(folder):
        box.drop("case_0.nii.gz", phantoms[0])
        wait_for(lambda: box.records("retry"), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert box.claimed() == ["case_0.nii.gz"]  # the input survives the crash where it was
    assert box.names("done") == []
    (claim,) = [p.name for p in (box.inbox / "work").iterdir()]
    delivered = [f"case_0_liver.{ext}" for ext in ("json", "nii.gz")]
    assert [n for n in box.outputs() if not n.startswith(".")] == ([] if blocked == "outbox" else delivered)
    own = [f".lk{claim}-mask.nii.gz", f"..lk{claim}-mask.nii.gz.ab12cd34.tmp.nii.gz"]  # what a kill mid-write leaves
    foreign = [".lk1a2b3c4d5e6f7a8b9-mask.nii.gz", ".case_0_liver.nii.gz.k3j4h5g6.tmp.nii.gz"]
    for name in own + foreign:
        (box.outbox / name).write_bytes(b"partial")
    box.drop("case_1.nii.gz", phantoms[1])

    out = box.once()
    assert out.returncode == 0, out.stderr
    assert box.names("done") == ["case_0.nii.gz", "case_1.nii.gz"]
    assert box.names("work") == [] and box.names("failed") == []
    assert box.outputs() == sorted(foreign + delivered + ["case_1_liver.json", "case_1_liver.nii.gz"])
    start = box.records("start")[-1]
    assert start["recovered"] == ["case_0.nii.gz"]
    after = [r for r in box.records() if r["time"] >= start["time"]]
    assert [r["name"] for r in after] == ["case_0.nii.gz", "case_1.nii.gz"]
    assert all(r["status"] == "ok" for r in after)
    finished_move = [r["name"] for r in after if "recovered" in r]
    assert finished_move == (["case_0.nii.gz"] if blocked == "done" else [])
    for name in ("case_0", "case_1"):
        nib.load(box.outbox / f"{name}_liver.nii.gz").get_fdata()  # complete, readable


def test_volume_in_hand_at_two_deaths_is_failed(tmp_path, engine, phantoms):
    """Item 8: the attempt is counted on disk before it starts, so an input that was in hand when
    the runner died twice is failed on the third start instead of crash-looping the service."""
    box = Box(tmp_path, engine)
    box.outbox.mkdir()
    with unwritable(box.outbox):
        box.drop("poison.nii.gz", phantoms[0])
        for death in (1, 2):
            proc = box.start()
            wait_for(lambda death=death: len(box.records("retry")) >= death, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert box.claimed() == ["poison.nii.gz"]
    box.drop("fine.nii.gz", phantoms[1])
    out = box.once()
    assert out.returncode == 0, out.stderr
    assert box.names("failed") == ["poison.nii.gz", "poison.nii.gz.error.json"]
    error = json.loads((box.inbox / "failed" / "poison.nii.gz.error.json").read_text())
    assert error["stage"] == "recover" and error["attempts"] == 3
    assert box.names("done") == ["fine.nii.gz"] and box.claimed() == []


def test_sigterm_finishes_the_volume_in_hand_and_exits_zero(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    big = nib.Nifti1Image(np.random.default_rng(0).normal(0, 300, (288, 288, 160)).astype(np.int16), np.eye(4))
    box.drop("big.nii", big.to_bytes(), mtime_ns=10**18)  # the oldest: taken first, and slow
    for i in range(2):
        box.drop(f"case_{i}.nii.gz", phantoms[0], mtime_ns=10**18 + 1 + i)
    proc = box.start()
    wait_for(lambda: box.claimed() == ["big.nii"], proc)
    assert stop(proc, signal.SIGTERM) == 0, proc.stderr.read()
    assert "big.nii" in box.names("done") and (box.outbox / "big_liver.nii.gz").is_file()  # finished ...
    assert box.claimed() == []
    left = sorted(p.name for p in box.inbox.glob("case_*"))
    assert sorted(left + [n for n in box.names("done") if n != "big.nii"]) == ["case_0.nii.gz", "case_1.nii.gz"]
    assert box.records("stop")[-1]["reason"] == "SIGTERM"
    assert box.state()["state"] == "stopped"


def test_delete_done_and_second_runner_refused(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    proc = box.start("--delete-done")
    wait_for(lambda: box.records("start"), proc)
    second = box.once()
    assert second.returncode == 2 and "already served by another runner" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    box.drop("x.nii.gz", phantoms[0])
    wait_for(lambda: box.records(), proc)
    assert stop(proc, signal.SIGINT) == 0
    assert box.names("done") == [] and box.claimed() == [] and not (box.inbox / "x.nii.gz").exists()
    assert (box.outbox / "x_liver.nii.gz").is_file() and (box.outbox / "x_liver.json").is_file()


def test_small_soak_with_same_names_slow_writers_and_kills(tmp_path, engine):
    soak = _load_soak().soak
    result = soak(tmp_path / "soak", n=40, size=32, engine=engine, timeout_s=400, mean_gap_s=0.02, kills=2)
    assert result["problems"] == [], result
    assert result["ok"] == 36 and result["failed"] == 4 and result["kills"] == 2
