"""The service loop around one warm Segmenter: claim -> segment -> deliver -> move.

One volume at a time, oldest first, claims left in work/ by a crash before new files.
- The input's fault (unreadable, not NIfTI, over max_voxels, the network fails on it, it was
  in hand when the runner died MAX_ATTEMPTS times): it goes to failed/ beside NAME.error.json.
- The environment's (outbox, done/, failed/ or work/ full, missing or unwritable): the input
  stays in work/, the runner waits retry_s (doubling up to RETRY_MAX_S) and tries again.
A claim's journal (journal.py) and Plans (place.py) make every step redoable after a kill.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

from liverkd.core import volume as V
from liverkd.core.atomic import write_json
from liverkd.core.errors import LiverkdError
from liverkd.core.timing import Clock
from liverkd.deploy.segment import stats_record

from .config import ConfigError, RunnerConfig
from .inbox import Inbox, LockError, lock
from .journal import MAX_ATTEMPTS, Claim, Journal, now_iso
from .place import copy_in, place, remove_temps, split_name, temp_path
from .report import JsonLog, StatusFile, one_line
from .watch import InboxWatch

RETRY_MAX_S = 60.0
EXIT_OK, EXIT_ENVIRONMENT, EXIT_CONFIG = 0, 1, 2
"""1: restarting may help (a full disk, a folder gone); 2: it will not (options, engine, lock)."""
MASK_TAIL, STATS_TAIL = "_liver.nii.gz", "_liver.json"  # as deploy.segment.output_path_for and sidecar_path
ERROR_TAIL = ".error.json"
SELF_TEST_SHAPE = (32, 32, 32)


class StartError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class InputFault(Exception):
    """The input itself cannot be segmented: it goes to failed/."""

    def __init__(self, stage: str, message: str, error_type: str = "RuntimeError"):
        super().__init__(message)
        self.stage, self.message, self.error_type = stage, message, error_type


class Backoff:
    def __init__(self, first_s: float):
        self.first_s, self.wait_s, self.until = first_s, 0.0, 0.0

    def failed(self) -> float:
        self.wait_s = min(RETRY_MAX_S, 2 * self.wait_s or self.first_s)
        self.until = time.monotonic() + self.wait_s
        return self.wait_s

    def reset(self) -> None:
        self.wait_s = self.until = 0.0

    def left_s(self) -> float:
        return max(0.0, self.until - time.monotonic())


def serve(cfg: RunnerConfig, prog: str = "liverkd runner") -> int:
    """Run the service until SIGTERM/SIGINT (or, with cfg.once, until the inbox is empty); the exit code."""
    try:
        service = Service.open(cfg)
    except StartError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    try:
        return service.run()
    finally:
        service.close()


def self_test(seg) -> str | None:
    """Segment a small built-in phantom; what went wrong, or None."""
    from liverkd.core.synth import synth_case

    vol, _ = synth_case(0, shape=SELF_TEST_SHAPE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = seg.segment_volume(vol).mask
    except Exception as e:  # whatever the backend raises: the message is the point
        return f"{type(e).__name__}: {one_line(e)}"
    if mask.shape != vol.shape or mask.dtype != np.uint8 or int(mask.max(initial=0)) > 1:
        return f"the mask came back {mask.dtype} {mask.shape}, not uint8 0/1 {vol.shape}"
    return None


class Service:
    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.log = JsonLog(cfg.log)
        self.status = StatusFile(cfg.status, self.log)
        self.inbox = Inbox(cfg.inbox, cfg.settle_s)
        self.journal = Journal(cfg.work, runner=f"{os.getpid()}-{time.time_ns()}")
        self.backoff = Backoff(cfg.retry_s)
        self.stop = threading.Event()
        self.stop_reason = "once"
        self.counts = {"ok": 0, "failed": 0}
        self.retries = 0
        self.last_error: str | None = None
        self.in_hand: Claim | None = None
        """The claim waiting out an environment error, if any."""
        self.latency_sum = 0.0
        self.last: dict | None = None
        self.started, self.started_at = time.monotonic(), now_iso()
        self.process_info = psutil.Process()
        self.lock_fd: int | None = None
        self.seg = None
        self.watch: InboxWatch | None = None

    # ------------------------------------------------------------ start and stop

    @classmethod
    def open(cls, cfg: RunnerConfig) -> Service:
        service = cls(cfg)
        try:
            service._prepare()
            service._load_engine()
        except BaseException:
            service.close()
            raise
        return service

    def _prepare(self) -> None:
        cfg = self.cfg
        try:
            cfg.check()
            for folder in (cfg.inbox, cfg.outbox, cfg.failed_dir, cfg.work, cfg.done):
                folder.mkdir(parents=True, exist_ok=True)
            for folder in (cfg.work, cfg.done):
                if folder.is_symlink():
                    raise ConfigError(f"{folder}: a symbolic link; the runner's own folders must be real ones")
            self.lock_fd = lock(cfg.inbox)
            for path in (cfg.log, cfg.status):
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
            self.status.remove_stale_temps()
            self.journal.adopt()
        except (ConfigError, LockError) as e:
            raise StartError(str(e), EXIT_CONFIG) from None
        except OSError as e:
            raise StartError(one_line(e), EXIT_ENVIRONMENT) from None

    def _load_engine(self) -> None:
        from liverkd.deploy.segment import Segmenter  # the heavy imports: numpy, scipy, the backend

        try:
            self.seg = Segmenter.load(self.cfg.engine, backend=self.cfg.backend)
        except (ValueError, RuntimeError, OSError) as e:
            raise StartError(one_line(e), EXIT_CONFIG) from None
        problem = self_test(self.seg)
        if problem:
            shape = "x".join(map(str, SELF_TEST_SHAPE))
            raise StartError(f"{self.cfg.engine}: self-test on a {shape} phantom failed: {problem}", EXIT_CONFIG)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.seg is not None:
            self.seg.close()
            self.seg = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        self.stop.set()
        if self.watch is not None:
            self.watch.wake()

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.log.write(
                {
                    "event": "start",
                    "pid": os.getpid(),
                    "engine": str(self.cfg.engine),
                    "backend": self.seg.describe(),
                    "inbox": str(self.cfg.inbox),
                    "outbox": str(self.cfg.outbox),
                    "recovered": [c.name for c in self.journal.claims()],
                    "rss_mb": self._rss_mb(),
                }
            )
            self.watch = InboxWatch(self.cfg.inbox, self.cfg.watch == "auto", self._watch_record)
            self.inbox.watch = self.watch
            code = self._loop()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.in_hand is not None:
            try:
                self.journal.release(self.in_hand)
            except OSError:
                pass  # it counts as one death of the runner: harmless below MAX_ATTEMPTS
        self.log.write({"event": "stop", "reason": self.stop_reason, "exit_code": code, **self._counts()})
        self._write_status("stopped")
        return code

    def _loop(self) -> int:
        next_beat = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.cfg.heartbeat_s
            if self.backoff.left_s() > 0:
                self.stop.wait(min(self.cfg.poll_s, self.backoff.left_s()))
                continue
            claim = self._next()
            if claim is not None:
                self.process(claim)
            if self.cfg.once and self.retries:
                return EXIT_ENVIRONMENT  # the input stays in work/ for the next run
            if claim is None:
                if self.cfg.once and self._waiting() <= 0:
                    break
                self.watch.wait(self.cfg.poll_s)  # returns early when a file is closed or renamed in
        return EXIT_OK

    def _watch_record(self, mode: str, reason: str) -> None:
        self.log.write({"event": "watch", "mode": mode, "reason": reason})

    def _waiting(self) -> int:
        try:
            return self.inbox.waiting()
        except OSError:
            return -1

    def _next(self) -> Claim | None:
        """The oldest claim in work/, else a new claim on the oldest ready file of the inbox."""
        try:
            claims = self.journal.claims()
            if claims:
                return claims[0]
            for path in self.inbox.ready():
                try:
                    claim = self.journal.claim(path)
                except FileNotFoundError:
                    continue  # gone before we could claim it
                self.inbox.taken(path.name)
                return claim
        except OSError as e:
            self._environment_error(None, e)
        return None

    # ------------------------------------------------------------ one volume

    def process(self, claim: Claim) -> bool:
        """Handle one claim to its end; False when the environment failed and it waits for a retry."""
        t0 = time.perf_counter()
        self._write_status("processing", claim.name)
        record: dict = {"event": "volume", "name": claim.name, "claim": claim.id}
        try:
            status = self._handle(claim, record)
        except (OSError, LiverkdError) as e:
            self._environment_error(claim, e)
            return False
        self.backoff.reset()
        self.in_hand = self.last_error = None
        if status is not None:
            self.counts[status] += 1
            latency = time.perf_counter() - t0
            self.latency_sum += latency
            record.update(n=sum(self.counts.values()), status=status, latency_s=round(latency, 6))
            record["rss_mb"] = self._rss_mb()
            self.last = {"name": claim.name, "status": status, "latency_s": record["latency_s"], "time": now_iso()}
            self.log.write(record)  # before the claim is closed: a kill now repeats the record, never loses it
        try:
            self.journal.close(claim)
        except OSError as e:
            self.log.write({"event": "error", "name": claim.name, "error": f"cannot close the claim: {one_line(e)}"})
        self._write_status("idle")
        return True

    def _handle(self, claim: Claim, record: dict) -> str | None:
        """'ok' or 'failed' once the input has left work/ (None: it had, with nothing to report)."""
        self._remove_temps(claim)
        for key, status in (("done", "ok"), ("failed", "failed")):
            plan = claim.plan(key)
            if plan and all(plan.placed()):  # killed after the move, before the claim was closed
                if claim.has_input():
                    claim.input.unlink()
                record["recovered"] = f"finished before a restart: the input is in {key}/"
                return status
            if plan:
                plan.undo()
                claim.set_plan(key, None)
        outputs = claim.plan("outputs")
        if not claim.has_input():  # killed after --delete-done removed it, or before the claim's rename
            return "ok" if outputs and all(outputs.placed()) else None
        if outputs and all(outputs.placed()):
            record.update(recovered="the outputs were already delivered; finished the move", output=outputs["names"][0])
        else:
            if outputs:
                outputs.undo()
                claim.set_plan("outputs", None)
            try:
                self._attempt(claim, record)
            except InputFault as fault:
                self._fail(claim, fault, record)
                return "failed"
        if self.cfg.delete_done:
            claim.input.unlink()
        else:
            self._move(claim, "done", self.cfg.done, [(claim.input, split_name(claim.name)[1])])
        return "ok"

    def _attempt(self, claim: Claim, record: dict) -> None:
        attempts = self.journal.begin_attempt(claim)
        if attempts > MAX_ATTEMPTS:
            message = f"{claim.name}: the runner died {attempts - 1} times while processing it; not retried"
            raise InputFault("recover", message)
        clock = Clock()
        vol, seg = self._segment(claim, clock)
        mask, stats = self._deliver(claim, vol, seg, clock)
        record.update(output=mask.name, liver_ml=stats["liver_ml"], timings=stats["timings"])
        record["warnings"] = stats["warnings"]

    def _segment(self, claim: Claim, clock: Clock):
        path = claim.input
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise InputFault("read", f"{claim.name}: not a regular file (a symlink or a special file); not read")
        try:
            with warnings.catch_warnings():  # they go into the log record and the stats
                warnings.simplefilter("ignore")
                with clock.stage("read"):
                    vol = V.load(path, max_voxels=self.cfg.max_voxels, grid_spacing=self.seg.spec.spacing)
                seg = self.seg.segment_volume(vol)
        except V.VolumeError as e:
            raise InputFault("read", f"{claim.name}: {e.problem}", type(e).__name__) from None
        except Exception as e:  # the backend on this very input: one bad volume must not stop the runner
            raise InputFault("segment", f"{claim.name}: {type(e).__name__}: {one_line(e)}", type(e).__name__) from None
        for stage, seconds in seg.timings.items():
            if stage != "total":
                clock.add(stage, seconds)
        return vol, seg

    def _deliver(self, claim: Claim, vol, seg, clock: Clock) -> tuple[Path, dict]:
        """Mask and stats, both fsynced under temp names, then linked to their names together."""
        outbox = self.cfg.outbox
        with clock.stage("write"):
            mask_tmp = V.save(seg.image, temp_path(outbox, claim.id, "mask.nii.gz"))
        st = os.stat(claim.input)
        stats = stats_record(seg, input=claim.name, output=None, engine=str(self.cfg.engine), timings=clock.timings(),
                             claim=claim.id, input_bytes=st.st_size, input_mtime_ns=st.st_mtime_ns,
                             finished_at=now_iso())  # fmt: skip
        stats_tmp = write_json(temp_path(outbox, claim.id, "stats.json"), stats)
        items = [(mask_tmp, MASK_TAIL), (stats_tmp, STATS_TAIL)]
        mask, _ = place(outbox, split_name(claim.name)[0], claim.id, items, lambda p: claim.set_plan("outputs", p))
        remove_temps(outbox, claim.id)
        return mask, stats

    def _fail(self, claim: Claim, fault: InputFault, record: dict) -> None:
        info = {
            "input": claim.name,
            "claim": claim.id,
            "message": fault.message,
            "error_type": fault.error_type,
            "stage": fault.stage,
            "attempts": claim.record.get("attempts", 0),
            "time": now_iso(),
        }
        folder = self.cfg.failed_dir
        error_tmp = write_json(temp_path(folder, claim.id, "error.json"), info)
        ext = split_name(claim.name)[1]
        self._move(claim, "failed", folder, [(claim.input, ext), (error_tmp, ext + ERROR_TAIL)])
        record.update(stage=fault.stage, error=fault.message)

    def _move(self, claim: Claim, key: str, folder: Path, items: list[tuple[Path, str]]) -> None:
        """The input (and its companions) into `folder` under free names; then the input leaves work/."""
        src = copy_in(claim.input, folder, claim.id)
        items = [(src if path == claim.input else path, tail) for path, tail in items]
        place(folder, split_name(claim.name)[0], claim.id, items, lambda plan: claim.set_plan(key, plan))
        claim.input.unlink()
        remove_temps(folder, claim.id)

    def _remove_temps(self, claim: Claim) -> None:
        for folder in (self.cfg.outbox, self.cfg.done, self.cfg.failed_dir):
            remove_temps(folder, claim.id)

    def _environment_error(self, claim: Claim | None, error: Exception) -> None:
        self.retries += 1
        self.in_hand = claim
        self.last_error = one_line(error)
        wait = self.backoff.failed()
        name = claim.name if claim else None
        self.log.write({"event": "retry", "name": name, "error": self.last_error, "retry_in_s": round(wait, 3)})
        self._write_status("waiting", name)

    # ------------------------------------------------------------ reporting

    def _rss_mb(self) -> float:
        return round(self.process_info.memory_info().rss / 2**20, 2)

    def _counts(self) -> dict:
        return {**self.counts, "retries": self.retries, "log_errors": self.log.errors, "rss_mb": self._rss_mb()}

    def _heartbeat(self) -> None:
        uptime = round(time.monotonic() - self.started, 3)
        self.log.write({"event": "heartbeat", "uptime_s": uptime, "waiting": self._waiting(), **self._counts()})
        self._write_status("waiting" if self.in_hand else "idle")

    def _write_status(self, state: str, current: str | None = None) -> None:
        n = sum(self.counts.values())
        self.status.write(
            {
                "pid": os.getpid(),
                "state": state,
                "current": current,
                "engine": str(self.cfg.engine),
                "started_at": self.started_at,
                "updated_at": now_iso(),
                "uptime_s": round(time.monotonic() - self.started, 3),
                "counts": dict(self.counts),
                "retries": self.retries,
                "last_error": self.last_error,
                "retry_in_s": round(self.backoff.left_s(), 3),
                "log_errors": self.log.errors,
                "mean_latency_s": round(self.latency_sum / n, 6) if n else None,
                "last": self.last,
                "rss_mb": self._rss_mb(),
            }
        )
