import bz2
import gzip
import math
import struct
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest

from liverkd.core import preprocess as P
from liverkd.core import volume as V
from liverkd.core.metrics import dice
from liverkd.core.spec import PreprocessSpec

TO_2MM = PreprocessSpec(spacing=(2.0, 2.0, 2.0))


def rotation_z(degrees):
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])


def make_affine(columns, origin=(10.0, -20.0, 30.0)):
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = origin
    return affine


LPS = make_affine(np.diag([-2.0, -3.0, 4.0]))
PERMUTED = make_affine(np.array([[0, 0, -1.5], [2.0, 0, 0], [0, -2.5, 0]]))  # axes (A, P-ish S, L)
OBLIQUE = make_affine(rotation_z(20) @ np.diag([3.0, 2.5, 4.0]))


def save_nifti(path, array, affine=None, **header_fields):
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    for key, value in header_fields.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def assert_one_line_naming(error: V.VolumeError, path):
    text = str(error)
    assert "\n" not in text and str(path) in text


# ---------------------------------------------------------------- shared data round trips


@pytest.mark.parametrize("name", ["ct_3mm.nii.gz", "mr_3mm_lps.nii.gz"])
def test_shared_image_survives_2mm_and_back(shared_data, tmp_path, name):
    vol = V.load(shared_data / name)
    original = nib.load(str(shared_data / name))
    grid, geo = P.to_spec_grid(vol, TO_2MM)
    assert nib.aff2axcodes(geo.grid_affine) == ("R", "A", "S")
    np.testing.assert_allclose(V.spacing_of(geo.grid_affine), (2.0, 2.0, 2.0))

    # Grid voxels 3k sit on input voxels 2k (3 mm -> 2 mm): same value at the same world point.
    ijk = np.argwhere(np.ones(grid.shape, bool)[::3, ::3, ::3])[::97] * 3
    world = geo.grid_affine @ np.c_[ijk, np.ones(len(ijk))].T
    src = np.linalg.solve(vol.affine, world)[:3].T
    np.testing.assert_allclose(src, np.round(src), atol=1e-6)
    src = np.round(src).astype(int)
    np.testing.assert_allclose(grid[tuple(ijk.T)], vol.array[tuple(src.T)], atol=1e-3)

    back = V.resample(grid, geo.spec_spacing, geo.canonical_spacing, out_shape=geo.canonical_shape)
    back = V.from_canonical(back, geo.orientation)
    assert back.shape == vol.shape
    assert np.corrcoef(back.ravel(), vol.array.ravel().astype(np.float64))[0, 1] > 0.98

    out = V.save(V.to_nifti(np.round(back).astype(vol.array.dtype), vol.affine, vol.header), tmp_path / name)
    saved = nib.load(str(out))
    assert saved.shape == original.shape
    np.testing.assert_array_equal(saved.affine, original.affine)
    for code in ("qform_code", "sform_code"):
        assert int(saved.header[code]) == int(original.header[code])
    np.testing.assert_array_equal(saved.header.get_sform(), original.header.get_sform())
    assert V.load(out).shape == vol.shape


def test_reference_mask_survives_2mm_and_back(shared_data, tmp_path):
    vol = V.load(shared_data / "liver_ref_3mm.nii.gz")
    grid, geo = P.to_spec_grid(vol, TO_2MM, label=True)
    assert grid.dtype == vol.array.dtype and set(np.unique(grid)) <= {0, 1}
    back = P.from_spec_grid(grid, geo)
    assert back.shape == vol.shape
    assert dice(back, vol.array) >= 0.98
    out = V.save(V.to_nifti(back.astype(np.uint8), vol.affine, vol.header), tmp_path / "mask.nii.gz")
    saved = nib.load(str(out))
    np.testing.assert_array_equal(saved.affine, nib.load(str(shared_data / "liver_ref_3mm.nii.gz")).affine)
    assert saved.get_data_dtype() == np.uint8


@pytest.mark.parametrize("affine", [LPS, PERMUTED, OBLIQUE], ids=["lps", "permuted", "oblique"])
def test_synthetic_mask_round_trip(affine):
    # Nearest-neighbour there and back is lossless only where 2 mm is not coarser than the
    # input (a 1.5 mm ball of radius 22 mm comes back at Dice ~0.976); these stay near that.
    shape = (40, 36, 24)
    centre = np.array(shape) / 2
    grid = np.indices(shape).transpose(1, 2, 3, 0) * V.spacing_of(affine)
    mask = (np.linalg.norm(grid - centre * V.spacing_of(affine), axis=-1) < 22).astype(np.uint8)
    vol = V.Volume(mask, affine)
    spec_grid, geo = P.to_spec_grid(vol, TO_2MM, label=True)
    back = P.from_spec_grid(spec_grid, geo)
    assert back.shape == shape
    assert dice(back, mask) >= 0.98


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("affine", [LPS, PERMUTED, OBLIQUE], ids=["lps", "permuted", "oblique"])
def test_orientation_round_trip(affine):
    array = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7)
    canonical, new_affine, orientation = V.to_canonical(array, affine)
    assert nib.aff2axcodes(new_affine) == ("R", "A", "S")
    # No resampling: every value keeps its world position.
    for index in [(0, 0, 0), (4, 5, 6), (1, 2, 3), (3, 0, 6)]:
        world = affine @ np.r_[index, 1]
        j = np.round(np.linalg.solve(new_affine, world)[:3]).astype(int)
        np.testing.assert_allclose(new_affine @ np.r_[j, 1], world, atol=1e-9)
        assert canonical[tuple(j)] == array[index]
    np.testing.assert_array_equal(V.from_canonical(canonical, orientation), array)


def test_oblique_input_warns(tmp_path):
    path = save_nifti(tmp_path / "oblique.nii.gz", np.zeros((8, 8, 8), np.int16), OBLIQUE)
    with pytest.warns(V.VolumeWarning, match="oblique"):
        vol = V.load(path)
    assert any("oblique" in w for w in vol.warnings)


# ---------------------------------------------------------------- crop / pad


def test_crop_pad_and_inverse():
    rng = np.random.default_rng(0)
    source = rng.integers(1, 100, size=(10, 20, 7)).astype(np.int16)
    plan = V.plan_crop_pad(source.shape, (16, 12, 7))  # pad x, crop y, keep z
    out = V.crop_pad(source, plan, fill=-5)
    assert out.shape == (16, 12, 7)
    assert plan.dst_start == (3, 0, 0) and plan.src_start == (0, 4, 0)
    np.testing.assert_array_equal(out[3:13], source[:, 4:16])
    assert np.all(out[:3] == -5) and np.all(out[13:] == -5)

    back = V.uncrop_pad(out, plan)
    assert back.shape == source.shape
    np.testing.assert_array_equal(back[:, 4:16], source[:, 4:16])
    assert np.all(back[:, :4] == 0) and np.all(back[:, 16:] == 0)

    pad_only = V.plan_crop_pad(source.shape, (12, 24, 9))
    np.testing.assert_array_equal(V.uncrop_pad(V.crop_pad(source, pad_only), pad_only), source)


def test_crop_window_follows_the_centre_and_stays_inside():
    plan = V.plan_crop_pad((100, 50, 30), (40, 40, 40), center=(10, 45, 15))
    assert plan.src_start[0] == 0  # clamped at the start
    assert plan.src_start[1] == 10  # clamped at the end: 50 - 40
    assert plan.size == (40, 40, 30) and plan.dst_start == (0, 0, 5)
    plan = V.plan_crop_pad((100, 50, 30), (40, 40, 30), center=(60, 25, 15))
    assert plan.src_start == (40, 5, 0)


# ---------------------------------------------------------------- load: good inputs


def test_scl_slope_and_inter_are_honoured(tmp_path):
    raw = np.arange(16 * 16 * 16, dtype=np.int16).reshape(16, 16, 16) - 1000
    path = save_nifti(tmp_path / "scaled.nii", raw)
    # Set the scaling in the file's header (nibabel drops a slope set before saving an array).
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    header.set_slope_inter(2.0, -1024.0)
    with open(path, "r+b") as f:
        header.write_to(f)
    proxy = nib.load(str(path)).dataobj  # nibabel moves the file's scaling onto the data proxy
    assert (proxy.slope, proxy.inter) == (2.0, -1024.0)

    vol = V.load(path)
    np.testing.assert_array_equal(vol.array, raw * 2.0 - 1024.0)

    # A mask saved with that header must not be scaled again on reading.
    mask = (vol.array > 0).astype(np.uint8)
    out = V.save(V.to_nifti(mask, vol.affine, vol.header), tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), mask)


def test_qform_and_sform_codes_survive_save(tmp_path):
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), LPS)
    img.set_qform(LPS, code=1)
    img.set_sform(LPS, code=4)
    path = tmp_path / "codes.nii.gz"
    nib.save(img, str(path))
    vol = V.load(path)
    out = V.save(V.to_nifti(np.ones((8, 8, 8), np.uint8), vol.affine, vol.header), tmp_path / "out.nii.gz")
    saved = nib.load(str(out))
    assert int(saved.header["qform_code"]) == 1 and int(saved.header["sform_code"]) == 4
    np.testing.assert_allclose(saved.affine, LPS)


def test_4d_gives_the_first_volume_with_a_warning(tmp_path):
    data = np.arange(8 * 8 * 8 * 3, dtype=np.int16).reshape(8, 8, 8, 3)
    path = save_nifti(tmp_path / "four.nii.gz", data)
    with pytest.warns(V.VolumeWarning, match="4-D"):
        vol = V.load(path)
    assert vol.shape == (8, 8, 8)
    np.testing.assert_array_equal(vol.array, data[..., 0])
    assert vol.warnings


def test_hu_window_clips_and_scales():
    out = V.hu_window(np.array([-1000, -175, 37.5, 250, 3000], dtype=np.float32), (-175.0, 250.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_save_is_atomic_and_refuses_a_missing_folder(tmp_path):
    img = V.to_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(V.VolumeError, match="does not exist"):
        V.save(img, tmp_path / "nope" / "x.nii.gz")
    V.save(img, tmp_path / "x.nii.gz")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["x.nii.gz"]  # no temp file left


# ---------------------------------------------------------------- load: bad inputs


def test_missing_file_and_folder(tmp_path):
    for path, problem in [(tmp_path / "absent.nii.gz", "no such file"), (tmp_path, "folder")]:
        with pytest.raises(V.VolumeError, match=problem) as e:
            V.load(path)
        assert_one_line_naming(e.value, path)


@pytest.mark.parametrize("name", ["text.nii", "text.nii.gz", "text.txt"])
def test_not_a_nifti(tmp_path, name):
    path = tmp_path / name
    path.write_text("patient,liver_ml\n1,1500\n" * 40)
    with pytest.raises(V.VolumeError, match="not a NIfTI") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(V.VolumeError, match="empty") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gzip(tmp_path, keep):
    rng = np.random.default_rng(1)
    full = save_nifti(tmp_path / "full.nii.gz", rng.integers(-1000, 1000, (32, 32, 32)).astype(np.int16))
    data = full.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(V.VolumeError, match="truncated|corrupt") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_truncated_uncompressed(tmp_path):
    full = save_nifti(tmp_path / "full.nii", np.ones((16, 16, 16), np.int16))
    path = tmp_path / "cut.nii"
    path.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(V.VolumeError, match="truncated") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1), (1, 16, 16)])
def test_2d_is_refused(tmp_path, shape):
    path = save_nifti(tmp_path / "flat.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(V.VolumeError, match="2-D") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_zero_sized_axis(tmp_path):
    path = save_nifti(tmp_path / "zero.nii.gz", np.zeros((0, 10, 10), np.int16))
    with pytest.raises(V.VolumeError, match="zero-sized") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_nan_voxels(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.inf
    path = save_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(V.VolumeError, match="2 NaN or infinite") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("huge.nii.gz", (30000, 30000, 30000)),  # over MAX_VOXELS
        ("huge.nii", (30000, 30000, 30000)),
        ("big.nii.gz", (1000, 1000, 1000)),  # under MAX_VOXELS, but a tiny file cannot hold 2 GB
        ("big.nii", (1000, 1000, 1000)),
    ],
)
def test_absurd_header_dims_are_refused_without_allocating(tmp_path, name, dims):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(dims)
    header.set_sform(np.eye(4), code=1)
    raw = tmp_path / "raw.nii"
    with open(raw, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4096)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw.read_bytes()) if name.endswith(".gz") else raw.read_bytes())
    tracemalloc.start()
    try:
        with pytest.raises(V.VolumeError) as e:
            V.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_naming(e.value, path)
    assert peak < 50e6, f"loading allocated {peak / 1e6:.0f} MB"


def test_max_voxels_limit(tmp_path):
    path = save_nifti(tmp_path / "ok.nii.gz", np.zeros((16, 16, 16), np.int16))
    with pytest.raises(V.VolumeError, match="over the limit") as e:
        V.load(path, max_voxels=1000)
    assert_one_line_naming(e.value, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert V.load(path).shape == (16, 16, 16)


# ---------------------------------------------------------------- load: hostile headers (issue 12)


def patched(path, edits):
    """A copy of the NIfTI-1 file at `path` with raw header fields overwritten: [(offset, struct format, values)]."""
    raw = bytearray(path.read_bytes())
    for offset, fmt, *values in edits:
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    out = path.with_name("patched_" + path.name)
    out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize(
    ("edits", "problem"),
    [
        ([(108, "<f", -1000.0)], "vox offset -1000 too low"),  # vox_offset
        ([(70, "<h", 999)], "data code 999 not recognized"),  # datatype
        ([(70, "<hh", 1536, 128)], "data code 1536 not supported"),  # float128
        ([(108, "<f", 1e30)], "over the limit"),  # an OverflowError at HEAD
        ([(40, "<h", 9)], "invalid NIfTI header|over the limit"),  # dim[0]: which check fires depends on dim[4:8]
        ([(42, "<h", -5)], "negative size"),
        ([(123, "<B", 7)], "unknown spatial unit code 7"),  # xyzt_units
    ],
    ids=["negative_vox_offset", "datatype_999", "float128", "vox_offset_1e30", "dim0_9", "negative_dim", "units_7"],
)
def test_headers_nibabel_cannot_read_are_one_line_volume_errors(tmp_path, edits, problem):
    path = patched(save_nifti(tmp_path / "ct.nii", np.zeros((16, 16, 16), np.int16)), edits)
    with pytest.raises(V.VolumeError, match=problem) as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def _with_extension_claiming(path, esize: int):
    """The file at `path` (vox_offset 352) rewritten with one 16-byte extension slot whose size field says `esize`."""
    raw = path.read_bytes()
    header = bytearray(raw[:348])
    header[108:112] = struct.pack("<f", 368.0)
    return bytes(header) + b"\x01\0\0\0" + struct.pack("<ii", esize, 6) + b"\0" * 8 + raw[352:]


def test_header_extensions_are_never_read(tmp_path):
    data = np.arange(16**3, dtype=np.int16).reshape(16, 16, 16)
    good = save_nifti(tmp_path / "good.nii", data)
    claims_2gb = tmp_path / "ext.nii"
    claims_2gb.write_bytes(_with_extension_claiming(good, 2**31 - 16))  # nibabel: HeaderDataError
    np.testing.assert_array_equal(V.load(claims_2gb).array, data)
    assert not V.load(claims_2gb).header.extensions

    # A 200 MB extension (in a 200 kB gzip) before an absurd shape: refused without reading it.
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((30000, 30000, 30000))
    esize = 200 * 2**20
    header["vox_offset"] = 352 + esize
    path = tmp_path / "ext_first.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", esize, 6))
        for _ in range(200):
            f.write(bytes(2**20))
    tracemalloc.start()
    try:
        with pytest.raises(V.VolumeError, match="over the limit"):
            V.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"loading allocated {peak / 1e6:.0f} MB"


@pytest.mark.parametrize(("unit", "pixdim"), [("meter", 0.0008), ("micron", 800.0), ("mm", 0.8)])
def test_spatial_units_become_millimetres(tmp_path, unit, pixdim):
    affine = np.diag([pixdim, pixdim, 2 * pixdim, 1.0])
    affine[:3, 3] = [-50 * pixdim, 10 * pixdim, 3 * pixdim]
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine)
    img.header.set_xyzt_units(xyz=unit, t="sec")
    nib.save(img, tmp_path / "ct.nii")
    vol = V.load(tmp_path / "ct.nii")
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 1.6))
    np.testing.assert_allclose(vol.affine[:3, 3], [-40.0, 8.0, 2.4])
    out = nib.load(V.save(V.to_nifti(np.zeros((8, 8, 8), np.uint8), vol.affine, vol.header), tmp_path / "m.nii.gz"))
    assert out.header.get_xyzt_units() == ("mm", "sec")  # so the mask says what its affine means
    np.testing.assert_allclose(out.affine, vol.affine, rtol=1e-6)


@pytest.mark.parametrize("spacing", [0.006, 0.04, 20.5, 40.0])
def test_absurd_voxel_sizes_are_refused(tmp_path, spacing):
    path = save_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16), np.diag([spacing] * 3 + [1.0]))
    with pytest.raises(V.VolumeError, match=f"voxel size {spacing:.3g} x .* mm is outside 0.05..20") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_the_resampled_grid_is_limited_before_reading(tmp_path):
    path = save_nifti(tmp_path / "ct.nii.gz", np.zeros((160, 160, 160), np.int16), np.diag([20.0] * 3 + [1.0]))
    assert V.load(path).shape == (160, 160, 160)
    with pytest.raises(V.VolumeError, match=r"resampled to \(3.0, 3.0, 3.0\) mm it is \(1067, 1067, 1067\)") as e:
        V.load(path, grid_spacing=(3.0, 3.0, 3.0))
    assert_one_line_naming(e.value, path)
    assert "134,217,728" in str(e.value)


def test_resampling_a_short_axis_by_a_large_factor_does_not_pad_it(tmp_path):
    tracemalloc.start()
    try:
        out = V.resample(np.ones((20, 20, 20), np.int16), (0.006, 0.006, 0.006), (3.0, 3.0, 3.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (1, 1, 1) and out[0, 0, 0] == pytest.approx(1.0)
    assert peak < 5e6, f"resampling 8000 voxels allocated {peak / 1e6:.0f} MB"  # HEAD padded to 500^3: 250 MB


def test_voxel_data_over_the_byte_limit_is_refused_before_allocating(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float64)
    header.set_data_shape((1024, 1024, 1000))  # 8.4 GB, under MAX_VOXELS
    path = tmp_path / "big.nii.bz2"
    with bz2.open(path, "wb") as f:
        header.write_to(f)
        f.write(bytes(4096))
    with pytest.raises(V.VolumeError, match="header claims 8,388,608,000 bytes of voxels, over the limit") as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


def test_a_valid_nii_bz2_is_read_and_written(tmp_path):
    data = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
    path = save_nifti(tmp_path / "ct.nii.bz2", data)
    np.testing.assert_array_equal(V.load(path).array, data)
    out = V.save(V.to_nifti(data, np.eye(4)), tmp_path / "copy.nii.bz2")
    np.testing.assert_array_equal(V.load(out).array, data)


@pytest.mark.parametrize(
    ("values", "problem"),
    [([1e308, -1e308], r"voxel values -1e\+308..1e\+308: beyond"), ([np.inf, 0.0], "1 NaN or infinite")],
    ids=["1e308", "inf"],
)
def test_float64_values_that_overflow_float32_are_refused(tmp_path, values, problem):
    data = np.zeros((8, 8, 8), np.float64)
    data[0, 0, :2] = values
    path = save_nifti(tmp_path / "ct.nii.gz", data)
    with pytest.raises(V.VolumeError, match=problem) as e:
        V.load(path)
    assert_one_line_naming(e.value, path)


@pytest.mark.parametrize(
    ("shape", "what"), [((1, 1, 1), "a single voxel"), ((16, 1, 1), "1-D line of voxels"), ((16, 1, 16), "2-D image")]
)
def test_what_is_not_3d_is_named_for_what_it_is(tmp_path, shape, what):
    path = save_nifti(tmp_path / "flat.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(V.VolumeError) as e:
        V.load(path)
    assert str(e.value).startswith(f"{path}: {what} (shape {shape})"), str(e.value)


def test_outputs_keep_no_extension_free_text_or_intent(tmp_path):
    from nibabel.nifti1 import Nifti1Extension

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    img.header.extensions.append(Nifti1Extension(6, b"PatientName=Doe^Jane; PatientBirthDate=19500101"))
    img.header["descrip"] = b"Doe^Jane 1950"
    img.header["aux_file"] = b"doe_jane.txt"
    img.header["db_name"] = b"ward 7"
    img.header.set_intent("t test", (5.0,), name="Doe")
    nib.save(img, tmp_path / "ct.nii")
    vol = V.from_image(nib.load(tmp_path / "ct.nii"))
    out = V.save(V.to_nifti(np.ones((8, 8, 8), np.uint8), vol.affine, vol.header), tmp_path / "mask.nii")
    assert b"Doe" not in out.read_bytes() and b"ward" not in out.read_bytes()
    header = nib.load(out).header
    assert not header.extensions and header.get_intent() == ("none", (), "")
    assert (header["descrip"].item(), header["aux_file"].item(), header["db_name"].item()) == (b"", b"", b"")


def test_names_in_messages_are_escaped_to_one_line():
    assert V.printable("a\nb\tc\x1b[31m\udcff\u202e é.nii") == "a\\nb\\tc\\x1b[31m\\udcff\\u202e é.nii"
    error = V.VolumeError("new\nline.nii.gz", "bad\rthing")
    assert str(error) == "new\\nline.nii.gz: bad\\rthing"
