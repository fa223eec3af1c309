"""The Python API: liverkd.segment for one call, Segmenter.segment for any kind of input."""

import nibabel as nib
import numpy as np
import pytest

import liverkd
from liverkd.core.synth import synth_case
from liverkd.deploy.segment import Segmenter
from liverkd.models import DEFAULT, path


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    image, _ = synth_case(4, shape=(48, 48, 40), spacing=6.0)
    file = tmp_path_factory.mktemp("api") / "ct.nii.gz"
    nib.save(image.to_nifti(), file)
    return file


def test_one_call_from_a_path_an_image_and_an_array_gives_the_same_mask(ct):
    img = nib.load(ct)
    from_path = liverkd.segment(ct)
    from_image = liverkd.segment(img)
    array = np.asanyarray(img.dataobj)
    from_array = liverkd.segment((array, img.affine))
    for out in (from_path, from_image, from_array):
        assert out.shape == img.shape and np.array_equal(out.affine, img.affine)
        assert out.get_data_dtype() == np.uint8
    reference = np.asanyarray(from_path.dataobj)
    assert reference.any()
    assert np.array_equal(np.asanyarray(from_image.dataobj), reference)
    assert np.array_equal(np.asanyarray(from_array.dataobj), reference)


def test_probability_thresholds_to_about_the_mask(ct):
    with Segmenter.load(path(DEFAULT)) as seg:
        out = seg.segment(str(ct), probability=True)
    p = out.probability
    assert p.shape == out.mask.shape and p.dtype == np.float32
    assert 0.0 <= p.min() and p.max() <= 1.0
    # The mask is the probability thresholded at 0.5 (one resampling; the cell shortcut is exact).
    assert np.array_equal(p > 0.5, out.mask.astype(bool))


def test_bad_sources_are_type_errors(ct):
    with Segmenter.load(path(DEFAULT)) as seg:
        with pytest.raises(TypeError, match="path, a nibabel image or"):
            seg.segment(42)
        with pytest.raises(TypeError, match="pair"):
            seg.segment((np.zeros((4, 4, 4)),))
