"""The embedded device runner: one warm Segmenter, segmenting each volume as it arrives.

Folders (work/, done/ and failed/ live inside the inbox unless --failed says otherwise):

    inbox/          drop complete files here: write NAME.part (or .NAME) and rename it
    inbox/work/     the volume being processed, claimed by an atomic rename
    inbox/done/     inputs whose mask and stats are durable in the outbox
    inbox/failed/   inputs that could not be segmented, each beside NAME.error.json
    outbox/         STEM_liver.nii.gz and STEM_liver.json, each written temp + fsync + rename

A volume goes: claim (rename into work/) -> mask -> stats JSON -> input to done/ (or
deleted). A crash at any point leaves the input in work/ (redone on restart, or just moved
on when the stats JSON shows the output came from this very file) or in done/: never lost,
never deleted before its output is on disk, and a redo overwrites the same output names.
An input that kills the runner MAX_ATTEMPTS times goes to failed/, so a poison volume
cannot hold a restarting service in a crash loop.

Test hook (documented in docs/runner.md): LIVERKD_RUNNER_TEST_PAUSE="claim:SECONDS" or
"output:SECONDS" sleeps after claiming each volume / after its mask and stats are durable
(before the input moves), so a test can kill the runner at a known point of a volume.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import psutil

from liverkd.core.atomic import fsync_dir, write_json
from liverkd.core.volume import VolumeError

MAX_ATTEMPTS = 2
"""A volume found in work/ after this many starts on it is failed instead of redone."""

DEFAULT_MAX_VOXELS = 512 * 512 * 1024
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def build_parser(prog: str = "python -m liverkd.deploy.runner") -> argparse.ArgumentParser:
    """The one parser: `liverkd runner` hands its arguments here unchanged."""
    p = argparse.ArgumentParser(
        prog=prog, description="Segment every volume that arrives in an inbox folder, with one warm engine."
    )
    add = p.add_argument
    add("--engine", required=True, type=Path, metavar="DIR", help="engine bundle folder (engines/NAME)")
    add("--inbox", required=True, type=Path, metavar="DIR", help="folder to watch for NIfTI volumes")
    add("--outbox", required=True, type=Path, metavar="DIR", help="folder for masks and stats JSON")
    add("--failed", type=Path, metavar="DIR", help="failed inputs and their .error.json (default INBOX/failed)")
    add("--backend", default="auto", help="auto, onnxruntime, tensorrt, torch or openvino (default auto)")
    add("--once", action="store_true", help="process what is in the inbox, then exit")
    add("--poll-ms", type=int, default=100, metavar="MS", help="poll interval; a file unchanged this long is complete")
    add("--log", type=Path, metavar="FILE", help="JSON-lines log (default: stdout)")
    add("--status", type=Path, metavar="FILE", help="status JSON for a supervisor, rewritten atomically")
    add("--heartbeat-s", type=float, default=30.0, metavar="S", help="seconds between heartbeat records (default 30)")
    add("--delete-done", action="store_true", help="delete inputs once their output is durable")
    add("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="N", help="refuse larger volumes (header check)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m liverkd.deploy.runner") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        runner = DeviceRunner(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        return runner.run()
    finally:
        runner.close()


# ---------------------------------------------------------------- small helpers


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_candidate(entry: os.DirEntry) -> bool:
    """A regular file that is not hidden, not a temp/partial name and not our lock."""
    name = entry.name
    return not name.startswith(".") and not name.endswith(TEMP_SUFFIXES) and entry.is_file(follow_symlinks=False)


def move(src: Path, dst: Path) -> None:
    """Rename; across file systems copy, fsync the copy, and only then unlink the source.

    Renames are not fsynced: one undone by a power cut puts the input back in work/,
    and the next start finishes it (its outputs are durable before any move).
    """
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        src.unlink()


def replace_text(path: Path, text: str) -> None:
    """Atomic but not fsynced: for files read live (status, attempt markers), not kept."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def header_voxels(path: Path) -> int | None:
    """Voxels the NIfTI header claims (3-D part), read without loading the data; None if unreadable."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception:
        return None  # the Segmenter's own read then names the problem precisely
    n = 1
    for s in shape[:3]:
        n *= int(s)
    return n


def test_pause() -> tuple[str, float] | None:
    spec = os.environ.get("LIVERKD_RUNNER_TEST_PAUSE")
    if not spec:
        return None
    point, _, seconds = spec.partition(":")
    return point, float(seconds or 0)


class JsonLog:
    """One JSON object per line, appended and closed per record (logrotate can move the file)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict) -> None:
        line = json.dumps({"time": now_iso(), **record}) + "\n"
        if self.path is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            with open(self.path, "a") as f:
                f.write(line)


# ---------------------------------------------------------------- the runner


class DeviceRunner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.inbox: Path = args.inbox
        self.work = self.inbox / "work"
        self.done = self.inbox / "done"
        self.failed: Path = args.failed or self.inbox / "failed"
        self.outbox: Path = args.outbox
        self.poll_s = max(args.poll_ms, 1) / 1000
        self.log = JsonLog(args.log)
        self.pause = test_pause()
        self.stop = threading.Event()
        self.stop_reason = "once"
        self.seen: dict[str, tuple[tuple[int, int], float]] = {}
        self.counts = {"ok": 0, "failed": 0}
        self.latency_sum = 0.0
        self.last: dict | None = None
        self.started = time.monotonic()
        self.started_at = now_iso()
        self.process_info = psutil.Process()
        self.lock_fd: int | None = None
        self.seg = None

        for folder in (self.inbox, self.work, self.done, self.failed, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        if args.log is not None:
            args.log.parent.mkdir(parents=True, exist_ok=True)
        self._lock_inbox()
        self._remove_stale_temps()

        from liverkd.deploy.segment import Segmenter  # the heavy imports: numpy, scipy, the backend

        self.seg = Segmenter.load(args.engine, backend=args.backend)

    # ------------------------------------------------------------ lifecycle

    def _lock_inbox(self) -> None:
        path = self.inbox / ".runner.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(f"{self.inbox}: already served by another runner (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    def _remove_stale_temps(self) -> None:
        """Temp files of atomic writes cut short by a crash (only this runner writes these folders)."""
        for folder in (self.outbox, self.work, self.failed, self.done):
            for p in folder.glob(".*.tmp*"):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self.seg is not None:
            self.seg.close()
            self.seg = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        self.stop.set()

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            recovered = sorted(self._candidates(self.work), key=lambda e: (e.stat().st_mtime_ns, e.name))
            self.log.write(
                {
                    "event": "start",
                    "pid": os.getpid(),
                    "engine": str(self.args.engine),
                    "backend": self.seg.describe(),
                    "inbox": str(self.inbox),
                    "outbox": str(self.outbox),
                    "recovered": [e.name for e in recovered],
                    "rss_mb": self._rss_mb(),
                }
            )
            for entry in recovered:
                if self.stop.is_set():
                    break
                self.process(Path(entry.path), claimed=True)
            self._loop()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        self.log.write({"event": "stop", "reason": self.stop_reason, **self.counts, "rss_mb": self._rss_mb()})
        self._write_status(state="stopped")
        return 0

    def _loop(self) -> None:
        next_beat = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.args.heartbeat_s
            path, waiting = self._next_ready()
            if path is not None:
                self.process(path)
            elif self.args.once and not waiting:
                break
            else:
                self.stop.wait(self.poll_s)

    # ------------------------------------------------------------ the inbox

    @staticmethod
    def _candidates(folder: Path) -> list[os.DirEntry]:
        with os.scandir(folder) as it:
            return [e for e in it if is_candidate(e)]

    def _next_ready(self) -> tuple[Path | None, int]:
        """The oldest complete file in the inbox, and how many files are there at all.

        Complete: size and mtime unchanged for one poll interval, judged by the file's
        mtime or, where clocks disagree (network mounts), by our own two observations.
        """
        now_wall, now = time.time(), time.monotonic()
        ready, seen = [], {}
        for entry in self._candidates(self.inbox):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            prev_sig, first = self.seen.get(entry.name, (None, now))
            if prev_sig != sig:
                first = now
            seen[entry.name] = (sig, first)
            if now_wall - st.st_mtime >= self.poll_s or now - first >= self.poll_s:
                ready.append((st.st_mtime_ns, entry.name))
        self.seen = seen  # only names present now: bounded by the inbox, not by history
        if not ready:
            return None, len(seen)
        return self.inbox / min(ready)[1], len(seen)

    # ------------------------------------------------------------ one volume

    def _outputs(self, name: str) -> tuple[Path, Path]:
        from liverkd.deploy.segment import output_path_for, sidecar_path

        mask = output_path_for(name, self.outbox)
        return mask, sidecar_path(mask, ".json")

    def _bump_attempts(self, name: str) -> int:
        marker = self.work / f".{name}.attempts"
        try:
            attempts = int(json.loads(marker.read_text())["attempts"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            attempts = 1
        replace_text(marker, json.dumps({"attempts": attempts, "started": now_iso()}))
        return attempts

    def _already_done(self, work: Path, stats_path: Path, mask_path: Path) -> bool:
        """True when the outbox holds this very input's output (a crash came before the move)."""
        try:
            stats = json.loads(stats_path.read_text())
            st = work.stat()
        except (OSError, ValueError):
            return False
        source = stats.get("input", {})
        return (
            mask_path.is_file()
            and source.get("name") == work.name
            and source.get("bytes") == st.st_size
            and source.get("mtime_ns") == st.st_mtime_ns
        )

    def _maybe_pause(self, point: str) -> None:
        if self.pause is not None and self.pause[0] == point:
            time.sleep(self.pause[1])

    def process(self, src: Path, claimed: bool = False) -> None:
        name = src.name
        work = self.work / name
        t0 = time.perf_counter()
        if not claimed:
            try:
                os.rename(src, work)
            except FileNotFoundError:
                return  # gone before we could claim it
        self._write_status(state="processing", current=name)
        attempts = self._bump_attempts(name)
        mask_path, stats_path = self._outputs(name)
        record: dict = {"event": "volume", "n": self.counts["ok"] + self.counts["failed"] + 1, "name": name}
        stage, wrote_mask = "recover", False
        try:
            if attempts > MAX_ATTEMPTS:
                raise RuntimeError(f"the runner died {attempts - 1} times while processing it; refusing to retry")
            stage = "claim"
            self._maybe_pause("claim")
            if self._already_done(work, stats_path, mask_path):
                record["recovered"] = "output already durable; finished the move"
                record["liver_ml"] = json.loads(stats_path.read_text()).get("liver_ml")
            else:
                stage = "header"
                voxels = header_voxels(work)
                if voxels is not None and voxels > self.args.max_voxels:
                    raise ValueError(
                        f"{work.name}: header claims {voxels:,} voxels, over --max-voxels {self.args.max_voxels:,}"
                    )
                stage = "segment"
                with warnings.catch_warnings():  # they go into the log record; "ignore" also keeps
                    warnings.simplefilter("ignore")  # the per-message warning registry from growing
                    result = self.seg.segment_file(work, mask_path)
                wrote_mask = True  # durable: segment_file writes via volume.save (temp, fsync, rename)
                stage = "stats"
                st = work.stat()
                stats = {
                    "input": {"name": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
                    "output": mask_path.name,
                    "liver_ml": result.liver_ml,
                    "liver_voxels": result.liver_voxels,
                    "mean_hu": result.mean_hu,
                    "warnings": list(result.warnings),
                    "timings": {k: round(v, 6) for k, v in result.timings.items()},
                    "engine": str(self.args.engine),
                    "finished_at": now_iso(),
                }
                write_json(stats_path, stats)
                record.update(liver_ml=result.liver_ml, timings=stats["timings"], warnings=stats["warnings"])
            self._maybe_pause("output")
            stage = "move"
            if self.args.delete_done:
                work.unlink()
            else:
                move(work, self.done / name)
            record.update(status="ok", output=mask_path.name)
            self.counts["ok"] += 1
        except Exception as e:  # one bad volume must not stop the runner
            if wrote_mask and stage != "move":
                mask_path.unlink(missing_ok=True)
            if stage == "segment" and isinstance(e, VolumeError) and e.path == str(work):
                stage = "read"  # the input itself is unreadable or invalid
            record.update(status="failed", stage=stage, error=_one_line(e))
            self.counts["failed"] += 1
            self._fail(work, name, stage, e, attempts)
        (self.work / f".{name}.attempts").unlink(missing_ok=True)
        latency = time.perf_counter() - t0
        self.latency_sum += latency
        record.update(latency_s=round(latency, 6), rss_mb=self._rss_mb())
        self.last = {"name": name, "status": record["status"], "latency_s": record["latency_s"], "time": now_iso()}
        self.log.write(record)
        self._write_status(state="idle")

    def _fail(self, work: Path, name: str, stage: str, error: Exception, attempts: int) -> None:
        info = {
            "input": name,
            "message": _one_line(error),
            "error_type": type(error).__name__,
            "stage": stage,
            "attempts": attempts,
            "time": now_iso(),
        }
        try:
            write_json(self.failed / f"{name}.error.json", info)
            if work.exists():
                move(work, self.failed / name)
        except OSError as e:  # failed/ unusable too: leave the input in work/ for the next start
            self.log.write({"event": "error", "name": name, "error": f"cannot move to {self.failed}: {_one_line(e)}"})

    # ------------------------------------------------------------ reporting

    def _rss_mb(self) -> float:
        return round(self.process_info.memory_info().rss / 2**20, 2)

    def _heartbeat(self) -> None:
        try:
            waiting = len(self._candidates(self.inbox))
        except OSError:
            waiting = -1
        self.log.write(
            {
                "event": "heartbeat",
                "uptime_s": round(time.monotonic() - self.started, 3),
                **self.counts,
                "waiting": waiting,
                "rss_mb": self._rss_mb(),
            }
        )
        self._write_status(state="idle")

    def _write_status(self, state: str, current: str | None = None) -> None:
        if self.args.status is None:
            return
        n = self.counts["ok"] + self.counts["failed"]
        status = {
            "pid": os.getpid(),
            "state": state,
            "current": current,
            "engine": str(self.args.engine),
            "started_at": self.started_at,
            "updated_at": now_iso(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "counts": dict(self.counts),
            "mean_latency_s": round(self.latency_sum / n, 6) if n else None,
            "last": self.last,
            "rss_mb": self._rss_mb(),
        }
        try:
            replace_text(self.args.status, json.dumps(status, indent=2) + "\n")
        except OSError as e:
            self.log.write({"event": "error", "error": f"cannot write status {self.args.status}: {_one_line(e)}"})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
