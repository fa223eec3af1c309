import pytest
import torch

from liverkd.distill.gtan import SlimUNet3D, assistant_index, extract, grow_adam_state, width_schedule
from liverkd.distill.losses import DiceCELoss
from liverkd.distill.models import PRESETS, UNet3D, UNetConfig
from liverkd.distill.objectives import GTANObjective


def slim_net(student="student-30k", n_widths=3, seed=0):
    torch.manual_seed(seed)
    return SlimUNet3D(PRESETS["ta"], width_schedule(PRESETS[student].widths, PRESETS["ta"].widths, n_widths))


def warm_bn(slim, x, entries):
    """A few training-mode passes so every BatchNorm has non-trivial running statistics."""
    slim.train()
    with torch.no_grad():
        for _ in range(3):
            for k in entries:
                slim(x, k)
    slim.eval()


def test_schedule_goes_from_student_to_assistant():
    s = width_schedule((2, 4, 9, 18), (8, 16, 32, 64), 4)
    assert s[0] == (2, 4, 9, 18) and s[-1] == (8, 16, 32, 64) and len(s) == 5
    assert all(a <= b for prev, cur in zip(s, s[1:]) for a, b in zip(prev, cur))
    with pytest.raises(ValueError, match="fit inside"):
        width_schedule((2, 40, 9, 18), (8, 16, 32, 64), 4)
    # growth: entry 1 at the start, full width from grow_until on, never shrinking
    idx = [assistant_index(step, 100, 4, 0.5) for step in range(100)]
    assert idx[0] == 1 and idx[50] == 4 and idx[-1] == 4 and idx == sorted(idx) and set(idx) == {1, 2, 3, 4}


@pytest.mark.parametrize("student", ["student-30k", "student-100k"])
def test_extracted_student_equals_the_slice(student):
    slim = slim_net(student)
    x = torch.randn(2, 1, 16, 16, 16)
    warm_bn(slim, x, range(len(slim.schedule)))
    net = extract(slim)
    assert isinstance(net, UNet3D) and net.config.widths == PRESETS[student].widths
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in UNet3D(PRESETS[student]).parameters())
    with torch.no_grad():
        diff = (net(x) - slim(x, 0)).abs().max().item()
    assert diff < 1e-5
    # the full assistant extracts as well, and it is not the student
    with torch.no_grad():
        assert (extract(slim, len(slim.schedule) - 1)(x) - slim(x, len(slim.schedule) - 1)).abs().max() < 1e-5
        assert (slim(x, 0) - slim(x, len(slim.schedule) - 1)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_growth_is_function_preserving(mode):
    slim = slim_net()
    x = torch.randn(2, 1, 16, 16, 16)
    warm_bn(slim, x, [1])
    getattr(slim, mode)()
    with torch.no_grad():
        before, student_before = slim(x, 1), slim(x, 0)
        slim.grow(1, 2)
        after, student_after = slim(x, 2), slim(x, 0)
    assert (after - before).abs().max().item() < 1e-5
    assert torch.equal(student_before, student_after)  # growth never touches the student's weights
    assert before.abs().max() > 0.01


def test_gtan_trains_assistant_and_student_in_one_step():
    teacher = UNet3D(UNetConfig(widths=(8, 16)))
    obj = GTANObjective(
        teacher, UNetConfig(widths=(2, 4)), UNetConfig(widths=(6, 12)), n_widths=2, grow_until=0.5, beta=0.5
    )
    x = torch.randn(2, 1, 8, 8, 8)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.AdamW(obj.module.parameters(), lr=1e-2)
    student0 = {k: v.clone() for k, v in obj.eval_model().state_dict().items()}
    grew = []
    for step in range(4):
        grew.append(obj.before_step(step, 4, opt))
        loss, parts = obj.loss(obj.module(x), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and parts["student_kd"] >= 0
    assert grew[0] is None and grew[2] is not None and obj.module.assistant_k == 2
    assert teacher.head.weight.grad is None  # the teacher stays frozen
    changed = [k for k, v in obj.eval_model().state_dict().items() if not torch.equal(v, student0[k])]
    assert any("weight" in k for k in changed)


def test_assistant_every_k_steps_skips_its_pass_in_between():
    """gtan.assistant_every 2: the assistant's pass on steps 0, 2, ...; on the others the student
    alone learns (from the teacher) and no assistant-only weight gets a gradient."""
    teacher = UNet3D(UNetConfig(widths=(8, 16)))
    obj = GTANObjective(teacher, UNetConfig(widths=(2, 4)), UNetConfig(widths=(6, 12)), n_widths=2,
                        assistant_every=2)  # fmt: skip
    x = torch.randn(2, 1, 8, 8, 8)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.AdamW(obj.module.parameters(), lr=1e-2)
    assistant_only = obj.slim.head.weight  # rows past the student's 2 classes' inputs are the assistant's
    for step in range(4):
        obj.before_step(step, 4, opt)
        out = obj.module(x)
        assert ("assistant" in out) == (step % 2 == 0)
        loss, parts = obj.loss(out, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and ("assistant_kd" in parts) == (step % 2 == 0)
        wide = assistant_only.grad[:, obj.slim.schedule[0][0] :]
        assert (wide.abs().sum() > 0) == (step % 2 == 0)  # the assistant's channels learn only on its steps
    with pytest.raises(ValueError, match="assistant_every"):
        GTANObjective(teacher, UNetConfig(widths=(2, 4)), UNetConfig(widths=(6, 12)), assistant_every=0)


def first_update_after_growth(handle_moments: bool, lr=1e-3):
    """Median |update| / lr of the weights growth 1 -> 2 makes active, at step 5000 of a run."""
    slim = slim_net()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    opt = torch.optim.AdamW(slim.parameters(), lr=lr, weight_decay=0.0)

    def step(k):
        opt.zero_grad()
        DiceCELoss()(slim(x, k), y).backward()
        opt.step()

    for _ in range(3):
        step(1)
    for state in opt.state.values():  # as deep into a run as a real growth, moments converged
        state["exp_avg"] /= 1 - 0.9**3
        state["exp_avg_sq"] /= 1 - 0.999**3
        state["step"].fill_(5000.0)
    was, now = slim.active(slim.schedule[1]), slim.active(slim.schedule[2])
    slim.grow(1, 2)
    if handle_moments:
        grow_adam_state(opt, slim, 1, 2)
    before = {p: p.detach().clone() for p in was}
    step(2)
    moves = [((p.detach() - before[p]).abs() / lr)[(now[p] & ~was[p]) & (p.grad.abs() > 1e-6)] for p in was]
    bn_old, bn_new = next(slim.bn_pairs(1, 2))
    return torch.cat(moves).median().item(), opt, bn_old, bn_new


def test_newly_active_weights_do_not_jump_after_growth():
    """Adam's per-tensor step counter is long past bias correction when growth hands it entries
    with zero moments: without grow_adam_state they move (1 - b1) / sqrt(1 - b2) = 3.16 lr."""
    plain, *_ = first_update_after_growth(handle_moments=False)
    assert plain == pytest.approx(3.16, rel=0.02)
    handled, opt, bn_old, bn_new = first_update_after_growth(handle_moments=True)
    assert handled < 0.5
    # the wider BN continues the narrower one's moments and counter (5000 + the step just taken)
    assert opt.state[bn_new.weight]["step"].item() == 5001
    n = bn_old.num_features
    assert not torch.equal(opt.state[bn_new.weight]["exp_avg_sq"][:n], torch.zeros(n))
