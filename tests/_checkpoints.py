"""Small real checkpoints for the export / calibrate / build tests (random-init students)."""

from __future__ import annotations

from liverkd.core.spec import PreprocessSpec

SPEC = PreprocessSpec(spacing=(12.0, 12.0, 12.0), input_shape=(32, 32, 32))


def make_checkpoint(path, preset="student-30k", seed=0, spec=SPEC):
    """A random-init student with non-trivial BatchNorm statistics (so folding them is tested).

    BatchNorm shifts are positive, so no ReLU layer of the narrow top level dies on a phantom
    (then the logits would be the head's bias alone, the same in every voxel), and the head's
    bias is set here, whatever distill.models initialises it to. Its answer is still nearly
    constant (random tiny networks mostly are): fine for shapes, parity and plumbing, useless
    for telling precisions apart. threshold_checkpoint is for that.
    """
    import torch

    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    torch.manual_seed(seed)
    model = create_model(preset)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.05, 0.2)
        model.head.bias.uniform_(-0.5, 0.5)
    return save_checkpoint(path, model, spec, preset=preset)


def threshold_checkpoint(path, threshold=0.55, gain=10.0, preset="student-30k", spec=SPEC):
    """A student whose weights make it answer "liver where the normalised intensity > threshold".

    Channel 0 carries the input unchanged through the top level of the U-Net (centre taps of 1,
    identity BatchNorm, skip connection); the head turns it into logits gain * (x - threshold).
    The decision boundary runs through soft tissue, so precision loss (INT8) really flips voxels.
    """
    import torch

    from liverkd.distill.checkpoint import save_checkpoint
    from liverkd.distill.models import create_model

    model = create_model(preset)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
        for block in [*model.down, *model.dec]:
            for m in block:
                if isinstance(m, torch.nn.Conv3d):
                    m.weight[0, 0, 1, 1, 1] = 1.0
        model.head.weight[1, 0] = gain
        model.head.bias[1] = -gain * threshold
    return save_checkpoint(path, model, spec, preset=preset)
