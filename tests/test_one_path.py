"""Training evaluation and `liverkd infer` are one inference path (liverkd.core.inference): the
Dice that `distill run` prints is the Dice of the mask the Segmenter writes."""

import numpy as np
import pytest
from _checkpoints import SPEC, threshold_checkpoint

from liverkd.core.datasets import discover, load_case
from liverkd.core.inference import segment_volume
from liverkd.core.metrics import evaluate_masks
from liverkd.core.synth import write_dataset
from liverkd.deploy.build import build_engine
from liverkd.deploy.segment import Segmenter

torch = pytest.importorskip("torch", reason="the training side needs torch")


def test_training_evaluation_scores_the_mask_infer_writes(tmp_path):
    from liverkd.distill.checkpoint import load_checkpoint, model_from_checkpoint
    from liverkd.distill.pipeline import evaluate
    from liverkd.distill.predictor import torch_predictor

    checkpoint = threshold_checkpoint(tmp_path / "threshold.pt")
    bundle = build_engine(checkpoint, tmp_path / "bundle", "fp32", backend="onnxruntime", log=lambda _m: None)
    # 40^3 voxels of 12 mm: larger than the 32^3 input, so the sliding window is on the path too
    write_dataset(tmp_path / "ds", 2, seed=4, shape=(40, 40, 40), spacing=12.0, progress=False)
    cases = discover(tmp_path / "ds")
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    printed = evaluate(model, cases, SPEC, "cpu")  # what `distill run` reports
    with Segmenter.load(bundle, backend="torch") as same_net, Segmenter.load(bundle, backend="onnxruntime") as ort:
        for case, row in zip(cases, printed["cases"], strict=True):
            image, label = load_case(case)
            trained = segment_volume(image, SPEC, torch_predictor(model))
            served = same_net.segment_volume(image).mask
            assert 0 < trained.sum() < trained.size
            assert np.array_equal(trained, served)  # the same network through both: the same mask
            assert row["dice"] == pytest.approx(evaluate_masks(served, label.array, image.spacing)["dice"])
            shipped = ort.segment_volume(image).mask  # ONNX Runtime: float differences only at the boundary
            assert evaluate_masks(shipped, trained, image.spacing)["dice"] > 0.99
