"""The real-time CPU path gives what the plain numpy/scipy/zlib path gives (liverkd.core.accel)."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverkd.core import accel, inference
from liverkd.core import volume as V
from liverkd.core.synth import scanner_grid_case, synth_case
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


@pytest.mark.parametrize("flip", [(False, False, False), (True, True, False), (False, True, True)], ids=str)
@pytest.mark.parametrize("spacing", [(0.57, 0.57, 1.6), (0.8, 0.7, 3.0), (1.0, 1.0, 5.0), (2.9, 3.0, 2.5)], ids=str)
def test_cell_threshold_equals_interpolating_every_voxel(spacing, flip):
    grid = _smooth((30, 28, 24), seed=2)
    out_shape = tuple(int(round(n * 3.0 / s)) for n, s in zip(grid.shape, spacing))
    fast = V.resample_mask(grid, (3.0, 3.0, 3.0), spacing, out_shape, 0.5, flip=flip)
    with accel.plain():
        plain = V.resample_mask(grid, (3.0, 3.0, 3.0), spacing, out_shape, 0.5, flip=flip)
    values = V.resample(grid, (3.0, 3.0, 3.0), spacing, out_shape=out_shape)
    values = values[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]
    full = values > 0.5
    assert fast.shape == out_shape and fast.dtype == np.uint8
    assert fast.flags.f_contiguous or max(spacing) > 3.0  # upsampling writes NIfTI's order, flips included
    assert np.array_equal(plain.astype(bool), full)
    # The fast path interpolates only straddling cells, in float64 as scipy does: a voxel may
    # differ only where its value is the threshold to within rounding (none did on any input so far).
    differ = fast.astype(bool) != full
    assert np.all(np.abs(values[differ] - 0.5) < 1e-6)
    assert differ.sum() <= 2
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


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_gunzip_in_pieces_is_gunzip(chunk):
    data = np.random.default_rng(0).integers(0, 4, 9000, dtype=np.uint8).tobytes()
    stream = gzip.compress(data[:3000]) + gzip.compress(data[3000:])  # two members
    assert b"".join(accel.gunzip_chunks(stream, len(data) + 10, chunk)) == data
    assert b"".join(accel.gunzip_chunks(stream, 5000, chunk)) == data[:5000]
    assert len(b"".join(accel.gunzip_chunks(stream[:2000], len(data), chunk))) < len(data)
    with pytest.raises(ValueError, match="corrupt gzip"):
        b"".join(accel.gunzip_chunks(stream[:20] + b"\xff" * 50 + stream[70:], len(data), chunk))


# (axis codes, spacing): flips of every axis, the slowest one included, and blocks along it (k_z > 1)
ORIENTED = [("RAS", (0.7, 0.8, 0.9)), ("LPS", (0.57, 0.57, 1.6)), ("LPI", (0.9, 0.7, 0.8)), ("RPI", (0.6, 1.1, 0.7))]


def _oriented_ct(folder, codes, spacing, shape=(70, 64, 40)):
    array, _ = scanner_grid_case(5, shape, spacing)
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = np.diag([*(s * f for s, f in zip(spacing, ornt[:, 1])), 1.0])
    path = folder / f"{codes}.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.mark.parametrize("codes,spacing", ORIENTED, ids=[c for c, _ in ORIENTED])
def test_streamed_load_sums_the_blocks_block_mean_sums(tmp_path, monkeypatch, codes, spacing):
    """load(grid_spacing=) inflates in pieces and sums the blocks on a second thread: the voxels and
    the block mean are those of a plain load and _block_mean, whatever the orientation."""
    monkeypatch.setattr(V, "GZ_PIECE_BYTES", 4096)  # many pieces, block rows split across them
    ct = _oriented_ct(tmp_path, codes, spacing)
    fast = V.load(ct, grid_spacing=(3.0, 3.0, 3.0))
    with accel.plain():
        plain = V.load(ct, grid_spacing=(3.0, 3.0, 3.0))
    assert fast.pooled is not None and plain.pooled is None
    assert np.array_equal(fast.array, plain.array) and not fast.array.flags.writeable
    view, affine, _ = V.to_canonical(plain.array, plain.affine)
    reference = V._block_mean(view, np.array([3.0] * 3) / np.array(V.spacing_of(affine)))
    pooled = fast.block_mean_for((3.0, 3.0, 3.0))
    assert np.array_equal(pooled[0], reference[0]) and np.allclose(pooled[1], reference[1])
    assert np.allclose(pooled[2], reference[2])
    assert fast.block_mean_for((2.0, 3.0, 3.0)) is None  # for another grid it sums again


def test_a_truncated_file_read_in_pieces_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "GZ_PIECE_BYTES", 4096)
    ct = _oriented_ct(tmp_path, "LPS", (0.57, 0.57, 1.6))
    data = ct.read_bytes()
    ct.write_bytes(data[: len(data) // 2])
    with pytest.raises(V.VolumeError, match="truncated"):
        V.load(ct, grid_spacing=(3.0, 3.0, 3.0))


def _lps_ct(folder):
    image, _ = synth_case(9, shape=(56, 56, 44), spacing=5.0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    ct = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image.array[::-1, ::-1], lps), ct)
    return ct


@pytest.mark.parametrize(
    "make_ct",
    [
        _lps_ct,  # coarse voxels: no blocks to sum, the mask downsampled back to 5 mm
        # fine voxels, every axis flipped: blocks summed while reading, straddling cells upsampled
        lambda folder: _oriented_ct(folder, "LPI", (1.45, 1.45, 1.4), shape=(200, 200, 200)),
    ],
    ids=["lps-5mm", "lpi-1.4mm"],
)
def test_fast_and_plain_segmenters_write_the_same_mask(tmp_path, make_ct):
    """The whole file-to-file path, on CTs stored F order as NIfTI is (flips on the way)."""
    ct = make_ct(tmp_path)
    with Segmenter.load(path(DEFAULT)) as seg:
        fast = seg.segment_file(ct, tmp_path / "fast.nii.gz")
        with accel.plain():
            plain = seg.segment_file(ct, tmp_path / "plain.nii.gz")
    a = np.asanyarray(nib.load(fast.output).dataobj)
    b = np.asanyarray(nib.load(plain.output).dataobj)
    assert a.any() and a.shape == nib.load(ct).shape
    assert (a != b).sum() <= 2  # the straddling cells' float64 lerps vs scipy's: none differed so far
    assert np.array_equal(nib.load(fast.output).affine, nib.load(ct).affine)
