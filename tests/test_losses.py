import pytest
import torch
import torch.nn.functional as F

from liverkd.distill.losses import IGNORE, BalancedKDLoss, DiceCELoss, DistillLoss, KDLoss, SoftDiceLoss
from liverkd.distill.objectives import KDSettings


def logits(seed, shape=(2, 2, 4, 4, 4), scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_kd_is_zero_when_student_equals_teacher():
    z = logits(0)
    for kd in (KDLoss(4.0), BalancedKDLoss(4.0)):
        assert kd(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
        assert kd(z, logits(1)).item() > 0.01


def test_kd_is_t_squared_times_the_softened_kl():
    s, t = logits(0), logits(1)
    for temp in (1.0, 2.0, 4.0):
        p_t = F.softmax(t / temp, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1)
        assert KDLoss(temp)(s, t).item() == pytest.approx(temp**2 * kl.mean().item(), rel=1e-5)
        liver = t.argmax(1) == 1
        balanced = (kl[liver].mean() + kl[~liver].mean()) / 2
        assert BalancedKDLoss(temp)(s, t).item() == pytest.approx(temp**2 * balanced.item(), rel=1e-5)


def test_balanced_kd_by_labels_groups_the_voxels_by_their_labels_not_the_teachers_argmax():
    """Grouped by the labels, a teacher's false positives stay in the background group, which
    they barely move; grouped by the teacher's argmax, they alone make half the term."""
    s, t = logits(0), logits(1)
    y = torch.zeros(t.shape[0], *t.shape[2:], dtype=torch.long)
    y[..., :2] = 1
    p_t = F.softmax(t, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s, 1))).sum(1)
    by_labels = (kl[y == 1].mean() + kl[y == 0].mean()) / 2
    assert BalancedKDLoss(by="labels")(s, t, y).item() == pytest.approx(by_labels.item(), rel=1e-5)
    by_teacher = BalancedKDLoss(by="teacher")(s, t, y).item()
    assert BalancedKDLoss(by="labels")(s, t, y).item() != pytest.approx(by_teacher, rel=1e-3)
    with pytest.raises(ValueError, match="labels"):
        BalancedKDLoss(by="labels")(s, t)


def test_balanced_kd_is_plain_kd_when_the_teacher_sees_one_class():
    s, t = logits(0), logits(1).abs() * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)  # background everywhere
    assert BalancedKDLoss()(s, t).item() == pytest.approx(KDLoss()(s, t).item(), rel=1e-6)


def test_t_squared_keeps_the_gradient_scale_across_temperatures():
    t = logits(1, scale=0.5)
    norms = []
    for temp in (4.0, 8.0):
        s = logits(0, scale=0.5).requires_grad_()
        KDLoss(temp)(s, t).backward()
        norms.append(s.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


def test_kd_does_not_push_gradients_into_the_teacher():
    for kd in (KDLoss(), BalancedKDLoss()):
        s, t = logits(0).requires_grad_(), logits(1).requires_grad_()
        kd(s, t).backward()
        assert t.grad is None and s.grad is not None


def liver_margin_gradient(kd, liver_share=0.12, n=10_000, margin=8.0):
    """d kd / d (a shift of every student liver logit) for a student at zero-bias init (margin 0)
    and a confident teacher on a batch with `liver_share` liver voxels."""
    liver = torch.arange(n) < liver_share * n
    teacher = torch.stack([torch.zeros(n), torch.where(liver, margin, -margin)]).view(1, 2, n, 1, 1)
    shift = torch.zeros((), requires_grad=True)
    student = torch.stack([torch.zeros(n), torch.zeros(n) + shift]).view(1, 2, n, 1, 1)
    kd(student, teacher).backward()
    return shift.grad.item()


def test_balanced_kd_does_not_pull_the_liver_margin_negative_at_init():
    """The ablation's collapse: at T = 4 on 88 % background the plain mean pushes every voxel to
    background from step 0 (gradient descent lowers the liver margin); the balanced term does not."""
    assert liver_margin_gradient(KDLoss(4.0)) > 1.0
    assert liver_margin_gradient(BalancedKDLoss(4.0)) == pytest.approx(0.0, abs=1e-5)
    assert liver_margin_gradient(BalancedKDLoss(4.0), liver_share=0.02) == pytest.approx(0.0, abs=1e-5)


def test_voxels_outside_the_volume_count_in_no_loss():
    s, t = logits(0), logits(1)
    y = (t.argmax(1) > 0).long()
    # the same batch with a padded half: arbitrary logits, labels IGNORE
    s_pad, t_pad = torch.cat([s, logits(2)], dim=-1), torch.cat([t, logits(3)], dim=-1)
    y_pad = torch.cat([y, torch.full_like(y, IGNORE)], dim=-1)
    for loss in (DiceCELoss(), SoftDiceLoss()):
        assert loss(s_pad, y_pad).item() == pytest.approx(loss(s, y).item(), rel=1e-5)
    for kd in (KDLoss(), BalancedKDLoss()):
        assert kd(s_pad, t_pad, y_pad).item() == pytest.approx(kd(s, t).item(), rel=1e-5)
        assert kd(s_pad, t_pad).item() != pytest.approx(kd(s, t).item(), rel=1e-3)
    by_labels = BalancedKDLoss(by="labels")
    assert by_labels(s_pad, t_pad, y_pad).item() == pytest.approx(by_labels(s, t, y).item(), rel=1e-5)


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
    loss = DistillLoss(KDLoss(2.0))
    assert loss(s, y, t, 0.0)[0].item() == pytest.approx(DiceCELoss()(s, y).item(), rel=1e-6)
    assert loss(s, y, t, 1.0)[0].item() == pytest.approx(KDLoss(2.0)(s, t).item())
    mixed, parts = DistillLoss(KDLoss())(s, y, [(0.5, t), (0.5, s)], 0.25)  # the second target costs nothing
    assert mixed.item() == pytest.approx(0.75 * parts["task"] + 0.25 * 0.5 * KDLoss()(s, t).item(), rel=1e-5)


def test_alpha_warms_up_from_zero():
    kd = KDSettings(alpha=0.5, warmup=0.1)
    assert [kd.alpha_at(s, 100) for s in (0, 5, 10, 50)] == [0.0, 0.25, 0.5, 0.5]
    assert KDSettings(alpha=0.5, warmup=0.0).alpha_at(0, 100) == 0.5
    assert isinstance(KDSettings().loss().kd, BalancedKDLoss)
    assert KDSettings(balance="labels").loss().kd.by == "labels"
    assert type(KDSettings(balance="none").loss().kd) is KDLoss
    with pytest.raises(ValueError, match="kd.balance"):
        KDSettings(balance="yes")
    with pytest.raises(ValueError, match="kd.alpha"):
        KDSettings(alpha=1.5)
