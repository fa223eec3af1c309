"""The first check on a machine with TensorRT (a Jetson, a workstation GPU): from one engine bundle, build
fp32, fp16 and int8 plans, run each against ONNX Runtime's fp32 on the same inputs, print agreement and latency.

    python3 benchmarks/trt_check.py engines/student-30k                      # every precision, TensorRT
    python3 benchmarks/trt_check.py engines/student-30k --cuda-binding pycuda --out trt_check.md
    python3 benchmarks/trt_check.py engines/student-30k --backend onnxruntime  # the same code on a CPU

Needs liverkd installed (`pip install -e .`, no torch) and, for --backend tensorrt, TensorRT, a CUDA
binding (cuda-python or pycuda) and a GPU; without them it prints the machine's facts and one line
saying what is missing, and exits 1. The bundle's own model.fp16.onnx / model.int8.onnx serve where it
has them; otherwise they are made here (deploy.fp16; deploy.calibrate's minmax on phantoms of the
bundle's spec that are never the ones compared). Plans are built in a temp folder, never into the
bundle. Agreement and timing are deploy.compare's run() and compare(): Dice of the liver masks, argmax
agreement and max |logit error| against ONNX Runtime CPU fp32, median host ms per volume (numpy in,
logits out), median network ms (CUDA events on TensorRT) and the last call's h2d/d2h.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from liverkd.core.errors import LiverkdError
from liverkd.deploy.bundle import ONNX_ROLE, PRECISIONS, Bundle, ModelFile

COMPARED_SEEDS = (7001, 7002)
"""Phantoms the precisions are compared on."""
CALIBRATION_SEEDS = (7101, 7102, 7103, 7104)
"""Phantoms an int8 ONNX is calibrated on when the bundle has none (never compared)."""
ROLE_PRECISION = {role: precision for precision, role in ONNX_ROLE.items()}


def onnx_for(bundle: Bundle, precision: str, work: Path) -> Path:
    """The bundle's ONNX file for `precision` (checked against engine.json), or one made in `work`."""
    role = ONNX_ROLE[precision]
    if bundle.file(role) is not None:
        bundle.model_file(role).read()
        return bundle.file(role)
    made = work / f"model.{precision}.onnx"
    if not made.exists():
        fp32 = onnx_for(bundle, "fp32", work)
        if precision == "fp16":
            from liverkd.deploy.fp16 import to_fp16

            to_fp16(fp32, made)
        else:
            from liverkd.deploy.calibrate import phantom_input, quantize_int8

            phantoms = (phantom_input(bundle.spec, s) for s in CALIBRATION_SEEDS)
            quantize_int8(fp32, made, phantoms, "minmax", work / "calibration.json")
    return made


def open_variant(bundle: Bundle, precision: str, args, work: Path):
    """(runner, the ONNX file it was made from) for `precision` on args.backend."""
    if args.backend == "onnxruntime":
        from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner

        source = onnx_for(bundle, precision, work)
        return OnnxRuntimeRunner(ModelFile.of(source), precision=precision, input_shape=bundle.input_shape), source
    from liverkd.deploy.backends.tensorrt import TensorRTRunner, build_plan, import_tensorrt, plan_onnx_role

    role = plan_onnx_role(precision, import_tensorrt().__version__)
    source = onnx_for(bundle, ROLE_PRECISION[role], work)
    plan = work / f"{precision}.plan"
    target = build_plan(source, plan, precision, workspace_mib=args.workspace, timing_cache_dir=work)
    runner = TensorRTRunner(
        ModelFile.of(plan),
        precision=precision,
        input_shape=bundle.input_shape,
        built_for=target,
        cuda_binding=args.cuda_binding,
    )
    return runner, source


def environment(backend: str, cuda_binding: str) -> tuple[list[str], str]:
    """(the machine's facts as lines, why TensorRT cannot run here or "")."""
    from liverkd.deploy.device_info import describe, device_facts

    lines = describe(device_facts())
    if backend != "tensorrt":
        return lines, ""
    from liverkd.deploy.backends.tensorrt import target_here

    try:
        here = target_here(cuda_binding)
    except LiverkdError as e:
        return lines, str(e)
    return lines + [f"TensorRT {here.version} on {here.gpu_name} (compute {here.compute_capability})"], ""


def check(bundle: Bundle, args, inputs) -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per precision that ran; (precision, why) for each that could not."""
    from liverkd.deploy.backends.base import open_runner

    rows, skipped = [], []
    with (
        tempfile.TemporaryDirectory(prefix="trt-check-") as work,
        open_runner(bundle, "onnxruntime", precision="fp32") as reference,
    ):
        for precision in args.precisions:
            try:
                rows.append(check_precision(bundle, precision, args, Path(work), reference, inputs))
            except (LiverkdError, ValueError) as e:
                skipped.append((precision, str(e).splitlines()[0] if str(e) else type(e).__name__))
                print(f"  {precision}: {skipped[-1][1]}", flush=True)
    return rows, skipped


def check_precision(bundle: Bundle, precision: str, args, work: Path, reference, inputs) -> dict:
    """`precision` against the ONNX Runtime fp32 reference, timed interleaved with it (deploy.compare)."""
    from liverkd.deploy.compare import compare, run

    runner, source = open_variant(bundle, precision, args, work)
    with runner:
        runs = run({"reference": reference, precision: runner}, inputs, rounds=args.runs)
        last = runner.last_timings
        name = runner.describe()
    agreement = compare(runs["reference"].outputs, runs[precision].outputs, int(bundle.spec.labels.get("liver", 1)))
    print(f"  {precision}: Dice {agreement.dice_min:.4f}, {runs[precision].median_ms:.2f} ms", flush=True)
    return {
        "precision": precision,
        "runner": name,
        "source": Path(source).name,
        "dice_min": agreement.dice_min,
        "argmax": agreement.argmax_agreement,
        "max_error": agreement.max_abs_error,
        "host_ms": runs[precision].median_ms,
        "network_ms": runs[precision].median_network_ms,
        "copies_ms": (last.get("h2d", 0.0) * 1e3, last.get("d2h", 0.0) * 1e3),
        "reference_ms": runs["reference"].median_ms,
    }


def markdown(bundle: Bundle, env: list[str], rows, skipped, runs: int, n_inputs: int, seconds: float) -> str:
    lines = [f"# trt_check: {bundle.name} ({bundle.path}), input {tuple(bundle.input_shape)}", ""]
    lines += [f"- {line}" for line in env]
    lines += [f"- {runs} timed rounds on {n_inputs} phantom(s) after 1 warm-up, interleaved; {seconds:.0f} s", ""]
    lines += [
        "| precision | runner | built from | Dice vs ORT fp32 (min) | argmax agreement | max abs logit error "
        "| host ms | network ms | h2d / d2h ms (last) | ORT CPU fp32 host ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h2d, d2h = r["copies_ms"]
        lines.append(
            f"| {r['precision']} | {r['runner']} | {r['source']} | {r['dice_min']:.4f} | {r['argmax']:.4%} "
            f"| {r['max_error']:.3g} | {r['host_ms']:.2f} | {r['network_ms']:.2f} | {h2d:.3f} / {d2h:.3f} "
            f"| {r['reference_ms']:.2f} |"
        )
    if skipped:
        lines += ["", "Could not run:", ""]
        lines += [f"- {precision}: {why}" for precision, why in skipped]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="an engine bundle folder (engine.json + model.onnx)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--backend", default="tensorrt", choices=("tensorrt", "onnxruntime"))
    ap.add_argument("--cuda-binding", default="auto", help="auto (cuda-python, else pycuda), cuda-python, pycuda")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds per precision")
    ap.add_argument("--workspace", type=int, default=1024, help="TensorRT workspace limit in MiB")
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    env, why = environment(args.backend, args.cuda_binding)
    print("\n".join(env), flush=True)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    try:
        bundle = Bundle.load(args.bundle)
    except LiverkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from liverkd.deploy.calibrate import phantom_input

    inputs = [phantom_input(bundle.spec, s) for s in COMPARED_SEEDS]
    rows, skipped = check(bundle, args, inputs)
    text = markdown(bundle, env, rows, skipped, args.runs, len(inputs), time.perf_counter() - t0)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0 if rows and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
