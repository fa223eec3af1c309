"""Run several runners on the same inputs and compare what they answer (Polygraphy's Comparator).

The one place for it: export parity (ONNX Runtime against PyTorch), the build's accuracy gate
(the built model against the fp32 ONNX) and the benchmarks' numeric columns.

    runs = run({"fp32": reference, "int8": built}, inputs, rounds=3)
    agreement = compare(runs["fp32"].outputs, runs["int8"].outputs, label=1)
    agreement.max_abs_error, agreement.argmax_agreement, agreement.dice_min, runs["int8"].median_ms

A runner is a Runner (its `infer` is called, its `last_timings["network"]` kept) or any
function array -> logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from liverkd.core.metrics import dice


@dataclass
class Run:
    """One runner on the inputs: its outputs (one per input) and the times of the timed calls."""

    outputs: list[np.ndarray] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    """Host time of every timed call, input in to logits out."""
    network_ms: list[float] = field(default_factory=list)
    """The runner's own network time per call, where it reports one (GPU runners: CUDA events)."""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    @property
    def median_network_ms(self) -> float:
        return statistics.median(self.network_ms) if self.network_ms else float("nan")


def run(runners: Mapping[str, object], inputs: Sequence[np.ndarray], *, rounds: int = 0, warmup: int = 1) -> dict:
    """name -> Run. Interleaved: each round calls every runner once on the same input, so a busy
    neighbour on the cores slows them all alike. `warmup` untimed rounds, then max(rounds,
    len(inputs)) timed rounds cycling through the inputs; the first pass keeps the outputs."""
    if not inputs:
        raise ValueError("compare.run needs at least one input")
    calls: dict[str, Callable] = {name: getattr(r, "infer", r) for name, r in runners.items()}
    runs = {name: Run() for name in calls}
    timed = max(rounds, len(inputs))
    for i in range(warmup + timed):
        x = inputs[(i - warmup) % len(inputs)]
        for name, call in calls.items():
            t0 = time.perf_counter()
            y = call(x)
            seconds = time.perf_counter() - t0
            if i < warmup:
                continue
            result = runs[name]
            result.ms.append(seconds * 1e3)
            network = (getattr(runners[name], "last_timings", None) or {}).get("network")
            if network is not None:
                result.network_ms.append(network * 1e3)
            if len(result.outputs) < len(inputs):
                result.outputs.append(y)
    return runs


@dataclass(frozen=True)
class Agreement:
    """How far outputs are from the reference's: logits, argmax voxels, masks of one label."""

    max_abs_error: float
    """Largest |logit difference| over every voxel, class and input."""
    argmax_agreement: float
    """Fraction of voxels (all inputs together) whose argmax class is the reference's."""
    dice: tuple[float, ...]
    """Per input: Dice of the masks argmax == label."""

    @property
    def dice_min(self) -> float:
        return min(self.dice)

    @property
    def dice_mean(self) -> float:
        return float(np.mean(self.dice))


def compare(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], label: int = 1) -> Agreement:
    """Outputs against the reference's, input by input (the same inputs, in the same order)."""
    if len(reference) != len(outputs) or not outputs:
        raise ValueError(f"{len(outputs)} outputs for {len(reference)} reference outputs")
    errors, same, voxels, dices = [], 0, 0, []
    for ref, out in zip(reference, outputs, strict=True):
        if ref.shape != out.shape:
            raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
        ref_class, out_class = ref.argmax(1), out.argmax(1)
        errors.append(float(np.abs(out.astype(np.float32) - ref.astype(np.float32)).max()))
        same += int(np.count_nonzero(ref_class == out_class))
        voxels += ref_class.size
        dices.append(dice(ref_class == label, out_class == label))
    return Agreement(max(errors), same / voxels, tuple(dices))
