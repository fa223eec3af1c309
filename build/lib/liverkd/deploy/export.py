"""Checkpoint -> ONNX (opset 17, BatchNorm folded, simplified, spec in the metadata), checked
against PyTorch on a phantom. The only module of deploy/ that imports torch (lazily).

Exporter: the TorchScript exporter (`dynamo=False`). torch 2.13's default dynamo exporter
needs onnxscript and emits opset 18 first (then down-converts); the TorchScript one writes
opset 17 directly and folds Conv+BatchNorm in eval mode, which is what TensorRT 8.5 (JetPack
5.1) reads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from liverkd.core.atomic import atomic_path, sha256_file
from liverkd.core.errors import LiverkdError
from liverkd.core.spec import PreprocessSpec
from liverkd.deploy.calibrate import phantom_input

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_SPEC = "liverkd.spec"
META_SHA256 = "liverkd.source_sha256"
META_PRESET = "liverkd.preset"
META_SOURCE = "liverkd.source"
MIN_PARITY_AGREEMENT = 0.999
PARITY_SEED = 1234


class ExportError(LiverkdError, ValueError):
    """Export failed. str() is one line naming the file and the problem."""


@dataclass
class ExportResult:
    path: Path
    spec: PreprocessSpec
    preset: str | None
    source_sha256: str
    max_abs_error: float
    agreement: float

    def summary(self) -> str:
        return (
            f"{self.path}: opset {OPSET}, input {(1, 1, *self.spec.input_shape)}; parity vs PyTorch on a phantom: "
            f"max |logit error| {self.max_abs_error:.2e}, argmax agreement {self.agreement:.4%}"
        )


def load_torch_model(checkpoint, data: bytes | None = None):
    """(model in eval mode, PreprocessSpec, checkpoint payload) from a liverkd checkpoint file
    (or from its bytes `data`, already checked against a bundle's engine.json). Unpickled with
    weights_only=True: a checkpoint cannot run code (distill.checkpoint)."""
    from liverkd.distill.checkpoint import load_checkpoint, model_from_checkpoint

    path = Path(checkpoint)
    if data is None and not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    payload = load_checkpoint(path, data)
    try:
        model, spec = model_from_checkpoint(payload)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ExportError(f"{path}: checkpoint does not rebuild a model ({str(e).splitlines()[0]})") from None
    return model, spec, payload


def require_torch():
    """torch, or a one-line ExportError naming the extra (export and checkpoints need the training side)."""
    try:
        import torch
    except ImportError:
        raise ExportError("exporting a checkpoint needs torch: pip install 'liverkd[train]'") from None
    return torch


def export_onnx(checkpoint, out, *, dynamic: bool = False, min_agreement: float = MIN_PARITY_AGREEMENT) -> ExportResult:
    """Export, simplify, tag and parity-check; `out` is written only when parity holds."""
    import onnx

    torch = require_torch()

    checkpoint = Path(checkpoint)
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"{out}: output folder {out.parent} does not exist")
    model, spec, payload = load_torch_model(checkpoint)
    sha = sha256_file(checkpoint)
    x = torch.from_numpy(phantom_input(spec, PARITY_SEED))
    with atomic_path(out, suffix=".onnx") as tmp:
        dynamic_axes = None
        if dynamic:
            axes = {2: "x", 3: "y", 4: "z"}
            dynamic_axes = {INPUT_NAME: axes, OUTPUT_NAME: axes}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        graph = simplify(onnx.load(str(tmp)), tmp)
        batchnorms = [n.name for n in graph.graph.node if n.op_type == "BatchNormalization"]
        if batchnorms:
            raise ExportError(f"{out}: BatchNormalization left unfolded in the graph ({len(batchnorms)} nodes)")
        tag(graph, spec, sha, payload.get("preset"), checkpoint.name)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        max_err, agreement = parity(tmp, model, x.numpy())
        if agreement < min_agreement:
            raise ExportError(
                f"{out}: ONNX Runtime disagrees with PyTorch on {1 - agreement:.3%} of voxels "
                f"(agreement {agreement:.4%} < {min_agreement:.1%}; max |logit error| {max_err:.2e}); nothing written"
            )
    return ExportResult(out, spec, payload.get("preset"), sha, max_err, agreement)


def simplify(model, where):
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as e:  # onnxsim raises whatever its checker raises
        raise ExportError(f"{where}: onnx-simplifier failed ({str(e).splitlines()[0]})") from None
    if not ok:
        raise ExportError(f"{where}: onnx-simplifier could not validate the simplified graph")
    return simplified


def tag(model, spec: PreprocessSpec, sha256: str, preset: str | None, source: str) -> None:
    """PreprocessSpec, source checkpoint hash, preset and name into the ONNX metadata_props."""
    import onnx

    props = {META_SPEC: spec.to_json(), META_SHA256: sha256, META_PRESET: preset or "", META_SOURCE: source}
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})


def parity(onnx_path, model, x) -> tuple[float, float]:
    """(max |logit error|, argmax agreement) of the ONNX file on ONNX Runtime CPU against the torch `model`."""
    import torch

    from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner
    from liverkd.deploy.bundle import ModelFile
    from liverkd.deploy.compare import compare, run

    def pytorch(array):
        with torch.no_grad():
            return model(torch.from_numpy(array)).numpy()

    with OnnxRuntimeRunner(ModelFile.of(onnx_path)) as onnx_runtime:
        runs = run({"pytorch": pytorch, "onnxruntime": onnx_runtime}, [x], warmup=0)
    try:
        agreement = compare(runs["pytorch"].outputs, runs["onnxruntime"].outputs)
    except ValueError as e:
        raise ExportError(f"{onnx_path}: ONNX Runtime against PyTorch: {e}") from None
    return agreement.max_abs_error, agreement.argmax_agreement
