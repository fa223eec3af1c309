"""The packaged model as a user on the target gets it (no torch needed): an INT8 bundle built from
it with `liverkd build-engine NAME --precision int8` (the step a Jetson user runs before TensorRT
is there), and that bundle segmenting a CT."""

import json
import subprocess

import nibabel as nib

from liverkd import models
from liverkd.core.synth import write_dataset


def test_build_an_int8_bundle_from_the_packaged_model_and_infer_with_it(liverkd_cmd, tmp_path):
    calib = tmp_path / "calib"
    write_dataset(calib, 4, seed=3, shape=(96, 96, 64), spacing=3.0, progress=False)
    out = tmp_path / "engines" / "student-30k-int8"
    build = [*liverkd_cmd, "build-engine", models.DEFAULT, "--precision", "int8", "--backend", "onnxruntime"]
    # The gate's bound is CPU-specific int8 numerics (docs/deploy.md); here it only has to run and be recorded.
    build += ["--calib-data", str(calib), "--min-agreement", "0.5", "--out", str(out)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    meta = json.loads((out / "engine.json").read_text())
    assert meta["precision"] == "int8" and (out / meta["files"]["onnx_int8"]["path"]).is_file()
    assert meta["calibration"]["n"] == 3 and meta["accuracy"]["passed"]  # one of four held out for the gate
    assert (
        meta["source"]["onnx_sha256"]
        == json.loads((models.path() / "engine.json").read_text())["files"]["onnx"]["sha256"]
    )
    ct = calib / "imagesTr" / "phantom_000.nii.gz"
    proc = subprocess.run(
        [*liverkd_cmd, "infer", str(ct), "-o", str(tmp_path / "mask.nii.gz"), "--engine", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    mask, image = nib.load(tmp_path / "mask.nii.gz"), nib.load(ct)
    assert mask.shape == image.shape and (mask.affine == image.affine).all()
