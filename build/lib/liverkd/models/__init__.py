"""The engine bundles that ship inside the package (ONNX + engine.json, a few hundred KB each),
so that `liverkd infer ct.nii.gz` works on a fresh install with no training and no download.
MODEL_CARD.md beside this file says how they were trained, on what, and how well they do.

    from liverkd import models
    models.path()                 # the default bundle's folder
    models.path("student-100k")   # another packaged one
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT = "student-30k"


def names() -> list[str]:
    """Names of the packaged bundles (folders holding an engine.json)."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "engine.json").is_file())


def path(name: str = DEFAULT) -> Path:
    """Folder of the packaged bundle `name`; a one-line error naming the choices if there is none."""
    if name not in names():
        from liverkd.core.errors import LiverkdError

        choices = ", ".join(names()) or "none: this install ships no model"
        raise LiverkdError(f"no packaged model {name!r} (packaged: {choices})")
    return Path(str(resources.files(__name__) / name))


def resolve(engine) -> Path:
    """`--engine` value -> bundle folder: a path to a bundle folder, or a packaged name; None = the default."""
    if engine is None:
        return path(DEFAULT)
    candidate = Path(engine)
    if candidate.exists() or str(engine) not in names():
        return candidate
    return path(str(engine))
