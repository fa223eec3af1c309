"""Seconds per stage of the one inference path (DESIGN.md, "the way a volume travels").

STAGES is the one list of stage names, in pipeline order: the Segmenter, `infer --stats`,
`profile` and the runner all report these keys (plus "total", wall clock end to end).

- read: file -> validated Volume (and the input checks)
- reorient_resample: canonical RAS + resample to the spec spacing
- normalize: HU window
- h2d / network / d2h: the Runner's own split, summed over windows
- postprocess: sliding-window blending, probabilities, largest component, hole filling
- resample_back: liver probability back to the input's voxels, threshold, original orientation
- write: atomic save, plus stats/preview when asked
"""

from __future__ import annotations

import contextlib
import time

STAGES = ("read", "reorient_resample", "normalize", "h2d", "network", "d2h", "postprocess", "resample_back", "write")
RUNNER_STAGES = ("h2d", "network", "d2h")


class Clock:
    """Accumulates seconds per stage; `timings()` lists them in STAGES order plus "total"."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def timings(self) -> dict[str, float]:
        out = {s: self.seconds[s] for s in STAGES if s in self.seconds}
        out["total"] = time.perf_counter() - self.start
        return out


class NoClock(Clock):
    """A Clock that keeps nothing (training evaluation, calibration)."""

    def add(self, stage: str, seconds: float) -> None:
        pass
