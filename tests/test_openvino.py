"""`--backend openvino`: real OpenVINO on real bundles, checked against ONNX Runtime on the same files."""

import json
import shutil
import subprocess
import warnings

import nibabel as nib
import numpy as np
import pytest
from _checkpoints import SPEC, make_checkpoint, threshold_checkpoint
from _segment_bundle import make_bundle, nifti, synthetic_ct

pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[openvino]')")

from liverkd.core.synth import write_dataset  # noqa: E402
from liverkd.deploy import Segmenter  # noqa: E402
from liverkd.deploy.backends.base import RunnerError, open_runner  # noqa: E402
from liverkd.deploy.build import build_engine  # noqa: E402
from liverkd.deploy.bundle import Bundle, BundleError, FileRecord  # noqa: E402
from liverkd.deploy.calibrate import calibration_files, load_inputs, phantom_input  # noqa: E402
from liverkd.deploy.compare import compare  # noqa: E402

quiet = lambda _message: None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openvino")
    make_checkpoint(folder / "random.pt")
    threshold_checkpoint(folder / "threshold.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("random", "threshold"):
            build_engine(folder / f"{name}.pt", folder / f"{name}-fp32", log=quiet)
    return folder


@pytest.fixture(scope="module")
def edge_bundle(tmp_path_factory):
    """A one-conv network with a known, non-trivial mask (a random student's mask is nearly constant)."""
    return make_bundle(tmp_path_factory.mktemp("engines") / "edge", preset="edge")


def run_both(bundle, x):
    with open_runner(bundle, "onnxruntime") as ort, open_runner(bundle, "openvino") as ov:
        return ort.infer(x), ov.infer(x), ov


def argmax_agreement(a, b) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


@pytest.mark.parametrize("name", ["random", "threshold"])
def test_logits_match_onnxruntime(work, name):
    bundle = Bundle.load(work / f"{name}-fp32")
    x = phantom_input(SPEC, 3)
    ref, out, runner = run_both(bundle, x)
    assert out.shape == ref.shape == (1, 2, *SPEC.input_shape) and out.dtype == np.float32
    # fp32 on both (OpenVINO pinned to f32): they differ by rounding alone, far below this on any
    # x86 CPU; only a voxel whose two logits are that close could flip, and fewer than 0.1% are
    # (the smallest 0.1% of the margins are 5e-3 for the threshold model, 0.14 for the random one).
    assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert argmax_agreement(out, ref) >= 0.999
    assert (runner.name, runner.device, runner.precision) == ("openvino", "cpu", "fp32")
    assert set(runner.last_timings) == {"h2d", "network", "d2h"} and runner.last_timings["network"] > 0


def test_output_is_a_copy_not_openvinos_buffer(work):
    with open_runner(Bundle.load(work / "threshold-fp32"), "openvino") as runner:
        first = runner.infer(phantom_input(SPEC, 1))
        kept = first.copy()
        second = runner.infer(phantom_input(SPEC, 2))
    assert not np.array_equal(kept, second)  # two different inputs give different logits
    assert np.array_equal(first, kept)  # and the second run did not write into the first answer


def test_int8_bundle_runs_its_qdq_model(work, tmp_path):
    calib = tmp_path / "calib"
    write_dataset(calib, 4, seed=5, shape=SPEC.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = build_engine(
            work / "threshold.pt", tmp_path / "int8", "int8", calib_data=calib, min_agreement=1e-6, log=quiet
        )
    x = phantom_input(SPEC, 3)
    with open_runner(int8, "openvino") as runner, open_runner(int8, "openvino", precision="fp32") as fp32:
        out, full = runner.infer(x), fp32.infer(x)
    assert runner.precision == "int8" and runner.model.path.name == "model.int8.onnx"
    assert fp32.model.path.name == "model.onnx"
    assert not np.array_equal(out, full)  # the quantized file ran, not model.onnx
    # How many boundary voxels int8 flips depends on the CPU's int8 kernels (VNNI or not, Intel or
    # AMD) and on the phantom: OpenVINO's int8 agreed with fp32 on 94.8% of the voxels on a Xeon
    # with AVX-512 VNNI, on 95.4% to 97.5% on an AMD EPYC. What holds on any CPU: the int8 answer is
    # better than the best constant answer (every voxel the fp32 mask's majority class, 84-87% of
    # them here). A network that did not really run on the input cannot beat that; a quantized one
    # moves only voxels near the decision boundary.
    liver = float(np.mean(full.argmax(1) == 1))
    constant = max(liver, 1 - liver)
    assert 0 < liver < 1 and argmax_agreement(out, full) > constant
    # The build recorded int8's agreement with fp32 (ONNX Runtime, held-out volume): measured again
    # here on the same CPU, it is the same number.
    held_out = [f for f in calibration_files(calib) if f.name in int8.meta.calibration.held_out]
    held_out = load_inputs(held_out, SPEC)
    with open_runner(int8, "onnxruntime") as ort8, open_runner(int8, "onnxruntime", precision="fp32") as ort32:
        again = compare([ort32.infer(v) for v in held_out], [ort8.infer(v) for v in held_out])
    assert int8.meta.accuracy.argmax_agreement == pytest.approx(again.argmax_agreement, abs=1e-4)
    assert int8.meta.accuracy.max_abs_logit_error > 0


def test_segment_file_matches_onnxruntime(edge_bundle, tmp_path):
    src = tmp_path / "ct.nii.gz"
    nib.save(nifti(synthetic_ct((40, 36, 28))), src)
    masks = {}
    for backend in ("onnxruntime", "openvino"):
        with Segmenter.load(edge_bundle, backend=backend) as seg:
            result = seg.segment_file(src, tmp_path / f"{backend}.nii.gz")
        assert result.timings["network"] > 0
        masks[backend] = nib.load(result.output)
    img, ort, ov = nib.load(src), masks["onnxruntime"], masks["openvino"]
    assert ov.shape == ort.shape == img.shape and ov.get_data_dtype() == np.uint8
    assert np.array_equal(ov.affine, img.affine) and np.array_equal(ov.affine, ort.affine)
    a, b = np.asarray(ov.dataobj), np.asarray(ort.dataobj)
    assert 0 < b.sum() < b.size  # a mask with both classes, so agreement means something
    assert np.mean(a == b) >= 0.999


def test_cli_infer_with_openvino(edge_bundle, tmp_path, liverkd_cmd):
    src = tmp_path / "ct.nii.gz"
    nib.save(nifti(synthetic_ct((40, 36, 28), seed=1)), src)
    out = tmp_path / "ct_liver.nii.gz"
    cmd = [*liverkd_cmd, "infer", str(src), "-o", str(out), "--engine", str(edge_bundle), "--backend", "openvino"]
    proc = subprocess.run([*cmd, "--json", "--stats"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.splitlines()[-1])
    assert line["output"] == str(out) and nib.load(out).shape == (40, 36, 28)
    assert "on openvino on cpu (fp32)" in json.loads((tmp_path / "ct_liver.json").read_text())["engine"]


def test_bad_model_and_bad_hint_are_one_line_errors(work, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(work / "random-fp32", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(BundleError, match="engine.json says .*; not loaded"):  # changed behind its back
        open_runner(Bundle.load(broken), "openvino")
    bundle = Bundle.load(broken)  # recorded as it is now: OpenVINO reads it, and says what is wrong
    Bundle(broken, bundle.meta.replace(files={"onnx": FileRecord.of(broken, "model.onnx")})).save()
    with pytest.raises(RunnerError) as e:
        open_runner(Bundle.load(broken), "openvino")
    assert str(e.value).startswith(f"{broken / 'model.onnx'}: OpenVINO cannot load it (")
    assert "\n" not in str(e.value) and "Exception from" not in str(e.value)
    with pytest.raises(RunnerError, match="OpenVINO hint 'FASTEST': choose from LATENCY"):
        open_runner(Bundle.load(work / "random-fp32"), "openvino", hint="FASTEST")
