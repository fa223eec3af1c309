"""DICOM SEG out (issue 16, part 1): `liverkd infer DICOM --format dicom-seg` writes a BINARY
Segmentation that references the source series and reads back (highdicom) to exactly the voxels
of the NIfTI mask the same model writes. Every file is written here with pydicom; the packaged
model segments (ONNX Runtime, no torch)."""

import json
import logging
import subprocess

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")
hd = pytest.importorskip("highdicom", reason="the optional extra `dicom` (highdicom) is not installed")

from test_dicom import write_enhanced, write_series  # noqa: E402

import liverkd  # noqa: E402
from liverkd.deploy.dicom import find_series, load_series  # noqa: E402
from liverkd.deploy.dicom_seg import write_seg  # noqa: E402

GRID = {"spacing": (6.0, 6.0), "step": 6.0}


def infer(liverkd_cmd, *args):
    cmd = [*liverkd_cmd, "infer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def phantom(folder):
    """A synthetic abdomen (liverkd.core.synth, 64 x 64 x 48 at 3 mm): HU and RAS affine."""
    from liverkd.core.synth import write_dataset

    ((image, _),) = write_dataset(folder, 1, seed=3, shape=(64, 64, 48), spacing=3.0)
    img = nib.load(image)
    return np.asarray(img.dataobj).astype(np.int16), img.affine


def phantom_series(folder):
    """The phantom as a CT series whose NIfTI reading is the phantom itself (RAS): rows run along
    -x of LPS, columns along -y."""
    hu, affine = phantom(folder.parent / "phantom")
    origin = affine[:3, 3] * [-1, -1, 1]  # RAS -> LPS
    write_series(folder, (hu + 1024).transpose(1, 0, 2), spacing=(3.0, 3.0), step=3.0, origin=tuple(origin),
                 iop=(-1, 0, 0, 0, -1, 0), series_uid=pydicom.uid.generate_uid())  # fmt: skip
    return folder


def sources_in_slice_order(folder):
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()]
    return sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))


def test_dicom_seg_round_trip_through_the_cli(liverkd_cmd, tmp_path):
    folder = phantom_series(tmp_path / "ct")
    proc = infer(liverkd_cmd, folder, "--format", "dicom-seg", "--json")  # the packaged model
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]
    out = tmp_path / "ct_liver_seg.dcm"
    assert line["output"] == str(out)
    proc = infer(liverkd_cmd, folder, "--json")
    assert proc.returncode == 0, proc.stderr
    mask = np.asarray(nib.load(tmp_path / "ct_liver.nii.gz").dataobj)  # [column, row, slice]
    assert mask.any()
    assert not [p for p in files_under(tmp_path) if ".tmp" in p]

    seg = hd.seg.segread(out)
    sources = sources_in_slice_order(folder)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    coded = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning) == ("10200004", "SCT", "Liver")
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodeMeaning) == ("123037004", "Anatomical Structure")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("liverkd", liverkd.__version__)

    voxels = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]  # [slice, row, column]
    assert voxels.shape == mask.transpose(2, 1, 0).shape
    assert np.array_equal(voxels, mask.transpose(2, 1, 0))


def test_a_multi_frame_source_is_referenced_frame_by_frame(tmp_path):
    from liverkd import Segmenter, models
    from liverkd.deploy.dicom_infer import segment_series

    ct, _ = phantom(tmp_path / "phantom")
    order = write_enhanced(tmp_path / "enhanced.dcm", (ct + 1024).transpose(1, 0, 2), spacing=(3.0, 3.0), step=3.0)
    (series,) = find_series(tmp_path / "enhanced.dcm")
    with Segmenter.load(models.path(), backend="onnxruntime") as seg:
        segment_series(seg, series, tmp_path / "m.nii.gz", fmt="nifti")
        result = segment_series(seg, series, tmp_path / "m_seg.dcm", fmt="dicom-seg", stats=True)
    assert result.stats == str(tmp_path / "m_seg.json")
    assert json.loads((tmp_path / "m_seg.json").read_text())["series"] == series.uid
    mask = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    assert mask.any()
    frames = hd.seg.segread(tmp_path / "m_seg.dcm").get_pixels_by_source_frame(
        series.header.SOPInstanceUID, list(range(1, len(order) + 1)), assert_missing_frames_are_empty=True
    )[..., 0]
    assert np.array_equal(frames, np.stack([mask[:, :, k].T for k in order]))  # frame f holds slice order[f]


def test_an_empty_mask_is_a_valid_seg_and_says_nothing(tmp_path, caplog):
    folder = write_series(tmp_path / "s", np.full((6, 5, 4), 1000, np.int16), **GRID)
    (series,) = find_series(folder)
    img, planes = load_series(series)
    with caplog.at_level(logging.WARNING):
        write_seg(np.zeros(img.shape, np.uint8), planes, tmp_path / "empty.dcm", model="m", version="0")
    assert not caplog.records
    seg = hd.seg.segread(tmp_path / "empty.dcm")
    assert seg.NumberOfFrames == 4 and not seg.pixel_array.any()


def test_what_a_seg_cannot_be_made_of_is_one_line_and_nothing_is_written(liverkd_cmd, tmp_path):
    from _segment_bundle import nifti, synthetic_ct

    ct = synthetic_ct((40, 36, 20)) + 1024
    nib.save(nifti(synthetic_ct((40, 36, 20))), tmp_path / "ct.nii.gz")
    unplaced = write_series(tmp_path / "no_frame_of_reference", ct, frame_uid=False, **GRID)
    good = write_series(tmp_path / "good", ct, **GRID)
    before = files_under(tmp_path)
    proc = infer(liverkd_cmd, tmp_path / "ct.nii.gz", unplaced, good, "--format", "dicom-seg", "--stats")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    first = sorted(unplaced.iterdir())[0]
    assert errors == [
        f"error: {tmp_path / 'ct.nii.gz'}: a DICOM SEG references the source DICOM images; "
        "this input is not DICOM (--format nifti)",
        f"error: {unplaced}: {first}: no FrameOfReferenceUID: a DICOM SEG cannot reference this image",
    ]
    assert sorted(set(files_under(tmp_path)) - set(before)) == ["good_liver_seg.dcm", "good_liver_seg.json"]

    for args, problem in [
        (["-o", tmp_path / "x.nii.gz", "--format", "dicom-seg"], "--format dicom-seg writes .dcm files"),
        (["--format", "rtstruct"], "--format rtstruct: one of nifti, dicom-seg"),
    ]:
        proc = infer(liverkd_cmd, good, *args)
        assert proc.returncode == 2 and problem in proc.stderr, proc.stderr
