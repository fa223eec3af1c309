"""The Segmenter: geometry in == geometry out, stage timings, stats, and no torch at run time."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import make_bundle, nifti, synthetic_ct

from liverkd.core.volume import VolumeWarning
from liverkd.deploy import Segmenter
from liverkd.deploy.segment import STAGES, SegmentResult


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "random")


@pytest.fixture(scope="module")
def edge_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "edge", preset="edge")


@pytest.fixture(scope="module")
def all_liver_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "all_liver", constant=1)


@pytest.fixture(scope="module")
def no_liver_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "no_liver", constant=0)


@pytest.fixture(scope="module")
def seg(random_bundle):
    with Segmenter.load(random_bundle, backend="onnxruntime") as s:
        yield s


def _rotation(deg_x: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg_x)), np.sin(np.radians(deg_x))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _affine(linear, origin=(-100.0, -80.0, 50.0)):
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": _affine(np.diag([6.0, 6.0, 6.0])),
    "lps": _affine(np.diag([-6.0, -6.0, 6.0])),
    "oblique": _affine(_rotation(20) @ np.diag([6.0, 6.0, 6.0])),
    "anisotropic": _affine(np.diag([2.0, 2.0, 15.0])),
    "permuted": _affine(np.array([[0, 0, 6.0], [6.0, 0, 0], [0, -6.0, 0]])),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (2, 0)])
def test_mask_has_the_input_geometry(seg, name, codes):
    made = nifti(synthetic_ct((40, 36, 28)), affine=AFFINES[name], qform_code=codes[0], sform_code=codes[1])
    img = nib.Nifti1Image.from_bytes(made.to_bytes())  # as read from a file: affine from the codes' choice
    with pytest.warns() if name != "ras" else _no_volume_warning():
        out = seg.segment(img).image
    assert out.shape == img.shape
    assert np.array_equal(out.affine, img.affine)
    assert int(out.header["qform_code"]) == codes[0] and int(out.header["sform_code"]) == codes[1]
    if codes[0]:
        assert np.allclose(out.get_qform(), img.get_qform())
    if codes[1]:
        assert np.array_equal(out.get_sform(), img.get_sform())
    assert out.get_data_dtype() == np.uint8
    data = np.asarray(out.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}


class _no_volume_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", VolumeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_axis_order_and_flips_do_not_change_the_answer(edge_bundle):
    """The same patient stored RAS, LPS or with permuted axes gets the same mask in world space.

    The engine's answer depends on the direction of +x, so a pipeline that fed the network
    the stored axes instead of canonical RAS would give different masks here."""
    seg = Segmenter.load(edge_bundle, backend="onnxruntime")
    ct = synthetic_ct((40, 36, 28), seed=3)
    ras = nifti(ct, affine=AFFINES["ras"])
    mask_ras = seg.segment(ras).mask
    assert 0 < mask_ras.sum() < mask_ras.size, "the random network should give a non-trivial mask"

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [ct.shape[0] - 1, ct.shape[1] - 1, 0]
    lps = nifti(ct[::-1, ::-1, :].copy(), affine=AFFINES["ras"] @ flip)
    with pytest.warns(VolumeWarning, match="orientation LPS"):
        mask_lps = seg.segment(lps).mask
    assert np.array_equal(mask_lps[::-1, ::-1, :], mask_ras)

    perm = np.zeros((4, 4))
    perm[[0, 1, 2, 3], [1, 2, 0, 3]] = 1  # stored axes (z, x, y)
    zxy = nifti(ct.transpose(2, 0, 1).copy(), affine=AFFINES["ras"] @ perm)
    with pytest.warns(VolumeWarning, match="orientation SRA"):
        mask_zxy = seg.segment(zxy).mask
    assert np.array_equal(mask_zxy.transpose(1, 2, 0), mask_ras)


def test_mask_header_drops_the_inputs_display_range_and_intent(seg, tmp_path):
    """cal_min/cal_max of a CT (-1000..2000) would make viewers show the 0/1 mask black."""
    img = nifti(synthetic_ct((32, 30, 24)))
    img.header["cal_min"], img.header["cal_max"] = -1000, 2000
    img.header.set_intent("t test", (5.0,), name="tstat")
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    for out in (seg.segment(img).image, nib.load(seg.segment_file(path).output)):
        assert (float(out.header["cal_min"]), float(out.header["cal_max"])) == (0.0, 0.0)
        assert out.header.get_intent() == ("none", (), "")
        assert np.array_equal(out.affine, img.affine)


def test_stage_timings_are_named_and_ordered(seg, tmp_path):
    img = nifti(synthetic_ct((40, 36, 28)))
    in_memory = [s for s in STAGES if s != "write"] + ["total"]
    assert list(seg.segment(img).timings) == in_memory
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    result = seg.segment_file(path)
    assert list(result.timings) == list(STAGES) + ["total"]
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["network"] > 0
    assert sum(v for k, v in result.timings.items() if k != "total") <= result.timings["total"] + 1e-6


def test_segment_file_writes_mask_stats_and_preview(all_liver_bundle, tmp_path):
    """A network that says 'liver' everywhere: volume and mean HU are then known exactly."""
    ct = synthetic_ct((30, 26, 20), spacing=(5.0, 4.0, 7.0))
    path = tmp_path / "scan.nii"
    nib.save(nifti(ct, spacing=(5.0, 4.0, 7.0)), path)
    with Segmenter.load(all_liver_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(path, stats=True, preview=True)
    assert isinstance(result, SegmentResult)
    assert result.output == str(tmp_path / "scan_liver.nii.gz")
    mask = np.asarray(nib.load(result.output).dataobj)
    assert mask.shape == ct.shape and mask.all()
    assert result.liver_voxels == ct.size
    assert result.liver_ml == pytest.approx(ct.size * 5.0 * 4.0 * 7.0 / 1000.0)
    assert result.mean_hu == pytest.approx(float(ct.mean(dtype=np.float64)))
    stats = json.loads((tmp_path / "scan_liver.json").read_text())
    assert stats["liver_ml"] == pytest.approx(result.liver_ml)
    assert stats["mean_hu"] == pytest.approx(result.mean_hu)
    assert stats["output"] == result.output and list(stats["timings"]) == list(result.timings)
    assert (tmp_path / "scan_liver.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scan.nii", "scan_liver.json", "scan_liver.nii.gz", "scan_liver.png"
    ]  # fmt: skip
    assert oct((tmp_path / "scan_liver.nii.gz").stat().st_mode & 0o777) != oct(0o600)


def test_empty_result_gives_an_empty_mask_and_a_warning(no_liver_bundle, tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nifti(synthetic_ct((30, 26, 20))), path)
    with Segmenter.load(no_liver_bundle, backend="onnxruntime") as seg:
        with pytest.warns(VolumeWarning, match="no liver found"):
            result = seg.segment_file(path, stats=True)
    assert result.liver_ml == 0 and result.mean_hu is None
    assert any("no liver found" in w for w in result.warnings)
    mask = nib.load(result.output)
    assert mask.shape == (30, 26, 20) and not np.asarray(mask.dataobj).any()


def test_sliding_window_covers_a_large_field_of_view(all_liver_bundle, random_bundle):
    """A grid larger than the 64^3 engine input goes through the sliding window; all of it is covered."""
    img = nifti(synthetic_ct((90, 70, 30)))  # 6 mm voxels: 90 x 70 > 64 on the spec grid
    with Segmenter.load(all_liver_bundle, backend="onnxruntime") as seg:
        mask = seg.segment(img).mask
        assert mask.shape == img.shape and mask.all()
    with Segmenter.load(random_bundle, backend="onnxruntime") as seg:
        out = seg.segment(img)
        assert out.image.shape == img.shape and np.array_equal(out.image.affine, img.affine)
        assert out.timings["network"] > 0


def test_four_d_input_uses_the_first_volume(seg):
    ct = synthetic_ct((32, 30, 24))
    img = nifti(np.stack([ct, np.full_like(ct, -1000)], axis=-1))
    with pytest.warns(VolumeWarning, match="4-D"):
        out = seg.segment(img).image
    assert out.shape == ct.shape
    assert np.array_equal(out.affine, img.affine)
    assert np.array_equal(np.asarray(out.dataobj), seg.segment(nifti(ct)).mask)


def test_segment_volume_returns_the_mask_and_its_facts(seg):
    from liverkd.core.volume import Volume

    ct = synthetic_ct((32, 30, 24))
    vol = Volume(ct, AFFINES["ras"])
    out = seg.segment_volume(vol)
    assert out.mask.shape == ct.shape and out.mask.dtype == np.uint8
    assert np.array_equal(out.image.affine, vol.affine)
    assert out.liver_ml == pytest.approx(out.mask.sum() * 6.0**3 / 1000)
    assert "network" in out.timings and isinstance(out.warnings, list)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_deploy_runs_without_importing_torch(random_bundle, tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed (pip install 'liverkd[openvino]')")
    path = tmp_path / "ct.nii.gz"
    nib.save(nifti(synthetic_ct((32, 30, 24))), path)
    code = (
        "import sys\n"
        "import nibabel as nib\n"
        "from liverkd.deploy import Segmenter\n"
        f"seg = Segmenter.load({str(random_bundle)!r}, backend={backend!r})\n"
        f"out = seg.segment(nib.load({str(path)!r})).image\n"
        f"seg.segment_file({str(path)!r}, {str(tmp_path / 'out.nii.gz')!r})\n"
        "assert out.shape == (32, 30, 24)\n"
        "print(seg.runner.name, 'torch' in sys.modules, sorted(m for m in sys.modules if 'distill' in m))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{backend} False []"
    assert (tmp_path / "out.nii.gz").is_file()


# ---------------------------------------------------------------- the real CT and MR


def test_real_ct_keeps_shape_affine_and_codes(seg, shared_data, tmp_path):
    src = shared_data / "ct_3mm.nii.gz"
    result = seg.segment_file(src, tmp_path / "ct_liver.nii.gz")
    img, out = nib.load(src), nib.load(result.output)
    assert out.shape == img.shape
    assert np.array_equal(out.affine, img.affine)
    for key in ("qform_code", "sform_code"):
        assert int(out.header[key]) == int(img.header[key])
    assert np.array_equal(out.get_sform(), img.get_sform())
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    assert not any("CT" in w for w in result.warnings)


def test_real_mr_warns_not_ct_and_keeps_lps(seg, shared_data, tmp_path):
    src = shared_data / "mr_3mm_lps.nii.gz"
    with pytest.warns(VolumeWarning):
        result = seg.segment_file(src, tmp_path / "mr_liver.nii.gz")
    assert any("do not look like CT" in w for w in result.warnings)
    assert any("orientation LPS" in w for w in result.warnings)
    img, out = nib.load(src), nib.load(result.output)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    assert out.shape == img.shape and np.array_equal(out.affine, img.affine)
