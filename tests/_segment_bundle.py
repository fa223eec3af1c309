"""Small real engine bundles for the Segmenter / infer tests, built with deploy.build.build_engine
(the same path as `liverkd build-engine`) from a random-init student checkpoint, or from a
hand-set network with a known answer. Random masks are junk (the network never trained), so
tests assert geometry and behaviour, never anatomy."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core.spec import PreprocessSpec

TEST_SPEC = PreprocessSpec(spacing=(6.0, 6.0, 6.0), input_shape=(64, 64, 64))


def edge_model():
    """A one-conv 'network' with a known, orientation-sensitive answer: liver where the
    normalised intensity plus twice its gradient along +x exceeds 0.58 (about 70 HU).
    A random U-Net answers almost the same everywhere, which tests nothing about geometry."""
    import torch
    from torch import nn

    conv = nn.Conv3d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, 0, 1, 1, 1] = 1.0
        conv.weight[1, 0, 2, 1, 1] = 2.0
        conv.weight[1, 0, 0, 1, 1] = -2.0
        conv.bias.copy_(torch.tensor([0.58, 0.0]))
    return conv.eval()


_BUILT: dict[tuple, Path] = {}
_CACHE_DIR: list[Path] = []


def make_bundle(
    folder, spec: PreprocessSpec = TEST_SPEC, preset: str = "student-30k", seed: int = 0, constant: int | None = None
) -> Path:
    """A bundle at `folder`. `constant` = 0 or 1: a network that answers that class everywhere
    (head weights zero, bias decides), for tests that need a known answer (empty / all liver).

    Each kind is built once per test session and copied after that (a build takes seconds)."""
    key = (spec.to_json(), preset, seed, constant)
    if key not in _BUILT:
        if not _CACHE_DIR:
            _CACHE_DIR.append(Path(tempfile.mkdtemp(prefix="liverkd-test-bundles-")))
            atexit.register(shutil.rmtree, _CACHE_DIR[0], True)
        _BUILT[key] = _build(_CACHE_DIR[0] / f"bundle{len(_BUILT)}", spec, preset, seed, constant)
    from liverkd.deploy.bundle import Bundle

    folder = Path(folder)
    shutil.copytree(_BUILT[key], folder)
    bundle = Bundle.load(folder)
    Bundle(folder, bundle.meta.replace(name=folder.name)).save()
    return folder


def _build(folder: Path, spec: PreprocessSpec, preset: str, seed: int, constant: int | None) -> Path:
    import onnx
    import torch

    from liverkd.core.atomic import sha256_file
    from liverkd.deploy.build import build_engine
    from liverkd.deploy.export import tag
    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = edge_model() if preset == "edge" else create_model(preset).eval()
    if constant is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor([5.0, -5.0] if constant == 0 else [-5.0, 5.0]))
    work = Path(tempfile.mkdtemp(prefix=".src-", dir=folder.parent))
    try:
        if preset == "edge":  # not a UNet3D, so no checkpoint: a tagged ONNX file is the source
            source = work / "edge.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
                torch.onnx.export(
                    model,
                    (torch.zeros((1, 1, *spec.input_shape)),),
                    str(source),
                    input_names=["image"],
                    output_names=["logits"],
                    opset_version=17,
                    dynamo=False,
                )
            proto = onnx.load(str(source))
            tag(proto, spec, sha256_file(source), "edge", source.name)
            onnx.save(proto, str(source))
        else:
            source = save_checkpoint(work / "model.pt", model, spec, preset=preset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_engine(source, folder, backend="onnxruntime", log=lambda message: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def synthetic_ct(shape=(48, 40, 32), spacing=(6.0, 6.0, 6.0), seed: int = 0, dtype=np.int16):
    """A CT-like int16 array in HU: air around an elliptic body of soft tissue with a brighter blob."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape, dtype=np.float32)
    centre = [(n - 1) / 2 for n in shape]
    r = sum(((i - c) / (0.42 * n)) ** 2 for i, c, n in zip(idx, centre, shape))
    ct = np.where(r < 1.0, 40.0, -1000.0)
    blob = sum(((i - c - 0.1 * n) / (0.18 * n)) ** 2 for i, c, n in zip(idx, centre, shape))
    ct = np.where(blob < 1.0, 90.0, ct) + rng.normal(0, 10, shape)
    return ct.astype(dtype)


def nifti(array, spacing=(6.0, 6.0, 6.0), affine=None, qform_code=1, sform_code=1):
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-100.0, -80.0, 50.0]
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    return img
