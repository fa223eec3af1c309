"""Sliding-window inference with Gaussian blending."""

import itertools

import numpy as np
import pytest

from liverkd.core.inference import gaussian_importance, sliding_window_inference, window_starts


@pytest.mark.parametrize(
    "size,roi,overlap", [(64, 64, 0.25), (65, 64, 0.25), (200, 64, 0.25), (200, 64, 0.5), (10, 3, 0.9)]
)
def test_windows_cover_every_voxel_and_stay_inside(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    covered = np.zeros(size, dtype=int)
    for s in starts:
        assert 0 <= s <= size - roi
        covered[s : s + roi] += 1
    assert covered.min() >= 1
    assert starts[0] == 0 and starts[-1] == size - roi
    assert starts == sorted(set(starts))
    steps = np.diff(starts)
    assert np.all(steps[:-1] == max(1, int(roi * (1 - overlap)))) if len(steps) > 1 else True


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    w = gaussian_importance((16, 12, 9))
    assert w.shape == (16, 12, 9) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert np.unravel_index(np.argmax(w), w.shape) in list(itertools.product([7, 8], [5, 6], [4]))
    assert np.allclose(w, w[::-1, ::-1, ::-1])


def test_identity_predictor_gives_back_the_image():
    """Any misplaced window or weight would show as a mismatch."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(50, 23, 37)).astype(np.float32)
    calls = []

    def predictor(x):
        calls.append(x.shape)
        return np.concatenate([x, 2 * x], axis=1)

    out = sliding_window_inference(image, (16, 32, 16), predictor, overlap=0.25)
    assert out.shape == (2, 50, 23, 37)
    assert np.allclose(out[0], image, atol=1e-5) and np.allclose(out[1], 2 * image, atol=1e-5)
    expected = np.prod([len(window_starts(n, r, 0.25)) for n, r in zip((50, 32, 37), (16, 32, 16))])
    assert len(calls) == expected and set(calls) == {(1, 1, 16, 32, 16)}


def test_small_axes_are_padded_with_pad_value():
    seen = []

    def predictor(x):
        seen.append(x.copy())
        return x

    image = np.ones((8, 8, 8), dtype=np.float32)
    out = sliding_window_inference(image, (12, 8, 8), predictor, pad_value=-3.0)
    assert out.shape == (1, 8, 8, 8) and np.allclose(out, 1.0)
    assert len(seen) == 1 and (seen[0] == -3.0).sum() == 4 * 8 * 8


def test_blending_favours_window_centres():
    """Each window answers its own index; a voxel in the middle of window A and the edge of B leans to A."""
    image = np.zeros((48, 8, 8), dtype=np.float32)
    counter = iter(range(100))

    def predictor(x):
        return np.full(x.shape, float(next(counter)), dtype=np.float32)

    out = sliding_window_inference(image, (32, 8, 8), predictor, overlap=0.5)
    # windows start at 0 and 16: voxel 8 is nearer the first window's centre, voxel 40 the second's
    assert out[0, 8, 4, 4] < 0.5 < out[0, 40, 4, 4]
    assert out[0, 0, 4, 4] == pytest.approx(0.0) and out[0, 47, 4, 4] == pytest.approx(1.0)


def test_bad_predictor_shape_is_refused():
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(np.zeros((8, 8, 8), np.float32), (8, 8, 8), lambda x: x[:, :, :4])
