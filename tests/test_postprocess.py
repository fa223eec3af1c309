"""Post-processing: liver probability, largest connected component, hole filling."""

import numpy as np

from liverkd.core.inference import (
    clean_mask,
    clean_probability,
    fill_holes,
    largest_component,
    liver_probability,
    softmax,
)


def test_softmax_sums_to_one_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (1, 3, 4, 5, 6)).astype(np.float32)
    p = softmax(logits)
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(p.argmax(axis=1), logits.argmax(axis=1))
    assert np.all(np.isfinite(softmax(np.array([[1000.0, -1000.0]]).reshape(1, 2, 1, 1, 1))))


def test_liver_probability_two_one_and_many_channels():
    rng = np.random.default_rng(1)
    two = rng.normal(size=(1, 2, 5, 5, 5))
    assert np.array_equal(liver_probability(two) > 0.5, two[0].argmax(axis=0) == 1)
    one = rng.normal(size=(1, 1, 5, 5, 5))
    assert np.array_equal(liver_probability(one) > 0.5, one[0, 0] > 0)
    many = rng.normal(size=(4, 5, 5, 5))
    p = liver_probability(many, label=2)
    assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))


def test_clean_probability_thresholds_to_the_clean_mask():
    """Largest component with holes filled, as clean_mask; the rim keeps its values for interpolation."""
    rng = np.random.default_rng(2)
    p = np.zeros((24, 24, 24), np.float32)
    p[3:15, 3:15, 3:15] = 0.9
    p[7:9, 7:9, 7:9] = 0.1  # an enclosed hole
    p[18:21, 18:21, 18:21] = 0.8  # a smaller, separate blob
    p += rng.uniform(0, 0.3, p.shape).astype(np.float32) * (p < 0.5)
    out = clean_probability(p)
    assert np.array_equal(out > 0.5, clean_mask(p > 0.5).astype(bool))
    assert out[8, 8, 8] == 1.0 and out[19, 19, 19] == 0.0
    assert out[2, 8, 8] == p[2, 8, 8] > 0  # rim voxel: the network's value
    assert out[0, 0, 0] == 0.0
    assert not clean_probability(np.full((4, 4, 4), 0.2, np.float32)).any()


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:10, 2:10, 2:10] = True  # 512 voxels
    mask[14:17, 14:17, 14:17] = True  # 27 voxels
    out = largest_component(mask)
    assert out.sum() == 512 and out[5, 5, 5] and not out[15, 15, 15]


def test_largest_component_joins_diagonal_neighbours():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True  # touching at corners only
    mask[5, 0, 5] = True
    assert largest_component(mask).sum() == 3


def test_fill_holes_fills_enclosed_cavities_only():
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[2:10, 2:10, 2:10] = True
    mask[4:6, 4:6, 4:6] = False  # enclosed
    mask[4:6, 4:6, 7:12] = False  # a tunnel open to the outside (through z = 9 -> edge)
    out = fill_holes(mask)
    assert out[4:6, 4:6, 4:6].all()
    assert not out[4:6, 4:6, 8:10].any()


def test_clean_mask_is_uint8_and_empty_stays_empty():
    empty = clean_mask(np.zeros((5, 5, 5), dtype=bool))
    assert empty.dtype == np.uint8 and not empty.any()
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:8, 1:8, 1:8] = True
    mask[4, 4, 4] = False
    mask[9, 9, 9] = True
    out = clean_mask(mask)
    assert out.dtype == np.uint8 and out.sum() == 7**3 and set(np.unique(out)) == {0, 1}


def test_fill_holes_on_the_bounding_box_equals_the_whole_array():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[8:30, 5:25, 10:35] = rng.random((22, 20, 25)) > 0.3  # many cavities, some open to the box edge
    assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert not fill_holes(np.zeros((5, 5, 5), dtype=bool)).any()
