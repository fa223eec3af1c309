"""The pipeline configs that ship inside the package (this folder installs as liverkd.configs),
selectable by name: `liverkd distill run quick` is `liverkd distill run configs/quick.yaml` from
anywhere, a wheel install included. `--set key=value` overrides one value of any config.

Relative paths inside a config (run_dir: runs/quick, data.phantoms.labelmaps:
../shared/data/...) are relative to the current directory, whichever way the config was named.

    from liverkd import configs
    configs.names()                                 # ['default', 'default-100k', ..., 'quick']
    configs.resolve("quick")                        # the packaged file; a path is returned as it is
    configs.read("quick", ["train.steps.teacher=10"])  # the YAML mapping, overrides applied
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from liverkd.core.errors import EXIT_USAGE, LiverkdError

SUFFIX = ".yaml"
EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
"""1e-3: a float in YAML 1.2 and Python, a string in PyYAML's YAML 1.1 (which wants 1.0e-3)."""


class ConfigError(LiverkdError, ValueError):
    """One line: '<file>: <problem>' or '--set KEY=VALUE: <problem>'. A usage error (exit 2)."""

    exit_code = EXIT_USAGE


def names() -> list[str]:
    """Names of the packaged configs (quick, default, ...)."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(SUFFIX)] for p in root.iterdir() if p.name.endswith(SUFFIX))


def resolve(config) -> Path:
    """A config file's path, or a packaged config's name (with or without .yaml) -> its file.

    An existing file wins over a packaged name; anything else is a one-line ConfigError."""
    path = Path(config)
    if path.is_file():
        return path
    if path.name != str(config):  # a path (it has a folder part), not a name
        raise ConfigError(f"{config}: no such config file")
    name = str(config)[: -len(SUFFIX)] if str(config).endswith(SUFFIX) else str(config)
    if name in names():
        return Path(str(resources.files(__name__) / f"{name}{SUFFIX}"))
    raise ConfigError(f"{config}: no such config file, nor a packaged config (packaged: {', '.join(names())})")


def parse_override(item: str) -> tuple[list[str], object]:
    """'train.steps.teacher=10' -> (['train', 'steps', 'teacher'], 10): the value is read as YAML
    (10 an int, 1e-3 a float, [1, 2] a list, null None; quote it to keep a string)."""
    import yaml

    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.steps.teacher=10")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(value, str) and EXPONENT.fullmatch(text.strip()):
        value = float(value)
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict, overrides) -> dict:
    """A copy of the config mapping `raw` with each 'dotted.key=value' set in it. A value replaces
    the key's whole value (a mapping too); missing levels are made. Unknown keys are left to the
    config loader, which names them."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item}: '{where}' is a value, not a mapping ({node!r})")
        node[parts[-1]] = value
    return out


def read(config, overrides=()) -> tuple[Path, dict]:
    """(the config's file, its YAML mapping with `overrides` applied). Errors are one line naming
    the file (unreadable, not YAML, not a mapping) or the --set item."""
    import yaml

    path = resolve(config)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'top level' must be a mapping, got {type(raw).__name__}")
    return path, apply_overrides(raw, overrides)
