"""The runner's inotify watch (deploy/service/watch.py): real runners, real files, real inotify.

Outcomes and their order are asserted, never durations: "taken at once" is shown by a settle
window of an hour, which only the watch can beat; "not taken while written" by pauses between
chunks several times the settle window, which the poll alone would not wait out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _segment_bundle import make_bundle
from _service_box import REPO, Box, phantom_bytes, stop, wait_for

from liverkd.deploy.service.config import ConfigError, RunnerConfig
from liverkd.deploy.service.inbox import Inbox, signature
from liverkd.deploy.service.watch import InboxWatch

LAUNCH = """
import sys
from pathlib import Path
from liverkd.deploy.service import RunnerConfig, serve
engine, inbox, outbox, log, status, watch, settle_s = sys.argv[1:]
sys.exit(serve(RunnerConfig(
    engine=Path(engine), inbox=Path(inbox), outbox=Path(outbox), log=Path(log), status=Path(status),
    watch=watch, poll_s=0.05, settle_s=float(settle_s), heartbeat_s=0.2, retry_s=0.2,
)))
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "student-30k-test")


@pytest.fixture
def inotify(tmp_path):
    watch = InboxWatch(tmp_path)
    mode = watch.mode
    watch.close()
    if mode != "inotify":
        pytest.skip("no inotify here")


def start(box: Box, watch: str, settle_s: float) -> subprocess.Popen:
    """A runner with `watch` (not a CLI option of its own yet: RunnerConfig straight to serve)."""
    paths = (box.engine, box.inbox, box.outbox, box.log, box.status)
    cmd = [sys.executable, "-c", LAUNCH, *map(str, paths), watch, str(settle_s)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: box.records("watch"), proc)  # the watch is set up: what comes now is seen
    return proc


def test_renamed_and_closed_files_are_taken_at_once(tmp_path, engine, inotify):
    box = Box(tmp_path, engine)
    proc = start(box, "auto", settle_s=3600)
    assert box.records("watch")[0]["mode"] == "inotify"
    box.drop("renamed.nii.gz", phantom_bytes(0))  # NAME.part, then the rename
    wait_for(lambda: box.names("done") == ["renamed.nii.gz"], proc)
    (box.inbox / "copied.nii.gz").write_bytes(phantom_bytes(1))  # as cp: written, then closed
    wait_for(lambda: len(box.names("done")) == 2, proc)
    (box.inbox / "copied.nii.gz.done").write_bytes(b"")  # a marker that came after its file was taken
    wait_for(lambda: not (box.inbox / "copied.nii.gz.done").exists(), proc)
    assert stop(proc, signal.SIGTERM) == 0, proc.stderr.read()
    assert [(r["name"], r["status"]) for r in box.records()] == [("renamed.nii.gz", "ok"), ("copied.nii.gz", "ok")]
    assert box.records("stop")[-1]["reason"] == "SIGTERM"


def test_a_file_still_being_written_is_not_taken_before_its_writer_closes_it(tmp_path, engine, inotify):
    box = Box(tmp_path, engine)
    settle_s = 0.3
    proc = start(box, "auto", settle_s=settle_s)
    data = phantom_bytes(0)
    path = box.inbox / "slow.nii.gz"
    chunks = [data[i : i + len(data) // 4 + 1] for i in range(0, len(data), len(data) // 4 + 1)]
    seen_at_pauses = []
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            beats = len(box.records("heartbeat"))
            time.sleep(4 * settle_s)  # far past the settle window: the poll alone would take it here
            wait_for(lambda beats=beats: len(box.records("heartbeat")) >= beats + 2, proc)  # it did look
            seen_at_pauses.append((path.exists(), box.claimed(), box.names("done")))
    wait_for(lambda: box.records(), proc)  # its volume record: taken, done or failed
    assert stop(proc, signal.SIGTERM) == 0, proc.stderr.read()
    assert seen_at_pauses == [(True, [], [])] * len(chunks)
    assert box.names("done") == ["slow.nii.gz"] and box.names("failed") == []
    (record,) = box.records()
    (stats,) = box.stats()
    assert record["status"] == "ok" and stats["input_bytes"] == len(data)  # the whole file, not a part


def test_poll_fallback_still_takes_files(tmp_path, engine):
    box = Box(tmp_path, engine)
    proc = start(box, "poll", settle_s=0.3)
    (watch,) = box.records("watch")
    assert watch["mode"] == "poll"
    box.drop("renamed.nii.gz", phantom_bytes(0))
    (box.inbox / "copied.nii.gz").write_bytes(phantom_bytes(1))
    wait_for(lambda: len(box.names("done")) == 2, proc)
    assert stop(proc, signal.SIGINT) == 0, proc.stderr.read()
    done = sorted((r["name"], r["status"]) for r in box.records())
    assert done == [("copied.nii.gz", "ok"), ("renamed.nii.gz", "ok")]


# ---------------------------------------------------------------- the watch alone, in this process


def test_watch_events_and_state(tmp_path, inotify):
    logs = []
    watch = InboxWatch(tmp_path, log=lambda mode, reason: logs.append(mode))
    inbox = Inbox(tmp_path, settle_s=3600, watch=watch)
    try:
        assert logs == ["inotify"] and watch.wait(0.01) is False
        (tmp_path / "a.part").write_bytes(b"a")
        assert inbox.ready() == []  # a temp name is no input, closed or not
        os.rename(tmp_path / "a.part", tmp_path / "a")
        assert watch.wait(60) is True
        assert watch.closed == {"a": signature(os.lstat(tmp_path / "a"))}
        with open(tmp_path / "b", "wb") as f:
            f.write(b"b")
            f.flush()
            assert inbox.ready() == [tmp_path / "a"] and watch.writing == {"b"}
            with open(tmp_path / "a", "ab") as g:  # written again after its close: not complete now
                g.write(b"more")
                g.flush()
                assert inbox.ready() == [] and watch.writing == {"a", "b"}
        assert watch.wait(60) is True and set(inbox.ready()) == {tmp_path / "a", tmp_path / "b"}
        os.unlink(tmp_path / "a")
        inbox.ready()
        assert set(watch.closed) == {"b"}  # forgotten with the file
        watch.wake()
        assert watch.wait(60) is True
    finally:
        watch.close()


def test_watch_falls_back_to_the_poll(tmp_path):
    reasons = []
    polling = InboxWatch(tmp_path, use_inotify=False, log=lambda mode, reason: reasons.append((mode, reason)))
    missing = InboxWatch(tmp_path / "missing", log=lambda mode, reason: reasons.append((mode, reason)))
    try:
        assert polling.mode == missing.mode == "poll"
        assert reasons[0] == ("poll", "polling (watch: poll)")
        assert reasons[1][0] == "poll" and "missing" in reasons[1][1]
        (tmp_path / "a").write_bytes(b"a")
        assert polling.wait(0.01) is False and polling.closed == {} and polling.drain() is False
        polling.wake()
        assert polling.wait(60) is True
    finally:
        polling.close()
        missing.close()
    with pytest.raises(ConfigError, match="watch must be one of auto, poll"):
        RunnerConfig(engine=tmp_path, inbox=tmp_path / "in", outbox=tmp_path / "out", watch="inotify").check()
