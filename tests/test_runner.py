"""The embedded device runner (deploy/runner.py), run as real subprocesses on real files."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverkd.core.synth.phantom import synth_case

REPO = Path(__file__).resolve().parents[1]


def _load_soak():
    """benchmarks/runner_soak.py: its bundle maker and a small soak run here."""
    spec = importlib.util.spec_from_file_location("runner_soak", REPO / "benchmarks" / "runner_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner_soak = _load_soak()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """A random-init student-30k bundle, 6 mm spacing, 64^3 input (built with torch here)."""
    return runner_soak.make_test_bundle(tmp_path_factory.mktemp("engines") / "student-30k-test")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("phantoms")
    return [runner_soak.nifti_bytes(synth_case(seed)[0].to_nifti(), folder) for seed in range(2)]


class Box:
    """One runner's folders, log and status, and how to start it."""

    def __init__(self, root: Path, engine: Path):
        self.root, self.engine = root, engine
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.log, self.status = root / "runner.log", root / "status.json"
        self.inbox.mkdir(parents=True, exist_ok=True)

    def args(self, *extra) -> list[str]:
        return [
            "--engine", str(self.engine), "--inbox", str(self.inbox), "--outbox", str(self.outbox),
            "--log", str(self.log), "--status", str(self.status), "--poll-ms", "50", "--heartbeat-s", "0.2",
            *extra,
        ]

    def start(self, *extra, pause: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "LIVERKD_RUNNER_TEST_PAUSE"}
        if pause:
            env["LIVERKD_RUNNER_TEST_PAUSE"] = pause
        cmd = [sys.executable, "-m", "liverkd.deploy.runner", *self.args(*extra)]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def drop(self, name: str, data: bytes) -> None:
        part = self.inbox / f"{name}.part"
        part.write_bytes(data)
        os.rename(part, self.inbox / name)

    def records(self, event: str = "volume") -> list[dict]:
        return [r for r in runner_soak.read_log(self.log) if r["event"] == event] if self.log.exists() else []

    def names(self, sub: str) -> list[str]:
        folder = self.inbox / sub
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def outputs(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"runner exited early (rc {proc.returncode}): {proc.stderr.read()[-500:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for the runner")
        time.sleep(0.05)


def test_once_good_and_corrupt_inputs(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    for i in range(3):
        box.drop(f"good_{i}.nii.gz", phantoms[i % 2])
    box.drop("truncated.nii.gz", phantoms[0][: len(phantoms[0]) // 2])
    box.drop("notes.nii.gz", b"not a NIfTI file\n")
    for name, shape in (("flat.nii.gz", (16, 16, 1)), ("huge.nii.gz", (70, 70, 70))):
        box.drop(name, runner_soak.nifti_bytes(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path))
    (box.inbox / "arriving.nii.gz.part").write_bytes(phantoms[0])
    (box.inbox / ".hidden.nii.gz").write_bytes(phantoms[0])

    out = subprocess.run(
        [sys.executable, "-m", "liverkd", "runner", *box.args("--once", "--max-voxels", str(300_000))],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr

    good = [f"good_{i}.nii.gz" for i in range(3)]
    bad = ["flat.nii.gz", "huge.nii.gz", "notes.nii.gz", "truncated.nii.gz"]
    assert box.names("done") == good
    assert box.names("failed") == sorted(bad + [f"{b}.error.json" for b in bad])
    assert box.names("work") == []
    assert sorted(p.name for p in box.inbox.iterdir() if p.is_file()) == [
        ".hidden.nii.gz", ".runner.lock", "arriving.nii.gz.part"
    ]
    stems = [g.replace(".nii.gz", "") for g in good]
    assert box.outputs() == sorted([f"{s}_liver.nii.gz" for s in stems] + [f"{s}_liver.json" for s in stems])

    mask = nib.load(box.outbox / "good_0_liver.nii.gz")
    image = nib.load(box.inbox / "done" / "good_0.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert mask.get_data_dtype() == np.uint8
    stats = json.loads((box.outbox / "good_0_liver.json").read_text())
    assert stats["input"]["name"] == "good_0.nii.gz" and stats["liver_ml"] >= 0 and "network" in stats["timings"]

    errors = {b: json.loads((box.inbox / "failed" / f"{b}.error.json").read_text()) for b in bad}
    for name, err in errors.items():
        assert {"message", "stage", "time"} <= set(err) and name in err["message"], err
        assert "\n" not in err["message"]
    assert errors["huge.nii.gz"]["stage"] == "header" and "--max-voxels" in errors["huge.nii.gz"]["message"]
    assert errors["truncated.nii.gz"]["stage"] == "read"

    records = box.records()
    assert sorted(r["name"] for r in records) == sorted(good + bad)
    assert all(r["rss_mb"] > 0 and "latency_s" in r for r in records)
    assert all("network" in r["timings"] for r in records if r["status"] == "ok")
    status = json.loads(box.status.read_text())
    assert status["counts"] == {"ok": 3, "failed": 4} and status["state"] == "stopped"
    assert status["mean_latency_s"] > 0 and status["last"]["name"] in good + bad


def test_runner_imports_no_torch(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    box.drop("a.nii.gz", phantoms[0])
    code = (
        "import sys; from liverkd.deploy.runner import main; rc = main(sys.argv[1:]); "
        "assert rc == 0, rc; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'distill')); "
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *box.args("--once")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
    assert box.names("done") == ["a.nii.gz"]


@pytest.mark.parametrize("point", ["claim", "output"])
def test_sigkill_mid_volume_then_restart_loses_nothing(tmp_path, engine, phantoms, point):
    box = Box(tmp_path, engine)
    names = [f"case_{i}.nii.gz" for i in range(3)]
    for i, name in enumerate(names):
        box.drop(name, phantoms[i % 2])
        os.utime(box.inbox / name, ns=(10**18 + i, 10**18 + i))  # a fixed order: case_0 is oldest
    proc = box.start(pause=f"{point}:60")
    if point == "claim":  # claimed, nothing written yet
        wait_for(lambda: (box.inbox / "work" / ".case_0.nii.gz.attempts").exists(), proc)
    else:  # mask and stats durable, input not yet moved
        wait_for(lambda: (box.outbox / "case_0_liver.json").exists(), proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert box.names("work") == ["case_0.nii.gz"]  # the input survives the crash where it was
    assert box.names("done") == []

    out = subprocess.run(
        [sys.executable, "-m", "liverkd.deploy.runner", *box.args("--once")], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert box.names("done") == names
    assert box.names("work") == [] and box.names("failed") == []
    stems = [n.replace(".nii.gz", "") for n in names]
    assert box.outputs() == sorted([f"{s}_liver.nii.gz" for s in stems] + [f"{s}_liver.json" for s in stems])
    start = box.records("start")[-1]
    assert start["recovered"] == ["case_0.nii.gz"]
    after_restart = [r for r in box.records() if r["time"] >= start["time"]]
    assert sorted(r["name"] for r in after_restart) == names
    assert all(r["status"] == "ok" for r in after_restart)
    finished_move = [r["name"] for r in after_restart if "recovered" in r]
    assert finished_move == (["case_0.nii.gz"] if point == "output" else [])  # no needless redo
    for name in names:
        nib.load(box.outbox / name.replace(".nii.gz", "_liver.nii.gz")).get_fdata()  # complete, readable


def test_sigterm_exits_zero_after_the_current_volume(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    for i in range(3):
        box.drop(f"case_{i}.nii.gz", phantoms[0])
        os.utime(box.inbox / f"case_{i}.nii.gz", ns=(10**18 + i, 10**18 + i))
    proc = box.start(pause="claim:1.5")
    wait_for(lambda: (box.inbox / "work" / ".case_0.nii.gz.attempts").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert box.names("done") == ["case_0.nii.gz"]  # the volume in hand was finished ...
    assert (box.outbox / "case_0_liver.nii.gz").is_file()
    assert sorted(p.name for p in box.inbox.glob("case_*")) == ["case_1.nii.gz", "case_2.nii.gz"]  # ... no more
    assert box.records("stop")[-1]["reason"] == "SIGTERM"
    assert json.loads(box.status.read_text())["state"] == "stopped"


def test_partial_files_wait_until_renamed(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    proc = box.start()
    (box.inbox / "late.nii.gz.part").write_bytes(phantoms[0][:100])
    (box.inbox / ".late.nii.gz.tmp").write_bytes(phantoms[0][:100])
    wait_for(lambda: len(box.records("heartbeat")) >= 5, proc)  # about a second of polls
    assert box.records() == [] and box.outputs() == []
    (box.inbox / "late.nii.gz.part").write_bytes(phantoms[0])
    os.rename(box.inbox / "late.nii.gz.part", box.inbox / "late.nii.gz")
    wait_for(lambda: box.names("done") == ["late.nii.gz"], proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert [r["status"] for r in box.records()] == ["ok"]
    assert (box.inbox / ".late.nii.gz.tmp").exists()  # never touched


def test_volume_that_keeps_crashing_the_runner_is_failed(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    (box.inbox / "work").mkdir()
    (box.inbox / "work" / "poison.nii.gz").write_bytes(phantoms[0])
    (box.inbox / "work" / ".poison.nii.gz.attempts").write_text(json.dumps({"attempts": 2}))
    box.drop("fine.nii.gz", phantoms[1])
    out = subprocess.run(
        [sys.executable, "-m", "liverkd.deploy.runner", *box.args("--once")], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert box.names("failed") == ["poison.nii.gz", "poison.nii.gz.error.json"]
    error = json.loads((box.inbox / "failed" / "poison.nii.gz.error.json").read_text())
    assert error["stage"] == "recover" and error["attempts"] == 3
    assert box.names("done") == ["fine.nii.gz"] and box.names("work") == []


def test_delete_done_and_second_runner_refused(tmp_path, engine, phantoms):
    box = Box(tmp_path, engine)
    proc = box.start("--delete-done")
    wait_for(lambda: box.records("start"), proc)
    second = subprocess.run(
        [sys.executable, "-m", "liverkd.deploy.runner", *box.args("--once")], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert second.returncode == 2 and "already served by another runner" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    box.drop("x.nii.gz", phantoms[0])
    wait_for(lambda: (box.outbox / "x_liver.json").exists() and not (box.inbox / "work" / "x.nii.gz").exists(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert box.names("done") == [] and not (box.inbox / "x.nii.gz").exists()
    assert (box.outbox / "x_liver.nii.gz").is_file()


def test_missing_engine_is_one_line_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "liverkd.deploy.runner", "--engine", str(tmp_path / "nope"), "--inbox", str(tmp_path / "in"),
         "--outbox", str(tmp_path / "out"), "--once"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "nope" in out.stderr


def test_small_soak(tmp_path, engine):
    result = runner_soak.soak(tmp_path / "soak", n=40, size=32, engine=engine, timeout_s=240, mean_gap_s=0.02)
    assert result["problems"] == [], result
    assert result["ok"] == 36 and result["failed"] == 4
