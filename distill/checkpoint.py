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
"""

from __future__ import annotations

from pathlib import Path

import torch

from liverkd.core.atomic import atomic_path
from liverkd.core.spec import PreprocessSpec
from liverkd.distill.models import UNet3D, UNetConfig

FORMAT = "liverkd-checkpoint"
VERSION = 1


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
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "spec": spec.to_dict(),
        "stage": stage,
        "step": int(step),
        "best_val_dice": best_val_dice,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path) -> dict:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a liverkd checkpoint")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {payload['version']} is newer than this liverkd")
    return payload


def model_from_checkpoint(payload_or_path) -> tuple[UNet3D, PreprocessSpec]:
    payload = payload_or_path if isinstance(payload_or_path, dict) else load_checkpoint(payload_or_path)
    model = UNet3D(UNetConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, PreprocessSpec.from_dict(payload["spec"])
