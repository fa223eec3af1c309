"""The real-time CPU path gives what the plain numpy/scipy/zlib path gives (liverkd.core.accel)."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverkd.core import accel, inference
from liverkd.core import volume as V
from liverkd.core.synth import synth_case
from liverkd.deploy.segment import Segmenter
from liverkd.models import DEFAULT, path


def _smooth(shape, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    return (field - field.min()) / (field.max() - field.min())


def test_gunzip_reads_all_members_stops_at_the_limit_and_names_corruption():
    data = np.arange(300_000, dtype=np.uint16).tobytes()
    stream = gzip.compress(data[:1000]) + gzip.compress(data[1000:])
    assert accel.gunzip(stream, len(data) + 10) == data
    assert accel.gunzip(stream, 5000) == data[:5000]
    assert len(accel.gunzip(stream[:2000], len(data))) < len(data)  # truncated: short, the caller says so
    broken = bytearray(stream)
    broken[40:60] = b"\xff" * 20
    with pytest.raises(ValueError, match="corrupt gzip data"):
        accel.gunzip(bytes(broken), len(data))
    assert gzip.decompress(accel.gzip_compress([data[:7], data[7:]], 1)) == data
    with accel.plain():
        assert accel.available() == {"gzip": "zlib", "components": "scipy"}
        assert gzip.decompress(accel.gzip_compress([data], 6)) == data


@pytest.mark.parametrize("flips", [(), (0,), (1,), (0, 1), (0, 1, 2)])
def test_block_mean_of_a_view_is_the_block_mean_of_its_copy(flips):
    base = np.asfortranarray(np.random.default_rng(1).normal(size=(23, 21, 10)).astype(np.float32))
    view = base
    for axis in flips:
        view = np.flip(view, axis)
    view = view.transpose(1, 0, 2)
    step = np.array([2.6, 3.1, 1.0])
    pooled, s1, o1 = V._block_mean(view, step)
    reference, s2, o2 = V._block_mean(np.ascontiguousarray(view), step)
    np.testing.assert_allclose(pooled, reference, rtol=1e-6, atol=1e-6)
    assert np.allclose(s1, s2) and np.allclose(o1, o2)
    # and whole blocks are means of the voxels they cover, counted from index 0 of `view`
    np.testing.assert_allclose(pooled[0, 0, 0], view[:2, :3, 0].mean(), rtol=1e-5)  # k = floor(step) = 2, 3, 1


@pytest.mark.parametrize("spacing", [(0.57, 0.57, 1.6), (0.8, 0.7, 3.0), (1.0, 1.0, 5.0), (2.9, 3.0, 2.5)], ids=str)
def test_cell_threshold_equals_interpolating_every_voxel(spacing):
    grid = _smooth((30, 28, 24), seed=2)
    out_shape = tuple(int(round(n * 3.0 / s)) for n, s in zip(grid.shape, spacing))
    fast = V.resample_mask(grid, (3.0, 3.0, 3.0), spacing, out_shape, 0.5)
    with accel.plain():
        plain = V.resample_mask(grid, (3.0, 3.0, 3.0), spacing, out_shape, 0.5)
    full = V.resample(grid, (3.0, 3.0, 3.0), spacing, out_shape=out_shape) > 0.5
    assert fast.shape == out_shape and fast.dtype == np.uint8
    assert np.array_equal(plain.astype(bool), full)
    assert np.array_equal(fast.astype(bool), full)
    assert 0.05 < full.mean() < 0.95  # a surface to get right, not an all-or-nothing grid


def test_components_and_holes_match_scipy():
    mask = _smooth((40, 36, 30), seed=3, sigma=2.0) > 0.55
    mask[10:20, 10:20, 10:20] = True
    mask[14:16, 14:16, 14:16] = False  # an enclosed hole
    fast_keep = inference.fill_holes(inference.largest_component(mask))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    reference = ndimage.binary_fill_holes(labels == np.argmax(sizes))
    assert n > 1 and np.array_equal(fast_keep, reference)
    with accel.plain():
        assert np.array_equal(inference.fill_holes(inference.largest_component(mask)), reference)
    cube = np.zeros((9, 9, 9), bool)
    cube[4, 4, 4] = True
    assert np.array_equal(inference.dilate(cube), ndimage.binary_dilation(cube, np.ones((3, 3, 3), bool)))
    assert inference.bounding_box(cube, margin=1) == (slice(3, 6), slice(3, 6), slice(3, 6))
    assert inference.bounding_box(np.zeros((3, 3, 3), bool)) is None


def test_saved_mask_reads_back_with_nibabel(tmp_path):
    mask = np.asfortranarray((_smooth((50, 40, 30), seed=4) > 0.5).astype(np.uint8))
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    out = V.save(V.to_nifti(mask, affine), tmp_path / "m.nii.gz")
    img = nib.load(out)
    assert np.array_equal(np.asanyarray(img.dataobj), mask) and np.allclose(img.affine, affine)


def test_fast_and_plain_segmenters_write_the_same_mask_on_an_lps_ct(tmp_path):
    """The whole file-to-file path, on an LPS CT stored F order as NIfTI is (flips on the way)."""
    image, _ = synth_case(9, shape=(56, 56, 44), spacing=5.0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image.array[::-1, ::-1], lps), ct)
    with Segmenter.load(path(DEFAULT)) as seg:
        fast = seg.segment_file(ct, tmp_path / "fast.nii.gz")
        with accel.plain():
            plain = seg.segment_file(ct, tmp_path / "plain.nii.gz")
    a = np.asanyarray(nib.load(fast.output).dataobj)
    b = np.asanyarray(nib.load(plain.output).dataobj)
    assert a.any() and a.shape == nib.load(ct).shape
    assert np.array_equal(a, b)
    assert np.array_equal(nib.load(fast.output).affine, nib.load(ct).affine)
