"""PreprocessSpec: the one description of how a CT becomes network input.

It is saved in every checkpoint, ONNX file and engine bundle, so training and
inference cannot drift apart. See docs/method.md for why these defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

SPEC_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    """Target voxel size in mm, canonical RAS axis order."""
    hu_window: tuple[float, float] = (-175.0, 250.0)
    """Hounsfield units clipped to this range, then scaled to [0, 1]."""
    input_shape: tuple[int, int, int] = (128, 128, 128)
    """Network input (x, y, z) after resampling; larger fields of view use a sliding window."""
    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "liver": 1})
    version: int = SPEC_VERSION

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "hu_window", tuple(float(h) for h in self.hu_window))
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "labels", {str(k): int(v) for k, v in self.labels.items()})
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing}")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 8:
            raise ValueError(f"input_shape must be three sizes >= 8, got {self.input_shape}")
        if self.version > SPEC_VERSION:
            raise ValueError(f"spec version {self.version} is newer than this liverkd ({SPEC_VERSION})")

    def __hash__(self):
        return hash(self.to_json())

    def with_(self, **changes) -> PreprocessSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["hu_window"] = list(self.hu_window)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {"spacing", "hu_window", "input_shape", "labels", "version"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PreprocessSpec keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))
