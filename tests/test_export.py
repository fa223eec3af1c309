"""liverkd export: opset 17, BatchNorm folded, spec in the metadata, parity with PyTorch."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import onnx
import pytest

from liverkd.core.atomic import sha256_file
from liverkd.core.spec import PreprocessSpec
from tests._checkpoints import SPEC, make_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from liverkd.deploy.export import export_onnx

    folder = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(folder / "s30.pt")
    result = export_onnx(ckpt, folder / "s30.onnx")
    return ckpt, result


def test_export_is_opset17_folded_and_tagged(exported):
    from liverkd.deploy import export as E

    ckpt, result = exported
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert "Conv" in ops
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, *SPEC.input_shape]
    props = {p.key: p.value for p in model.metadata_props}
    assert PreprocessSpec.from_json(props[E.META_SPEC]) == SPEC
    assert props[E.META_SHA256] == sha256_file(ckpt)
    assert props[E.META_PRESET] == "student-30k"


def test_parity_numbers_are_measured(exported):
    _, result = exported
    assert result.agreement >= 0.999
    assert 0.0 <= result.max_abs_error < 1e-3
    assert "argmax agreement" in result.summary()


def test_onnx_matches_torch_on_other_input(exported):
    """Independent of export's own check: the graph computes what the checkpoint computes."""
    import onnxruntime as ort
    import torch

    from liverkd.deploy.export import load_torch_model

    ckpt, result = exported
    model, _, _ = load_torch_model(ckpt)
    x = np.random.default_rng(3).random((1, 1, *SPEC.input_shape), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(result.path)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_dynamic_axes_run_other_sizes(tmp_path, exported):
    import onnxruntime as ort

    from liverkd.deploy.export import export_onnx

    ckpt, _ = exported
    result = export_onnx(ckpt, tmp_path / "dyn.onnx", dynamic=True)
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["x", "y", "z"]
    out = ort.InferenceSession(str(result.path)).run(None, {"input": np.zeros((1, 1, 48, 32, 40), np.float32)})[0]
    assert out.shape == (1, 2, 48, 32, 40)


def test_failed_parity_leaves_no_file(tmp_path, exported):
    from liverkd.deploy.export import ExportError, export_onnx

    ckpt, _ = exported
    with pytest.raises(ExportError, match="agreement"):
        export_onnx(ckpt, tmp_path / "never.onnx", min_agreement=1.01)  # unreachable on purpose
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_one_line_error(tmp_path, liverkd_cmd):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run(
        [*liverkd_cmd, "export", str(bad), "--out", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    if importlib.util.find_spec("torch") is None:  # the Python 3.10 run: the missing extra, in one line
        assert len(lines) == 1 and "liverkd[train]" in lines[0]
        return
    assert len(lines) == 1 and str(bad) in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_prints_parity(tmp_path, exported, liverkd_cmd):
    ckpt, _ = exported
    out = subprocess.run(
        [*liverkd_cmd, "export", str(ckpt), "--out", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "max |logit error|" in out.stdout and "argmax agreement" in out.stdout
    spec = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}["liverkd.spec"]
    assert json.loads(spec)["input_shape"] == list(SPEC.input_shape)
