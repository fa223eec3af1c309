import dataclasses
import json

import pytest

from liverkd.core.spec import SPEC_VERSION, PreprocessSpec


def test_defaults():
    spec = PreprocessSpec()
    assert spec.spacing == (3.0, 3.0, 3.0)
    assert spec.input_shape == (128, 128, 128)
    assert spec.hu_window == (-175.0, 250.0)
    assert spec.labels == {"background": 0, "liver": 1}
    assert spec.version == SPEC_VERSION


def test_json_round_trip():
    spec = PreprocessSpec(spacing=(1.5, 1.5, 2.5), hu_window=(-21, 189), input_shape=(96, 96, 64))
    text = spec.to_json()
    back = PreprocessSpec.from_json(text)
    assert back == spec and hash(back) == hash(spec)
    assert back.spacing == (1.5, 1.5, 2.5) and isinstance(back.input_shape[0], int)
    data = json.loads(text)
    assert data["hu_window"] == [-21.0, 189.0] and data["version"] == SPEC_VERSION
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_values_are_normalised_and_frozen():
    spec = PreprocessSpec(spacing=[2, 2, 2], input_shape=[64.0, 64, 64], labels={"liver": "1", "background": 0})
    assert spec.spacing == (2.0, 2.0, 2.0) and spec.input_shape == (64, 64, 64)
    assert spec.labels["liver"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.spacing = (1.0, 1.0, 1.0)
    assert spec.with_(spacing=(6, 6, 6)).spacing == (6.0, 6.0, 6.0)
    assert spec.spacing == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spacing": (3.0, 3.0)}, "spacing"),
        ({"spacing": (3.0, 0.0, 3.0)}, "spacing"),
        ({"spacing": (3.0, -1.0, 3.0)}, "spacing"),
        ({"hu_window": (250.0, -175.0)}, "hu_window"),
        ({"hu_window": (100.0, 100.0)}, "hu_window"),
        ({"input_shape": (128, 128)}, "input_shape"),
        ({"input_shape": (128, 4, 128)}, "input_shape"),
        ({"version": SPEC_VERSION + 1}, "newer"),
    ],
)
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**changes)
    with pytest.raises(ValueError, match=message):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), **changes})


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown PreprocessSpec keys"):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), "hu_windw": [0, 1]})
    with pytest.raises(ValueError):
        PreprocessSpec.from_json("{not json")
