import csv

import numpy as np
import pytest
import torch

from liverkd.distill.average import WeightAverage, decay_at
from liverkd.distill.checkpoint import load_checkpoint, model_from_checkpoint
from liverkd.distill.data import Augment, PatchDataset, extract_patch, phantom_volumes, prepare_case, split_cases
from liverkd.distill.losses import IGNORE
from liverkd.distill.models import UNet3D, UNetConfig
from liverkd.distill.objectives import GTANObjective, Supervised
from liverkd.distill.train import PartialCheckpointExists, TrainSettings, param_groups, partial_path, train

TINY = UNetConfig(widths=(4, 8))


@pytest.fixture(scope="module")
def volumes():
    return phantom_volumes(3, (32, 32, 32), seed=0)


def objective(kind: str):
    if kind == "gtan":  # 3 widths over the first half of 6 steps: growth at steps 2 and 3
        teacher = UNet3D(UNetConfig(widths=(8, 16)))
        return GTANObjective(teacher, TINY, UNetConfig(widths=(8, 12)), n_widths=3, grow_until=0.5)
    return Supervised(UNet3D(TINY))


def run(volumes, out, steps=6, stop_after=None, resume=False, kind="supervised", average=0.0):
    vols, spec = volumes
    torch.manual_seed(0)
    dataset = PatchDataset(vols[:2], (16, 16, 16), augment=Augment(), seed=3)
    settings = TrainSettings(steps=steps, batch_size=2, lr=3e-3, val_every=2, average=average)
    return train(
        objective(kind), dataset, vols[2:], spec, settings, out, stop_after=stop_after, resume=resume, stage="student"
    )


@pytest.mark.parametrize(
    ("kind", "stop", "average"), [("supervised", 4, 0.0), ("gtan", 2, 0.0), ("supervised", 2, 0.9), ("gtan", 2, 0.9)]
)
def test_resume_continues_exactly(volumes, tmp_path, kind, stop, average):
    whole = run(volumes, tmp_path / "a" / "model.pt", kind=kind, average=average)
    out = tmp_path / "b" / "model.pt"
    first = run(volumes, out, stop_after=stop, kind=kind, average=average)  # "killed" right after a checkpoint
    assert not first["finished"] and not out.exists() and partial_path(out).exists()
    with pytest.raises(PartialCheckpointExists, match="--resume"):
        run(volumes, out, kind=kind, average=average)
    resumed = run(volumes, out, resume=True, kind=kind, average=average)
    assert resumed["finished"] and resumed["step"] == whole["step"] == 6
    assert len(resumed["step_loss"]) == 6
    np.testing.assert_allclose(resumed["step_loss"], whole["step_loss"], rtol=1e-5)
    a, b = load_checkpoint(tmp_path / "a" / "model.pt"), load_checkpoint(out)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k])
    assert not partial_path(out).exists()


def test_the_weight_average_is_what_is_kept_and_never_changes_training(volumes, tmp_path):
    raw = run(volumes, tmp_path / "raw.pt")
    averaged = run(volumes, tmp_path / "avg.pt", average=0.9)
    assert averaged["step_loss"] == raw["step_loss"]  # the module trains on its own weights
    a, b = load_checkpoint(tmp_path / "raw.pt")["state_dict"], load_checkpoint(tmp_path / "avg.pt")["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    # a decay of almost 0 keeps the last step's weights: the average tracks the module
    tracked = load_checkpoint(run(volumes, tmp_path / "tracked.pt", average=1e-9)["out"])["state_dict"]
    for k, v in a.items():
        torch.testing.assert_close(tracked[k], v)


def test_weight_average_follows_its_formula():
    layer = torch.nn.BatchNorm1d(2)
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    layer.num_batches_tracked.fill_(7)
    average.update(layer)  # update 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(average.state["weight"], torch.full((2,), d * 1.0 + (1 - d) * 3.0))
    assert int(average.state["num_batches_tracked"]) == 7
    assert decay_at(0.5, 100) == 0.5
    with pytest.raises(ValueError, match="0 < decay < 1"):
        WeightAverage(layer, decay=1.0)


def test_checkpoint_and_logs(volumes, tmp_path):
    out = tmp_path / "model.pt"
    result = run(volumes, out, steps=4)
    payload = load_checkpoint(out)
    assert payload["step"] == 4 and payload["stage"] == "student"
    assert payload["best_val_dice"] == result["best_val_dice"] and 0 <= payload["best_val_dice"] <= 1
    model, spec = model_from_checkpoint(out)
    assert spec == volumes[1] and model.config == TINY
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(r["val_dice"] for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_patience_stops_early_and_keeps_the_best_weights(volumes, tmp_path):
    """lr 0: the validation Dice can never rise again, so patience 2 ends the run at its third
    validation (step 3 of 40), with OUT.pt written as if finished and no partial checkpoint."""
    vols, spec = volumes
    torch.manual_seed(0)
    dataset = PatchDataset(vols[:2], (16, 16, 16), augment=Augment(), seed=3)
    settings = TrainSettings(steps=40, batch_size=1, lr=0.0, val_every=1, patience=2)
    out = tmp_path / "teacher.pt"
    result = train(Supervised(UNet3D(TINY)), dataset, vols[2:], spec, settings, out, stage="teacher")
    assert result["stopped_early"] and result["finished"] and result["step"] == 3
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and payload["extra"]["stopped_early"] and payload["extra"]["best_step"] == 1
    assert not partial_path(out).exists()
    whole = train(Supervised(UNet3D(TINY)), dataset, vols[2:], spec,
                  TrainSettings(steps=5, batch_size=1, lr=0.0, val_every=1), tmp_path / "all.pt")  # fmt: skip
    assert whole["step"] == 5 and not whole["stopped_early"]  # patience 0: every step


def test_patches_are_seeded_and_foreground_biased(volumes):
    vols, _ = volumes
    a = PatchDataset(vols, (16, 16, 16), augment=Augment(), seed=1)
    b = PatchDataset(vols, (16, 16, 16), augment=Augment(), seed=1)
    x1, y1 = a[5]
    x2, y2 = b[5]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a[6][0], x1)
    fg = PatchDataset(vols, (8, 8, 8), foreground=1.0, seed=0)
    bg = PatchDataset(vols, (8, 8, 8), foreground=0.0, seed=0)
    liver_share = [np.mean([ds[i][1].float().mean() for i in range(30)]) for ds in (fg, bg)]
    assert liver_share[0] > 2 * liver_share[1]


def test_unaugmented_patch_is_an_exact_crop_no_flip(volumes):
    v = volumes[0][0]
    mid = (np.array(v.image.shape) - 1) / 2
    x, y = extract_patch(v.image, v.label, mid, v.image.shape, np.eye(3))
    np.testing.assert_allclose(x, v.image, atol=1e-6)
    assert np.array_equal(y, v.label)
    x, _ = extract_patch(v.image, v.label, mid + [4, 0, 0], (24, 32, 32), np.eye(3))
    np.testing.assert_allclose(x, v.image[8:32], atol=1e-6)  # moved along +x, never mirrored


def test_intensity_augmentation_leaves_some_patches_as_inference_sees_them(volumes):
    """augment.p: with p = 0.15 most patches keep the plain intensities a scan has at inference
    (p = 1 gave every patch noise, and a network that never saw flat air called it liver);
    p = 0 is plain intensities only, p = 1 never a plain one."""
    vols, _ = volumes
    spatial = dict(rotate_deg=10.0, scale=0.1, intensity=0.0, noise=0.0)
    plain = PatchDataset(vols, (8, 8, 8), augment=Augment(**spatial, p=1.0), seed=4)

    def share_plain(p):
        ds = PatchDataset(vols, (8, 8, 8), augment=Augment(**{**spatial, "intensity": 0.1, "noise": 0.02}, p=p), seed=4)
        same = [torch.equal(ds[i][0], plain[i][0]) and torch.equal(ds[i][1], plain[i][1]) for i in range(200)]
        return np.mean(same)

    assert share_plain(0.0) == 1.0 and share_plain(1.0) == 0.0
    assert 0.6 < share_plain(0.15) < 0.85  # both coins tails: 0.85^2 = 0.72


def test_patch_voxels_outside_the_volume_are_ignored(volumes):
    v = volumes[0][0]
    x, y = extract_patch(v.image, v.label, (0, 0, 0), (16, 16, 16), np.eye(3))  # centred on a corner
    inside = np.zeros((16, 16, 16), bool)
    inside[8:, 8:, 8:] = True  # voxels 8.. of the patch are voxels 0..7 of the volume
    assert np.array_equal(y == IGNORE, ~inside) and (y[inside] >= 0).all()
    assert np.array_equal(y[inside].reshape(8, 8, 8), v.label[:8, :8, :8])
    assert (x[~inside] == 0).all()


def test_adamw_decays_conv_weights_only():
    model = UNet3D(TINY)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    skip = {id(p) for m in norms for p in (m.weight, m.bias)} | {id(model.head.bias)} | {id(u.bias) for u in model.up}
    assert {id(p) for p in no_decay["params"]} == skip
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - skip
    assert all(p.ndim == 5 for p in decay["params"])


def test_cases_are_cached_once(tmp_path):
    from liverkd.core.datasets import discover
    from liverkd.core.spec import PreprocessSpec
    from liverkd.core.synth import write_dataset

    write_dataset(tmp_path / "ds", 4, seed=0, shape=(32, 32, 32))
    cases = discover(tmp_path / "ds")
    spec = PreprocessSpec(spacing=(12, 12, 12), input_shape=(32, 32, 32))
    first = prepare_case(cases[0], spec, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    again = prepare_case(cases[0], spec, tmp_path / "cache")
    assert np.array_equal(first.image, again.image) and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    prepare_case(cases[0], spec.with_(spacing=(16, 16, 16)), tmp_path / "cache")  # another spec, another entry
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    train_cases, val, test = split_cases(cases, 1, 1, seed=0)
    assert len(train_cases) == 2 and {c.case_id for c in train_cases + val + test} == {c.case_id for c in cases}
    assert split_cases(cases, 1, 1, seed=0)[2] == test


def test_the_learning_rate_decays_over_the_longer_schedule_when_one_is_set():
    plain = TrainSettings(steps=10, lr=1.0)
    assert plain.lr_at(0) == 1.0 and plain.lr_at(5) == pytest.approx(0.5**0.9)
    longer = TrainSettings(steps=10, lr=1.0, lr_schedule_steps=40)  # 10 steps of a 40-step decay
    assert longer.lr_at(5) == pytest.approx((35 / 40) ** 0.9) and longer.lr_at(9) > 0.7
    assert TrainSettings(steps=10, lr=1.0, lr_schedule_steps=4).lr_at(5) == plain.lr_at(5)  # never shorter
