"""liverkd.core.datasets: every layout written exactly as the real data sets ship, and each error."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from liverkd.core.datasets import Case, DatasetError, discover, load_case

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _nifti(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _pair(image_path, label_path, value=1, shape=(6, 5, 4)):
    image = np.full(shape, -1000, np.int16)
    image[1:4, 1:4, 1:3] = 60
    label = np.zeros(shape, np.uint8)
    label[1:4, 1:4, 1:3] = 1
    label[2, 2, 1] = value  # MSD / LiTS tumour = 2
    _nifti(image_path, image)
    if label_path is not None:
        _nifti(label_path, label)


def _junk(path):
    """The '._' AppleDouble files of the MSD archives: not NIfTI at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x05\x16\x07junk")


def _msd(root, n=2, with_test=True):
    training, test = [], []
    for i in range(n):
        _pair(root / "imagesTr" / f"liver_{i}.nii.gz", root / "labelsTr" / f"liver_{i}.nii.gz", value=2)
        _junk(root / "imagesTr" / f"._liver_{i}.nii.gz")
        _junk(root / "labelsTr" / f"._liver_{i}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    if with_test:
        _pair(root / "imagesTs" / "liver_99.nii.gz", None)
        test.append("./imagesTs/liver_99.nii.gz")
    meta = {
        "name": "Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": n,
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ---------------------------------------------------------------- layouts


def test_msd(tmp_path):
    root = _msd(tmp_path / "Task03_Liver")
    cases = discover(root)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]
    assert cases[0] == Case("liver_0", root / "./imagesTr/liver_0.nii.gz", root / "./labelsTr/liver_0.nii.gz")
    assert discover(root / "dataset.json") == cases
    image, label = load_case(cases[1])
    assert image.shape == label.shape == (6, 5, 4)
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1}  # tumour (2) is liver
    assert label.array.sum() == 18
    with_test = discover(root, require_labels=False)
    assert [c.case_id for c in with_test] == ["liver_0", "liver_1", "liver_99"]
    assert with_test[-1].label is None


def test_msd_without_dataset_json_pairs_by_name(tmp_path):
    root = _msd(tmp_path / "msd")
    (root / "dataset.json").unlink()
    cases = discover(root)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]  # "._" junk ignored
    assert cases[0].label == root / "labelsTr" / "liver_0.nii.gz"


def test_lits_in_subfolders(tmp_path):
    for n, folder in ((0, "Training Batch 1"), (2, "Training Batch 1"), (10, "Training Batch 2")):
        suffix = ".nii.gz" if n == 10 else ".nii"
        _pair(tmp_path / folder / f"volume-{n}{suffix}", tmp_path / folder / f"segmentation-{n}{suffix}", value=2)
    _pair(tmp_path / "test" / "test-volume-0.nii", None)  # the LiTS test set: not a training case
    cases = discover(tmp_path)
    assert [c.case_id for c in cases] == ["volume-0", "volume-2", "volume-10"]
    assert cases[2].label == tmp_path / "Training Batch 2" / "segmentation-10.nii.gz"
    _, label = load_case(cases[2])
    assert label.array.max() == 1


def test_totalsegmentator(tmp_path):
    for case in ("s0001", "s0002"):
        _pair(tmp_path / case / "ct.nii.gz", tmp_path / case / "segmentations" / "liver.nii.gz")
        _nifti(tmp_path / case / "segmentations" / "spleen.nii.gz", np.zeros((6, 5, 4), np.uint8))
    (tmp_path / "meta.csv").write_text("image_id;age\ns0001;60\ns0002;70\n")
    cases = discover(tmp_path)
    assert [c.case_id for c in cases] == ["s0001", "s0002"]
    assert cases[1].image == tmp_path / "s0002" / "ct.nii.gz"
    assert cases[1].label == tmp_path / "s0002" / "segmentations" / "liver.nii.gz"
    assert load_case(cases[0])[1].array.sum() == 18


def test_csv_list(tmp_path):
    _pair(tmp_path / "data" / "a.nii.gz", tmp_path / "data" / "a_seg.nii.gz")
    _pair(tmp_path / "data" / "b.nii", tmp_path / "data" / "b_seg.nii")
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = ["image,label", "../data/a.nii.gz,../data/a_seg.nii.gz", "../data/b.nii,../data/b_seg.nii"]
    (lists / "cases.csv").write_text("\n".join(rows) + "\n")
    cases = discover(lists / "cases.csv")
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[1].label == (tmp_path / "data" / "b_seg.nii").resolve()
    (lists / "ids.csv").write_text("id,image,label\nfirst,../data/a.nii.gz,../data/a_seg.nii.gz\n")
    assert discover(lists / "ids.csv")[0].case_id == "first"
    assert load_case(discover(lists / "ids.csv")[0])[1].array.sum() == 18


def test_json_list(tmp_path):
    _pair(tmp_path / "img" / "x.nii.gz", tmp_path / "lab" / "x.nii.gz")
    (tmp_path / "cases.json").write_text(json.dumps([{"image": "img/x.nii.gz", "label": "lab/x.nii.gz"}]))
    cases = discover(tmp_path / "cases.json")
    assert len(cases) == 1 and cases[0].case_id == "x"
    (tmp_path / "wrapped.json").write_text(json.dumps({"cases": [{"id": "k", "image": "img/x.nii.gz"}]}))
    assert discover(tmp_path / "wrapped.json", require_labels=False)[0] == Case(
        "k", (tmp_path / "img" / "x.nii.gz").resolve(), None
    )


def test_phantom_dataset_is_msd(tmp_path):
    from liverkd.core.synth import write_dataset

    pairs = write_dataset(tmp_path, 2, seed=1, shape=(24, 24, 24), progress=False)
    cases = discover(tmp_path)
    assert [(c.image.resolve(), c.label.resolve()) for c in cases] == [(a.resolve(), b.resolve()) for a, b in pairs]
    image, label = load_case(cases[0])
    assert image.shape == label.shape == (24, 24, 24)


# ---------------------------------------------------------------- errors


def _error(path, match, **kwargs) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        discover(path, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_missing_and_empty(tmp_path):
    assert _error(tmp_path / "nope", "no such file").startswith(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _error(empty, "empty folder")
    _junk(empty / "._volume-0.nii")
    _error(empty, "empty folder")  # only AppleDouble junk
    other = tmp_path / "other"
    _nifti(other / "scan.nii.gz", np.zeros((4, 4, 4), np.int16))
    assert str(other) in _error(other, "no known data set layout")
    (tmp_path / "notes.txt").write_text("x")
    _error(tmp_path / "notes.txt", "not a data set")


def test_msd_missing_label_names_it(tmp_path):
    root = _msd(tmp_path / "msd")
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    text = _error(root, "label of case liver_1 does not exist")
    assert "liver_1.nii.gz" in text and "dataset.json" in text
    assert [c.label for c in discover(root, require_labels=False)][1] is None
    (root / "imagesTr" / "liver_0.nii.gz").unlink()
    assert "imagesTr/liver_0.nii.gz" in _error(root, "image of case liver_0 does not exist")


def test_msd_bad_dataset_json(tmp_path):
    root = _msd(tmp_path / "msd")
    (root / "dataset.json").write_text("{not json")
    assert str(root / "dataset.json") in _error(root, "not valid JSON")
    (root / "dataset.json").write_text(json.dumps({"name": "x"}))
    _error(root, '"training"')


def test_lits_missing_segmentation(tmp_path):
    _pair(tmp_path / "volume-0.nii", tmp_path / "segmentation-0.nii")
    _pair(tmp_path / "volume-1.nii", None)
    assert str(tmp_path / "segmentation-1.nii") in _error(tmp_path, "label of case volume-1 does not exist")
    _pair(tmp_path / "extra" / "segmentation-7.nii", None)
    _error(tmp_path, "no volume-7.nii")


def test_totalsegmentator_missing_liver(tmp_path):
    _pair(tmp_path / "s0001" / "ct.nii.gz", tmp_path / "s0001" / "segmentations" / "liver.nii.gz")
    _pair(tmp_path / "s0002" / "ct.nii.gz", None)
    text = _error(tmp_path, "label of case s0002 does not exist")
    assert str(tmp_path / "s0002" / "segmentations" / "liver.nii.gz") in text


def test_list_errors(tmp_path):
    _pair(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz")
    (tmp_path / "nocol.csv").write_text("path,mask\na.nii.gz,a_seg.nii.gz\n")
    assert str(tmp_path / "nocol.csv") in _error(tmp_path / "nocol.csv", "no 'image' column")
    (tmp_path / "gone.csv").write_text("image,label\nmissing.nii.gz,a_seg.nii.gz\n")
    text = _error(tmp_path / "gone.csv", "image of case missing does not exist")
    assert "missing.nii.gz" in text and "gone.csv" in text
    (tmp_path / "nolabel.csv").write_text("image,label\na.nii.gz,\n")
    _error(tmp_path / "nolabel.csv", "no label given for case a")
    assert discover(tmp_path / "nolabel.csv", require_labels=False)[0].label is None
    (tmp_path / "empty.csv").write_text("image,label\n")
    _error(tmp_path / "empty.csv", "no rows")
    (tmp_path / "twice.csv").write_text("image,label\na.nii.gz,a_seg.nii.gz\na.nii.gz,a_seg.nii.gz\n")
    _error(tmp_path / "twice.csv", "listed twice")
    (tmp_path / "obj.json").write_text(json.dumps({"image": "a.nii.gz"}))
    _error(tmp_path / "obj.json", "expected a JSON list")


def test_load_case_checks_the_grid(tmp_path):
    _pair(tmp_path / "img.nii.gz", None)
    _nifti(tmp_path / "small.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"label shape \(6, 5, 3\) does not match image shape \(6, 5, 4\)") as info:
        load_case(Case("c", tmp_path / "img.nii.gz", tmp_path / "small.nii.gz"))
    assert str(info.value).startswith(str(tmp_path / "small.nii.gz"))
    shifted = AFFINE.copy()
    shifted[0, 3] = 10.0
    _nifti(tmp_path / "shifted.nii.gz", np.zeros((6, 5, 4), np.uint8), affine=shifted)
    with pytest.raises(DatasetError, match="affine differs") as info:
        load_case(Case("c", tmp_path / "img.nii.gz", tmp_path / "shifted.nii.gz"))
    assert str(tmp_path / "shifted.nii.gz") in str(info.value)
    with pytest.raises(DatasetError, match="has no label"):
        load_case(Case("c", tmp_path / "img.nii.gz", None))


def test_cli_data_check(tmp_path, liverkd_cmd):
    root = _msd(tmp_path / "msd", n=1)
    ok = subprocess.run([*liverkd_cmd, "data", "check", str(root)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "liver_0" in ok.stdout and "6x5x4" in ok.stdout
    (root / "labelsTr" / "liver_0.nii.gz").unlink()
    bad = subprocess.run([*liverkd_cmd, "data", "check", str(root)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "liver_0.nii.gz" in bad.stderr
