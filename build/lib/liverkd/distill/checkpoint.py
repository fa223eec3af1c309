"""The checkpoint file: weights + model config + PreprocessSpec + training state.

deploy.export reads this format with torch.load alone (plus distill.models to rebuild
the network), so its keys are a contract:

    format          "liverkd-checkpoint"
    version         1
    preset          preset name or None
    model_config    UNetConfig.to_dict()
    state_dict      model weights (a plain UNet3D)
    spec            PreprocessSpec.to_dict()
    stage           "teacher" | "student" | "gtan" | ...
    step            optimizer steps taken
    best_val_dice   best validation Dice so far (or None)
    optimizer       optimizer state_dict (or None)
    extra           anything stage-specific (history, config, rng states ...)

Checkpoints hold tensors and plain data only (dict, list, tuple, str, int, float, bool,
None): save_checkpoint turns numpy values and paths into those and refuses anything else,
and load_checkpoint unpickles with torch.load(weights_only=True), so a .pt file from anyone
cannot run code when it is opened (docs/security.md).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from liverkd.core.atomic import atomic_path
from liverkd.core.errors import LiverkdError
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.models import UNet3D, UNetConfig

FORMAT = "liverkd-checkpoint"
VERSION = 1


class CheckpointError(LiverkdError, ValueError):
    """A checkpoint that cannot be used. str() is one line naming the file."""


def save_checkpoint(
    path,
    model: UNet3D,
    spec: PreprocessSpec,
    *,
    preset: str | None = None,
    stage: str = "model",
    step: int = 0,
    best_val_dice: float | None = None,
    optimizer=None,
    extra: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "preset": preset,
        "model_config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "spec": spec.to_dict(),
        "stage": stage,
        "step": int(step),
        "best_val_dice": best_val_dice,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    payload = plain(payload, "checkpoint")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def plain(value, where: str):
    """`value` as tensors (on the CPU) and plain data, the only things weights_only=True loads."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a checkpoint (tensors and plain data only)")


def load_checkpoint(path, data: bytes | None = None) -> dict:
    """The payload of the checkpoint at `path` (or of its bytes `data`, already read and checked)."""
    path = Path(path)
    try:
        payload = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({_reason(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a liverkd checkpoint")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this liverkd")
    return payload


def _reason(e: Exception) -> str:
    """torch's refusal of a pickle that would build objects is many lines that suggest weights_only=False."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused:
        return f"it would run {refused.group(1)} when unpickled; refused: checkpoints hold tensors and plain data only"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def model_from_checkpoint(payload_or_path) -> tuple[UNet3D, PreprocessSpec]:
    payload = payload_or_path if isinstance(payload_or_path, dict) else load_checkpoint(payload_or_path)
    model = UNet3D(UNetConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, PreprocessSpec.from_dict(payload["spec"])
