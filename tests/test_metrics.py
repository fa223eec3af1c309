import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from liverkd.core.metrics import (
    assd,
    dice,
    evaluate_masks,
    hd95,
    iou,
    relative_volume_difference,
    surface_distances,
    to_jsonable,
)

SHAPE = (64, 64, 64)


def sphere(center, radius, shape=SHAPE):
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) <= radius**2


def cube(start, size, shape=SHAPE):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def brute_force_distances(a, b, spacing):
    """The same definition computed another way: neighbour tests for the surface, a k-d tree
    over every surface voxel of the whole array (no bounding box) for the distances."""

    def surface_points(mask):
        padded = np.pad(mask != 0, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        interior = inner.copy()
        for axis in range(3):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & ~interior) * np.asarray(spacing, dtype=np.float64)

    pa, pb = surface_points(a), surface_points(b)
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


def test_identical_masks_are_perfect():
    a = sphere((30, 32, 34), 10)
    m = evaluate_masks(a, a.copy(), (0.8, 0.8, 2.5))
    assert m == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "rvd": 0.0}


def test_offset_spheres_dice_matches_the_analytic_lens_volume():
    r, d = 12, 6
    a = sphere((28, 32, 32), r)
    b = sphere((28 + d, 32, 32), r)
    # Two balls of radius r whose centres are d apart overlap in a lens of volume
    # pi (4r + d)(2r - d)^2 / 12; Dice = lens / ball, IoU = Dice / (2 - Dice).
    expected_dice = (math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12) / (4 / 3 * math.pi * r**3)
    assert dice(a, b) == pytest.approx(expected_dice, abs=0.01)
    assert iou(a, b) == pytest.approx(expected_dice / (2 - expected_dice), abs=0.01)
    assert relative_volume_difference(a, b) == 0.0
    # The farthest surface point of one ball from the other's surface is d away.
    assert 0 < hd95(a, b, (1, 1, 1)) <= d
    assert 0 < assd(a, b, (1, 1, 1)) < hd95(a, b, (1, 1, 1))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.7, 2.5)])
def test_surface_distances_match_brute_force(spacing):
    a = sphere((20, 30, 33), 9)
    b = sphere((25, 27, 35), 7) | cube((30, 30, 30), 6).astype(bool)
    ab, ba = surface_distances(a, b, spacing)
    ref_ab, ref_ba = brute_force_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(ab), np.sort(ref_ab), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.sort(ba), np.sort(ref_ba), rtol=1e-9, atol=1e-9)
    pooled = np.concatenate([ref_ab, ref_ba])
    directed = max(np.percentile(ref_ab, 95), np.percentile(ref_ba, 95))
    assert hd95(a, b, spacing) == pytest.approx(directed)  # MONAI / nnU-Net
    assert hd95(a, b, spacing, mode="pooled") == pytest.approx(np.percentile(pooled, 95))  # MedPy
    assert hd95(a, b, spacing, mode="pooled") < hd95(a, b, spacing)
    assert assd(a, b, spacing) == pytest.approx(pooled.mean())


def test_masks_cut_by_the_field_of_view_have_a_surface_on_that_face():
    a = sphere((2, 32, 60), 10)  # cut by two faces of the array
    b = sphere((4, 30, 61), 11)
    spacing = (2.0, 1.0, 1.25)
    pooled = np.concatenate(brute_force_distances(a, b, spacing))
    assert hd95(a, b, spacing, mode="pooled") == pytest.approx(np.percentile(pooled, 95))
    assert assd(a, b, spacing) == pytest.approx(pooled.mean())


def test_single_voxel():
    a = np.zeros(SHAPE, np.uint8)
    b = np.zeros(SHAPE, np.uint8)
    a[10, 10, 10] = 1
    b[13, 14, 10] = 1
    assert dice(a, a) == 1.0 and hd95(a, a, (1, 1, 1)) == 0.0
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(5.0)
    assert assd(a, b, (1, 1, 1)) == pytest.approx(5.0)
    assert hd95(a, b, (2, 1, 1)) == pytest.approx(math.sqrt(6**2 + 4**2))


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_shifted_cube_hd95_equals_the_shift(shift):
    # One face of each cube (1/6 of its surface, more than 5 %) lies exactly `shift` voxels
    # from the other cube's surface and nothing lies farther, so the 95th percentile is the shift.
    a = cube((20, 20, 20), 12)
    b = cube((20 + shift, 20, 20), 12)
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(shift)
    assert dice(a, b) == pytest.approx((12 - shift) / 12)


def test_anisotropic_spacing_scales_distances_along_its_axis_only():
    a = cube((20, 20, 20), 12)
    along_x = cube((23, 20, 20), 12)
    along_y = cube((20, 23, 20), 12)
    spacing = (2.5, 1.0, 1.0)
    assert hd95(a, along_x, spacing) == pytest.approx(3 * 2.5)
    assert hd95(a, along_y, spacing) == pytest.approx(3 * 1.0)
    assert assd(a, along_x, spacing) > assd(a, along_y, spacing)


def test_relative_volume_difference_is_signed():
    ref = cube((10, 10, 10), 10)  # 1000 voxels
    bigger = ref.copy()
    bigger[30:31, 0:10, 0:10] = 1  # +100 voxels
    assert relative_volume_difference(bigger, ref) == pytest.approx(0.1)
    assert relative_volume_difference(ref, bigger) == pytest.approx(-100 / 1100)


def test_any_nonzero_label_counts_as_foreground():
    ref = cube((10, 10, 10), 10)
    msd = ref * 1
    msd[12:14, 12:14, 12:14] = 2  # tumour inside the liver
    assert evaluate_masks(msd, ref, (1, 1, 1))["dice"] == 1.0


def test_empty_masks():
    empty = np.zeros(SHAPE, np.uint8)
    full = cube((10, 10, 10), 5)
    both = evaluate_masks(empty, empty, (1, 1, 1))
    assert both == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "rvd": 0.0}

    missed = evaluate_masks(empty, full, (1, 1, 1))
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and missed["rvd"] == -1.0
    assert math.isinf(missed["hd95"]) and math.isinf(missed["assd"])

    spurious = evaluate_masks(full, empty, (1, 1, 1))
    assert spurious["dice"] == 0.0 and math.isinf(spurious["rvd"]) and math.isinf(spurious["hd95"])
    assert hd95(full, empty, (1, 1, 1)) == math.inf and assd(empty, full, (1, 1, 1)) == math.inf

    text = json.dumps(to_jsonable(spurious), allow_nan=False)
    assert json.loads(text)["hd95"] is None and json.loads(text)["dice"] == 0.0


def test_shape_mismatch_and_bad_spacing_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(cube((1, 1, 1), 2, (8, 8, 8)), cube((1, 1, 1), 2, (8, 8, 8)), (1, 0, 1))


def test_reference_liver_shifted_matches_brute_force(shared_data):
    img = nib.load(shared_data / "liver_ref_3mm.nii.gz")
    ref = np.asarray(img.dataobj) > 0
    spacing = img.header.get_zooms()[:3]
    moved = np.zeros_like(ref)
    moved[2:, :, 1:] = ref[:-2, :, :-1]
    m = evaluate_masks(moved, ref, spacing)
    pooled = np.concatenate(brute_force_distances(moved, ref, spacing))
    assert m["hd95"] == pytest.approx(np.percentile(pooled, 95))
    assert m["assd"] == pytest.approx(pooled.mean())
    assert 0.8 < m["dice"] < 1.0
    # Every voxel moved by sqrt(2^2 + 1^2) voxels of 3 mm (the few cut off by the array edge aside).
    assert 0 < m["hd95"] <= math.sqrt(5) * 3 + 1e-9


def test_evaluate_masks_agrees_with_the_single_metrics():
    a = sphere((20, 30, 40), 9)
    b = sphere((24, 29, 38), 10)
    spacing = (0.8, 0.8, 2.0)
    assert evaluate_masks(a, b, spacing) == pytest.approx(
        {
            "dice": dice(a, b),
            "iou": iou(a, b),
            "hd95": hd95(a, b, spacing),
            "assd": assd(a, b, spacing),
            "rvd": relative_volume_difference(a, b),
        }
    )
