"""Training data: cases preprocessed once (cached .npz), foreground-biased patches,
augmentation that respects anatomy, everything seeded by (seed, sample index).

Because a sample is a pure function of (seed, index), a resumed run sees exactly the
batches an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from liverkd.core.atomic import atomic_path
from liverkd.core.datasets import load_case
from liverkd.core.preprocess import prepare_pair
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.losses import IGNORE


@dataclass(frozen=True)
class Augment:
    """Small, anatomy-respecting perturbations. No flips: the liver is on the right."""

    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.1
    noise: float = 0.02
    p: float = 0.15
    """Probability that a patch gets the intensity change, and (drawn separately) the noise:
    nnU-Net's per-sample probability for its brightness transforms (Isensee et al. 2021).
    Inference inputs get neither; with p = 1 the network never sees an input like them, and the
    exactly flat air of a clipped CT window (x = 0) is out of its training distribution
    (docs/method.md section 2 has the failure this caused). p = 1 draws no coin, so the configs
    that set it give the patches they gave before the key existed."""


@dataclass
class Prepared:
    """One case on the spec grid: normalized float32 image and uint8 liver mask."""

    case_id: str
    image: np.ndarray
    label: np.ndarray


def cache_key(case, spec: PreprocessSpec) -> str:
    parts = [spec.to_json()]
    for p in (case.image, case.label):
        p = Path(p).resolve()
        parts += [str(p), str(p.stat().st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cache_path(case, spec: PreprocessSpec, cache_dir) -> Path:
    """Where prepare_case keeps the case's preprocessed arrays."""
    return Path(cache_dir) / f"{case.case_id}-{cache_key(case, spec)}.npz"


def prepare_case(case, spec: PreprocessSpec, cache_dir) -> Prepared:
    """prepare_pair on the case once; later calls read the cached .npz."""
    if case.label is None:
        raise ValueError(f"{case.image}: case {case.case_id!r} has no label; training needs labelled cases")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = cache_path(case, spec, cache_dir)
    if path.exists():
        with np.load(path) as z:
            return Prepared(case.case_id, z["image"], z["label"])
    image, label = prepare_pair(*load_case(case), spec)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, image=image.astype(np.float32), label=label.astype(np.uint8))
    return Prepared(case.case_id, image.astype(np.float32), label.astype(np.uint8))


def split_cases(cases: list, n_val: int, n_test: int, seed: int) -> tuple[list, list, list]:
    """Deterministic shuffle of the cases by id, then (train, val, test)."""
    if n_val < 1 or n_test < 0:
        raise ValueError(f"need at least one validation case (val={n_val}, test={n_test})")
    if len(cases) < n_val + n_test + 1:
        need = n_val + n_test + 1
        raise ValueError(f"{len(cases)} labelled cases; need at least {need} (val={n_val}, test={n_test})")
    ordered = sorted(cases, key=lambda c: c.case_id)
    order = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    test = shuffled[:n_test]
    val = shuffled[n_test : n_test + n_val]
    return shuffled[n_test + n_val :], val, test


def rotation(angles_rad) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def extract_patch(image, label, center, patch, matrix) -> tuple[np.ndarray, np.ndarray]:
    """Patch of `patch` voxels around `center`; input coord = center + matrix @ (o - mid).

    Voxels outside the volume read image 0 (as the sliding window pads) and label IGNORE
    (int64): they are not easy background, and no loss counts them."""
    mid = (np.asarray(patch) - 1) / 2
    offset = np.asarray(center, dtype=np.float64) - matrix @ mid
    x = ndimage.affine_transform(image, matrix, offset, output_shape=patch, order=1, mode="constant", cval=0.0)
    y = ndimage.affine_transform(
        label, matrix, offset, output_shape=patch, order=0, mode="constant", cval=IGNORE, output=np.int64
    )
    return x, y


class PatchDataset(torch.utils.data.Dataset):
    """Item i is a pure function of (seed, i): (image (1, *patch) float32, label (*patch) int64,
    IGNORE outside the volume)."""

    def __init__(
        self,
        volumes: list[Prepared],
        patch,
        *,
        foreground: float = 2 / 3,
        augment: Augment | None = None,
        seed: int = 0,
        length: int = 1 << 30,
    ):
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = volumes
        self.patch = tuple(int(p) for p in patch)
        self.foreground = float(foreground)
        self.augment = augment
        self.seed = int(seed)
        self.length = int(length)
        self._fg = [np.argwhere(v.label > 0) for v in volumes]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(len(self.volumes)))
        vol = self.volumes[k]
        fg = self._fg[k]
        if len(fg) and rng.random() < self.foreground:
            center = fg[rng.integers(len(fg))].astype(np.float64)
        else:
            center = rng.random(3) * (np.asarray(vol.image.shape) - 1)
        aug = self.augment
        matrix = np.eye(3)
        if aug is not None:
            angles = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg, 3))
            matrix = rotation(angles) * rng.uniform(1 - aug.scale, 1 + aug.scale)
        x, y = extract_patch(vol.image, vol.label, center, self.patch, matrix)
        if aug is not None:
            applies = lambda: aug.p >= 1 or rng.random() < aug.p  # noqa: E731  (p = 1 draws no coin)
            if applies():
                x = x * (1 + rng.uniform(-aug.intensity, aug.intensity)) + rng.uniform(-aug.intensity, aug.intensity)
            if aug.noise > 0 and applies():
                x = x + rng.normal(0, aug.noise, x.shape).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], torch.from_numpy(y)


def phantom_volumes(n: int, shape=(32, 32, 32), seed: int = 0) -> tuple[list[Prepared], PreprocessSpec]:
    """n phantoms prepared in memory at their own spacing (tests and benchmarks)."""
    from liverkd.core.synth import case_seed, synth_case

    volumes, spec = [], None
    for i in range(n):
        image, label = synth_case(case_seed(seed, i), shape=shape)
        spec = spec or PreprocessSpec(spacing=image.spacing, input_shape=shape)
        x, y = prepare_pair(image, label, spec)
        volumes.append(Prepared(f"phantom_{i:03d}", x, y))
    return volumes, spec
