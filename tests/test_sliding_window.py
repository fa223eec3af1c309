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


@pytest.mark.parametrize("shape", [(20, 20, 20), (40, 20, 20)])  # one window; the sliding window
def test_what_the_network_says_in_the_padding_never_wins_the_largest_component(shape):
    """Padded voxels are no voxel of the input and training never scores them: a 'liver' the
    network draws there must not be the component kept (it erased the real liver of both IRCAD
    CTs when prepare() padded the grid before the largest-component step)."""
    from liverkd.core import volume as V
    from liverkd.core.inference import segment_volume
    from liverkd.core.spec import PreprocessSpec

    spec = PreprocessSpec(spacing=(3.0, 3.0, 3.0), input_shape=(32, 32, 32))
    hu = np.zeros(shape, np.float32)  # water: x = 175 / 425 after the window, never 0
    hu[8:14, 8:14, 8:14] = 200.0  # the liver: a 6^3 blob, far smaller than the padding
    vol = V.Volume(hu, np.diag([3.0, 3.0, 3.0, 1.0]))

    def predict(window):  # liver where the input is bright, and everywhere in the padding (x == 0)
        liver = (window > 0.8) | (window == 0.0)
        return np.concatenate([~liver, liver], axis=1).astype(np.float32) * 8.0 - 4.0

    mask = segment_volume(vol, spec, predict)
    assert mask.shape == shape
    expected = np.zeros(shape, np.uint8)
    expected[8:14, 8:14, 8:14] = 1
    assert np.array_equal(mask, expected)
