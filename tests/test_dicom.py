"""DICOM series folder -> NIfTI in memory: voxel values and world positions survive."""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")

from liverkd.core.volume import VolumeError, VolumeWarning  # noqa: E402
from liverkd.deploy.dicom import is_dicom_folder, read_series  # noqa: E402


def write_series(
    folder,
    volume,
    *,
    spacing=(0.8, 0.7),
    step=2.5,
    origin=(-120.0, -90.0, 40.0),
    iop=(1, 0, 0, 0, 1, 0),
    slope=1.0,
    intercept=-1024.0,
    series_uid=None,
    shuffle_seed=0,
    modality="CT",
    image_type=None,
    offsets=None,
    prefix="IM",
    description=None,
    number=None,
    study_uid=None,
    frame_uid=None,
):
    """Write `volume` [row, col, slice] (stored values) as one slice per file, in shuffled names.

    `offsets`: each slice's distance (mm) from `origin` along the slice normal (default k * step).
    Study and Frame of Reference UIDs are new ones unless given; `frame_uid=False` leaves it out."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = volume.shape
    row_dir, col_dir = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid() if frame_uid is None else frame_uid
    order = np.random.default_rng(shuffle_seed).permutation(n)
    offsets = np.arange(n) * step if offsets is None else np.asarray(offsets, dtype=float)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        if frame_uid:
            ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID = "Test^Patient", "P0001"
        ds.InstanceNumber = k + 1
        if description is not None:
            ds.SeriesDescription = description
        if number is not None:
            ds.SeriesNumber = number
        ds.Modality = modality
        if image_type is not None:
            ds.ImageType = list(image_type)
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = step
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + offsets[k] * normal]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].astype(np.int16)).tobytes()
        ds.save_as(folder / f"{prefix}{order[k]:04d}", enforce_file_format=True)
    return folder


def write_enhanced(
    path,
    volume,
    *,
    spacing=(0.8, 0.7),
    step=2.5,
    origin=(-120.0, -90.0, 40.0),
    slope=1.0,
    intercept=-1024.0,
    seed=0,
    positions=True,
    series_uid=None,
):
    """Write `volume` [row, col, slice] as one multi-frame Enhanced CT file, its frames in a shuffled
    order (frame f holds slice `order[f]`, returned), placed by per-frame functional groups; the
    orientation, pixel spacing and rescale shared. `positions=False` leaves the frames unplaced."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    rows, cols, n = volume.shape
    order = np.random.default_rng(seed).permutation(n)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName, ds.PatientID = "Test^Patient", "P0001"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    measures, plane, rescale, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing[0], spacing[1]], step
    plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, intercept, "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [origin[0], origin[1], origin[2] + float(k) * step]
        if positions:
            group.PlanePositionSequence = Sequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(volume[:, :, order].transpose(2, 0, 1).astype(np.int16)).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return order


def deflate_bomb(path, inflated: int):
    """Rewrite the slice at `path` deflated, with `inflated` zero bytes in a private element: a file of
    ~1/1000 that size, which pydicom inflates whole into memory before reading a tag."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.private_block(0x0009, "liverkd test", create=True).add_new(0x10, "OB", bytes(inflated))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_series_values_and_world_positions(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(12, 10, 7)).astype(np.int16)  # rows, cols, slices
    folder = write_series(tmp_path / "series", stored)
    (folder / "notes.txt").write_text("not a DICOM file")
    assert is_dicom_folder(folder)
    img = read_series(folder)
    data = np.asarray(img.dataobj)
    assert data.shape == (10, 12, 7) and data.dtype == np.int16  # [column, row, slice]
    assert np.array_equal(data, stored.transpose(1, 0, 2) - 1024)
    # voxel (i=col, j=row, k) sits at LPS origin + i*0.7*x + j*0.8*y + k*2.5*z; RAS flips x, y
    for i, j, k in [(0, 0, 0), (9, 11, 6), (3, 5, 2)]:
        lps = np.array([-120.0 + i * 0.7, -90.0 + j * 0.8, 40.0 + k * 2.5])
        assert np.allclose(img.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1])
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_oblique_series_and_fractional_rescale(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, -s, c, 0.0)
    stored = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    img = read_series(write_series(tmp_path / "s", stored, iop=iop, slope=0.5, intercept=-100.0))
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32
    assert np.allclose(data, stored.transpose(1, 0, 2) * 0.5 - 100.0)
    assert np.allclose(img.affine[:3, 0], [-c * 0.7, -s * 0.7, 0.0])


def test_largest_of_two_series_is_taken_with_a_warning(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, np.zeros((6, 6, 5), np.int16), series_uid="1.2.3.4")
    extra = write_series(tmp_path / "other", np.zeros((6, 6, 3), np.int16), series_uid="1.2.3.5")
    for p in extra.iterdir():
        p.rename(folder / ("B" + p.name))
    with pytest.warns(VolumeWarning, match="2 CT image series .*using the CT series 1.2.3.4 "):
        img = read_series(folder)
    assert img.shape == (6, 6, 5)


def test_folder_without_dicom_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    assert not is_dicom_folder(tmp_path)
    with pytest.raises(VolumeError, match="no DICOM images"):
        read_series(tmp_path)


def test_single_slice_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="single DICOM slice"):
        read_series(write_series(tmp_path / "one", np.zeros((6, 6, 1), np.int16)))


def test_segmenter_reads_a_dicom_folder(tmp_path):
    from _segment_bundle import make_bundle, synthetic_ct

    from liverkd.deploy import Segmenter

    hu = synthetic_ct((40, 36, 20))  # used as rows x cols x slices
    folder = write_series(tmp_path / "case1", hu + 1024, spacing=(6.0, 6.0), step=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter.load(make_bundle(tmp_path / "engine"), backend="onnxruntime")
    result = seg.segment_file(folder)
    assert result.output == str(tmp_path / "case1_liver.nii.gz")
    out = nib.load(result.output)
    assert out.shape == (36, 40, 20)
    assert np.allclose(out.affine, read_series(folder).affine)


# ------------------------------------------------ geometry that cannot be trusted is refused, not guessed


def _slices_by_position(folder):
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def test_an_unreadable_slice_is_refused_not_dropped(tmp_path):
    folder = write_series(tmp_path / "s", np.zeros((6, 6, 8), np.int16))
    last = _slices_by_position(folder)[-1]  # dropping an end slice leaves no gap to notice
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(VolumeError, match="unreadable DICOM file") as e:
        read_series(folder)
    assert str(last) in str(e.value)


def test_missing_slices_are_refused(tmp_path):
    offsets = [0, 2.5, 5, 7.5, 15, 17.5, 20]  # 10 and 12.5 are missing
    with pytest.raises(VolumeError, match="missing slices"):
        read_series(write_series(tmp_path / "s", np.zeros((6, 6, 7), np.int16), offsets=offsets))


def test_uneven_spacing_is_refused_and_a_slight_one_warns(tmp_path):
    uneven = [0, 2.5, 5, 7.5, 10.8, 13.3, 15.8]  # one gap of 3.3 mm in 2.5
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        read_series(write_series(tmp_path / "a", np.zeros((6, 6, 7), np.int16), offsets=uneven))
    slight = [0, 2.5, 5, 7.55, 10.05, 12.55]  # 2% off once
    with pytest.warns(VolumeWarning, match="slightly uneven"):
        img = read_series(write_series(tmp_path / "b", np.zeros((6, 6, 6), np.int16), offsets=slight))
    assert img.shape == (6, 6, 6)


def _two_series(tmp_path, first: dict, second: dict, sizes=(5, 5)):
    folder = tmp_path / "mixed"
    write_series(folder, np.zeros((6, 6, sizes[0]), np.int16), series_uid="1.2.3.4", prefix="A", **first)
    write_series(folder, np.ones((8, 8, sizes[1]), np.int16), series_uid="1.2.3.5", prefix="B", **second)
    return folder


@pytest.mark.parametrize(
    ("other", "sizes"),
    [
        ({"modality": "SEG"}, (5, 5)),  # a tie broken by file order picked the mask at HEAD
        ({"modality": "SEG"}, (5, 9)),  # the larger series is not the CT
        ({"modality": "RTSTRUCT"}, (5, 9)),
        ({"image_type": ["DERIVED", "SECONDARY"]}, (5, 5)),  # a mask saved as CT: ORIGINAL wins
        ({"image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, (5, 9)),  # a scout
    ],
    ids=["seg_tie", "seg_larger", "rtstruct_larger", "derived_tie", "localizer_larger"],
)
def test_the_ct_series_is_picked_never_a_mask_or_scout(tmp_path, other, sizes):
    folder = _two_series(tmp_path, {"image_type": ["ORIGINAL", "PRIMARY", "AXIAL"]}, other, sizes)
    with pytest.warns(VolumeWarning, match="using the CT series 1.2.3.4"):
        img = read_series(folder)
    assert img.shape == (6, 6, sizes[0])  # the other series is 8 x 8


def test_two_equal_ct_series_are_ambiguous(tmp_path):
    with pytest.raises(VolumeError, match="2 CT series of 5 slices each"):
        read_series(_two_series(tmp_path, {}, {}))


def test_a_folder_without_a_ct_series_is_refused(tmp_path):
    with pytest.raises(VolumeError, match=r"no CT image series in this folder \(found: MR \(5 files\)\)"):
        read_series(write_series(tmp_path / "mr", np.zeros((6, 6, 5), np.int16), modality="MR"))


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    import tracemalloc

    from liverkd.deploy.dicom import MAX_FILE_BYTES

    folder = write_series(tmp_path / "s", np.zeros((6, 6, 5), np.int16))
    bomb = deflate_bomb(sorted(folder.iterdir())[0], MAX_FILE_BYTES + 2**20)
    assert bomb.stat().st_size < MAX_FILE_BYTES / 100
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError, match="inflates to over") as e:
            read_series(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(bomb) in str(e.value)
    assert peak < 16e6, f"reading allocated {peak / 1e6:.0f} MB"


def test_a_small_deflated_slice_is_read(tmp_path):
    stored = np.arange(6 * 6 * 5, dtype=np.int16).reshape(6, 6, 5)
    folder = write_series(tmp_path / "s", stored)
    for path in folder.iterdir():
        deflate_bomb(path, 1000)
    assert np.array_equal(np.asarray(read_series(folder).dataobj), stored.transpose(1, 0, 2) - 1024)


def test_sizes_are_checked_before_pixels_are_decoded(tmp_path):
    folder = write_series(tmp_path / "s", np.zeros((6, 6, 5), np.int16), spacing=(0.01, 0.01))
    with pytest.raises(VolumeError, match="voxel size 0.01 x 0.01 x 2.5 mm is outside"):
        read_series(folder)
    with pytest.raises(VolumeError, match="over the limit of 100"):
        read_series(write_series(tmp_path / "t", np.zeros((6, 6, 5), np.int16)), max_voxels=100)
