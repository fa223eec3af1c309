"""Per-stage latency of the Segmenter over many volumes: where every millisecond of a volume goes.

The profile runs exactly the path `liverkd infer` runs (Segmenter.segment_file: read the
NIfTI, preprocess, network, postprocess, write the mask) and records the returned stage timings for
every volume. Several (engine, backend) targets are profiled on the same volumes, interleaved
volume by volume, so that a noisy neighbour slows them all alike.

Cold start (bundle load + first volume) is reported apart from the warm runs. Statistics
follow trtexec's names: min, mean, median (p50), p90/p95/p99, max; throughput is warm volumes
per second of summed end-to-end time. GPU runners time h2d / network / d2h with CUDA events
themselves; this module only collects what the Segmenter reports. Targets after the first
start in a process that has already imported their libraries, so their cold start is the
bundle's own cost, not the interpreter's.
"""

from __future__ import annotations

import csv
import io
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverkd.core import accel
from liverkd.core import volume as V
from liverkd.core.atomic import atomic_path, write_json, write_text
from liverkd.core.timing import STAGES

TOTAL = "total"
UNACCOUNTED = "unaccounted"
"""total minus the sum of the stages: time the Segmenter spends outside any named stage."""
STAT_KEYS = ("n", "min", "p50", "p90", "p95", "p99", "max", "mean")
REPORT_FORMAT = "liverkd-profile"
REPORT_VERSION = 1


def summarize(seconds: Sequence[float]) -> dict:
    """N and min/p50/p90/p95/p99/max/mean in milliseconds (linear-interpolated percentiles)."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {k: (0 if k == "n" else None) for k in STAT_KEYS}
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {
        "n": int(a.size),
        "min": float(a.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def ordered_stages(timings: dict) -> list[str]:
    """The contract's stages present in `timings`, in pipeline order, then any extra ones."""
    known = [s for s in STAGES if s in timings]
    extra = [s for s in timings if s not in STAGES and s != TOTAL]
    return known + extra


# ---------------------------------------------------------------- inputs


def find_volumes(folder) -> list[Path]:
    """NIfTI files directly in `folder`, else the images of a data set layout it holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of volumes")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not found:
        from liverkd.core.datasets import discover

        found = [case.image for case in discover(folder)]
    if not found:
        raise ValueError(f"{folder}: no NIfTI volumes (.nii / .nii.gz) found")
    return found


def synthetic_shape(spec) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A CT-like grid for a phantom: twice the engine's in-plane resolution, its field of view.

    Resampling to the spec then does real work (in-plane downsampling), as with a real CT.
    """
    x, y, z = spec.input_shape
    shape = (2 * x, 2 * y, z)
    spacing = tuple(s * n / m for s, n, m in zip(spec.spacing, spec.input_shape, shape, strict=True))
    return shape, spacing


def write_synthetic(folder, n: int, shape, spacing, on_volume: Callable[[], None] | None = None) -> list[Path]:
    """`n` phantom CTs (liverkd.core.synth.synth_case, seeds 0..n-1) as NIfTI files in `folder`."""
    from liverkd.core.synth import synth_case

    if n < 1:
        raise ValueError(f"--synthetic needs at least 1 volume, got {n}")
    folder = Path(folder)
    paths = []
    for seed in range(n):
        image, _label = synth_case(seed, shape=tuple(shape), spacing=tuple(spacing))
        paths.append(V.save(image.to_nifti(), folder / f"synthetic_{seed:03d}.nii.gz"))
        if on_volume:
            on_volume()
    return paths


# ---------------------------------------------------------------- measurement


@dataclass
class Target:
    """One (engine bundle, backend) pair to profile."""

    engine: Path
    backend: str = "auto"
    name: str | None = None
    """Label override (profile() numbers repeated targets: an A/A run shows the noise)."""

    @property
    def label(self) -> str:
        return self.name or f"{Path(self.engine).name}/{self.backend}"


@dataclass
class TargetResult:
    target: Target
    runner: str = "?"
    device: str = "cpu"
    precision: str = "?"
    load_s: float = 0.0
    first_volume: dict = field(default_factory=dict)
    """Stage -> seconds of the first (cold) volume, with "total"."""
    samples: dict = field(default_factory=dict)
    """Stage -> seconds per warm volume, with "total"; lists of equal length."""
    volumes: list = field(default_factory=list)
    """Input file of each warm sample."""
    rss_max_mib: float = 0.0
    """Largest resident set size of this process sampled after each of this target's volumes."""
    gpu_memory_mib: float | None = None
    """GPU memory this process holds after the runs (nvidia-smi), for targets on a GPU."""

    def record(self, timings: dict, volume: Path) -> None:
        for stage, seconds in timings.items():
            self.samples.setdefault(stage, []).append(float(seconds))
        self.volumes.append(str(volume))

    @property
    def stages(self) -> list[str]:
        return ordered_stages(self.samples)

    def unaccounted(self) -> list[float]:
        total = np.asarray(self.samples.get(TOTAL, []), dtype=np.float64)
        parts = sum((np.asarray(self.samples[s], dtype=np.float64) for s in self.stages), np.zeros_like(total))
        return list(total - parts)

    def stats(self) -> dict:
        """Stage -> summary (ms), in pipeline order, then "unaccounted" and "total"."""
        out = {s: summarize(self.samples[s]) for s in self.stages}
        out[UNACCOUNTED] = summarize(self.unaccounted())
        out[TOTAL] = summarize(self.samples.get(TOTAL, []))
        return out

    @property
    def throughput(self) -> float | None:
        """Warm volumes per second, one after the other (runs / summed end-to-end time)."""
        total = sum(self.samples.get(TOTAL, []))
        return len(self.samples[TOTAL]) / total if total > 0 else None

    def to_dict(self) -> dict:
        cold_total = self.load_s + self.first_volume.get(TOTAL, 0.0)
        return {
            "label": self.target.label,
            "engine": str(self.target.engine),
            "backend": self.target.backend,
            "runner": self.runner,
            "device": self.device,
            "precision": self.precision,
            "cold_start": {
                "load_ms": self.load_s * 1e3,
                "first_volume_ms": {k: v * 1e3 for k, v in self.first_volume.items()},
                "total_ms": cold_total * 1e3,
            },
            "stats_ms": self.stats(),
            "throughput_volumes_per_s": self.throughput,
            "rss_max_mib": self.rss_max_mib,
            "gpu_memory_mib": self.gpu_memory_mib,
            "samples_ms": {k: [v * 1e3 for v in vals] for k, vals in self.samples.items()},
            "sample_volumes": self.volumes,
        }


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_profile(
    targets: Sequence[Target],
    volumes: Sequence[Path],
    *,
    warmup: int = 5,
    runs: int = 50,
    work_dir,
    on_step: Callable[[str], None] | None = None,
) -> list[TargetResult]:
    """Cold-start every target, then warm up and time them interleaved, volume by volume.

    Masks are written under `work_dir` (one file per target, overwritten each volume) by
    the same Segmenter.segment_file that `liverkd infer` calls.
    """
    from liverkd.deploy.device_info import gpu_memory_used_mib
    from liverkd.deploy.segment import Segmenter

    if not targets:
        raise ValueError("nothing to profile: no engine given")
    if not volumes:
        raise ValueError("nothing to profile: no volumes")
    if runs < 1 or warmup < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0 (got runs={runs}, warmup={warmup})")
    work_dir = Path(work_dir)
    step = on_step or (lambda _msg: None)
    results = [TargetResult(t) for t in targets]
    segmenters = []
    try:
        for i, res in enumerate(results):
            step(f"cold start {res.target.label}")
            t0 = time.perf_counter_ns()
            seg = Segmenter.load(res.target.engine, backend=res.target.backend)
            res.load_s = (time.perf_counter_ns() - t0) / 1e9
            segmenters.append(seg)
            res.runner, res.device, res.precision = seg.runner.describe(), seg.runner.device, seg.runner.precision
            res.first_volume = dict(seg.segment_file(volumes[0], work_dir / f"mask_{i}.nii.gz").timings)
        for k in range(warmup + runs):
            vol = volumes[k % len(volumes)]
            for i, (res, seg) in enumerate(zip(results, segmenters, strict=True)):
                step(f"{'warm-up' if k < warmup else 'run'} {res.target.label}")
                timings = seg.segment_file(vol, work_dir / f"mask_{i}.nii.gz").timings
                if k >= warmup:
                    res.record(timings, vol)
                    res.rss_max_mib = max(res.rss_max_mib, _rss_mib())
        for res in results:
            if "cuda" in str(res.device) or "gpu" in str(res.device).lower():
                res.gpu_memory_mib = gpu_memory_used_mib()
    finally:
        for seg in segmenters:
            seg.close()
    return results


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    device: dict
    config: dict
    results: list[TargetResult]
    peak_rss_mib: float = field(default_factory=_peak_rss_mib)

    def speedups(self) -> dict:
        """Label -> stage -> speedup of its median against the first target's (first / this)."""
        if not self.results:
            return {}
        base = self.results[0].stats()
        out = {}
        for res in self.results:
            stats = res.stats()
            out[res.target.label] = {
                stage: (base[stage]["p50"] / s["p50"] if stage in base and s["p50"] and base[stage]["p50"] else None)
                for stage, s in stats.items()
                if stage != UNACCOUNTED
            }
        return out

    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "device": self.device,
            "config": self.config,
            "peak_rss_mib": self.peak_rss_mib,
            "baseline": self.results[0].target.label if self.results else None,
            "targets": [r.to_dict() for r in self.results],
            "speedup_vs_baseline_p50": self.speedups(),
        }

    def write_json(self, path) -> Path:
        return write_json(path, self.to_dict())

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            [
                "target",
                "engine",
                "backend",
                "runner",
                "stage",
                *[f"{k}_ms" if k != "n" else k for k in STAT_KEYS],
                "speedup_vs_baseline_p50",
            ]
        )
        speed = self.speedups()
        for res in self.results:
            for stage, s in res.stats().items():
                ratio = speed[res.target.label].get(stage)
                w.writerow(
                    [
                        res.target.label,
                        res.target.engine,
                        res.target.backend,
                        res.runner,
                        stage,
                        *[_csv_num(s[k]) for k in STAT_KEYS],
                        _csv_num(ratio),
                    ]
                )
        return buf.getvalue()

    def write_csv(self, path) -> Path:
        return write_text(path, self.csv_text())

    def write_plot(self, path) -> Path:
        """PNG: stacked mean stage times per target, and the end-to-end latency histogram."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (bars, hist) = plt.subplots(
            1, 2, figsize=(13, 2.8 + 0.45 * len(self.results)), gridspec_kw={"width_ratios": [3, 2]}
        )
        labels = [r.target.label for r in self.results]
        stats = [r.stats() for r in self.results]
        stages = []
        for res in self.results:
            stages += [s for s in res.stages if s not in stages]
        tab10 = plt.get_cmap("tab10").colors
        palette = [c for i, c in enumerate(tab10) if i != 7] + list(plt.get_cmap("tab20").colors[1::2])  # 7: gray
        colors = plt.get_cmap("tab10")
        left = np.zeros(len(self.results))
        for j, stage in enumerate([*stages, UNACCOUNTED]):
            widths = np.array([max(0.0, st[stage]["mean"] or 0.0) if stage in st else 0.0 for st in stats])
            color = "0.75" if stage == UNACCOUNTED else palette[j % len(palette)]
            bars.barh(labels, widths, left=left, height=0.6, label=stage, color=color)
            left += widths
        for y, total in enumerate(left):
            bars.text(total, y, f" {total:.1f} ms", va="center", fontsize=9)
        bars.invert_yaxis()
        bars.set_xlabel("mean time per volume (ms), warm runs")
        bars.set_title("Where a volume's time goes")
        bars.set_xlim(0, max(left.max(), 1e-3) * 1.2)
        bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=5, frameon=False)
        all_totals = np.concatenate([np.asarray(r.samples[TOTAL]) * 1e3 for r in self.results])
        edges = np.histogram_bin_edges(all_totals, bins=min(40, max(10, all_totals.size // 3)))
        for j, res in enumerate(self.results):
            t = np.asarray(res.samples[TOTAL]) * 1e3
            hist.hist(t, bins=edges, alpha=0.55, color=colors(j % 10), label=res.target.label)
            hist.axvline(np.median(t), color=colors(j % 10), linestyle="--", linewidth=1)
        hist.set_xlabel("end-to-end latency per volume (ms); dashed = median")
        hist.set_ylabel("volumes")
        hist.set_title("End-to-end latency")
        hist.legend(fontsize=8)
        hist.yaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(
            f"liverkd profile — {self.device['cpu']['model']}"
            + (f" — {self.device['gpus'][0]['name']}" if self.device.get("gpus") else ""),
            fontsize=10,
        )
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
        plt.close(fig)
        return Path(path)

    def render(self, console) -> None:
        """Rich tables: the device header, one table per target, and a comparison when several."""
        from rich import box
        from rich.table import Table

        from liverkd.deploy.device_info import describe

        for line in describe(self.device):
            console.print(f"[dim]{line}[/dim]")
        cfg = self.config
        console.print(
            f"[dim]{cfg['n_volumes']} volume(s) ({cfg['source']}), {cfg['warmup']} warm-up + "
            f"{cfg['runs']} timed runs per target, interleaved; times in ms, p50 = median, "
            "%p50 = share of the median total[/dim]"
        )
        for res in self.results:
            stats = res.stats()
            total_p50 = stats[TOTAL]["p50"] or 0.0
            table = Table(
                title=f"{res.target.label}: {res.runner}, N = {stats[TOTAL]['n']} warm volumes",
                title_justify="left",
                box=box.SIMPLE_HEAD,
                padding=(0, 1),
                pad_edge=False,
            )
            table.add_column("stage", no_wrap=True)
            for k in STAT_KEYS[1:]:
                table.add_column(k, justify="right", no_wrap=True)
            table.add_column("%p50", justify="right", no_wrap=True)
            paths = cfg.get("stage_paths", {})
            table.add_column("path", no_wrap=True, style="dim")
            for stage, s in stats.items():
                is_total = stage == TOTAL
                share = "" if is_total or not total_p50 else f"{100 * (s['p50'] or 0) / total_p50:.1f}"
                table.add_row(
                    f"[bold]{stage}[/bold]" if is_total else stage,
                    *[_ms(s[k]) for k in STAT_KEYS[1:]],
                    share,
                    paths.get(stage, ""),
                    end_section=stage == UNACCOUNTED,
                )
            console.print(table)
            cold = res.to_dict()["cold_start"]
            gpu = f", GPU memory {res.gpu_memory_mib:.0f} MiB" if res.gpu_memory_mib is not None else ""
            console.print(
                f"cold start: load {cold['load_ms']:.1f} ms + first volume "
                f"{cold['first_volume_ms'].get(TOTAL, 0):.1f} ms = {cold['total_ms']:.1f} ms; "
                f"throughput {res.throughput or 0:.2f} volumes/s; RSS {res.rss_max_mib:.0f} MiB{gpu}\n"
            )
        if len(self.results) > 1:
            self._render_comparison(console)
        console.print(f"[dim]process peak RSS {self.peak_rss_mib:.0f} MiB[/dim]")

    def _render_comparison(self, console) -> None:
        from rich import box
        from rich.table import Table

        base = self.results[0].target.label
        speed = self.speedups()
        table = Table(
            title=f"median (p50) ms per stage; speedup = {base} / target",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
        )
        table.add_column("stage", no_wrap=True)
        for res in self.results:
            table.add_column(res.target.label, justify="right")
            if res is not self.results[0]:
                table.add_column("speedup", justify="right")
        all_stats = [r.stats() for r in self.results]
        stages = []
        for st in all_stats:
            stages += [s for s in st if s not in stages and s not in (UNACCOUNTED, TOTAL)]
        stages.append(TOTAL)
        for stage in stages:
            row = [f"[bold]{stage}[/bold]" if stage == TOTAL else stage]
            for res, st in zip(self.results, all_stats, strict=True):
                row.append(_ms(st[stage]["p50"]) if stage in st else "-")
                if res is not self.results[0]:
                    r = speed[res.target.label].get(stage)
                    row.append(f"{r:.2f}x" if r else "-")
            table.add_row(*row)
        console.print(table)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def _csv_num(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def profile(
    engines: Sequence,
    backends: Sequence[str] = ("auto",),
    *,
    volumes_dir=None,
    synthetic: int | None = None,
    warmup: int = 5,
    runs: int = 50,
    progress=None,
) -> Report:
    """Profile every engine x backend on the same volumes (a folder, or `synthetic` phantoms).

    `progress` is an optional rich Progress to advance.
    """
    import tempfile

    from liverkd.deploy.backends.base import BACKENDS
    from liverkd.deploy.bundle import Bundle
    from liverkd.deploy.device_info import device_facts

    targets = [Target(Path(e), b) for e in engines for b in backends]
    if not targets:
        raise ValueError("nothing to profile: no engine given")
    labels = [t.label for t in targets]
    for i, t in enumerate(targets):
        if labels.count(t.label) > 1:
            t.name = f"{labels[i]}#{labels[: i + 1].count(labels[i])}"
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"--backend {b!r}: choose from {', '.join(BACKENDS)}")
    bundles = [Bundle.load(t.engine) for t in targets]  # fail early, before any volume is written
    volumes = find_volumes(volumes_dir) if volumes_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="liverkd-profile-") as tmp:
        tmp = Path(tmp)
        if volumes is None:
            n = 5 if synthetic is None else synthetic
            shape, spacing = synthetic_shape(bundles[0].spec)
            (tmp / "volumes").mkdir()
            task = progress.add_task("writing phantoms", total=n) if progress else None
            volumes = write_synthetic(
                tmp / "volumes", n, shape, spacing, on_volume=(lambda: progress.advance(task)) if progress else None
            )
            source = "synthetic phantoms {} at {} mm".format(
                "x".join(map(str, shape)), "x".join(f"{s:g}" for s in spacing)
            )
        else:
            source = str(volumes_dir)
        (tmp / "masks").mkdir()
        task = progress.add_task("profiling", total=len(targets) * (1 + warmup + runs)) if progress else None

        def on_step(msg: str) -> None:
            if progress:
                progress.update(task, advance=1, description=msg)

        results = run_profile(targets, volumes, warmup=warmup, runs=runs, work_dir=tmp / "masks", on_step=on_step)
    config = {
        "engines": [str(e) for e in engines],
        "backends": list(backends),
        "source": source,
        "n_volumes": len(volumes),
        "volumes": [str(v) if volumes_dir is not None else Path(v).name for v in volumes],
        "warmup": warmup,
        "runs": runs,
        "interleaved": True,
        "stage_paths": accel.stage_paths(),  # which implementation each stage took (the fast path, or plain)
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Report(device=device_facts(), config=config, results=results)
