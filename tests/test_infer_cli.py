"""`liverkd infer` end to end, as a user runs it (subprocess, real files, a real ONNX engine)."""

import gzip
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import make_bundle, nifti, synthetic_ct

from liverkd.deploy.segment import STAGES


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "student")


def run(cmd, *args, cwd=None):
    return subprocess.run([*cmd, "infer", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def write_ct(path, shape=(40, 36, 28), seed=0, **kw):
    img = nifti(synthetic_ct(shape, seed=seed), **kw)
    nib.save(img, path)
    return path


def assert_same_geometry(mask_path, image_path):
    mask, img = nib.load(mask_path), nib.load(image_path)
    assert mask.shape == img.shape[:3]
    assert np.array_equal(mask.affine, img.affine)
    assert mask.get_data_dtype() == np.uint8
    for key in ("qform_code", "sform_code"):
        assert int(mask.header[key]) == int(img.header[key])


def test_default_names_beside_the_input_and_json_lines(liverkd_cmd, engine, tmp_path):
    a = write_ct(tmp_path / "a.nii")
    b = write_ct(tmp_path / "b.nii.gz", seed=1)
    proc = run(liverkd_cmd, a, b, "--engine", engine, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["input"] for d in lines] == [str(a), str(b)]
    assert [d["output"] for d in lines] == [str(tmp_path / "a_liver.nii.gz"), str(tmp_path / "b_liver.nii.gz")]
    for d, src in zip(lines, (a, b)):
        assert list(d["timings"]) == list(STAGES) + ["total"]
        assert d["liver_ml"] >= 0 and isinstance(d["warnings"], list)
        assert_same_geometry(d["output"], src)
    assert "2 of 2 volumes segmented" in proc.stderr


def test_output_file_for_one_input(liverkd_cmd, engine, tmp_path):
    src = write_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "sub" / "mask.nii.gz"
    out.parent.mkdir()
    proc = run(liverkd_cmd, src, "-o", out, "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    assert_same_geometry(out, src)
    assert "liver" in proc.stdout and "mL" in proc.stdout and "network" in proc.stdout
    assert sorted(os.listdir(out.parent)) == ["mask.nii.gz"]


def test_folder_and_glob_inputs_into_an_output_folder(liverkd_cmd, engine, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(2):
        write_ct(cases / f"case{i}.nii.gz", seed=i)
    write_ct(cases / "case0_liver.nii.gz")  # an earlier output: not an input
    more = tmp_path / "more"
    more.mkdir()
    write_ct(more / "x1.nii.gz", seed=5)
    write_ct(more / "x2.nii", seed=6)
    out_dir = tmp_path / "out"
    proc = run(liverkd_cmd, cases, str(more / "x*.nii*"), "-o", out_dir, "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    names = ["case0_liver.nii.gz", "case1_liver.nii.gz", "x1_liver.nii.gz", "x2_liver.nii.gz"]
    assert sorted(os.listdir(out_dir)) == names
    assert_same_geometry(out_dir / "x2_liver.nii.gz", more / "x2.nii")


def test_one_output_file_for_many_inputs_is_refused(liverkd_cmd, engine, tmp_path):
    a, b = write_ct(tmp_path / "a.nii.gz"), write_ct(tmp_path / "b.nii.gz")
    proc = run(liverkd_cmd, a, b, "-o", tmp_path / "one.nii.gz", "--engine", engine)
    assert proc.returncode == 2
    assert "give a folder" in proc.stderr
    assert not (tmp_path / "one.nii.gz").exists()


def test_stats_and_preview(liverkd_cmd, engine, tmp_path):
    src = write_ct(tmp_path / "ct.nii.gz")
    proc = run(liverkd_cmd, src, "--engine", engine, "--stats", "--preview")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "ct_liver.json").read_text())
    mask = np.asarray(nib.load(tmp_path / "ct_liver.nii.gz").dataobj)
    hu = np.asarray(nib.load(src).dataobj)
    assert stats["liver_voxels"] == int(mask.sum())
    assert stats["liver_ml"] == pytest.approx(mask.sum() * 6.0**3 / 1000)
    if mask.any():
        assert stats["mean_hu"] == pytest.approx(float(hu[mask > 0].mean()))
    assert stats["engine"].startswith("student")
    assert (tmp_path / "ct_liver.png").read_bytes()[:4] == b"\x89PNG"


def test_without_engine_the_packaged_model_runs_in_an_empty_folder(liverkd_cmd, tmp_path):
    """A fresh install: no engines/, no --engine -> the model inside the package."""
    from liverkd import models

    src = write_ct(tmp_path / "ct.nii.gz")
    proc = run(liverkd_cmd, src.name, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"using the packaged model {models.DEFAULT}" in proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    out = nib.load(tmp_path / "ct_liver.nii.gz")
    assert line["output"] == "ct_liver.nii.gz" and out.shape == nib.load(src).shape


def test_a_packaged_model_is_selected_by_name_and_a_wrong_name_is_one_line(liverkd_cmd, tmp_path):
    from liverkd import models

    src = write_ct(tmp_path / "ct.nii.gz")
    for name in models.names():
        proc = run(liverkd_cmd, src.name, "--engine", name, "-o", f"{name}.nii.gz", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = run(liverkd_cmd, src.name, "--engine", "no-such-model", cwd=tmp_path)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-such-model" in proc.stderr
    assert not (tmp_path / "ct_liver.nii.gz").exists()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m["spec"].update(extra=1), "unknown PreprocessSpec keys"),
        (lambda m: m["input"].pop("shape"), "KeyError"),
        (lambda m: m.update(spec=None), "invalid spec"),
    ],
)
def test_broken_engine_json_is_a_one_line_error(liverkd_cmd, tmp_path, edit, problem):
    bundle = make_bundle(tmp_path / "broken")
    meta = json.loads((bundle / "engine.json").read_text())
    edit(meta)
    (bundle / "engine.json").write_text(json.dumps(meta))
    src = write_ct(tmp_path / "ct.nii.gz")
    proc = run(liverkd_cmd, src, "--engine", bundle)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "engine.json" in proc.stderr and problem in proc.stderr
    assert not (tmp_path / "ct_liver.nii.gz").exists()


def test_dicom_series_folder(liverkd_cmd, engine, tmp_path):
    pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")
    from test_dicom import write_series

    folder = write_series(tmp_path / "patient7", synthetic_ct((40, 36, 20)) + 1024, spacing=(6.0, 6.0), step=6.0)
    proc = run(liverkd_cmd, folder, "--engine", engine, "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]
    assert line["output"] == str(tmp_path / "patient7_liver.nii.gz")
    assert nib.load(line["output"]).shape == (36, 40, 20)


# ------------------------------------------------ outputs never replace what is there (issue 12, item 2)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_output_never_replaces_another_input_of_the_run(liverkd_cmd, engine, tmp_path):
    scan = write_ct(tmp_path / "scan.nii.gz")
    second = write_ct(tmp_path / "scan_liver.nii.gz", seed=1)  # a CT that happens to have scan's output name
    ct_bytes = second.read_bytes()
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        proc = run(liverkd_cmd, scan, second, "--engine", engine, *extra)
        assert proc.returncode == 1, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert line.startswith(f"error: {scan}: {second}: output would overwrite an input of this run"), line
        assert second.read_bytes() == ct_bytes
        assert_same_geometry(tmp_path / "scan_liver_liver.nii.gz", second)  # the second input was segmented


def test_existing_outputs_are_kept_unless_overwrite(liverkd_cmd, engine, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    write_ct(ds / "case01.nii.gz")
    write_ct(ds / "case02.nii.gz", seed=1)
    reference = ds / "case01_liver.nii.gz"  # a reference label beside its CT, not an input (a *_liver name)
    nib.save(nib.Nifti1Image(np.ones((40, 36, 28), np.uint8), np.eye(4)), reference)
    label_bytes = reference.read_bytes()
    proc = run(liverkd_cmd, ds, "--engine", engine)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"error: {ds / 'case01.nii.gz'}: {reference}: ")
    assert line.endswith("output exists; not overwritten (--overwrite replaces it)")
    assert reference.read_bytes() == label_bytes
    mask = (ds / "case02_liver.nii.gz").read_bytes()

    proc = run(liverkd_cmd, ds, "--engine", engine, "--stats")  # a re-run: nothing is replaced, and it says so
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 2, proc.stderr
    assert reference.read_bytes() == label_bytes and (ds / "case02_liver.nii.gz").read_bytes() == mask
    assert not (ds / "case02_liver.json").exists()  # refused before any work: no half of the outputs

    proc = run(liverkd_cmd, ds, "--engine", engine, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert_same_geometry(reference, ds / "case01.nii.gz")


def test_an_existing_stats_file_is_kept_too(liverkd_cmd, engine, tmp_path):
    src = write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "ct_liver.json").write_text('{"mine": true}')
    proc = run(liverkd_cmd, src, "--engine", engine, "--stats")
    assert proc.returncode == 1 and "ct_liver.json: output exists" in proc.stderr, proc.stderr
    assert (tmp_path / "ct_liver.json").read_text() == '{"mine": true}'
    assert not (tmp_path / "ct_liver.nii.gz").exists()


def in_mount_namespace(folder, mount_point, *cmd):
    """`cmd` with `folder` bind-mounted on `mount_point`, in a private mount namespace (gone when cmd exits)."""
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    argv = ["unshare", "-m", "sh", "-c", script, folder, mount_point, *cmd]
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a bind mount needs root and unshare")
def test_an_input_seen_through_a_bind_mount_is_never_replaced(liverkd_cmd, engine, tmp_path):
    """`-o b/ct.nii.gz` where b is a bind mount of the input's folder: another path, the same file."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    src = write_ct(a / "ct.nii.gz")
    ct_bytes = src.read_bytes()
    if in_mount_namespace(a, b, "true").returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    proc = in_mount_namespace(a, b, *liverkd_cmd, "infer", src, "-o", b / "ct.nii.gz", "--engine", engine)
    assert proc.returncode == 1, proc.stderr
    assert "output would overwrite an input of this run" in proc.stderr
    assert src.read_bytes() == ct_bytes


# ------------------------------------------------ no patient data from the input's header (issue 12, item 7)


def test_the_mask_carries_no_header_extension_or_free_text(liverkd_cmd, engine, tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")
    from nibabel.nifti1 import Nifti1DicomExtension, Nifti1Extension

    dicom = pydicom.Dataset()
    dicom.PatientName, dicom.PatientBirthDate, dicom.PatientID = "Doe^Jane", "19500101", "MRN-0042"
    img = nifti(synthetic_ct((40, 36, 28)))
    img.header.extensions += [Nifti1DicomExtension(2, dicom), Nifti1Extension(6, b"Doe^Jane, ward 7")]
    img.header["descrip"], img.header["aux_file"], img.header["db_name"] = b"Doe^Jane", b"MRN-0042.txt", b"ward 7"
    img.header.set_intent("estimate", name="Doe")
    nib.save(img, tmp_path / "ct.nii.gz")
    proc = run(liverkd_cmd, tmp_path / "ct.nii.gz", "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ct_liver.nii.gz"
    raw = gzip.decompress(out.read_bytes())
    assert not any(s in raw for s in (b"Doe", b"19500101", b"MRN", b"ward")), raw[:600]
    header = nib.load(out).header
    assert not header.extensions and header.get_intent() == ("none", (), "")
    assert all(header[k].item() == b"" for k in ("descrip", "aux_file", "db_name"))
    assert_same_geometry(out, tmp_path / "ct.nii.gz")
