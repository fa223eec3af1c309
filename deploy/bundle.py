"""An engine bundle: a folder with model files and engine.json (see ../shared/DESIGN.md).

engines/<name>/
    model.onnx          fp32 ONNX, always present (the reference for parity checks)
    model.fp16.onnx     optional, fp16 tensors (strongly typed TensorRT builds)
    model.int8.onnx     optional, Q/DQ from calibration
    model.plan          optional, TensorRT plan for one GPU + TensorRT version
    engine.json         the facts below
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from liverkd.core.atomic import write_json
from liverkd.core.spec import PreprocessSpec

FORMAT = "liverkd-engine"
VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be used. str() is one line naming the folder or file."""


@dataclass
class Bundle:
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["spec"])

    @property
    def precision(self) -> str:
        return self.meta.get("precision", "fp32")

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def input_name(self) -> str:
        return self.meta["input"]["name"]

    @property
    def output_name(self) -> str:
        return self.meta["output"]["name"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input"]["shape"])

    def file(self, key: str) -> Path | None:
        """Path of a model file named in engine.json's "files" ({"onnx": "model.onnx", ...})."""
        name = self.meta.get("files", {}).get(key)
        return self.path / name if name else None

    @property
    def onnx_for_runtime(self) -> Path:
        """The ONNX file ONNX Runtime should run: the precision's own file, else fp32."""
        return self.file(f"onnx_{self.precision}") or self.file("onnx")

    @classmethod
    def load(cls, path) -> Bundle:
        path = Path(path)
        meta_path = path / "engine.json"
        if not path.is_dir():
            raise BundleError(f"{path}: not an engine bundle folder")
        if not meta_path.is_file():
            raise BundleError(f"{path}: no engine.json (build one with `liverkd build-engine`)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{meta_path}: unreadable engine.json ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BundleError(f"{meta_path}: not a liverkd engine.json")
        if meta.get("version", 0) > VERSION:
            raise BundleError(f"{meta_path}: bundle version {meta['version']} is newer than this liverkd")
        for key in ("spec", "input", "output", "files"):
            if key not in meta:
                raise BundleError(f"{meta_path}: missing key {key!r}")
        bundle = cls(path, meta)
        try:  # a hand-edited or newer engine.json: one line here, not a traceback in the Segmenter
            PreprocessSpec.from_dict(meta["spec"])
            tuple(meta["input"]["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{meta_path}: invalid spec or input shape ({type(e).__name__}: {e})") from None
        onnx = bundle.file("onnx")
        if onnx is None or not onnx.is_file():
            raise BundleError(f"{path}: model.onnx named in engine.json is missing")
        return bundle

    def save(self) -> Path:
        self.meta.setdefault("format", FORMAT)
        self.meta.setdefault("version", VERSION)
        return write_json(self.path / "engine.json", self.meta)


def newest_bundle(root="engines") -> Bundle:
    """The most recently built bundle under `root`."""
    root = Path(root)
    candidates = sorted(
        (p.parent for p in root.glob("*/engine.json")), key=lambda p: (p / "engine.json").stat().st_mtime
    )
    if not candidates:
        raise BundleError(f"{root}: no engine bundles (build one with `liverkd build-engine`)")
    return Bundle.load(candidates[-1])
