"""INT8 against fp32 on ONNX Runtime's CPU provider, for the TensorRT Q/DQ layout of deploy.calibrate.

    .venv/bin/python benchmarks/int8_layout.py CHECKPOINT DATA_FOLDER [--methods minmax entropy percentile]

Exports CHECKPOINT, splits the NIfTI volumes under DATA_FOLDER as `liverkd build-engine` does
(calibrate.split_held_out: every fifth held out), calibrates on the rest with each method and
compares the INT8 model with the fp32 one on the held-out volumes (deploy.compare: argmax
agreement over voxels, Dice of the liver masks per volume, the build gate's number).
ONNX Runtime's own Q/DQ defaults (outputs quantized, int8 weights, ConvTranspose axis 1) are
run beside it for contrast ("ort-default").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ort_default_int8(onnx_in, onnx_out, inputs) -> None:
    """The layout deploy.calibrate wrote before issue 13: quantize_static's QDQ defaults, symmetric."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": x} for x in inputs])

        def get_next(self):
            return next(self.feeds, None)

    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    quantize_static(
        str(onnx_in), str(onnx_out), Reader(), per_channel=True, activation_type=QuantType.QInt8, extra_options=options
    )


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    from liverkd.core.spec import PreprocessSpec
    from liverkd.deploy import calibrate as C
    from liverkd.deploy.compare import compare
    from liverkd.deploy.export import export_onnx
    from liverkd.distill.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data", type=Path, help="folder of NIfTI volumes (labels folders are skipped)")
    ap.add_argument("--methods", nargs="+", default=[*C.METHODS, "ort-default"])
    args = ap.parse_args()

    spec = PreprocessSpec.from_dict(load_checkpoint(args.checkpoint)["spec"])
    used, held = C.split_held_out(C.calibration_files(args.data))
    held_inputs = C.load_inputs(held, spec)
    print(
        f"{args.checkpoint.name}: input {spec.input_shape}, calibrate on {len(used)}, compare on "
        f"{len(held)} ({', '.join(f.name for f in held)}); onnxruntime {ort.__version__}\n"
    )
    print("| method | argmax agreement | Dice vs fp32 min | mean | max logit error |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        fp32 = export_onnx(args.checkpoint, work / "fp32.onnx").path
        ref = [ort.InferenceSession(str(fp32)).run(None, {"input": x})[0] for x in held_inputs]
        for method in args.methods:
            int8 = work / f"{method}.onnx"
            if method == "ort-default":
                ort_default_int8(fp32, int8, C.load_inputs(used, spec))
            else:
                C.quantize_int8(fp32, int8, C.iter_inputs(used, spec), method, work / f"{method}.json")
            session = ort.InferenceSession(str(int8))
            a = compare(ref, [session.run(None, {"input": x})[0] for x in held_inputs], label=1)
            row = [f"{a.argmax_agreement:.4%}", f"{a.dice_min:.4f}", f"{a.dice_mean:.4f}", f"{a.max_abs_error:.3f}"]
            print(f"| {method} | {' | '.join(row)} |")
    print(f"\nDice: the liver masks (argmax == 1) per held-out input, {np.prod(spec.input_shape)} voxels each.")


if __name__ == "__main__":
    main()
