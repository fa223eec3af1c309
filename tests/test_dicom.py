"""DICOM series folder -> NIfTI in memory: voxel values and world positions survive."""

import warnings

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
):
    """Write `volume` [row, col, slice] (stored values) as one CT slice per file, in shuffled names."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = volume.shape
    row_dir, col_dir = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(shuffle_seed).permutation(n)
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
        ds.Modality = "CT"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + k * step * normal]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].astype(np.int16)).tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}", enforce_file_format=True)
    return folder


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
    with pytest.warns(VolumeWarning, match="2 DICOM series"):
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
