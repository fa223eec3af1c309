"""DICOM in (issue 16, part 2): series found below a folder (PATIENT/STUDY/SERIES), `--series UID`,
one output per image series, a single .dcm file, multi-frame Enhanced CT, and never a mask series;
each bad input one line. Every file is written here with pydicom; `liverkd infer` runs as a user
runs it, with the packaged model (ONNX Runtime, no torch)."""

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import synthetic_ct

pydicom = pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")

from test_dicom import write_enhanced, write_series  # noqa: E402

from liverkd.core.volume import VolumeError, VolumeWarning  # noqa: E402
from liverkd.deploy.dicom import find_series, pick_image_series, read_series  # noqa: E402

GRID = {"spacing": (6.0, 6.0), "step": 6.0}
CT_TYPE = ["ORIGINAL", "PRIMARY", "AXIAL"]


def stored_ct(n=20, seed=0):
    """A CT's stored values (HU + 1024) as [row, column, slice]."""
    return synthetic_ct((40, 36, n), seed=seed) + 1024


def infer(liverkd_cmd, *args):
    cmd = [*liverkd_cmd, "infer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def pacs_export(root):
    """export/PAT1/STUDY1/{CT20,CT16,SEG}: two CT series of different sizes and a SEG-modality one."""
    study = root / "export" / "PAT1" / "STUDY1"
    write_series(study / "CT20", stored_ct(20), series_uid="1.2.826.0.1.20", image_type=CT_TYPE, **GRID)
    write_series(study / "CT16", stored_ct(16, seed=1), series_uid="1.2.826.0.1.16", image_type=CT_TYPE, **GRID)
    write_series(study / "SEG", np.zeros((40, 36, 20), np.int16), series_uid="1.2.826.0.1.99", modality="SEG")
    (study / "notes.txt").write_text("not a DICOM file")
    return root / "export", study


# ------------------------------------------------ finding series, one output each


def test_nested_series_are_found_and_each_gets_its_own_output(liverkd_cmd, tmp_path):
    export, study = pacs_export(tmp_path)
    assert [s.uid for s in find_series(export)] == ["1.2.826.0.1.16", "1.2.826.0.1.20", "1.2.826.0.1.99"]
    proc = infer(liverkd_cmd, export, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["input"] for d in lines] == [f"{export} (series 1.2.826.0.1.16)", f"{export} (series 1.2.826.0.1.20)"]
    for d, n, folder in zip(lines, (16, 20), ("CT16", "CT20")):
        assert d["output"] == str(tmp_path / f"export_1.2.826.0.1.{n}_liver.nii.gz")
        mask, ct = nib.load(d["output"]), read_series(study / folder)
        assert mask.shape == ct.shape == (36, 40, n) and np.array_equal(mask.affine, ct.affine)
    assert "series 1.2.826.0.1.99: Modality SEG" in proc.stderr  # said once per output, as a warning
    assert not error_lines(proc.stderr)


def test_series_picks_one_and_a_wrong_uid_is_one_line(liverkd_cmd, tmp_path):
    export, _ = pacs_export(tmp_path)
    proc = infer(liverkd_cmd, export, "--series", "1.2.826.0.1.16", "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]
    assert line["output"] == str(tmp_path / "export_liver.nii.gz")
    assert nib.load(line["output"]).shape == (36, 40, 16)

    before = files_under(tmp_path)
    for uid, problem in [
        ("9.9.9", "no series 9.9.9 here (found: 1.2.826.0.1.16, 1.2.826.0.1.20, 1.2.826.0.1.99)"),
        ("1.2.826.0.1.99", "series 1.2.826.0.1.99 is not a CT image series: Modality SEG"),
    ]:
        proc = infer(liverkd_cmd, export, "--series", uid)
        assert proc.returncode == 1, proc.stderr
        assert error_lines(proc.stderr) == [f"error: {export}: {problem}"]
        assert "Traceback" not in proc.stderr
    assert files_under(tmp_path) == before


def test_python_api_reads_a_nested_folder_and_a_chosen_series(tmp_path):
    export, study = pacs_export(tmp_path)
    with pytest.warns(VolumeWarning) as caught:
        assert read_series(export).shape == (36, 40, 20)  # the larger of two
    said = [str(w.message) for w in caught]
    assert any("left out series 1.2.826.0.1.99: Modality SEG" in m for m in said), said
    picked = "2 CT image series (CT (20 files), CT (16 files)); using the CT series 1.2.826.0.1.20 (20 slices)"
    assert any(picked in m for m in said), said
    assert read_series(export, series="1.2.826.0.1.16").shape == (36, 40, 16)


# ------------------------------------------------ a single file, multi-frame Enhanced CT


def test_enhanced_ct_and_a_single_slice_file(liverkd_cmd, tmp_path):
    ct = stored_ct(20)
    order = write_enhanced(tmp_path / "enhanced.dcm", ct, **GRID)
    assert list(order) != sorted(order)  # frames out of slice order: placed by their functional groups
    folder = write_series(tmp_path / "slices", ct, **GRID)
    a, b = read_series(tmp_path / "enhanced.dcm"), read_series(folder)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)

    proc = infer(liverkd_cmd, tmp_path / "enhanced.dcm", folder, "--json")
    assert proc.returncode == 0, proc.stderr
    outputs = [json.loads(s)["output"] for s in proc.stdout.splitlines()]
    assert outputs == [str(tmp_path / "enhanced_liver.nii.gz"), str(tmp_path / "slices_liver.nii.gz")]
    masks = [nib.load(p) for p in outputs]
    assert np.array_equal(masks[0].get_fdata(), masks[1].get_fdata()) and masks[0].get_fdata().any()

    one_slice = sorted(folder.iterdir())[3]  # one file of the series stands for the series
    proc = infer(liverkd_cmd, one_slice, one_slice, "-o", tmp_path / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]  # named twice, segmented once
    assert line["output"] == str(tmp_path / "out" / "slices_liver.nii.gz")
    assert np.array_equal(nib.load(line["output"]).get_fdata(), masks[1].get_fdata())


# ------------------------------------------------ never the mask series


def test_a_mask_series_beside_its_ct_is_never_segmented(liverkd_cmd, tmp_path):
    """HEAD: a CT and a mask saved as CT, same size, one folder: the pick followed the file names."""
    folder = tmp_path / "case"
    ct = stored_ct(20)
    label = (ct > 1024 + 60).astype(np.int16)  # 0/1, stored like a slice of a CT
    write_series(folder, ct, series_uid="1.2.3.1", image_type=CT_TYPE, prefix="B", intercept=-1024.0, **GRID)
    write_series(folder, label, series_uid="1.2.3.2", image_type=CT_TYPE, prefix="A", intercept=0.0, **GRID)
    proc = infer(liverkd_cmd, folder, "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]
    assert line["output"] == str(tmp_path / "case_liver.nii.gz")
    assert line["mean_hu"] is not None and line["mean_hu"] > 20  # the CT's HU, not a label map's 0/1
    assert "series 1.2.3.2: pixel values only 0 and 1: a label map, not a CT image" in proc.stderr
    assert "using the CT series 1.2.3.1" in proc.stderr


def _pair(tmp_path, values=None, **mask):
    """A CT (series 1.2.3.1) and a second series of its size (1.2.3.2, its files first) in one folder."""
    folder = tmp_path / "pair"
    ct = stored_ct(20)
    write_series(folder, ct, series_uid="1.2.3.1", image_type=CT_TYPE, prefix="B", **GRID)
    values = ((ct > 1084) * 255).astype(np.int16) if values is None else values
    kw = {"series_uid": "1.2.3.2", "image_type": CT_TYPE, "prefix": "A", "intercept": 0.0, **GRID, **mask}
    write_series(folder, values, **kw)
    return folder


@pytest.mark.parametrize(
    ("mask", "why", "choosable"),
    [
        ({}, "pixel values only 0 and 255: a label map", False),
        (
            {"values": np.full((40, 36, 20), 7, np.int16), "description": "Liver mask"},
            "marked as a segmentation",
            False,
        ),
        ({"values": stored_ct(20, seed=4), "image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "a localizer", False),
        ({"values": stored_ct(20, seed=4), "image_type": ["DERIVED", "SECONDARY"]}, "DERIVED beside an ORIGINAL", True),
    ],
    ids=["values_0_255", "description", "localizer", "derived"],
)
def test_what_is_not_an_image_series_is_left_out(tmp_path, mask, why, choosable):
    folder = _pair(tmp_path, **mask)
    (chosen,) = pick_image_series(find_series(folder), folder)
    assert chosen.uid == "1.2.3.1"
    assert "series 1.2.3.2" in chosen.notes[0] and why in chosen.notes[0], chosen.notes
    if choosable:  # a derived CT (a reformat) is an image: --series takes it
        assert [s.uid for s in pick_image_series(find_series(folder), folder, series="1.2.3.2")] == ["1.2.3.2"]
    else:
        with pytest.raises(VolumeError, match=f"series 1.2.3.2 .*is not a CT image series: .*{why}"):
            pick_image_series(find_series(folder), folder, series="1.2.3.2")


def test_a_chosen_label_map_is_refused_when_read(tmp_path):
    """The sampled slices may miss a mask's one labelled slice; reading the whole series does not."""
    label = np.zeros((40, 36, 30), np.int16)
    label[10:20, 10:20, 14] = 1  # one labelled slice, between the sampled ones
    folder = write_series(tmp_path / "m", label, intercept=0.0, **GRID)
    with pytest.raises(VolumeError, match="pixel values only 0 and 1: a label map"):
        read_series(folder)


def test_a_pair_that_cannot_be_told_apart_is_refused_naming_folder_and_series(liverkd_cmd, tmp_path):
    folder = _pair(tmp_path, values=((stored_ct(20) > 1084) * 1000).astype(np.int16))  # a mask of 0/1000
    before = files_under(tmp_path)
    proc = infer(liverkd_cmd, folder)
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: {folder}: 2 CT series of 20 slices each (series 1.2.3.2, series 1.2.3.1): "
        "ambiguous; pick one (--series UID)"
    ]
    assert files_under(tmp_path) == before
    proc = infer(liverkd_cmd, folder, "--series", "1.2.3.1")
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------ bad inputs: one line each, nothing written


def test_bad_dicom_inputs_are_one_line_each_and_the_rest_runs(liverkd_cmd, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset

    bad = tmp_path / "bad"
    unplaced = bad / "unplaced.dcm"
    write_enhanced(unplaced, stored_ct(6), positions=False, **GRID)
    plain = bad / "plain_multiframe.dcm"
    write_enhanced(plain, stored_ct(6), **GRID)
    ds = pydicom.dcmread(plain)
    del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
    ds.save_as(plain)
    text = bad / "notes.dcm"
    text.write_text("this is not DICOM\n" * 20)
    one = write_series(bad / "one", stored_ct(1), **GRID)
    index = bad / "DICOMDIR"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", "1.2.3.9"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    directory = Dataset()
    directory.file_meta = meta
    directory.save_as(index, enforce_file_format=True)
    good = write_series(tmp_path / "good", stored_ct(20), **GRID)
    before = files_under(bad)

    proc = infer(liverkd_cmd, unplaced, plain, text, one, index, good)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: {unplaced}: frame 1 has no plane position, orientation or pixel spacing",
        f"error: {plain}: multi-frame DICOM without per-frame functional groups; not supported",
        f"error: {text}: unreadable DICOM file (" + error_lines(proc.stderr)[2].split(" file (", 1)[-1],
        f"error: {one}: {sorted(one.iterdir())[0]}: a single DICOM slice; a 3-D series is needed",
        f"error: {index}: a DICOMDIR (an index of files), not an image; give its folder",
    ]
    assert proc.stderr.splitlines()[-1] == "1 of 6 volumes segmented, 5 failed"
    assert files_under(bad) == before
    assert (tmp_path / "good_liver.nii.gz").is_file()
