"""The synthesis variants: a longer left lobe, liver-density masses outside the liver, food."""

import numpy as np

from liverkd.core.synth import synth
from liverkd.core.synth.dataset import SYNTH_VERSION, rngs
from liverkd.core.synth.render import grid_axes
from liverkd.core.synth.tissues import ID, LIVER
from liverkd.core.synth.variants import (
    LeftLobe,
    Mass,
    Variants,
    draw_variants,
    fill_stomach,
    grow_left_lobe,
    paint_masses,
)

SPACING = (3.0, 3.0, 3.0)


def _abdomen(shape=(40, 30, 30)):
    """A wedge-shaped liver on the patient's right (high x in RAS+), fat to its left, a spleen beyond."""
    tissue = np.full(shape, ID["fat"], np.uint8)
    for x in range(22, 38):  # thicker towards the right
        half = 2 + (x - 22) // 2
        tissue[x, 15 - half : 15 + half, 10:20] = LIVER
    tissue[2:6, 10:20, 10:20] = ID["spleen"]
    body = np.ones(shape, np.float32)
    return tissue, body


def test_left_lobe_grows_to_the_left_through_fat_only_and_keeps_the_liver():
    tissue, body = _abdomen()
    before = tissue.copy()
    grown = grow_left_lobe(tissue, body, LeftLobe(length_mm=45.0, part=0.2, drift=(0.0, 0.0)), SPACING)
    assert grown.any()
    xs = np.flatnonzero(grown.any(axis=(1, 2)))
    assert xs.min() < 22 <= xs.max() + 1  # beyond the old tip, towards -x
    assert 22 - xs.min() >= 10  # about 45 mm / 3 mm, less what the tip's taper leaves out
    assert (before[grown] == ID["fat"]).all()  # only fat was claimed
    assert (tissue[before == LIVER] == LIVER).all()  # nothing was taken from the liver
    assert (tissue[before == ID["spleen"]] == ID["spleen"]).all()  # the spleen stays
    assert (tissue[grown] == LIVER).all()


def test_left_lobe_stays_inside_the_body_and_none_is_a_no_op():
    tissue, body = _abdomen()
    body[:20] = 0.0
    assert not grow_left_lobe(tissue.copy(), body, LeftLobe(60.0, 0.2, (0.2, 0.2)), SPACING)[:20].any()
    untouched = tissue.copy()
    assert not grow_left_lobe(untouched, body, None, SPACING).any()
    assert np.array_equal(untouched, tissue)


def test_left_lobe_drapes_over_the_stomach_and_bowel_and_never_enters_them():
    """Version 2 let the lobe claim stomach voxels: the label then called stomach liver."""
    tissue, body = _abdomen()
    tissue[8:18, 11:19, 10:20] = ID["stomach"]  # in the lobe's way, beside the liver's tip
    tissue[12:16, 19:22, 10:20] = ID["bowel"]
    before = tissue.copy()
    grown = grow_left_lobe(tissue, body, LeftLobe(length_mm=60.0, part=0.2, drift=(0.0, 0.0)), SPACING)
    assert grown.any() and (before[grown] == ID["fat"]).all()
    assert (tissue[before == ID["stomach"]] == ID["stomach"]).all()
    assert (tissue[before == ID["bowel"]] == ID["bowel"]).all()
    assert grown[:8].any()  # it goes on beyond the stomach, around it


def test_masses_sit_outside_the_liver_at_its_density():
    tissue, body = _abdomen()
    hu = np.where(tissue == LIVER, 60.0, -100.0).astype(np.float32)
    before = hu.copy()
    mass = Mass(radius_mm=12.0, axes=(1.0, 1.0, 1.0), adjacent=True, hu_offset=0.0, texture_hu=0.0,
                rim="none", rim_hu=0.0)  # fmt: skip
    paint_masses(hu, tissue, body, Variants(masses=[mass]), 60.0, grid_axes(hu.shape, SPACING), SPACING,
                 np.random.default_rng(0))  # fmt: skip
    changed = np.abs(hu - before) > 1
    assert changed.sum() > 20
    assert not changed[tissue == LIVER].any()
    assert np.median(hu[np.abs(hu - before) > 80]) > 30  # fat turned liver-like, not something else


def test_a_mass_touching_the_liver_is_parted_from_it_by_its_border():
    """Up to version 3 the contact face had no border: the mass's sphere surface lay inside the
    (unpainted) liver, so at the liver's density nothing marked where the label changed."""
    from scipy import ndimage

    tissue, body = _abdomen()
    liver = tissue == LIVER
    painted = {}
    for rim, rim_hu in (("none", 0.0), ("fat", -90.0)):
        hu = np.where(liver, 60.0, -100.0).astype(np.float32)
        mass = Mass(radius_mm=24.0, axes=(1.0, 1.0, 1.0), adjacent=True, hu_offset=0.0, texture_hu=0.0,
                    rim=rim, rim_hu=rim_hu)  # fmt: skip
        paint_masses(hu, tissue, body, Variants(masses=[mass]), 60.0, grid_axes(hu.shape, SPACING), SPACING,
                     np.random.default_rng(0))  # fmt: skip
        painted[rim] = hu
    mass_voxels = painted["none"] > 0  # outside the liver only the mass is near the liver's density
    contact = mass_voxels & ~liver & ndimage.binary_dilation(liver)
    assert contact.sum() > 5
    assert np.median(painted["none"][contact]) > 50  # without a border the contact is invisible
    assert np.median(painted["fat"][contact]) < 60.0 - 50  # with one, the face it turns to the liver is fat


def test_masses_touching_the_liver_always_have_a_border_that_shows():
    masses = [m for s in range(300) for m in draw_variants(rngs(s)["variants"]).masses]
    touching = [m for m in masses if m.adjacent]
    assert len(touching) > 50 and all(m.rim in ("fat", "enhancing") for m in touching)
    assert any(m.rim == "none" for m in masses if not m.adjacent)  # elsewhere the shape tells them apart
    liver_hu = 60.0
    for m in (m for m in masses if m.rim == "enhancing"):
        m_hu = liver_hu + m.hu_offset
        rim = liver_hu + max(m.hu_offset, 0.0) + m.rim_hu
        assert rim >= max(liver_hu, m_hu) + 15  # brighter than the liver and the mass alike


def test_food_fills_the_stomach_near_the_liver_hu():
    tissue = np.full((8, 8, 8), ID["fat"], np.uint8)
    tissue[2:6, 2:6, 2:6] = ID["stomach"]
    hu = np.zeros(tissue.shape, np.float32)
    fill_stomach(hu, tissue, 60.0, Variants(stomach_food_offset=-10.0), np.zeros(tissue.shape, np.float32))
    assert np.allclose(hu[tissue == ID["stomach"]], 50.0) and (hu[tissue != ID["stomach"]] == 0).all()


def test_variant_draws_are_seeded_and_recorded():
    a, b = draw_variants(rngs(5)["variants"]), draw_variants(rngs(5)["variants"])
    assert a == b
    kinds = [draw_variants(rngs(s)["variants"]) for s in range(200)]
    assert 0.15 < np.mean([v.left_lobe is not None for v in kinds]) < 0.45
    assert 0.15 < np.mean([v.stomach_food_offset is not None for v in kinds]) < 0.45
    assert np.mean([len(v.masses) > 0 for v in kinds]) > 0.3
    _, _, info = synth(3, (32, 32, 32), variants=True)
    assert {"left_lobe_mm", "masses", "stomach_food"} <= set(info)
    assert SYNTH_VERSION >= 4


def test_without_variants_a_case_is_what_it_was_and_with_them_it_differs():
    """variants=False draws nothing from the variants stream: the bytes of synthesis version 1."""
    plain, _, info = synth(21, (40, 40, 40))
    assert info["left_lobe_mm"] == 0 and info["masses"] == [] and not info["stomach_food"]
    again, _, _ = synth(21, (40, 40, 40))
    assert np.array_equal(plain.array, again.array)
    seeds = [s for s in range(40) if draw_variants(rngs(s)["variants"]).masses]
    with_variants, _, _ = synth(seeds[0], (40, 40, 40), variants=True)
    without, _, _ = synth(seeds[0], (40, 40, 40))
    assert not np.array_equal(with_variants.array, without.array)
