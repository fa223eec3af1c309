"""Median latency per volume of the students on a CUDA machine, every way this machine can run them.

    python3 benchmarks/gpu_check.py --out gpu_check.md            # on the GPU machine, < 5 min
    python3 benchmarks/gpu_check.py --device cpu --runs 2 --size 32  # the same code on a CPU

Needs only torch and numpy (onnxruntime, onnx and tensorrt are used when importable); no
network, no liverkd install: without one it reads liverkd.distill and liverkd.deploy from the
repository's distill/ and deploy/. Trains nothing: random-init students (latency does not
depend on the weights) or --checkpoint files. Every variant runs in its own try/except; a
variant that cannot run prints why it was skipped. Columns: median host->host ms per volume
(numpy in, numpy logits out), median GPU ms (CUDA events around the network alone, where
measured), argmax agreement with PyTorch fp32 (timed and compared by deploy.compare).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import liverkd.distill  # noqa: F401  (installed, or an editable install)
except ImportError:  # a bare checkout: liverkd.distill is distill/, liverkd.deploy is deploy/
    import liverkd

    liverkd.__path__.append(str(ROOT))


class Skip(Exception):
    """This variant cannot run here; str() says why."""


# ---------------------------------------------------------------- PyTorch variants


def torch_runner(model, device, half=False, channels_last=False, cuda_graph=False, compiled=False):
    """A function host array -> (host logits, gpu ms or None)."""
    import torch

    if half and device == "cpu":
        raise Skip("fp16 needs CUDA")
    if cuda_graph and device == "cpu":
        raise Skip("CUDA graphs need CUDA")
    dtype = torch.float16 if half else torch.float32
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=fmt).eval()
    if compiled:
        net = torch.compile(net)
    cuda = device != "cpu"

    def to_device(x):
        return torch.from_numpy(x).to(device, non_blocking=False).to(dtype).contiguous(memory_format=fmt)

    if cuda_graph:
        static_in = to_device(np.zeros(INPUT_SHAPE, np.float32))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm up on a side stream before capture (the documented recipe)
                net(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = net(static_in)

        def run(x):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            static_in.copy_(to_device(x))
            start.record()
            graph.replay()
            end.record()
            out = static_out.float().cpu().numpy()
            return out, start.elapsed_time(end)

        return run

    def run(x):
        with torch.inference_mode():
            xd = to_device(x)
            if not cuda:
                return net(xd).float().numpy(), None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yd = net(xd)
            end.record()
            out = yd.float().cpu().numpy()
            return out, start.elapsed_time(end)

    return run


# ---------------------------------------------------------------- ONNX Runtime / TensorRT variants


def export_onnx(model, folder: Path, name: str) -> Path:
    import warnings

    import torch

    path = folder / f"{name}.onnx"
    if not path.exists():
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = copy.deepcopy(model).to("cpu", torch.float32).eval()
            torch.onnx.export(
                model, (torch.zeros(INPUT_SHAPE),), str(path), dynamo=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
            )  # fmt: skip
    return path


def fp16_onnx(path: Path) -> Path:
    out = path.with_suffix(".fp16.onnx")
    if not out.exists():
        try:
            from liverkd.deploy.fp16 import to_fp16
        except ImportError as e:
            raise Skip(f"fp16 conversion needs onnx + onnxruntime ({e})") from None
        to_fp16(path, out)
    return out


def ort_runner(path: Path, provider: str):
    """deploy's OnnxRuntimeRunner on `provider` alone (a session that fell back to another is skipped)."""
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner
    from liverkd.deploy.bundle import ModelFile

    try:
        runner = OnnxRuntimeRunner(ModelFile.of(path), providers=[provider])
    except RunnerError as e:
        raise Skip(str(e)) from None
    if runner.session.get_providers()[0] != provider:
        raise Skip(f"{provider} was requested but the session fell back to {runner.session.get_providers()}")

    def run(x):
        return runner.infer(x), None

    return run


def tensorrt_source(path: Path, precision: str, tensorrt_version: str) -> Path:
    """The ONNX a `precision` plan is built from: an fp16 ONNX where TensorRT is strongly typed (>= 10
    ignores the FP16 flag there, and 11 has none), the fp32 one with the FP16 flag on TensorRT 8.6."""
    from liverkd.deploy.backends.tensorrt import plan_onnx_role

    role = plan_onnx_role(precision, tensorrt_version)
    if role == "onnx_int8":
        raise Skip("int8 needs a calibrated Q/DQ ONNX: benchmarks/trt_check.py builds and checks one")
    return fp16_onnx(path) if role == "onnx_fp16" else path


def tensorrt_runner(path: Path, precision: str, folder: Path, cuda_binding: str = "auto"):
    from liverkd.deploy.backends.base import RunnerError
    from liverkd.deploy.backends.tensorrt import TensorRTRunner, build_plan, tensorrt_available
    from liverkd.deploy.bundle import ModelFile

    ok, why = tensorrt_available(cuda_binding)
    if not ok:
        raise Skip(why)
    import tensorrt

    source = tensorrt_source(path, precision, tensorrt.__version__)
    plan = folder / f"{path.stem}-{precision}.plan"
    try:
        built_for = build_plan(source, plan, precision, workspace_mib=2048, timing_cache_dir=folder)
        runner = TensorRTRunner(ModelFile.of(plan), precision=precision, built_for=built_for, cuda_binding=cuda_binding)
    except RunnerError as e:
        raise Skip(str(e)) from None

    def run(x):
        out = runner.infer(x)
        return out, runner.last_timings["network"] * 1e3

    return run


# ---------------------------------------------------------------- the table


class Timed:
    """A variant's function x -> (logits, GPU ms or None) as a runner deploy.compare.run can time."""

    def __init__(self, fn):
        self.fn, self.last_timings = fn, {}

    def infer(self, x):
        out, gpu_ms = self.fn(x)
        self.last_timings = {} if gpu_ms is None else {"network": gpu_ms / 1e3}
        return out


def time_variant(fn, x, runs: int, reference):
    """(median host ms, median GPU ms, argmax agreement with `reference`, the logits) after 2 warm-ups."""
    from liverkd.deploy.compare import compare, run

    result = run({"variant": Timed(fn)}, [x], rounds=runs, warmup=2)["variant"]
    agree = compare([reference], result.outputs).argmax_agreement if reference is not None else 1.0
    return result.median_ms, result.median_network_ms, agree, result.outputs[0]


def environment(device: str) -> list[str]:
    import torch

    lines = [f"host {platform.node()}, Python {platform.python_version()}, torch {torch.__version__}"]
    if device != "cpu":
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU {torch.cuda.get_device_name(0)} (compute {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB), "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        lines.append(f"CPU only ({os.cpu_count()} threads)")
    for mod in ("onnxruntime", "onnx", "tensorrt"):
        try:
            m = __import__(mod)
            extra = f" providers {m.get_available_providers()}" if mod == "onnxruntime" else ""
            lines.append(f"{mod} {m.__version__}{extra}")
        except ImportError:
            lines.append(f"{mod}: not installed")
    from liverkd.deploy.device_info import device_facts

    packages = device_facts()["packages"]
    bindings = [
        f"{p} {packages[p]}" for p in ("cuda-python", "cuda-bindings", "pycuda") if packages[p] != "not installed"
    ]
    lines.append(f"CUDA bindings (TensorRT rows): {', '.join(bindings) or 'none installed'}")
    return lines


INPUT_SHAPE = (1, 1, 128, 128, 128)


def main(argv=None) -> int:
    global INPUT_SHAPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--size", type=int, default=128, help="input edge length (a multiple of 8)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--presets", nargs="+", default=["student-30k", "student-100k"])
    ap.add_argument("--checkpoint", nargs="*", default=[], help="checkpoint files instead of random-init presets")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip what is left after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    ap.add_argument("--cuda-binding", default="auto", help="the TensorRT rows' CUDA binding: auto, cuda-python, pycuda")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows (CuPy: CT in memory -> mask)")
    args = ap.parse_args(argv)

    import torch

    from liverkd.distill.models import count_params, create_model

    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 1
    INPUT_SHAPE = (1, 1, args.size, args.size, args.size)
    torch.backends.cudnn.benchmark = True
    models = []
    if args.checkpoint:
        from liverkd.distill.checkpoint import model_from_checkpoint

        models = [(Path(c).stem, model_from_checkpoint(c)[0]) for c in args.checkpoint]
    else:
        torch.manual_seed(0)
        models = [(p, create_model(p).eval()) for p in args.presets]
    x = np.random.default_rng(0).random(INPUT_SHAPE, dtype=np.float32)
    env = environment(device)
    print("\n".join(env), flush=True)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = [
            (name, label, make)
            for name, model in models
            for label, make in variants(name, model, device, tmp, args.cuda_binding)
        ]
        if not args.no_compile:  # slowest to start: after everything else, within the time budget
            plan += [(name, "torch.compile fp16", lambda m=model: _compiled(m, device)) for name, model in models]
        params = {name: count_params(model) for name, model in models}
        references: dict[str, np.ndarray] = {}
        for name, label, make in plan:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append((name, label, f"time budget of {args.budget_s:.0f} s spent"))
                print(f"  skip {name} {label}: time budget spent", flush=True)
                continue
            try:
                run = make()
                runs = min(args.runs, 5) if "CPU" in label and device != "cpu" else args.runs
                host_ms, gpu_ms, agree, out = time_variant(run, x, runs, references.get(name))
                references.setdefault(name, out)
                rows.append((name, params[name], label, host_ms, gpu_ms, agree))
                gpu_text = f"{gpu_ms:8.2f}" if gpu_ms == gpu_ms else "       -"
                print(
                    f"  {name:13s} {label:30s} host {host_ms:8.2f} ms  gpu {gpu_text} ms  agree {agree:.4%}", flush=True
                )
            except Skip as e:
                skipped.append((name, label, str(e)))
                print(f"  skip {name} {label}: {e}", flush=True)
            except Exception as e:  # a variant must never take the others down
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                skipped.append((name, label, reason))
                print(f"  skip {name} {label}: {reason}", flush=True)
            finally:
                if device != "cpu":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    text = markdown(env, INPUT_SHAPE, rows, skipped, args.runs, time.perf_counter() - t_start)
    if not args.no_e2e:
        try:
            text += end_to_end(device, min(args.runs, 10))
        except ImportError as e:  # nibabel or scipy missing on a bare GPU image: carry them as wheels
            text += f"\nEnd to end skipped: {e}\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


E2E_SHAPE, E2E_SPACING = (512, 512, 300), (0.7, 0.7, 1.0)


def e2e_ct(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 512x512x300 int16 CT in memory (liverkd.core.synth.scanner_grid_case)."""
    from liverkd.core.synth import scanner_grid_case

    return scanner_grid_case(seed, E2E_SHAPE, E2E_SPACING)


def end_to_end(device: str, runs: int) -> str:
    """The whole `liverkd infer` path with the packaged student-30k: CT in memory -> mask (and
    file -> file), on the CPU and, with CuPy and ONNX Runtime's CUDA provider, on the GPU
    (Segmenter(device="cuda"): one upload, one download). Medians over `runs`."""
    import statistics

    import nibabel as nib

    from liverkd import models
    from liverkd.deploy.segment import Segmenter

    array, affine = e2e_ct()
    lines = ["", f"## End to end: CT {E2E_SHAPE} int16 in memory -> uint8 mask (packaged {models.DEFAULT})", ""]
    lines += ["| path | median ms | min ms | Dice vs CPU |", "|---|---:|---:|---:|"]
    configs = [("CPU (numpy, ONNX Runtime CPU)", dict(backend="onnxruntime", device="cpu"))]
    if device != "cpu":
        configs.append(("GPU (CuPy, ONNX Runtime CUDA, IO binding)",
                        dict(backend="onnxruntime", device="cuda", providers=["CUDAExecutionProvider"])))  # fmt: skip
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        ct_file = Path(tmp) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), ct_file)
        for label, options in configs:
            try:
                with Segmenter.load(models.path(models.DEFAULT), **options) as seg:
                    seg.segment_array(array, affine)  # warm-up: engine, CuPy kernels, allocator
                    times, mask = [], None
                    for _ in range(runs):
                        t = time.perf_counter()
                        mask = seg.segment_array(array, affine).mask
                        times.append(time.perf_counter() - t)
                    file_times = []
                    for _ in range(max(2, runs // 3)):
                        t = time.perf_counter()
                        seg.segment_file(ct_file, Path(tmp) / "mask.nii.gz")
                        file_times.append(time.perf_counter() - t)
            except Exception as e:  # a path must never take the others down
                lines.append(
                    f"| {label} | skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} | | |"
                )
                continue
            reference = mask if reference is None else reference
            both = reference.sum() + mask.sum()
            dice = 2 * np.logical_and(reference, mask).sum() / both if both else 1.0
            lines.append(
                f"| {label}, in memory | {1000 * statistics.median(times):.1f} | {1000 * min(times):.1f} | {dice:.4f} |"
            )
            lines.append(f"| {label}, file -> file | {1000 * statistics.median(file_times):.1f} | "
                         f"{1000 * min(file_times):.1f} | |")  # fmt: skip
            print(lines[-2], lines[-1], sep="\n", flush=True)
    return "\n".join(lines) + "\n"


def variants(name, model, device, tmp, cuda_binding="auto"):
    """(label, make) pairs; make() returns a runner or raises Skip. The first is the reference."""

    def onnx_file():
        return export_onnx(model, tmp, name)

    return [
        ("torch fp32", lambda: torch_runner(model, device)),
        ("torch fp32 channels_last_3d", lambda: torch_runner(model, device, channels_last=True)),
        ("torch fp16", lambda: torch_runner(model, device, half=True)),
        ("torch fp16 channels_last_3d", lambda: torch_runner(model, device, half=True, channels_last=True)),
        ("torch fp32 CUDA graph", lambda: torch_runner(model, device, cuda_graph=True)),
        ("torch fp16 CUDA graph", lambda: torch_runner(model, device, half=True, cuda_graph=True)),
        ("onnxruntime CUDA fp32", lambda: ort_runner(onnx_file(), "CUDAExecutionProvider")),
        ("onnxruntime CUDA fp16", lambda: ort_runner(fp16_onnx(onnx_file()), "CUDAExecutionProvider")),
        ("onnxruntime TensorRT EP fp32", lambda: ort_runner(onnx_file(), "TensorrtExecutionProvider")),
        ("onnxruntime CPU fp32", lambda: ort_runner(onnx_file(), "CPUExecutionProvider")),
        ("TensorRT fp32", lambda: tensorrt_runner(onnx_file(), "fp32", tmp, cuda_binding)),
        ("TensorRT fp16", lambda: tensorrt_runner(onnx_file(), "fp16", tmp, cuda_binding)),
    ]


def _compiled(model, device):
    if device == "cpu":
        raise Skip("torch.compile is only timed on CUDA here")
    return torch_runner(model, device, half=True, compiled=True)


def markdown(env, shape, rows, skipped, runs, seconds) -> str:
    lines = [f"# gpu_check: median latency per volume, input {tuple(shape)}", ""]
    lines += [f"- {line}" for line in env]
    lines += [f"- {runs} timed runs per variant after 2 warm-ups; {seconds:.0f} s in all", ""]
    lines += ["| model | params | variant | host->host ms | GPU ms | argmax agreement vs torch fp32 |"]
    lines += ["|---|---:|---|---:|---:|---:|"]
    for name, params, label, host_ms, gpu_ms, agree in rows:
        gpu = f"{gpu_ms:.2f}" if gpu_ms == gpu_ms else "-"
        lines.append(f"| {name} | {params:,} | {label} | {host_ms:.2f} | {gpu} | {agree:.4%} |")
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {name} / {label}: {why}" for name, label, why in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
