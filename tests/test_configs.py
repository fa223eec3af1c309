"""The packaged pipeline configs (liverkd.configs) and `--set key=value` (no torch needed)."""

import re
from pathlib import Path

import pytest

from liverkd import configs
from liverkd.configs import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_configs_users_name_are_packaged():
    assert {"quick", "default", "default-100k", "paper-100k", "paper-30k"} <= set(configs.names())
    assert {p.stem for p in (ROOT / "configs").glob("*.yaml")} == set(configs.names())


def test_a_name_finds_the_packaged_file_and_a_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("quick").read_text() == (ROOT / "configs" / "quick.yaml").read_text()
    assert configs.resolve("quick.yaml") == configs.resolve("quick")
    (tmp_path / "quick.yaml").write_text("run_dir: mine\n")
    assert configs.resolve("quick.yaml") == Path("quick.yaml")  # an existing file is taken as a file
    listed = re.escape(", ".join(configs.names()))  # every packaged name, in the message
    with pytest.raises(ConfigError, match=rf"^nosuch: no such config file, nor a packaged config \(packaged: {listed}"):
        configs.resolve("nosuch")
    with pytest.raises(ConfigError, match=r"^sub/quick.yaml: no such config file$"):
        configs.resolve("sub/quick.yaml")  # a path is never taken for a name


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("train.steps.teacher=10", ["train", "steps", "teacher"], 10),
        ("train.lr=1e-3", ["train", "lr"], 1e-3),
        ("data.path=/data/Task03_Liver", ["data", "path"], "/data/Task03_Liver"),
        ("patch=[16, 16, 16]", ["patch"], [16, 16, 16]),
        ("data.cache=null", ["data", "cache"], None),
        ("kd.balance=false", ["kd", "balance"], False),
        ("run_dir='123'", ["run_dir"], "123"),
        ("augment={rotate_deg: 5}", ["augment"], {"rotate_deg": 5}),
        ("a.b==c", ["a", "b"], "=c"),
    ],
)
def test_values_are_typed_by_yaml(item, key, value):
    assert configs.parse_override(item) == (key, value)


def test_overrides_apply_to_a_copy_making_missing_levels():
    raw = {"train": {"steps": {"teacher": 400}}, "data": {"path": "/x", "cache": None}}
    out = configs.apply_overrides(raw, ["train.steps.teacher=10", "data.phantoms.n=4", "data.cache.x=1", "seed=3"])
    assert out == {"train": {"steps": {"teacher": 10}}, "data": {"path": "/x", "phantoms": {"n": 4}, "cache": {"x": 1}},
                   "seed": 3}  # fmt: skip
    assert raw["train"]["steps"]["teacher"] == 400


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train", "--set train: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("train..steps=3", "--set train..steps=3: expected KEY=VALUE"),
        ("seed.x=1", "--set seed.x=1: 'seed' is a value, not a mapping (0)"),
        ("seed=[1", "--set seed=[1: the value is not valid YAML"),
    ],
)
def test_bad_overrides_are_one_line(item, message):
    with pytest.raises(ConfigError) as err:
        configs.apply_overrides({"seed": 0}, [item])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_read_applies_overrides_to_the_packaged_file():
    path, raw = configs.read("quick", ["train.steps.teacher=10", "run_dir=elsewhere"])
    assert path == configs.resolve("quick")
    assert raw["train"]["steps"] == {"teacher": 10, "student": 600}
    assert raw["run_dir"] == "elsewhere"


def test_read_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        configs.read(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'top level' must be a mapping, got list"):
        configs.read(bad)
