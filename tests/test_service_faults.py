"""The device runner (liverkd.deploy.service) against a hostile or failing world: files still
being written, symlinks, a log it cannot write, an outbox that is full or unwritable, runners
sharing an outbox, and options or engines it must refuse. Real subprocesses on real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import nibabel as nib
import pytest
from _segment_bundle import make_bundle
from _service_box import Box, phantom_bytes, stop, unwritable, wait_for


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "student-30k-test")


def slow_write(path, data: bytes, mode: str, chunks: int = 8, gap_s: float = 0.25) -> None:
    """Write `data` into `path` in place, in chunks `gap_s` apart: appending ("grow"), into a file
    preallocated to its full size ("prealloc"), or that and, after each chunk, the mtime set back
    to a fixed old time as a sender with a lagging clock would ("old_clock")."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as f:
        if mode != "grow":
            f.truncate(len(data))
        for start in range(0, len(data), step):
            f.seek(start)
            f.write(data[start : start + step])
            f.flush()
            if mode == "old_clock":
                os.utime(path, ns=(10**18, 10**18))
            time.sleep(gap_s)


def test_files_still_being_written_are_not_taken(tmp_path, engine):
    """Item 3: gaps between chunks far over the poll interval, under the settle window."""
    box = Box(tmp_path, engine)
    proc = box.start("--settle-s", "2.0")
    wait_for(lambda: box.records("start"), proc)
    modes = ["grow", "prealloc", "old_clock"]
    shapes = {"grow": (32, 32, 32), "prealloc": (36, 32, 28), "old_clock": (30, 34, 32)}
    writers = [
        threading.Thread(target=slow_write, args=(box.inbox / f"{m}.nii.gz", phantom_bytes(i, shapes[m]), m))
        for i, m in enumerate(modes)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    wait_for(lambda: len(box.names("done")) == 3, proc)
    assert stop(proc, signal.SIGTERM) == 0
    assert box.names("failed") == []
    assert [r["status"] for r in box.records()] == ["ok"] * 3
    for m in modes:
        assert nib.load(box.outbox / f"{m}_liver.nii.gz").shape == shapes[m]


def test_done_marker_hands_a_file_over_at_once(tmp_path, engine):
    """Item 3: NAME.done written after NAME makes it ready without the settle window; a marker
    older than its file is not the sender's word on it."""
    box = Box(tmp_path, engine)
    data = phantom_bytes(0)
    (box.inbox / "stale.nii.gz.done").write_bytes(b"")
    time.sleep(0.1)  # past the file system's timestamp granularity
    (box.inbox / "stale.nii.gz").write_bytes(data)
    (box.inbox / "unmarked.nii.gz").write_bytes(data)
    proc = box.start("--settle-s", "600")
    (box.inbox / "marked.nii.gz").write_bytes(data)
    (box.inbox / "marked.nii.gz.done").write_bytes(b"")
    wait_for(lambda: box.names("done") == ["marked.nii.gz"], proc)
    beats = len(box.records("heartbeat"))
    wait_for(lambda: len(box.records("heartbeat")) >= beats + 3, proc)  # many more looks at the inbox
    assert stop(proc, signal.SIGTERM) == 0
    assert sorted(p.name for p in box.inbox.glob("*.nii.gz*")) == [
        "stale.nii.gz",
        "stale.nii.gz.done",
        "unmarked.nii.gz",
    ]
    assert [r["name"] for r in box.records()] == ["marked.nii.gz"]


def test_symlinks_are_never_followed(tmp_path, engine):
    """Item 6: symlinks planted in the inbox, in work/ at the fixed temp names the one-file runner
    used, at the output names and at the status file: nothing outside is read or written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.nii.gz"
    secret.write_bytes(phantom_bytes(1))
    victims = {n: outside / n for n in ("work.txt", "mask.txt", "stats.txt", "status.txt", "tmp.txt", "lock.txt")}
    for path in victims.values():
        path.write_text(f"keep {path.name}\n")
    before = {p: p.read_bytes() for p in [secret, *victims.values()]}

    box = Box(tmp_path, engine)
    (box.inbox / "link.nii.gz").symlink_to(secret)
    (box.inbox / "work").mkdir()
    (box.inbox / "work" / "..case.nii.gz.attempts.tmp").symlink_to(victims["work.txt"])
    box.outbox.mkdir()
    (box.outbox / "case_liver.nii.gz").symlink_to(victims["mask.txt"])
    (box.outbox / "case_liver.json").symlink_to(victims["stats.txt"])
    box.status.symlink_to(victims["status.txt"])
    (box.root / ".status.json.tmp").symlink_to(victims["tmp.txt"])  # the one-file runner's fixed temp name
    box.drop("case.nii.gz", phantom_bytes(0))
    out = box.once()
    assert out.returncode == 0, out.stderr

    assert {p: p.read_bytes() for p in before} == before
    assert (box.inbox / "link.nii.gz").is_symlink() and box.names("done") == ["case.nii.gz"]
    assert all((box.outbox / n).is_symlink() for n in ("case_liver.nii.gz", "case_liver.json"))
    (stats,) = box.stats()
    assert stats["input"] == "case.nii.gz"
    assert (box.outbox / f"case~{stats['claim']}_liver.nii.gz").is_file()
    assert not box.status.is_symlink() and box.state()["state"] == "stopped"
    assert (box.root / ".status.json.tmp").is_symlink()

    (box.inbox / ".runner.lock").unlink()
    (box.inbox / ".runner.lock").symlink_to(victims["lock.txt"])
    refused = box.once()
    assert refused.returncode == 2 and "symbolic link" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("blocker", ["fifo", "folder"])
def test_a_log_that_cannot_be_written_never_stops_the_runner(tmp_path, engine, blocker):
    """Item 10: a FIFO with no reader (the old runner blocked on it for good) or a folder at the
    log path (the old one died): records wait, errors are counted, and they are written later."""
    box = Box(tmp_path, engine)
    os.mkfifo(box.log) if blocker == "fifo" else box.log.mkdir()
    proc = box.start()
    box.drop("a.nii.gz", phantom_bytes(0))
    wait_for(lambda: box.state().get("counts", {}).get("ok") == 1, proc)
    assert box.state()["log_errors"] > 0
    box.log.unlink() if blocker == "fifo" else box.log.rmdir()
    box.drop("b.nii.gz", phantom_bytes(1))
    wait_for(lambda: [r["name"] for r in box.records()] == ["a.nii.gz", "b.nii.gz"], proc)
    assert stop(proc, signal.SIGTERM) == 0
    assert box.records("start") and box.records("stop")[-1]["reason"] == "SIGTERM"


def test_unwritable_outbox_keeps_the_input_and_delivers_later(tmp_path, engine):
    """Item 11 (and item 1 while the first is in hand): an outbox that cannot be written is not
    the input's fault. The runner keeps it in work/, retries with back-off, takes the next
    same-name input after it, and delivers both once the outbox is writable again."""
    box = Box(tmp_path, engine)
    proc = box.start()
    wait_for(lambda: box.records("start"), proc)
    with unwritable(box.outbox):
        box.drop("ct.nii.gz", phantom_bytes(0, (32, 32, 32)))
        wait_for(lambda: len(box.records("retry")) >= 3, proc)
        assert box.claimed() == ["ct.nii.gz"] and box.names("failed") == []

        # between two attempts the status says "waiting" (it is written just after the retry
        # record, and the next attempt starts 0.8 s later: wait for it rather than read it once)
        def waiting_on_the_outbox() -> bool:
            state = box.state()
            return state.get("state") == "waiting" and str(box.outbox) in (state.get("last_error") or "")

        wait_for(waiting_on_the_outbox, proc)
        waits = [r["retry_in_s"] for r in box.records("retry")]
        assert waits[:3] == [0.2, 0.4, 0.8]  # back-off doubles
        box.drop("ct.nii.gz", phantom_bytes(1, (40, 36, 28)))
    wait_for(lambda: len(box.names("done")) == 2, proc)
    assert stop(proc, signal.SIGTERM) == 0
    assert box.names("failed") == [] and box.claimed() == []
    assert sorted(s["input"] for s in box.stats()) == ["ct.nii.gz", "ct.nii.gz"]
    shapes = sorted(nib.load(p).shape for p in box.outbox.glob("*_liver.nii.gz"))
    assert shapes == [(32, 32, 32), (40, 36, 28)]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_retried_not_failed(tmp_path, engine, small_disk):
    """Item 11: a full outbox (ENOSPC) leaves the input in work/ and ends `--once` with exit 1, a
    code the documented unit restarts; with space again the next run delivers it."""
    box = Box(tmp_path, engine, outbox=small_disk / "outbox")
    box.outbox.mkdir()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    box.drop("a.nii.gz", phantom_bytes(0))
    full = box.once()
    assert full.returncode == 1, full.stderr
    assert box.claimed() == ["a.nii.gz"] and box.names("failed") == []
    assert "No space left" in box.records("retry")[0]["error"]
    assert box.outputs() == []  # no temp left behind either
    filler.unlink()
    out = box.once()
    assert out.returncode == 0, out.stderr
    assert box.names("done") == ["a.nii.gz"] and box.outputs() == ["a_liver.json", "a_liver.nii.gz"]


def _bad_spacing(engine):
    meta = json.loads((engine / "engine.json").read_text())
    meta["spec"]["spacing"] = [0.01, 0.01, 0.01]  # loads; segmenting even a tiny phantom is hopeless
    (engine / "engine.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("outbox_is_inbox", 2, "must not be the inbox"),
        ("outbox_in_inbox", 2, "must not be the inbox"),
        ("engine_fails_self_test", 2, "self-test on a 32x32x32 phantom failed"),
        ("no_engine", 2, "nope"),
        ("outbox_is_a_file", 1, "outbox"),
    ],
)
def test_refusals_at_start_are_one_line(tmp_path, engine, case, code, words):
    """Item 14 (and 11): exit 2 where restarting cannot help, 1 where it may (docs/runner.md's unit)."""
    box = Box(tmp_path, engine)
    if case == "outbox_is_inbox":
        box.outbox = box.inbox
    elif case == "outbox_in_inbox":
        box.outbox = box.inbox / "out"
    elif case == "engine_fails_self_test":
        box.engine = make_bundle(tmp_path / "bad-engine")
        _bad_spacing(box.engine)
    elif case == "no_engine":
        box.engine = tmp_path / "nope"
    else:
        box.outbox.write_text("a file\n")
    out = box.once()
    assert out.returncode == code, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("liverkd runner: error: ") and words in line


def test_runners_sharing_an_outbox(tmp_path, engine):
    """Item 14: two runners, one outbox, the same input name at once: both masks are kept, and
    neither removes the other's (or anyone's) temp files."""
    boxes = [Box(tmp_path / f"r{i}", engine, outbox=tmp_path / "outbox") for i in range(2)]
    outbox = boxes[0].outbox
    outbox.mkdir()
    foreign = [".lk1a2b3c4d5e6f7a8b9-mask.nii.gz", ".ct_liver.nii.gz.k3j4h5g6.tmp.nii.gz"]
    for name in foreign:
        (outbox / name).write_bytes(b"another runner's write in progress")
    shapes = [(32, 32, 32), (40, 36, 28)]
    for box, shape in zip(boxes, shapes):
        box.drop("ct.nii.gz", phantom_bytes(0, shape))
    procs = [box.start("--once") for box in boxes]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    names = sorted(os.listdir(outbox))
    assert names[:2] == foreign[::-1] and len(names) == 6
    stats = boxes[0].stats()
    assert sorted(s["input"] for s in stats) == ["ct.nii.gz", "ct.nii.gz"]
    assert "ct_liver.nii.gz" in names and "ct_liver.json" in names
    assert sorted(nib.load(p).shape for p in outbox.glob("*_liver.nii.gz")) == shapes


def test_mask_and_stats_land_together(tmp_path, engine):
    """Item 15: where the stats name is taken (here by a folder), the mask does not land alone
    under its usual name: the pair moves on to a free name together."""
    box = Box(tmp_path, engine)
    box.outbox.mkdir()
    (box.outbox / "ct_liver.json").mkdir()
    box.drop("ct.nii.gz", phantom_bytes(0))
    out = box.once()
    assert out.returncode == 0, out.stderr
    assert box.names("done") == ["ct.nii.gz"]
    (stats,) = box.stats()
    claim = stats["claim"]
    assert box.outputs() == ["ct_liver.json", f"ct~{claim}_liver.json", f"ct~{claim}_liver.nii.gz"]
    assert (box.outbox / "ct_liver.json").is_dir() and os.listdir(box.outbox / "ct_liver.json") == []
