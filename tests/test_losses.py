import pytest
import torch
import torch.nn.functional as F
from liverkd.distill.losses import DiceCELoss, DistillLoss, KDLoss, SoftDiceLoss


def logits(seed, shape=(2, 2, 4, 4, 4), scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_kd_is_zero_when_student_equals_teacher():
    z = logits(0)
    assert KDLoss(4.0)(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert KDLoss(4.0)(z, logits(1)).item() > 0.01


def test_kd_is_t_squared_times_the_softened_kl():
    s, t = logits(0), logits(1)
    for temp in (1.0, 2.0, 4.0):
        p_t = F.softmax(t / temp, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean()
        assert KDLoss(temp)(s, t).item() == pytest.approx(temp**2 * kl.item(), rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_across_temperatures():
    t = logits(1, scale=0.5)
    norms = []
    for temp in (4.0, 8.0):
        s = logits(0, scale=0.5).requires_grad_()
        KDLoss(temp)(s, t).backward()
        norms.append(s.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


def test_kd_does_not_push_gradients_into_the_teacher():
    s, t = logits(0).requires_grad_(), logits(1).requires_grad_()
    KDLoss()(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_dice_ce_is_small_for_a_confident_correct_prediction():
    labels = (torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).long()
    good = F.one_hot(labels, 2).movedim(-1, 1).float() * 20
    bad = F.one_hot(1 - labels, 2).movedim(-1, 1).float() * 20
    assert DiceCELoss()(good, labels).item() < 0.01
    assert DiceCELoss()(bad, labels).item() > 1.9
    assert SoftDiceLoss()(good, labels).item() < 0.01


def test_alpha_mixes_task_and_kd():
    s, t = logits(0), logits(1)
    y = (t.argmax(1) > 0).long()
    assert DistillLoss(alpha=0.0)(s, y, t)[0].item() == pytest.approx(DiceCELoss()(s, y).item(), rel=1e-6)
    assert DistillLoss(alpha=1.0, temperature=2.0)(s, y, t)[0].item() == pytest.approx(KDLoss(2.0)(s, t).item())
    mixed, parts = DistillLoss(alpha=0.25)(s, y, [(0.5, t), (0.5, s)])  # the second target costs nothing
    assert mixed.item() == pytest.approx(0.75 * parts["task"] + 0.25 * 0.5 * KDLoss()(s, t).item(), rel=1e-5)
    with pytest.raises(ValueError):
        DistillLoss(alpha=1.5)
