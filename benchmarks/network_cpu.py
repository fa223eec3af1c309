"""Network time of the 30k and 100k students on this CPU at 128^3, and how far from the floor.

    make bench                                        # or: .venv/bin/python benchmarks/network_cpu.py
    .venv/bin/python benchmarks/network_cpu.py --tune # + the ONNX Runtime settings sweep (30k student)

Runtimes: PyTorch eager fp32, then ONNX Runtime and OpenVINO through deploy's own runners
(OnnxRuntimeRunner, OpenVINORunner): ONNX Runtime fp32 and int8 (Q/DQ), OpenVINO fp32 / bf16
(where the CPU has it) / int8 (it reads the same Q/DQ file) when installed
(`pip install -e '.[openvino]'`; skipped with a message otherwise).
The bundles are built by
deploy.build.build_engine, the code behind `liverkd build-engine` (export with BatchNorm
folded and onnxsim; int8 calibrated with minmax on phantoms), so the files timed are the
files users run.

Weights are RANDOM (seeded): a network's time does not depend on its weights' values, and
no trained checkpoint is needed to run this. The max |dlogit| column (each runtime's logits
against PyTorch eager's on one phantom) checks the numerics, it is not an accuracy.

Floor: the model's convolution GFLOPs (2 x multiply-adds, counted from the ONNX graph) over
the peak GFLOP/s of this CPU, measured in the same run with a large float32 numpy matmul
(in a child process with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset, see
/work/.library/env/README.md). It is the time the arithmetic alone would take at matmul
speed; memory traffic (these nets move far more bytes than they compute) is not in it.

Timings are medians over interleaved rounds (one call of every runtime per round), so a busy
neighbour on the same cores slows them all alike; on a shared machine they stay indicative.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("student-30k", "student-100k")
PEAK_SCRIPT = """
import time, numpy as np
n = {n}
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
b = np.random.default_rng(1).random((n, n), dtype=np.float32)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range({repeats}))
print(2 * n**3 / best / 1e9)
"""


# ---------------------------------------------------------------- the floor


def conv_gflops(onnx_path) -> float:
    """2 x multiply-adds of every Conv / ConvTranspose in the graph (shapes from ONNX shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights[node.input[1]]
        if node.op_type == "Conv":  # w: (cout, cin/groups, k...): that many MACs per output element
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(w[1:]))
        else:  # w: (cin, cout/groups, k...): that many MACs per input element
            macs += int(np.prod(shapes[node.input[0]])) * int(np.prod(w[1:]))
    return 2 * macs / 1e9


def peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Best float32 numpy matmul GFLOP/s, in a child process with the OpenBLAS core-type override unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT.format(n=n, repeats=repeats)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip())


# ---------------------------------------------------------------- models and runtimes


def build_bundles(preset: str, size: int, folder: Path, n_calib: int = 4) -> dict:
    """Random-init checkpoint -> fp32 and int8 ONNX Runtime bundles via deploy.build.build_engine."""
    import torch

    from liverkd.core.spec import PreprocessSpec
    from liverkd.core.synth import write_dataset
    from liverkd.deploy.build import build_engine
    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    torch.manual_seed(0)
    spec = PreprocessSpec(spacing=(384 / size,) * 3, input_shape=(size,) * 3)
    ckpt = save_checkpoint(folder / f"{preset}.pt", create_model(preset).eval(), spec, preset=preset)
    calib = folder / "calib"
    if not calib.is_dir():
        write_dataset(calib, n_calib, seed=0, shape=(size,) * 3)
    quiet = lambda _msg: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = build_engine(ckpt, folder / f"{preset}-fp32", "fp32", backend="onnxruntime", log=quiet)
        int8 = build_engine(
            ckpt, folder / f"{preset}-int8", "int8", backend="onnxruntime", calib_data=calib,
            calib_method="minmax", min_agreement=1e-6, log=quiet,
        )  # fmt: skip
    return {"checkpoint": ckpt, "fp32": fp32, "int8": int8, "spec": spec}


def torch_eager(checkpoint, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from liverkd.distill.checkpoint import model_from_checkpoint

    torch.set_num_threads(threads)
    model, _ = model_from_checkpoint(checkpoint)

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def ort_runner(bundle, threads: int):
    """deploy's OnnxRuntimeRunner on the file the bundle names for ONNX Runtime."""
    from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner.from_bundle(bundle, threads=threads)


def ov_runner(bundle, threads: int, inference_precision: str | None = None):
    """OpenVINO CPU: an fp32 bundle runs in f32, "bf16" asks for bf16 (see OpenVINORunner)."""
    from liverkd.deploy.backends.openvino import OpenVINORunner

    return OpenVINORunner.from_bundle(bundle, threads=threads, inference_precision=inference_precision)


def bf16_capable() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def openvino_available() -> tuple[bool, str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False, "OpenVINO not installed (pip install -e '.[openvino]'): skipped"
    return True, ""


# ---------------------------------------------------------------- the ONNX Runtime sweep


def sweep_configs(fp32: Path, int8: Path, threads: int) -> dict[str, tuple[Path, dict]]:
    """Name -> (ONNX file, session settings) for the 30k student's ONNX Runtime sweep."""
    base = {"level": "all", "intra": threads}
    return {
        "ORT defaults (ALL, intra=cores, spinning)": (fp32, base),
        "level DISABLE": (fp32, {**base, "level": "disable"}),
        "level BASIC": (fp32, {**base, "level": "basic"}),
        "level EXTENDED": (fp32, {**base, "level": "extended"}),
        "intra=1": (fp32, {**base, "intra": 1}),
        "no spinning (OnnxRuntimeRunner's setting)": (
            fp32,
            {**base, "config": {"session.intra_op.allow_spinning": "0"}},
        ),
        "ORT_PARALLEL, inter=2, intra=1": (fp32, {**base, "intra": 1, "inter": threads, "parallel": True}),
        "no memory arena": (fp32, {**base, "arena": False}),
        "no memory pattern": (fp32, {**base, "pattern": False}),
        "denormals as zero": (fp32, {**base, "config": {"session.set_denormal_as_zero": "1"}}),
        "dynamic_block_base=4": (fp32, {**base, "config": {"session.dynamic_block_base": "4"}}),
        "int8 Q/DQ (ALL)": (int8, base),
        "int8 Q/DQ, no spinning": (int8, {**base, "config": {"session.intra_op.allow_spinning": "0"}}),
        "int8 Q/DQ run as float (disable_quant_qdq)": (int8, {**base, "config": {"session.disable_quant_qdq": "1"}}),
    }


def ort_session(path: Path, level="all", intra=1, inter=1, parallel=False, arena=True, pattern=True, config=None):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = inter
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = pattern
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from liverkd.deploy.calibrate import phantom_input
    from liverkd.deploy.compare import compare, run
    from liverkd.deploy.device_info import describe, device_facts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--size", type=int, default=128, help="input edge in voxels (default 128)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads (default: cores)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="students to time")
    parser.add_argument("--tune", action="store_true", help="also sweep ONNX Runtime settings for the first preset")
    args = parser.parse_args(argv)

    console = Console() if sys.stdout.isatty() else Console(width=130)
    for line in describe(device_facts()):
        console.print(f"[dim]{line}[/dim]")
    peak_start = peak_gflops()
    console.print(
        f"peak at start: {peak_start:.0f} GFLOP/s (float32 numpy matmul 4096^2, best of 5, all cores); "
        f"load average {os.getloadavg()[0]:.1f}; weights are random (timing only)"
    )
    have_ov, why_not = openvino_available()
    if not have_ov:
        console.print(f"[yellow]{why_not}[/yellow]")

    table = Table(title=f"network time at {args.size}^3, batch 1, {args.threads} threads; median of {args.runs} "
                  "interleaved rounds", title_justify="left")  # fmt: skip
    for col in ("model", "GFLOPs", "runtime", "median ms", "min ms", "vs eager", "x floor", "max |dlogit|"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    tune_input = None
    results = []
    with tempfile.TemporaryDirectory(prefix="liverkd-bench-") as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            console.print(f"building {preset} bundles (fp32, int8) ...")
            b = build_bundles(preset, args.size, tmp)
            x = phantom_input(b["spec"], 7)
            fns = {
                "PyTorch eager fp32": torch_eager(b["checkpoint"], args.threads),
                "ONNX Runtime fp32": ort_runner(b["fp32"], args.threads),
                "ONNX Runtime int8": ort_runner(b["int8"], args.threads),
            }
            if have_ov:
                fns["OpenVINO fp32"] = ov_runner(b["fp32"], args.threads)
                if bf16_capable():
                    fns["OpenVINO bf16"] = ov_runner(b["fp32"], args.threads, "bf16")
                fns["OpenVINO int8 (Q/DQ)"] = ov_runner(b["int8"], args.threads)
            console.print(f"timing {preset}: {', '.join(fns)} ...")
            runs = run(fns, [x], rounds=args.runs, warmup=args.warmup)
            reference = runs["PyTorch eager fp32"].outputs
            errors = {name: compare(reference, r.outputs).max_abs_error for name, r in runs.items()}
            times = {name: [ms / 1e3 for ms in r.ms] for name, r in runs.items()}
            results.append((preset, conv_gflops(b["fp32"].file("onnx")), times, errors))
            if args.tune and preset == args.presets[0]:
                tune_input = (preset, b, x)
        peak_end = peak_gflops()
        peak = max(peak_start, peak_end)
        console.print(f"peak at end: {peak_end:.0f} GFLOP/s; the floor uses the larger, {peak:.0f} GFLOP/s")
        for preset, gflops, times, errors in results:
            floor_ms = gflops / peak * 1e3
            eager = float(np.median(times["PyTorch eager fp32"]))
            for name, t in times.items():
                med = float(np.median(t))
                table.add_row(
                    preset, f"{gflops:.2f}", name, f"{med * 1e3:.1f}", f"{min(t) * 1e3:.1f}",
                    f"{eager / med:.2f}x", f"{med * 1e3 / floor_ms:.1f}", f"{errors[name]:.2g}",
                    end_section=name == list(times)[-1],
                )  # fmt: skip
            table.add_row(preset, f"{gflops:.2f}", "[bold]floor[/bold] (GFLOPs / peak)", f"{floor_ms:.1f}", "", "",
                          "1.0", "", end_section=True)  # fmt: skip
        console.print(table)
        console.print(f"[dim]load average {os.getloadavg()[0]:.1f} at the end (other work on these cores slows "
                      "every runtime alike; rerun for quieter numbers)[/dim]")  # fmt: skip
        if tune_input is not None:
            preset, b, x = tune_input
            tune(console, preset, b, x, conv_gflops(b["fp32"].file("onnx")) / peak * 1e3, args)
    return 0


def tune(console, preset, bundles, x, floor_ms, args) -> None:
    from rich.table import Table

    from liverkd.deploy.compare import run

    configs = sweep_configs(bundles["fp32"].file("onnx"), bundles["int8"].file("onnx_int8"), args.threads)
    fns = {name: ort_session(path, **settings) for name, (path, settings) in configs.items()}
    console.print(f"ONNX Runtime sweep for {preset}: {len(fns)} settings, {args.runs} interleaved rounds ...")
    times = {name: [ms / 1e3 for ms in r.ms] for name, r in run(fns, [x], rounds=args.runs, warmup=args.warmup).items()}
    base = float(np.median(times[next(iter(times))]))
    table = Table(title=f"ONNX Runtime settings, {preset} at {args.size}^3, {args.threads} cores", title_justify="left")
    for col in ("setting", "median ms", "min ms", "vs ORT defaults", "x floor"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, t in sorted(times.items(), key=lambda kv: np.median(kv[1])):
        med = float(np.median(t))
        table.add_row(
            name, f"{med * 1e3:.1f}", f"{min(t) * 1e3:.1f}", f"{base / med:.2f}x", f"{med * 1e3 / floor_ms:.1f}"
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
