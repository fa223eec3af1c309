"""The optional parts of liverkd and the extra that installs each (pyproject.toml).

The base install is what `liverkd infer` and the device runner need; the rest is imported only
where it is used, through `require`, so that a missing package is one line naming the extra:

    require("matplotlib.pyplot", "--preview")  # LiverkdError: --preview needs matplotlib: pip install 'liverkd[plot]'
"""

from __future__ import annotations

import importlib

from liverkd.core.errors import LiverkdError

EXTRAS = {"torch": "train", "onnxsim": "train", "yaml": "train", "matplotlib": "plot", "onnx": "build"}
"""Top-level module -> the extra that brings it."""
PACKAGES = {"yaml": "pyyaml"}
"""Top-level module -> its package's name on PyPI, where they differ."""


class MissingExtra(LiverkdError):
    """An optional package is not installed (exit 1: a fact of this environment, not a usage error)."""


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    return f"pip install 'liverkd[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {PACKAGES.get(top, top)}"


def require(module: str, what: str):
    """`module`, imported; or a MissingExtra: '<what> needs <package>: pip install 'liverkd[<extra>]''."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or top).split(".")[0]
        why = "" if missing == top else f" ({e})"  # installed, but something it needs is not
        raise MissingExtra(f"{what} needs {PACKAGES.get(top, top)}: {install_hint(top)}{why}") from None
