"""liverkd.core.synth.phantom: determinism, geometry, anatomy sanity, the MSD layout, preview, CLI."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverkd.core.synth import phantom as P
from liverkd.core.volume import load


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _seeds(phase: str, count: int, lesions: bool | None = None, cut: str | None = None) -> list[int]:
    """The first seeds whose patient has this contrast phase (and lesions or none, this FOV cut)."""
    found = []
    for seed in range(500):
        patient = P.Patient.from_seed(seed)
        if (
            patient.phase == phase
            and (lesions is None or bool(patient.lesions) == lesions)
            and (cut is None or patient.fov_cut == cut)
        ):
            found.append(seed)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} seeds with phase {phase}")


def _render(patient, shape=(64, 64, 64)):
    """Noise- and blur-free HU and the liver mask, default field of view."""
    shape, spacing = P._grid(shape, None)
    return patient.render(P.grid_axes(shape, spacing))


# ---------------------------------------------------------------- contract and determinism


def test_synth_case_contract():
    image, label = P.synth_case(3)
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (64, 64, 64)
    np.testing.assert_allclose(image.spacing, (6.0, 6.0, 6.0))
    np.testing.assert_array_equal(image.affine, label.affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert set(np.unique(label.array)) == {0, 1}
    # field of view centred on world (0, 0, 0)
    centre = image.affine @ np.array([31.5, 31.5, 31.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)
    assert image.array.min() >= -1024 and image.array.max() > 300  # air and bone


def test_spacing_forms():
    image, _ = P.synth_case(1, shape=(24, 20, 16), spacing=5.0)
    assert image.shape == (24, 20, 16)
    np.testing.assert_allclose(image.spacing, (5, 5, 5))
    image, _ = P.synth_case(1, shape=(24, 20, 16), spacing=(4.0, 5.0, 6.0))
    np.testing.assert_allclose(image.spacing, (4, 5, 6))
    with pytest.raises(ValueError, match="spacing"):
        P.synth_case(1, shape=(16, 16, 16), spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        P.synth_case(1, shape=(16, 16))


def test_same_seed_same_array_different_seed_different():
    a_img, a_lab = P.synth_case(7, shape=(32, 32, 32))
    b_img, b_lab = P.synth_case(7, shape=(32, 32, 32))
    c_img, c_lab = P.synth_case(8, shape=(32, 32, 32))
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_img.array, c_img.array)
    assert not np.array_equal(a_lab.array, c_lab.array)


def test_same_anatomy_on_any_grid():
    """Physical mm: a seed is one patient; a coarser grid samples the same liver."""
    _, fine = P.synth_case(5, shape=(64, 64, 64))
    _, coarse = P.synth_case(5, shape=(32, 32, 32))
    fine_ml = fine.array.sum() * 6.0**3 / 1000
    coarse_ml = coarse.array.sum() * 12.0**3 / 1000
    assert fine_ml > 300
    assert abs(fine_ml - coarse_ml) / fine_ml < 0.12
    centroid = lambda v: (v.affine @ np.r_[np.argwhere(v.array).mean(axis=0), 1])[:3]  # noqa: E731
    assert np.linalg.norm(centroid(fine) - centroid(coarse)) < 6.0
    # nearest-neighbour downsampling of the fine mask agrees with the coarse one
    zoomed = fine.array[1::2, 1::2, 1::2]
    overlap = 2 * (zoomed & coarse.array).sum() / (zoomed.sum() + coarse.array.sum())
    assert overlap > 0.8


def test_write_dataset_same_seed_same_bytes(tmp_path):
    first = P.write_dataset(tmp_path / "a", 2, seed=11, shape=(32, 32, 32), progress=False)
    P.write_dataset(tmp_path / "b", 2, seed=11, shape=(32, 32, 32), progress=False)
    P.write_dataset(tmp_path / "c", 2, seed=12, shape=(32, 32, 32), progress=False)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert sorted(a) == [
        "dataset.json",
        "imagesTr/phantom_000.nii.gz",
        "imagesTr/phantom_001.nii.gz",
        "labelsTr/phantom_000.nii.gz",
        "labelsTr/phantom_001.nii.gz",
    ]
    assert a == b
    assert a["imagesTr/phantom_000.nii.gz"] != c["imagesTr/phantom_000.nii.gz"]
    assert a["imagesTr/phantom_000.nii.gz"] != a["imagesTr/phantom_001.nii.gz"]
    assert [p.name for pair in first for p in pair] == ["phantom_000.nii.gz"] * 2 + ["phantom_001.nii.gz"] * 2
    meta = json.loads(a["dataset.json"])
    assert meta["numTraining"] == 2 and meta["labels"] == {"0": "background", "1": "liver"}
    assert meta["training"][1]["image"] == "./imagesTr/phantom_001.nii.gz"
    assert meta["training"][1]["label"] == "./labelsTr/phantom_001.nii.gz"
    image = load(tmp_path / "a" / "imagesTr" / "phantom_000.nii.gz")
    label = load(tmp_path / "a" / "labelsTr" / "phantom_000.nii.gz")
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    # a data set's cases are not another data set's: no seed overlap between seeds 11 and 12
    assert not set(_files(tmp_path / "a").values()) & set(_files(tmp_path / "c").values())


def test_write_dataset_replaces_a_larger_earlier_run(tmp_path):
    P.write_dataset(tmp_path, 3, seed=1, shape=(16, 16, 16), progress=False)
    (tmp_path / "imagesTr" / "mine.nii.gz").write_bytes(b"not ours")
    P.write_dataset(tmp_path, 1, seed=1, shape=(16, 16, 16), progress=False)
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["mine.nii.gz", "phantom_000.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["phantom_000.nii.gz"]
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1


def test_write_dataset_rejects_zero(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        P.write_dataset(tmp_path, 0)
    assert not (tmp_path / "dataset.json").exists()


# ---------------------------------------------------------------- anatomy


def test_liver_fraction_and_side():
    for seed in range(8):
        image, label, info = P.synth(seed)
        mask = label.array.astype(bool)
        fraction = mask.mean()
        assert 0.004 < fraction < 0.06, (seed, fraction)
        assert info["liver_ml"] == pytest.approx(mask.sum() * 6.0**3 / 1000, abs=0.1)
        # RAS: +x is the patient's right, where the liver is
        world_x = image.affine[0, 0] * np.argwhere(mask)[:, 0] + image.affine[0, 3]
        assert np.mean(world_x > 0) > 0.75, (seed, np.mean(world_x > 0))
        assert image.array[mask].mean() > image.array[~mask].mean()


def test_liver_hu_follows_contrast_phase():
    def liver_median(seed):
        image, label = P.synth_case(seed)
        core = ndimage.binary_erosion(label.array.astype(bool))
        return float(np.median(image.array[core]))

    native = [liver_median(s) for s in _seeds("native", 3)]
    portal = [liver_median(s) for s in _seeds("portal", 3)]
    assert all(35 <= v <= 80 for v in native), native
    assert all(80 <= v <= 145 for v in portal), portal
    assert max(native) + 20 < min(portal)


def _tissue(patient, name, shape=(64, 64, 64)):
    """Where the noise-free render paints tissue `name` (given a sentinel HU), and the liver mask."""
    patient.hu[name] = 5000.0
    hu, liver = _render(patient, shape)
    return hu == 5000.0, liver


def test_spleen_is_a_real_distractor():
    for seed in _seeds("portal", 2) + _seeds("native", 2):
        patient = P.Patient.from_seed(seed)
        assert abs(patient.hu["spleen"] - patient.hu["liver"]) < 25
        spleen, liver = _tissue(patient, "spleen")
        assert spleen.sum() > 50 and not (spleen & liver).any()
        x = P.grid_axes((64, 64, 64), (6.0, 6.0, 6.0))[0]
        assert np.mean(x[np.argwhere(spleen)[:, 0]] < 0) > 0.9  # the patient's left


def test_lesions_and_vessels_are_liver():
    seed = _seeds("portal", 1, lesions=True)[0]
    patient = P.Patient.from_seed(seed)
    hu, liver = _render(patient)
    liver_hu = patient.hu["liver"]
    dark = liver & (hu < liver_hu - 30)
    bright = liver & (hu > liver_hu + 30)
    assert dark.sum() > 0, "hypodense lesions inside the liver label"
    assert bright.sum() > 0, "enhancing vessels inside the liver label"
    # without lesions and vessels the label is the same: they are part of the liver
    patient.lesions, patient.portal_tree, patient.hepatic_veins = [], [], []
    patient.ivc = (patient.ivc[0], patient.ivc[1], 1e-3)
    plain_hu, plain_liver = _render(patient)
    np.testing.assert_array_equal(plain_liver, liver)
    assert (plain_liver & (plain_hu < liver_hu - 30)).sum() == 0
    assert (plain_liver & (plain_hu > liver_hu + 30)).sum() == 0


def test_heart_sits_on_the_liver():
    """Heart directly above the liver, separated by no more than the diaphragm (and a voxel)."""
    for seed in _seeds("native", 2, cut="none") + _seeds("portal", 1, cut="none"):
        heart, liver = _tissue(P.Patient.from_seed(seed), "myocardium")
        assert heart.sum() > 20 and liver.sum() > 20
        lowest_heart = np.argwhere(heart)[:, 2].min()
        top_liver = np.argwhere(liver)[:, 2].max()
        assert np.median(np.argwhere(heart)[:, 2]) > top_liver
        assert lowest_heart - top_liver <= 3  # 6 mm voxels: within 18 mm
        columns = heart.any(axis=2) & liver.any(axis=2)
        assert columns.sum() > 5  # some (x, y) columns hold both: the heart is over the liver


def test_field_of_view_sometimes_cuts_the_liver():
    """'top'/'bottom' draws cut the liver at that z border; the rest keep it whole."""
    kinds = set()
    for seed in range(40):
        _, label, info = P.synth(seed, shape=(32, 32, 32))
        mask = label.array
        touches = (bool(mask[:, :, -1].any()), bool(mask[:, :, 0].any()))
        expected = {"none": (False, False), "top": (True, False), "bottom": (False, True)}[info["fov_cut"]]
        assert touches == expected, (seed, info["fov_cut"], touches)
        kinds.add(info["fov_cut"])
    assert kinds == {"none", "top", "bottom"}


def test_bodies_differ_in_size():
    areas = []
    for seed in range(6):
        image, _ = P.synth_case(seed, shape=(48, 48, 48))
        body = image.array > -500
        areas.append(body.sum(axis=(0, 1)).max())
    assert max(areas) > 1.25 * min(areas)


# ---------------------------------------------------------------- preview and CLI


def test_preview_png(tmp_path):
    P.write_dataset(tmp_path, 2, seed=0, shape=(32, 32, 32), progress=False)
    png = P.preview_dataset(tmp_path)
    assert png == tmp_path / "preview.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_synth_twice_same_bytes(tmp_path, liverkd_cmd):
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        cmd = [*liverkd_cmd, "data", "synth", "--out", str(out), "--n", "2", "--seed", "4", "--shape", "24", "24", "24"]
        result = subprocess.run([*cmd, "--preview"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert str(out / "preview.png") in result.stdout
        runs.append(_files(out))
    one, two = runs
    one.pop("preview.png"), two.pop("preview.png")
    assert one == two and len(one) == 5
    assert load(tmp_path / "one" / "imagesTr" / "phantom_001.nii.gz").shape == (24, 24, 24)


def test_cli_synth_bad_input(tmp_path, liverkd_cmd):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    result = subprocess.run(
        [*liverkd_cmd, "data", "synth", "--out", str(afile), "--n", "1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert str(afile) in result.stderr and "not a folder" in result.stderr
    result = subprocess.run(
        [*liverkd_cmd, "data", "synth", "--out", str(tmp_path / "x"), "--n", "0"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert not (tmp_path / "x" / "dataset.json").exists()
