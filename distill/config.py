"""The pipeline's YAML config: typed, every key read, unknown keys an error naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from liverkd.configs import EXPONENT, ConfigError, read
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.data import Augment
from liverkd.distill.models import PRESETS
from liverkd.distill.objectives import KDSettings

RENAMED = {"gtan.widths": "gtan.n_widths"}
"""Old key -> new key: an old config gets a one-line error naming the new key."""
REMOVED = {
    "train.steps.assistant": "TAKD's assistant now trains for the teacher's budget (train.steps.teacher, "
    "train.patience), as Mirzadeh et al. train theirs; delete the key",
}
"""Keys that are gone -> why: an old config gets a one-line error saying so."""
WAS_BOOL = {"kd.balance": "true is now 'teacher' (the old grouping) or 'labels', false is 'none'"}
"""Keys that were true/false and now name a choice: an old config's boolean gets a one-line error saying how."""


@dataclass(frozen=True)
class Phantoms:
    """Synthetic training data (liverkd.core.synth.write_dataset), written once per setting."""

    n: int = 12
    shape: tuple[int, int, int] = (64, 64, 64)
    seed: int = 0
    spacing: float | None = None
    """Voxel size in mm; None: 384 mm / shape per axis."""
    labelmaps: str | None = None
    """Folder of TotalSegmentator-style label-map subjects for the anatomy; None: procedural only."""
    procedural_fraction: float = 0.0
    """With label maps: the share of cases drawn from the procedural anatomy instead."""
    scan_extent: bool = False
    """Crop each case to a random scanned region, as real series are smaller than the input."""
    variants: bool = False
    """Add the synthesis variants (liverkd.core.synth.variants: a longer left lobe, liver-density
    masses outside the liver, food in the stomach). Off in the shipped recipe: measured worse on
    the real validation CTs (docs/results.md)."""


@dataclass(frozen=True)
class Data:
    path: str | None = None
    """A data set in any liverkd.core.datasets layout; or `phantoms` made into RUN_DIR/phantoms."""
    phantoms: Phantoms | None = None
    val: int = 2
    test: int = 2
    cache: str | None = None
    """Preprocessed-case cache folder; default RUN_DIR/cache."""


@dataclass(frozen=True)
class Models:
    teacher: str = "teacher"
    assistant: str = "ta"
    student: str = "student-30k"


@dataclass(frozen=True)
class GTAN:
    n_widths: int = 4
    """How many assistant widths the growth schedule has (after the student's own)."""
    grow_until: float = 0.5
    """Fraction of training from which the assistant has its full width."""
    beta: float = 0.0
    """Weight of the teacher (vs the assistant) in the student's KD target."""
    assistant_every: int = 1
    """The assistant's pass (forward, backward, its KD term) on every k-th step; in between the
    student learns from the teacher, as in KD. 1: every step, the method as published; larger
    k costs less per step (benchmarks/gtan_step.py --assistant-every)."""


@dataclass(frozen=True)
class Steps:
    teacher: int = 400
    """The teacher's budget; TAKD's assistant gets the same (and train.patience)."""
    student: int = 400
    """Every student, whatever the method: the ablation compares them at the same budget."""


@dataclass(frozen=True)
class Train:
    steps: Steps = field(default_factory=Steps)
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_every: int = 50
    num_workers: int = 0
    """DataLoader worker processes; also the processes that synthesise and preprocess the cases (0 or 1: one)."""
    patience: int = 0
    """Validations without a better Dice after which the teacher (and TAKD's assistant) stop early,
    their best weights kept; 0: they train all their steps. Students always train all theirs."""
    average: float = 0.0
    """Decay of an exponential moving average of the weights (distill/average.py): validation
    measures it and the checkpoint keeps it, at every stage; 0: the raw weights."""
    lr_schedule_steps: int = 0
    """Length of the learning-rate decay when longer than a stage's steps: the stage trains its
    steps of this longer schedule (the shipped 100k: 1250 steps of a 3000-step run that its time
    budget stopped, MODEL_CARD.md); 0: each stage's own steps."""


@dataclass(frozen=True)
class Ablation:
    students: tuple[str, ...] = ("student-100k", "student-30k")
    real: str | None = None
    """A folder laid out as ../shared/data (real_ct/, totalseg_example/): every method is also
    evaluated on the real validation CTs found there (liverkd.core.datasets.REAL_VALIDATION);
    None or a folder without them: synthetic held-out cases only."""


@dataclass(frozen=True)
class Config:
    run_dir: str
    data: Data
    spec: PreprocessSpec
    seed: int = 0
    patch: tuple[int, int, int] = (64, 64, 64)
    foreground: float = 2 / 3
    augment: Augment = field(default_factory=Augment)
    models: Models = field(default_factory=Models)
    kd: KDSettings = field(default_factory=KDSettings)
    gtan: GTAN = field(default_factory=GTAN)
    train: Train = field(default_factory=Train)
    ablation: Ablation = field(default_factory=Ablation)
    method: str = "gtan"
    """How `distill run` trains the student: gtan (teacher -> GTAN -> student), kd (teacher -> KD),
    or nokd (no teacher: Dice + CE on the labels alone)."""
    source: str = "<config>"


def _build(cls, value, where: str):
    hints = typing.get_type_hints(cls)
    if not isinstance(value, dict):
        raise ValueError(f"'{where or 'top level'}' must be a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for key in value:
        name = f"{where + '.' if where else ''}{key}"
        if name in RENAMED:
            raise ValueError(f"'{name}' is now '{RENAMED[name]}' (a count of assistant widths); rename it")
        if name in REMOVED:
            raise ValueError(f"'{name}' is gone: {REMOVED[name]}")
        if key not in names:
            raise ValueError(f"unknown key '{name}'")
        if name in WAS_BOOL and isinstance(value[key], bool):
            raise ValueError(f"'{name}' names a choice now: {WAS_BOOL[name]}")
    kwargs = {k: _convert(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"'{where or 'top level'}': {e}") from None


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _convert(hint, value, where)
    if hint is PreprocessSpec:
        if not isinstance(value, dict):
            raise ValueError(f"'{where}' must be a mapping")
        return PreprocessSpec.from_dict(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"'{where}' must be a list, got {value!r}")
        inner = args[0]
        if args[-1] is not Ellipsis and len(args) != len(value):
            raise ValueError(f"'{where}' must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(inner, v, where) for v in value)
    if hint is float:
        if isinstance(value, str) and EXPONENT.fullmatch(value.strip()):  # 1e-3, a string to PyYAML
            value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"'{where}' must be a number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and (type(value) is not hint):
        raise ValueError(f"'{where}' must be {hint.__name__}, got {value!r}")
    return value


def load_config(config, overrides=()) -> Config:
    """A config file or a packaged config's name (liverkd.configs), with `overrides`
    ('dotted.key=value', the value read as YAML) applied; a one-line ConfigError otherwise."""
    path, raw = read(config, overrides)
    where = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    try:
        cfg = _build(Config, raw, "")
        check(cfg)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return dataclasses.replace(cfg, source=where)


RUN_METHODS = ("gtan", "kd", "nokd")


def check(cfg: Config) -> None:
    if cfg.method not in RUN_METHODS:
        raise ValueError(f"unknown 'method' {cfg.method!r}; choose from {', '.join(RUN_METHODS)}")
    if (cfg.data.path is None) == (cfg.data.phantoms is None):
        raise ValueError("data needs exactly one of 'data.path' and 'data.phantoms'")
    for name in (cfg.models.teacher, cfg.models.assistant, cfg.models.student, *cfg.ablation.students):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    assistant = PRESETS[cfg.models.assistant].widths
    for name in (cfg.models.student, *cfg.ablation.students):
        if any(s > a for s, a in zip(PRESETS[name].widths, assistant)):
            raise ValueError(f"student {name} {PRESETS[name].widths} does not fit inside assistant {assistant}")
    divisor = 2 ** (len(PRESETS[cfg.models.teacher].widths) - 1)
    for what, shape in (("patch", cfg.patch), ("spec.input_shape", cfg.spec.input_shape)):
        if any(s % divisor for s in shape):
            raise ValueError(f"'{what}' {list(shape)} must be multiples of {divisor}")
    if cfg.data.test < 1:
        raise ValueError("'data.test' must be >= 1: the held-out cases the student's Dice is reported on")
    if not 0 <= cfg.foreground <= 1:
        raise ValueError(f"'foreground' must be in [0, 1], got {cfg.foreground}")
    if not 0 <= cfg.augment.p <= 1:
        raise ValueError(f"'augment.p' must be in [0, 1], got {cfg.augment.p}")
    steps = cfg.train.steps
    if min(steps.teacher, steps.student, cfg.train.batch_size, cfg.train.val_every) < 1:
        raise ValueError("train steps, batch_size and val_every must be >= 1")
    if not 0 <= cfg.train.average < 1:
        raise ValueError(f"'train.average' must be in [0, 1) (0: no weight average), got {cfg.train.average}")
    if cfg.train.lr_schedule_steps < 0:
        got = cfg.train.lr_schedule_steps
        raise ValueError(f"'train.lr_schedule_steps' must be >= 0 (0: each stage's steps), got {got}")
    if cfg.train.patience < 0:
        raise ValueError(f"'train.patience' must be >= 0 (0: no early stop), got {cfg.train.patience}")
    g = cfg.gtan
    if g.n_widths < 1 or not 0 <= g.grow_until <= 1 or not 0 <= g.beta <= 1 or g.assistant_every < 1:
        raise ValueError("'gtan' needs n_widths >= 1, assistant_every >= 1 and grow_until, beta in [0, 1]")
