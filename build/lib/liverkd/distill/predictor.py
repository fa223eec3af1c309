"""A torch model as a `predict` for liverkd.core.inference: numpy in, numpy logits out.

Training validation, held-out evaluation and the ablation score a model through this and
liverkd.core.inference.segment_volume / segment_grid: the same path `liverkd infer` runs.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_predictor(model: torch.nn.Module, device="cpu"):
    """float32 (1, 1, x, y, z) numpy -> (1, C, x, y, z) float32 numpy logits, in eval mode, no grad."""
    model.eval()

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)).float().cpu().numpy()

    return predict
