"""Is INT8 (or fp16) faster than fp32 on ONNX Runtime's CPU provider here? Medians and ratios.

    .venv/bin/python benchmarks/int8_cpu.py [--runs 5] [--sizes 64 128] [--out int8_cpu.md]

For the 30k and 100k students (random init: speed does not depend on the weights) at each
size: the fp32 export, the shipped INT8 file (deploy.calibrate: symmetric QInt8, per-channel,
float bias, i.e. what TensorRT wants), the fp16 file (deploy.fp16.to_fp16), and an INT8
variant tuned the way ONNX Runtime recommends for x86 CPUs (QUInt8 activations, per-tensor
weights, quantized bias) to see whether any INT8 layout pays off on this CPU. Calibration uses
two phantoms. Every file runs in deploy's OnnxRuntimeRunner, all of them interleaved in one
process (deploy.compare.run); the last column is each file's argmax agreement with fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ort_cpu_tuned_int8(onnx_in, onnx_out, inputs) -> None:
    """ONNX Runtime's x86 advice: QUInt8 activations, QInt8 per-tensor weights, bias quantized."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x} for x in inputs])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(onnx_in), str(onnx_out), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--presets", nargs="+", default=["student-30k", "student-100k"])
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from liverkd.core.spec import PreprocessSpec
    from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner
    from liverkd.deploy.bundle import ModelFile
    from liverkd.deploy.calibrate import phantom_input, quantize_int8
    from liverkd.deploy.compare import compare, run
    from liverkd.deploy.device_info import cpu_model
    from liverkd.deploy.export import export_onnx
    from liverkd.deploy.fp16 import to_fp16
    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    header = f"ONNX Runtime {ort.__version__} CPU, {cpu_model()}, {os.cpu_count()} threads, median of {args.runs}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            for size in args.sizes:
                spec = PreprocessSpec(spacing=(384.0 / size,) * 3, input_shape=(size,) * 3)
                torch.manual_seed(0)
                ckpt = save_checkpoint(tmp / f"{preset}-{size}.pt", create_model(preset), spec, preset=preset)
                fp32 = export_onnx(ckpt, tmp / f"{preset}-{size}.onnx").path
                calib = [phantom_input(spec, s) for s in (1, 2)]
                x = phantom_input(spec, 3)
                files = {"fp32": fp32}
                quantize_int8(fp32, tmp / "int8.onnx", calib, "minmax", tmp / "ranges.json")
                files["int8 (shipped, TensorRT layout)"] = tmp / "int8.onnx"
                ort_cpu_tuned_int8(fp32, tmp / "int8-cpu.onnx", calib)
                files["int8 (ORT x86 layout)"] = tmp / "int8-cpu.onnx"
                to_fp16(fp32, tmp / "fp16.onnx")
                files["fp16 file"] = tmp / "fp16.onnx"
                runners = {name: OnnxRuntimeRunner(ModelFile.of(path)) for name, path in files.items()}
                runs = run(runners, [x], rounds=args.runs)
                base = runs["fp32"].median_ms
                for name, result in runs.items():
                    ms, agree = result.median_ms, compare(runs["fp32"].outputs, result.outputs).argmax_agreement
                    rows.append((preset, f"{size}^3", name, ms, ms / base, agree))
                    print(
                        f"{preset:13s} {size:4d}^3  {name:32s} {ms:9.1f} ms  x{ms / base:.2f} vs fp32, "
                        f"argmax agreement {agree:.2%}",
                        flush=True,
                    )
    lines = [
        f"# ONNX Runtime CPU: INT8 / fp16 vs fp32\n\n{header}\n",
        "| model | input | file | median ms | vs fp32 | argmax agreement vs fp32 |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {p} | {s} | {n} | {ms:.1f} | {r:.2f}x | {a:.2%} |" for p, s, n, ms, r, a in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
