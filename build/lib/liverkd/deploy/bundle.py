"""An engine bundle: a folder of model files and engine.json (EngineMeta); see ../shared/DESIGN.md.

engines/<name>/
    model.onnx          fp32 ONNX, always present (the reference for parity checks)
    model.fp16.onnx     optional, fp16 tensors (strongly typed TensorRT builds)
    model.int8.onnx     optional, Q/DQ from calibration
    model.plan          optional, TensorRT plan for one GPU + TensorRT version
    model.pt            optional, the source checkpoint (the torch backend)
    calibration.json    int8: the activation ranges; calib_loader.py: a Polygraphy data loader
    engine.json         EngineMeta: the facts, with the size and sha256 of every file above

Nothing in a bundle is trusted for being there (docs/security.md): engine.json is parsed into
typed fields, every file it names must lie inside the bundle folder, and a model file is read
once, checked against its recorded size and sha256, and only then handed to a runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from liverkd.core.atomic import sha256_file, write_json
from liverkd.core.errors import LiverkdError
from liverkd.core.spec import PreprocessSpec

FORMAT = "liverkd-engine"
FORMAT_VERSION = 2
"""2: every file with size and sha256, typed sections. 1 (no hashes) is refused: rebuild it."""
PRECISIONS = ("fp32", "fp16", "int8")
ONNX_ROLE = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}
"""The ONNX file that serves each precision on ONNX Runtime and OpenVINO."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()


class BundleError(LiverkdError, ValueError):
    """A bundle that cannot be used. str() is one line naming the folder or file."""


# ---------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFile:
    """A model file and the size and sha256 it must have; what a Runner is built from."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path) -> ModelFile:
        """A file as it is now (one this process just wrote: export parity, benchmarks)."""
        path = Path(path)
        return cls(path, sha256_file(path), path.stat().st_size)

    def read(self) -> bytes:
        """The file's bytes, once they match the recorded size and sha256; else BundleError naming it."""
        try:
            size = self.path.stat().st_size
            if size == self.size:
                data = self.path.read_bytes()
                size = len(data)
        except OSError as e:
            raise BundleError(f"{self.path}: cannot read it ({e.strerror or e})") from None
        if size != self.size:
            kind = "truncated" if size < self.size else "larger than recorded"
            raise BundleError(f"{self.path}: {kind} ({size:,} bytes, engine.json says {self.size:,}); not loaded")
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise BundleError(f"{self.path}: sha256 differs from engine.json (changed since the build); not loaded")
        return data


# ---------------------------------------------------------------- engine.json


@dataclass(frozen=True)
class FileRecord:
    path: str
    """Relative to the bundle folder; never absolute, never through `..`."""
    sha256: str
    size: int

    def __post_init__(self):
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError(f"size {self.size} is negative")
        parts = Path(self.path).parts
        if not parts or Path(self.path).is_absolute() or self.path.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(f"path {self.path!r} must be a plain path inside the bundle folder")

    @classmethod
    def of(cls, folder: Path, name: str) -> FileRecord:
        return cls(name, sha256_file(folder / name), (folder / name).stat().st_size)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]
    """(1, channels, X, Y, Z); a named axis (str) is dynamic."""
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.shape) != 5:
            raise ValueError(f"shape {list(self.shape)} must have 5 axes (1, channels, X, Y, Z)")
        if any(isinstance(d, int) and d <= 0 for d in self.shape) or not all(
            isinstance(d, int) for d in self.shape[:2]
        ):
            raise ValueError(f"shape {list(self.shape)}: sizes must be positive, batch and channels fixed")


@dataclass(frozen=True)
class Source:
    checkpoint: str | None = None
    sha256: str | None = None
    """Of the source checkpoint."""
    preset: str | None = None
    onnx: str | None = None
    """The ONNX file the bundle was built from, when it was built from one."""
    onnx_sha256: str | None = None


@dataclass(frozen=True)
class Calibration:
    method: str
    files: tuple[str, ...]
    n: int
    statistics: str
    folder: str
    held_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorRTTarget:
    """What a plan was built with and for: it runs only where all of these are the same."""

    version: str  # TensorRT's: a plan runs only on the version that built it
    gpu_name: str
    compute_capability: str
    sm_count: int | None = None  # an AGX Orin plan is not an Orin NX plan, though both are SM 8.7
    driver: str | None = None
    strongly_typed: bool = True
    builder_flags: tuple[str, ...] = ()
    workspace_mib: int = 1024
    onnx: str = "model.onnx"
    """The ONNX file the plan was built from."""


@dataclass(frozen=True)
class AccuracyCheck:
    """The built model against the fp32 ONNX on ONNX Runtime CPU, on held-out volumes (deploy.compare)."""

    reference: str
    runner: str
    volumes: tuple[str, ...]
    dice: tuple[float, ...]
    dice_min: float
    dice_mean: float
    argmax_agreement: float
    max_abs_logit_error: float
    min_agreement: float
    passed: bool


@dataclass(frozen=True)
class SpeedCheck:
    device: str
    fp32_ms: float
    built_ms: float
    ratio: float
    runs: int


@dataclass(frozen=True)
class EngineMeta:
    """engine.json, typed and versioned. `from_json` refuses anything malformed in one line."""

    name: str
    spec: PreprocessSpec
    precision: str
    backend: str
    """The backend the bundle was built for: "tensorrt" (a plan) or "onnxruntime"."""
    input: TensorInfo
    output: TensorInfo
    files: dict[str, FileRecord]
    """Role -> file: onnx, onnx_fp16, onnx_int8, plan, checkpoint, calibration, data_loader."""
    source: Source = field(default_factory=Source)
    calibration: Calibration | None = None
    tensorrt: TensorRTTarget | None = None
    built_at: str = ""
    accuracy: AccuracyCheck | None = None
    speed: SpeedCheck | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if "onnx" not in self.files:
            raise KeyError("files.onnx")
        if ("plan" in self.files) != (self.tensorrt is not None):
            raise ValueError("files.plan and the tensorrt entry come together (a plan is useless without its target)")

    def replace(self, **changes) -> EngineMeta:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, data, where) -> EngineMeta:
        """Parsed engine.json -> EngineMeta; BundleError naming `where` (the file) for anything else."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{where}: not a liverkd engine.json")
        version = data.get("format_version", data.get("version"))
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"{where}: no format_version")
        if version < FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {version} records no file hashes; rebuild it with `liverkd build-engine`"
            )
        if version > FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {version} is newer than this liverkd reads ({FORMAT_VERSION})")
        section, values = None, {}
        try:
            for name, hint, value, path in _fields(cls, data, ""):
                section = name
                values[name] = _from_json(hint, value, path)
            section = None
            return cls(**values)
        except (KeyError, TypeError, ValueError) as e:
            what = f"invalid {section}" if section else "invalid"
            raise BundleError(f"{where}: {what} ({type(e).__name__}: {e})") from None


def _to_json(value):
    if isinstance(value, PreprocessSpec):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _fields(tp, value: dict, where: str):
    """(name, type, JSON value, path) of every field of dataclass `tp` that `value` holds or must hold
    (a required one it lacks comes as _MISSING); ValueError for a key `tp` does not have."""
    hints = typing.get_type_hints(tp)
    unknown = sorted(set(value) - set(hints))
    if unknown:
        raise ValueError(f"{where or 'engine.json'}: unknown keys {unknown}")
    for f in dataclasses.fields(tp):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in value or required:
            yield f.name, hints[f.name], value.get(f.name, _MISSING), f"{where}.{f.name}" if where else f.name


def _from_json(tp, value, where: str):
    """JSON `value` as type `tp`: a dataclass, tuple[X, ...], dict[str, X], X | None, str, int, float, bool."""
    if value is _MISSING:
        raise KeyError(where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if (dataclasses.is_dataclass(tp) or origin is dict) and not isinstance(value, dict):
        raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
    if tp is PreprocessSpec:
        return PreprocessSpec.from_dict(value)
    if dataclasses.is_dataclass(tp):
        kwargs = {name: _from_json(hint, v, path) for name, hint, v, path in _fields(tp, value, where)}
        try:
            return tp(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: X's own error says what is wrong
            return _from_json(options[0], value, where)
        for option in options:
            try:
                return _from_json(option, value, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where}: {value!r} is not {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        return {k: _from_json(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: EngineMeta

    @property
    def spec(self) -> PreprocessSpec:
        return self.meta.spec

    @property
    def precision(self) -> str:
        return self.meta.precision

    @property
    def name(self) -> str:
        return self.meta.name or self.path.name

    @property
    def input_name(self) -> str:
        return self.meta.input.name

    @property
    def output_name(self) -> str:
        return self.meta.output.name

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        return self.meta.input.shape

    def file(self, role: str) -> Path | None:
        """Path of the file engine.json records for `role` (not yet checked against its hash)."""
        record = self.meta.files.get(role)
        return self.path / record.path if record else None

    def model_file(self, role: str) -> ModelFile:
        record = self.meta.files.get(role)
        if record is None:
            raise BundleError(f"{self.path}: engine.json names no {role} file")
        return ModelFile(self.path / record.path, record.sha256, record.size)

    def model_for(self, backend: str, precision: str | None = None) -> ModelFile:
        """The file that serves `backend` at `precision` (default: the bundle's):
        tensorrt -> model.plan (its own precision only), torch -> model.pt,
        onnxruntime / openvino -> model.onnx (fp32), model.fp16.onnx, model.int8.onnx."""
        precision = precision or self.precision
        if backend == "tensorrt":
            if precision != self.precision:
                raise BundleError(f"{self.path}: the TensorRT plan is {self.precision}, not {precision}")
            return self.model_file("plan")
        if backend == "torch":
            return self.model_file("checkpoint")
        if precision not in ONNX_ROLE:
            raise BundleError(f"{self.path}: precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        return self.model_file(ONNX_ROLE[precision])

    @property
    def finished(self) -> bool:
        """Built to the end: the accuracy check ran and passed."""
        return self.meta.accuracy is not None and self.meta.accuracy.passed

    @classmethod
    def load(cls, path) -> Bundle:
        path = Path(path)
        meta_path = path / "engine.json"
        if not path.is_dir():
            raise BundleError(f"{path}: not an engine bundle folder")
        if not meta_path.is_file():
            raise BundleError(f"{path}: no engine.json (build one with `liverkd build-engine`)")
        try:
            data = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{meta_path}: unreadable engine.json ({e})") from None
        bundle = cls(path, EngineMeta.from_json(data, meta_path))
        bundle.check_paths()
        return bundle

    def check_paths(self) -> None:
        """Every recorded file lies inside the bundle folder (a symlink may not lead out of it), and
        model.onnx is there. Another file may be left out of a copy (model.pt of a packaged model):
        it is refused when it is needed, as a changed one is."""
        root = self.path.resolve()
        for role, record in self.meta.files.items():
            target = (self.path / record.path).resolve()
            if not target.is_relative_to(root):
                raise BundleError(f"{self.path / 'engine.json'}: files.{role} {record.path!r} leads out of the bundle")
        if not (self.path / self.meta.files["onnx"].path).is_file():
            raise BundleError(f"{self.path}: {self.meta.files['onnx'].path} named in engine.json is missing")

    def save(self) -> Path:
        return write_json(self.path / "engine.json", self.meta.to_json())


def newest_bundle(root="engines") -> Bundle:
    """The most recently written finished bundle under `root` (the `--engine` default).

    Hidden folders (a build in progress, `.tmp-*`, an old copy being replaced) are never
    candidates, nor is a bundle whose accuracy check has not run and passed."""
    root = Path(root)
    folders = [p.parent for p in root.glob("*/engine.json") if not p.parent.name.startswith(".")]
    for folder in sorted(folders, key=lambda p: (p / "engine.json").stat().st_mtime, reverse=True):
        bundle = Bundle.load(folder)
        if bundle.finished:
            return bundle
    raise BundleError(f"{root}: no engine bundles with a passed accuracy check (build one with `liverkd build-engine`)")
