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

from liverkd.deploy import Segmenter  # noqa: E402
from liverkd.deploy.backends.base import RunnerError, open_runner  # noqa: E402
from liverkd.deploy.build import build_engine  # noqa: E402
from liverkd.deploy.bundle import Bundle  # noqa: E402
from liverkd.deploy.calibrate import phantom_input  # noqa: E402

from liverkd.core.synth.phantom import write_dataset  # noqa: E402

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
    write_dataset(calib, 4, seed=5, shape=SPEC.input_shape, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = build_engine(
            work / "threshold.pt", tmp_path / "int8", "int8", calib_data=calib, min_agreement=1e-6, log=quiet
        )
    x = phantom_input(SPEC, 3)
    ref, out, runner = run_both(int8, x)
    with open_runner(Bundle.load(work / "threshold-fp32"), "openvino") as fp32:
        full = fp32.infer(x)
    assert runner.precision == "int8"
    assert not np.array_equal(out, full)  # the quantized file ran, not model.onnx
    assert argmax_agreement(out, ref) >= 0.99


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
    with pytest.raises(RunnerError) as e:
        open_runner(Bundle.load(broken), "openvino")
    assert str(e.value).startswith(f"{broken / 'model.onnx'}: OpenVINO cannot load it (")
    assert "\n" not in str(e.value) and "Exception from" not in str(e.value)
    with pytest.raises(RunnerError, match="OpenVINO hint 'FASTEST': choose from LATENCY"):
        open_runner(Bundle.load(work / "random-fp32"), "openvino", hint="FASTEST")
