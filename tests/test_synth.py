"""liverkd.core.synth: determinism, the label-map loader, anatomy and appearance sanity, the MSD
layout, the preview PNG, the CLI, and a core that imports no plotting, CLI or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverkd.core import synth as S
from liverkd.core.synth.dataset import rngs
from liverkd.core.synth.placement import draw_placement
from liverkd.core.synth.randomize import draw_appearance
from liverkd.core.synth.scanner import draw_scanner
from liverkd.core.synth.tissues import ID, LIVER
from liverkd.core.volume import VolumeError, load
from liverkd.viz import preview_dataset

LABELMAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "anatomy_labelmaps"
SMALL = dict(shape=(32, 32, 32), spacing=8.0)
TINY = dict(shape=(20, 20, 20), spacing=12.0)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_subject(folder: Path, shift_mm: float = 0.0) -> Path:
    """A tiny TotalSegmentator-style subject: 3 mm grid, RAS, one binary mask per structure."""
    folder.mkdir(parents=True)
    shape = (48, 40, 48)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-(n - 1) * 1.5 for n in shape]
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * 3.0 for n in shape], indexing="ij")
    x = x - shift_mm
    structures = {
        "liver": ((x - 30) / 35) ** 2 + (y / 30) ** 2 + ((z - 10) / 30) ** 2 < 1,
        "spleen": ((x + 40) / 12) ** 2 + ((y + 10) / 20) ** 2 + ((z - 10) / 20) ** 2 < 1,
        "vertebrae_L1": np.hypot(x, y + 40) < 10,
        "aorta": np.hypot(x + 12, y + 20) < 6,
        "lung_lower_lobe_right": (z > 45) & (np.hypot(x - 35, y) < 35),
        "kidney_left": np.zeros(shape, bool),  # empty, as structures outside a scan are
        "mystery_organ": ((x + 20) / 8) ** 2 + ((y - 25) / 8) ** 2 + ((z + 30) / 8) ** 2 < 1,
    }
    for name, mask in structures.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelmaps")
    _write_subject(root / "a")
    _write_subject(root / "b", shift_mm=-8.0)
    return root


# ---------------------------------------------------------------- contract and determinism


def test_synth_case_contract():
    image, label = S.synth_case(3, shape=(32, 32, 32))
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (32, 32, 32)
    np.testing.assert_allclose(image.spacing, (12.0, 12.0, 12.0))  # 384 mm / shape
    np.testing.assert_array_equal(image.affine, label.affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert set(np.unique(label.array)) == {0, 1}
    centre = image.affine @ np.array([15.5, 15.5, 15.5, 1.0])  # field of view centred on world (0, 0, 0)
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)
    assert image.array[0, 0, :].max() < -800 and image.array.max() > 300  # air in the corner, bone


def test_spacing_and_fov_forms():
    image, _ = S.synth_case(1, shape=(24, 20, 16), spacing=10.0)
    assert image.shape == (24, 20, 16)
    np.testing.assert_allclose(image.spacing, (10, 10, 10))
    image, _ = S.synth_case(1, shape=(24, 20, 16), spacing=(12.0, 13.0, 14.0))
    np.testing.assert_allclose(image.spacing, (12, 13, 14))
    image, _, _ = S.synth(1, spacing=12.0, fov_mm=(240, 288, 192))
    assert image.shape == (20, 24, 16)
    with pytest.raises(ValueError, match="spacing"):
        S.synth_case(1, shape=(16, 16, 16), spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        S.synth_case(1, shape=(16, 16))


def test_same_seed_same_array_different_seed_different():
    a_img, a_lab = S.synth_case(7, **TINY)
    b_img, b_lab = S.synth_case(7, **TINY)
    c_img, c_lab = S.synth_case(8, **TINY)
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_img.array, c_img.array)
    assert not np.array_equal(a_lab.array, c_lab.array)


def test_write_dataset_same_seed_same_bytes(tmp_path):
    calls = []
    first = S.write_dataset(
        tmp_path / "a", 2, seed=11, **TINY, progress=lambda done, total: calls.append((done, total))
    )
    S.write_dataset(tmp_path / "b", 2, seed=11, **TINY)
    S.write_dataset(tmp_path / "c", 2, seed=12, **TINY)
    assert calls == [(1, 2), (2, 2)]
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert sorted(a) == [
        "dataset.json",
        "imagesTr/phantom_000.nii.gz",
        "imagesTr/phantom_001.nii.gz",
        "labelsTr/phantom_000.nii.gz",
        "labelsTr/phantom_001.nii.gz",
    ]
    assert a == b
    assert not set(a.values()) & set(c.values())  # data sets with other seeds share no case
    assert a["imagesTr/phantom_000.nii.gz"] != a["imagesTr/phantom_001.nii.gz"]
    assert [p.name for pair in first for p in pair] == ["phantom_000.nii.gz"] * 2 + ["phantom_001.nii.gz"] * 2
    meta = json.loads(a["dataset.json"])
    assert meta["numTraining"] == 2 and meta["labels"] == {"0": "background", "1": "liver"}
    assert meta["training"][1]["image"] == "./imagesTr/phantom_001.nii.gz"
    info = meta["training"][0]["phantom"]
    assert info["anatomy"] == "procedural" and info["phase"] in ("native", "arterial", "portal", "delayed")
    assert {"noise_hu", "slice_mm", "rotation_deg", "scale", "fat_mm", "fov_cut", "liver_ml"} <= set(info)
    image = load(tmp_path / "a" / "imagesTr" / "phantom_000.nii.gz")
    label = load(tmp_path / "a" / "labelsTr" / "phantom_000.nii.gz")
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1


def test_write_dataset_replaces_a_larger_earlier_run(tmp_path):
    S.write_dataset(tmp_path, 3, seed=1, shape=(16, 16, 16))
    (tmp_path / "imagesTr" / "mine.nii.gz").write_bytes(b"not ours")
    S.write_dataset(tmp_path, 1, seed=1, shape=(16, 16, 16), progress=False)
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["mine.nii.gz", "phantom_000.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["phantom_000.nii.gz"]
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        S.write_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="procedural_fraction"):
        S.write_dataset(tmp_path, 1, labelmaps=tmp_path, procedural_fraction=1.5)
    with pytest.raises(ValueError, match="workers"):
        S.write_dataset(tmp_path, 1, workers=0)
    with pytest.raises(VolumeError, match="no subject folders"):
        S.write_dataset(tmp_path, 1, labelmaps=tmp_path)
    assert not (tmp_path / "dataset.json").exists()


# ---------------------------------------------------------------- label maps


def test_labelmap_loader(subjects):
    assert [p.name for p in S.find_subjects(subjects)] == ["a", "b"]
    assert S.find_subjects(subjects / "a") == [subjects / "a"]
    lm = S.load_labelmap(subjects / "a")
    liver = np.asarray(nib.load(subjects / "a" / "liver.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(lm.tissue == LIVER, liver)  # the label is exactly the subject's liver
    assert "kidney_left" not in lm.structures and len(lm.structures) == 6
    assert lm.unknown == ["mystery_organ"]
    assert (lm.tissue == ID["gland"]).any()  # an unknown structure is kept as soft tissue
    assert (lm.tissue == ID["spleen"]).sum() > 100 and (lm.tissue == ID["lung"]).any()
    bone = (lm.tissue == ID["cortical"]) | (lm.tissue == ID["cancellous"])
    assert (lm.tissue == ID["cortical"]).any() and (lm.tissue == ID["cancellous"]).any()  # shell and interior
    assert ((lm.tissue == ID["cortical"]) & ndimage.binary_erosion(bone)).sum() == 0
    lo, hi = lm.liver_box()
    assert lo[0] == pytest.approx(-5, abs=4) and hi[0] == pytest.approx(65, abs=4)


def test_labelmap_errors_name_the_file(tmp_path, subjects):
    with pytest.raises(VolumeError, match="liver.nii.gz"):
        S.load_labelmap(tmp_path)
    bad = _write_subject(tmp_path / "bad")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), bad / "spleen.nii.gz")
    with pytest.raises(VolumeError, match=r"spleen\.nii\.gz: grid"):
        S.load_labelmap(bad)
    (bad / "spleen.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match=r"spleen\.nii\.gz"):
        S.load_labelmap(bad)


def test_labelmap_case_same_bytes_and_a_whole_body(subjects):
    lm = S.load_labelmap(subjects / "a")
    a_img, a_lab, info = S.synth(3, labelmap=lm, **SMALL)
    b_img, b_lab, _ = S.synth(3, labelmap=S.load_labelmap(subjects / "a"), **SMALL)
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    assert info["anatomy"] == "a" and a_lab.array.sum() > 20
    # the liver lies on the patient's right (+x in RAS), as in the subject
    world_x = a_img.affine[0, 0] * np.argwhere(a_lab.array)[:, 0] + a_img.affine[0, 3]
    assert np.mean(world_x > 0) > 0.7
    # the synthesised body: air outside, fat and soft tissue around the labelled structures
    img = a_img.array
    assert img[0, 0].max() < -800
    body = ndimage.binary_fill_holes(img > -400)
    assert 0.1 < body.mean() < 0.9
    fat = (img > -150) & (img < -50)
    assert fat[body].mean() > 0.05


def test_write_dataset_mixes_subjects_and_procedural(tmp_path, subjects):
    S.write_dataset(tmp_path / "one", 5, seed=2, labelmaps=subjects, procedural_fraction=0.4, **TINY)
    S.write_dataset(tmp_path / "two", 5, seed=2, labelmaps=subjects, procedural_fraction=0.4, **TINY)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    done = []  # in worker processes (each loads the subjects itself): the same bytes, progress in order
    S.write_dataset(tmp_path / "pool", 5, seed=2, labelmaps=subjects, procedural_fraction=0.4, **TINY, workers=2,
                    progress=lambda i, n: done.append(i))  # fmt: skip
    assert _files(tmp_path / "pool") == _files(tmp_path / "one") and done == [1, 2, 3, 4, 5]
    meta = json.loads((tmp_path / "one" / "dataset.json").read_text())
    sources = [r["phantom"]["anatomy"] for r in meta["training"]]
    assert set(sources) <= {"a", "b", "procedural"} and len(set(sources)) >= 2, sources
    assert meta["phantom"]["labelmaps"] == ["a", "b"] and meta["phantom"]["procedural_fraction"] == 0.4
    assert "10.1148/ryai.230024" in meta["reference"] and "CC BY 4.0" in meta["licence"]


@pytest.mark.skipif(
    not (LABELMAPS / "s0006" / "liver.nii.gz").is_file(),
    reason=f"real TotalSegmentator label maps not found at {LABELMAPS} (not part of a clone)",
)
def test_real_totalsegmentator_subject():
    lm = S.load_labelmap(LABELMAPS / "s0006")
    assert lm.unknown == [] and len(lm.structures) >= 50
    liver_ml = (lm.tissue == LIVER).sum() * np.prod(lm.spacing) / 1000
    assert liver_ml == pytest.approx(815, rel=0.02)  # PROVENANCE.md
    image, label, info = S.synth(5, shape=(48, 48, 48), spacing=8.0, labelmap=lm)
    assert 300 < info["liver_ml"] < 2000
    core = ndimage.binary_erosion(label.array.astype(bool))
    assert abs(np.median(image.array[core]) - info["liver_hu"]) < 40


# ---------------------------------------------------------------- procedural anatomy


def _patient_labels(seed: int):
    patient = S.Patient(rngs(seed)["anatomy"])
    tissue, affine = patient.crop((-180, -150, -300), (180, 150, 150), 6.0)
    x = affine[0, 3] + 6.0 * np.arange(tissue.shape[0])
    z = affine[2, 3] + 6.0 * np.arange(tissue.shape[2])
    return tissue, x, z


def test_procedural_anatomy_organs_where_they_belong():
    for seed in range(3):
        tissue, x, z = _patient_labels(seed)
        liver, spleen, heart = (tissue == ID[n] for n in ("liver", "spleen", "heart"))
        assert 600 < liver.sum() * 0.216 < 2500  # mL at 6 mm
        assert np.mean(x[np.argwhere(liver)[:, 0]] > 0) > 0.75  # patient's right
        assert np.mean(x[np.argwhere(spleen)[:, 0]] < 0) > 0.9  # patient's left
        assert np.median(z[np.argwhere(heart)[:, 2]]) > z[np.argwhere(liver)[:, 2]].max()  # heart on the dome
        assert (tissue == ID["lung"]).any() and (tissue == ID["cortical"]).any() and (tissue == ID["viscera"]).any()


def test_procedural_anatomy_does_not_depend_on_the_grid():
    _, fine = S.synth_case(5, shape=(48, 48, 48), spacing=8.0)
    _, coarse = S.synth_case(5, shape=(24, 24, 24), spacing=16.0)
    fine_ml, coarse_ml = fine.array.sum() * 0.512, coarse.array.sum() * 4.096
    assert fine_ml > 300 and abs(fine_ml - coarse_ml) / fine_ml < 0.2


# ---------------------------------------------------------------- appearance, placement, scanner


def _first_seed(draw, want, stream: str) -> int:
    for seed in range(300):
        if want(draw(rngs(seed)[stream])):
            return seed
    raise AssertionError("no seed found")


def test_liver_hu_follows_the_draw():
    checked = 0
    for seed in range(3):
        image, label, info = S.synth(seed, **SMALL)
        core = ndimage.binary_erosion(label.array.astype(bool))
        if core.sum() < 20 or info["lesions"]:
            continue
        assert abs(np.median(image.array[core]) - info["liver_hu"]) < 35, info
        checked += 1
    assert checked
    looks = [draw_appearance(rngs(seed)["appearance"]) for seed in range(60)]
    assert min(a["liver"] for a in looks) < 40 and max(a["liver"] for a in looks) > 110  # fatty to enhanced
    assert {a.phase for a in looks} == {"native", "arterial", "portal", "delayed"}
    close = [abs(a["spleen"] - a["liver"]) < 12 for a in looks]
    assert 0.2 < np.mean(close) < 0.8  # a spleen like the liver, often but not always


def test_field_of_view_aims_at_the_liver():
    """'top' / 'bottom' cut the liver at that border; 'none' keeps the procedural liver whole."""
    patient = S.Patient(rngs(0)["anatomy"])
    fov = np.array([240.0, 240.0, 240.0])
    for aim in ("none", "top", "bottom"):
        seed = _first_seed(
            lambda rng: draw_placement(rng, patient, fov).cut, lambda cut, aim=aim: cut == aim, "placement"
        )
        _, label, info = S.synth(seed, **TINY)
        assert info["fov_aim"] == aim
        touches = {"none": (False, False), "top": (True, False), "bottom": (False, True)}[aim]
        assert (bool(label.array[:, :, -1].any()), bool(label.array[:, :, 0].any())) == touches, info


def test_some_scans_are_clipped_like_ircad():
    seed = _first_seed(draw_scanner, lambda s: s.clip == (-1024, 1024) and s.circle is None, "scanner")
    image, _, info = S.synth(seed, **SMALL)
    assert info["clip"] == [-1024, 1024] and image.array.max() <= 1024 and image.array.min() >= -1024


def test_bodies_differ_in_size():
    areas = [int((S.synth_case(seed, **TINY)[0].array > -500).sum()) for seed in range(5)]
    assert max(areas) > 1.3 * min(areas)


# ---------------------------------------------------------------- preview, CLI, import hygiene


def test_preview_png(tmp_path, subjects):
    S.write_dataset(tmp_path, 2, seed=0, labelmaps=subjects, procedural_fraction=0.5, **TINY)
    png = preview_dataset(tmp_path)
    assert png == tmp_path / "preview.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_synth(tmp_path, liverkd_cmd, subjects):
    out = tmp_path / "out"
    cmd = [*liverkd_cmd, "data", "synth", "--out", str(out), "--n", "2", "--seed", "4", "--shape", "24", "24", "24",
           "--spacing", "10", "--labelmaps", str(subjects), "--procedural-fraction", "0.5", "--preview",
           "--workers", "2"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(out / "preview.png") in result.stdout and (out / "preview.png").is_file()
    in_process = tmp_path / "in_process"
    S.write_dataset(in_process, 2, seed=4, shape=(24, 24, 24), spacing=10.0, labelmaps=subjects,
                    procedural_fraction=0.5)  # fmt: skip
    cli = _files(out)
    cli.pop("preview.png")
    assert cli == _files(in_process)


def test_cli_synth_errors_are_one_line_naming_the_path(tmp_path, liverkd_cmd):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    missing = tmp_path / "no_such_folder"
    for args, path, words in (
        (["--out", str(afile)], afile, "not a folder"),
        (["--out", str(tmp_path / "x"), "--labelmaps", str(missing)], missing, "not found"),
    ):
        result = subprocess.run([*liverkd_cmd, "data", "synth", "--n", "1", *args], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], result.stderr
    assert not (tmp_path / "x" / "dataset.json").exists()


def test_core_synth_imports_no_plotting_cli_or_torch():
    code = (
        "import sys; from liverkd.core.synth import synth; synth(0, shape=(12, 12, 12)); "
        "bad = sorted(m for m in ('matplotlib', 'rich', 'typer', 'torch', 'tensorrt') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
