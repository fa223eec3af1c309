import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from liverkd.cli.evaluate import pair_by_name

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def run(cmd, *args):
    return subprocess.run([*cmd, "evaluate", *map(str, args)], capture_output=True, text=True, timeout=120)


def cube_mask(start, size=8, shape=(24, 24, 16)):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def write(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))
    return path


def test_reference_mask_against_itself(shared_data, liverkd_cmd):
    ref = shared_data / "liver_ref_3mm.nii.gz"
    out = run(liverkd_cmd, ref, ref, "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["case"] == "liver_ref_3mm"
    assert record["dice"] == 1.0 and record["iou"] == 1.0
    assert record["hd95"] == 0.0 and record["assd"] == 0.0 and record["rvd"] == 0.0

    table = run(liverkd_cmd, ref, ref)
    assert table.returncode == 0, table.stderr
    assert "liver_ref_3mm" in table.stdout and "1.0000" in table.stdout and "mean" in table.stdout


@pytest.fixture
def folders(tmp_path):
    pred, label = tmp_path / "pred", tmp_path / "label"
    pred.mkdir()
    label.mkdir()
    write(label / "a.nii.gz", cube_mask((4, 4, 4)))
    write(label / "b.nii.gz", cube_mask((6, 6, 2)))
    write(label / "d.nii.gz", cube_mask((6, 6, 2)))  # no prediction
    write(pred / "a_liver.nii.gz", cube_mask((6, 4, 4)))  # what infer writes; Dice 6/8
    write(pred / "a.nii.gz", np.ones((24, 24, 16)))  # the input CT beside it: not the prediction
    write(pred / "b.nii", cube_mask((6, 6, 2)))  # exact name, Dice 1
    write(pred / "c_liver.nii.gz", cube_mask((1, 1, 1)))  # no reference
    return pred, label


def test_pair_by_name(folders):
    pred, label = folders
    pairs, lone_preds, lone_labels = pair_by_name(pred, label)
    assert [(case, p.name, lab.name) for case, p, lab in pairs] == [
        ("a", "a_liver.nii.gz", "a.nii.gz"),
        ("b", "b.nii", "b.nii.gz"),
    ]
    assert sorted(p.name for p in lone_preds) == ["a.nii.gz", "c_liver.nii.gz"]
    assert [p.name for p in lone_labels] == ["d.nii.gz"]


def test_folders_json_one_object_per_case(folders, liverkd_cmd):
    pred, label = folders
    out = run(liverkd_cmd, pred, label, "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["case"] for r in records] == ["a", "b"]
    assert records[0]["dice"] == pytest.approx(0.75)
    assert records[0]["hd95"] == pytest.approx(2 * 1.5)  # shifted 2 voxels of 1.5 mm
    assert records[1]["dice"] == 1.0
    assert "c_liver.nii.gz" in out.stderr and "d.nii.gz" in out.stderr

    table = run(liverkd_cmd, pred, label)
    assert table.returncode == 0
    assert "mean" in table.stdout and "0.8750" in table.stdout  # mean Dice of 0.75 and 1


def test_mismatched_shape_is_a_one_line_error_naming_both_files(tmp_path, liverkd_cmd):
    pred = write(tmp_path / "p.nii.gz", cube_mask((4, 4, 4)))
    label = write(tmp_path / "l.nii.gz", cube_mask((4, 4, 4), shape=(24, 24, 18)))
    out = run(liverkd_cmd, pred, label, "--json")
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(pred) in lines[0] and str(label) in lines[0] and "shape" in lines[0]


def test_mismatched_affine_is_refused(tmp_path, liverkd_cmd):
    pred = write(tmp_path / "p.nii.gz", cube_mask((4, 4, 4)), affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    label = write(tmp_path / "l.nii.gz", cube_mask((4, 4, 4)))
    out = run(liverkd_cmd, pred, label)
    assert out.returncode != 0
    assert "affine" in out.stderr and str(pred) in out.stderr and str(label) in out.stderr


def test_bad_inputs(tmp_path, liverkd_cmd):
    label = write(tmp_path / "l.nii.gz", cube_mask((4, 4, 4)))
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("not an image\n")
    out = run(liverkd_cmd, junk, label)
    assert out.returncode != 0 and str(junk) in out.stderr

    out = run(liverkd_cmd, tmp_path, label)  # a folder and a file
    assert out.returncode != 0 and "two files or two folders" in out.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    out = run(liverkd_cmd, empty, tmp_path)
    assert out.returncode != 0 and "no masks paired" in out.stderr


def test_empty_prediction_gives_null_distances(tmp_path, liverkd_cmd):
    pred = write(tmp_path / "p.nii.gz", np.zeros((24, 24, 16)))
    label = write(tmp_path / "l.nii.gz", cube_mask((4, 4, 4)))
    out = run(liverkd_cmd, pred, label, "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["dice"] == 0.0 and record["hd95"] is None and record["assd"] is None and record["rvd"] == -1.0
