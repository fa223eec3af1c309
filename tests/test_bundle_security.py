"""What a bundle or checkpoint from someone else cannot do (docs/security.md): run code when it is
opened, swap a model file behind engine.json's back, point outside its folder, or hand a
malformed engine.json to a runtime; and what `newest_bundle` never picks. Real files, real ONNX
Runtime. Issue 12, items 4, 5, 9 and 15: each test here fails on the code before it."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverkd.deploy.backends.base import RunnerError, open_runner
from liverkd.deploy.build import build_engine
from liverkd.deploy.bundle import Bundle, BundleError, FileRecord, newest_bundle
from tests._checkpoints import SPEC, make_checkpoint
from tests._segment_bundle import nifti, synthetic_ct


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    make_checkpoint(folder / "s30.pt")
    return build_engine(folder / "s30.pt", folder / "bundle", log=quiet).path


@pytest.fixture
def bundle(built, tmp_path):
    """A fresh copy of a real fp32 bundle (model.onnx + model.pt) to tamper with."""
    return Path(shutil.copytree(built, tmp_path / "bundle"))


def edit_engine_json(folder, change) -> None:
    meta = json.loads((folder / "engine.json").read_text())
    change(meta)
    (folder / "engine.json").write_text(json.dumps(meta))


def one_line(error) -> str:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def infer_cli(liverkd_cmd, folder, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    nib.save(nifti(synthetic_ct((40, 36, 28))), ct)
    cmd = [*liverkd_cmd, "infer", str(ct), "--engine", str(folder), "--backend", "onnxruntime"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "ct_liver.nii.gz").exists()
    return done.returncode, done.stderr.strip()


# ---------------------------------------------------------------- item 4: checkpoints cannot run code


class OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code a .pt file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def malicious_checkpoint(path, marker):
    import torch

    torch.save({"format": "liverkd-checkpoint", "version": 1, "extra": OpensAFile(marker)}, path)
    return path


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    from liverkd.distill.checkpoint import load_checkpoint

    marker = tmp_path / "created-by-unpickling"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError) as e:
        load_checkpoint(evil)
    assert one_line(e.value).startswith(f"{evil}: ") and "io.open" in str(e.value)
    assert not marker.exists()


def test_export_and_build_engine_refuse_it(tmp_path, liverkd_cmd):
    marker = tmp_path / "created-by-unpickling"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    done = subprocess.run(
        [*liverkd_cmd, "export", str(evil), "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True
    )
    assert done.returncode == 1 and str(evil) in one_line(done.stderr.strip())
    with pytest.raises(ValueError, match="refused"):
        build_engine(evil, tmp_path / "engine", log=quiet)
    assert not marker.exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "engine").exists()


def test_the_torch_backend_checks_the_hash_then_loads_weights_only(bundle, tmp_path):
    marker = tmp_path / "created-by-unpickling"
    malicious_checkpoint(bundle / "model.pt", marker)
    with pytest.raises(BundleError) as e:  # not the file engine.json recorded: never unpickled
        open_runner(Bundle.load(bundle), "torch")
    assert one_line(e.value).startswith(f"{bundle / 'model.pt'}: ")
    edit_engine_json(
        bundle, lambda m: m["files"].update(checkpoint=dataclasses.asdict(FileRecord.of(bundle, "model.pt")))
    )
    with pytest.raises(RunnerError) as e:  # recorded as well (engine.json forged too): weights_only refuses it
        open_runner(Bundle.load(bundle), "torch")
    assert "io.open" in one_line(e.value)
    assert not marker.exists()


def test_checkpoints_hold_tensors_and_plain_data_only(tmp_path):
    import torch

    from liverkd.distill.checkpoint import load_checkpoint, save_checkpoint
    from liverkd.distill.models import create_model

    model = create_model("student-30k")
    extra = {"dice": np.float64(0.5), "run": tmp_path, "curve": np.arange(3.0), "steps": (np.int64(2), [1])}
    payload = load_checkpoint(save_checkpoint(tmp_path / "ok.pt", model, SPEC, extra=extra))
    assert payload["extra"]["dice"] == 0.5 and type(payload["extra"]["dice"]) is float
    assert payload["extra"]["run"] == str(tmp_path) and payload["extra"]["steps"] == (2, [1])
    assert torch.equal(payload["extra"]["curve"], torch.arange(3.0, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['obj'\]: a OpensAFile"):
        save_checkpoint(tmp_path / "no.pt", model, SPEC, extra={"obj": OpensAFile(tmp_path / "x")})
    assert not (tmp_path / "no.pt").exists()


# ---------------------------------------------------------------- item 5: tampered or foreign files


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_model_changed_by_one_byte_is_refused(bundle, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    flip_one_byte(bundle / "model.onnx")
    with pytest.raises(BundleError) as e:
        open_runner(Bundle.load(bundle), backend)
    assert one_line(e.value) == (
        f"{bundle / 'model.onnx'}: sha256 differs from engine.json (changed since the build); not loaded"
    )


def test_a_tampered_model_is_one_line_from_the_cli(bundle, tmp_path, liverkd_cmd):
    flip_one_byte(bundle / "model.onnx")
    code, stderr = infer_cli(liverkd_cmd, bundle, tmp_path)
    assert code != 0 and one_line(stderr).startswith("error: ") and str(bundle / "model.onnx") in stderr


@pytest.mark.parametrize("where", ["parent", "absolute", "dotdot inside", "symlink out"])
def test_files_outside_the_bundle_are_refused(bundle, where):
    outside = bundle.parent / "x.onnx"
    shutil.copyfile(bundle / "model.onnx", outside)  # the very same bytes: the hash would match
    path = {"parent": "../x.onnx", "absolute": str(outside), "dotdot inside": "sub/../../x.onnx"}.get(where)
    if where == "symlink out":
        (bundle / "model.onnx").unlink()
        (bundle / "model.onnx").symlink_to(outside)
    else:
        edit_engine_json(bundle, lambda m: m["files"]["onnx"].update(path=path))
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    assert str(bundle / "engine.json") in one_line(e.value)


def test_a_symlink_within_the_bundle_is_fine(bundle):
    os.replace(bundle / "model.onnx", bundle / "real.onnx")
    (bundle / "model.onnx").symlink_to("real.onnx")
    with open_runner(Bundle.load(bundle), "onnxruntime") as runner:
        assert runner.infer(np.zeros(runner.input_shape, np.float32)).shape == (1, 2, 32, 32, 32)


def test_a_file_left_out_of_a_copy_is_refused_when_it_is_needed(bundle):
    (bundle / "model.pt").unlink()  # e.g. a packaged model, shipped without its checkpoint
    with open_runner(Bundle.load(bundle), "onnxruntime") as runner:
        assert runner.model.path == bundle / "model.onnx"
    with pytest.raises(BundleError) as e:
        open_runner(Bundle.load(bundle), "torch")
    assert one_line(e.value).startswith(f"{bundle / 'model.pt'}: cannot read it")
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx named in engine.json is missing"):
        Bundle.load(bundle)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r.pop("sha256"), "KeyError: 'files.onnx.sha256'"),
        (lambda r: r.pop("size"), "KeyError: 'files.onnx.size'"),
        (lambda r: r.update(sha256="abc"), "not 64 lowercase hex digits"),
        (lambda r: r.update(size=-1), "negative"),
        (lambda r: r.update(size="118683"), "expected int"),
    ],
)
def test_a_file_without_its_size_and_sha256_is_refused(bundle, change, problem):
    edit_engine_json(bundle, lambda m: change(m["files"]["onnx"]))
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    assert one_line(e.value).startswith(f"{bundle / 'engine.json'}: invalid files (") and problem in str(e.value)


def test_a_plan_without_size_and_sha256_is_refused(bundle):
    (bundle / "model.plan").write_bytes(b"plan")
    tensorrt = {"version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    edit_engine_json(
        bundle, lambda m: m.update(tensorrt=tensorrt, files={**m["files"], "plan": {"path": "model.plan"}})
    )
    with pytest.raises(BundleError, match="KeyError: 'files.plan.sha256'"):
        Bundle.load(bundle)


# ---------------------------------------------------------------- item 9: shapes, malformed engine.json


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_model_whose_input_is_not_engine_jsons_is_one_line(bundle, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    edit_engine_json(bundle, lambda m: m["input"].update(shape=[1, 1, 64, 64, 64]))
    with pytest.raises(RunnerError) as e:
        open_runner(Bundle.load(bundle), backend)
    assert one_line(e.value) == (
        f"{bundle / 'model.onnx'}: the model's input shape [1, 1, 32, 32, 32] is not engine.json's [1, 1, 64, 64, 64]"
    )


def test_an_input_of_another_shape_is_one_line_not_a_runtime_traceback(bundle, tmp_path, liverkd_cmd):
    for backend in ("onnxruntime", "torch"):
        with open_runner(Bundle.load(bundle), backend) as runner, pytest.raises(RunnerError) as e:
            runner.infer(np.zeros((1, 1, 48, 32, 32), np.float32))
        assert one_line(e.value) == (
            f"{runner.model.path}: input of shape (1, 1, 48, 32, 32); the model takes [1, 1, 32, 32, 32]"
        )
    edit_engine_json(bundle, lambda m: m["input"].update(shape=[1, 1, 64, 64, 64]))
    code, stderr = infer_cli(liverkd_cmd, bundle, tmp_path)
    assert code != 0 and "is not engine.json's [1, 1, 64, 64, 64]" in one_line(stderr)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m["input"].update(shape="1x1x32x32x32"), "invalid input (TypeError"),
        (lambda m: m["input"].update(shape=[1, 1, 32, 32]), "must have 5 axes"),
        (lambda m: m["input"].update(shape=[1, 1, -32, 32, 32]), "sizes must be positive"),
        (lambda m: m["input"].update(shape=[1, 1, 32.5, 32, 32]), "invalid input (TypeError"),
        (lambda m: m["input"].update(shape=[1, 1, True, 32, 32]), "invalid input (TypeError"),
        (lambda m: m["input"].update(shape=None), "invalid input (TypeError"),
        (lambda m: m["input"].update(shape=[[1], 1, 32, 32, 32]), "invalid input (TypeError"),
        (lambda m: m["input"].update(shape=["batch", 1, 32, 32, 32]), "batch and channels fixed"),
        (lambda m: m["output"].pop("shape"), "invalid output (KeyError: 'output.shape')"),
        (lambda m: m.pop("input"), "invalid input (KeyError: 'input')"),
        (lambda m: m.update(files=["model.onnx"]), "invalid files (TypeError"),
        (lambda m: m.update(precision="int4"), "precision 'int4'"),
        (lambda m: m.update(spec=None), "invalid spec (TypeError"),
        (lambda m: m.update(accuracy={"passed": "yes"}), "invalid accuracy"),
        (lambda m: m.update(surprise=1), "unknown keys ['surprise']"),
        (lambda m: m.update(format_version=99), "format_version 99 is newer than this liverkd"),
        (lambda m: m.update(format_version=1), "rebuild it with `liverkd build-engine`"),
        (lambda m: m.update(format="something-else"), "not a liverkd engine.json"),
    ],
)
def test_malformed_engine_json_is_one_line(bundle, change, problem):
    edit_engine_json(bundle, change)
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    assert one_line(e.value).startswith(f"{bundle / 'engine.json'}: ") and problem in str(e.value)


def test_unreadable_engine_json_is_one_line(bundle):
    (bundle / "engine.json").write_text('{"format": "liverkd-engine", ')
    with pytest.raises(BundleError, match="unreadable engine.json") as e:
        Bundle.load(bundle)
    one_line(e.value)


# ---------------------------------------------------------------- item 15: the --engine default


def test_newest_bundle_never_picks_a_hidden_or_unchecked_build(built, tmp_path):
    engines = tmp_path / "engines"
    for name in ("old", ".tmp-new", ".new.x1y2.building", "unchecked", "failed"):
        shutil.copytree(built, engines / name)
    edit_engine_json(engines / "unchecked", lambda m: m.update(accuracy=None))
    edit_engine_json(engines / "failed", lambda m: m["accuracy"].update(passed=False))
    os.utime(engines / "old" / "engine.json", (1_000_000_000, 1_000_000_000))  # the oldest of them all
    assert newest_bundle(engines).path == engines / "old"
    shutil.rmtree(engines / "old")
    with pytest.raises(BundleError, match="no engine bundles with a passed accuracy check") as e:
        newest_bundle(engines)
    one_line(e.value)


def test_engine_json_is_written_last_so_a_build_in_progress_is_no_bundle(tmp_path, built):
    """While the gate runs, the temp folder holds every model file but no engine.json yet."""
    seen = []

    def log(line: str) -> None:
        if line.startswith("accuracy gate"):
            building = [p for p in (tmp_path / "engines").iterdir() if p.name.startswith(".")]
            seen.extend((p.name, (p / "model.onnx").is_file(), (p / "engine.json").exists()) for p in building)

    build_engine(built / "model.pt", tmp_path / "engines" / "s30", log=log)
    assert len(seen) == 1 and seen[0][0].startswith(".s30.") and seen[0][1:] == (True, False)
    assert newest_bundle(tmp_path / "engines").path == tmp_path / "engines" / "s30"
