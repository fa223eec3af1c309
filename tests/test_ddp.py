"""Two CPU processes under torchrun (gloo) through the one training loop."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from liverkd.distill.data import Augment, PatchDataset, phantom_volumes
    from liverkd.distill.models import UNet3D, UNetConfig
    from liverkd.distill.objectives import GTANObjective, Supervised
    from liverkd.distill.train import TrainSettings, train

    out = sys.argv[1]
    vols, spec = phantom_volumes(3, (16, 16, 16), seed=0)
    dataset = PatchDataset(vols[:2], (8, 8, 8), augment=Augment(), seed=0)
    settings = TrainSettings(steps=4, batch_size=2, val_every=2)
    torch.manual_seed(0)
    sup = Supervised(UNet3D(UNetConfig(widths=(4, 8))))
    train(sup, dataset, vols[2:], spec, settings, f"{out}/sup.pt")
    torch.manual_seed(0)
    gtan = GTANObjective(UNet3D(UNetConfig(widths=(8, 16))), UNetConfig(widths=(2, 4)), UNetConfig(widths=(6, 12)),
                         n_widths=2, grow_until=0.5)
    train(gtan, dataset, vols[2:], spec, settings, f"{out}/gtan.pt")
    rank = dist.get_rank()
    torch.save({"world": dist.get_world_size(), "sup": sup.module.state_dict(), "gtan": gtan.module.state_dict()},
               f"{out}/rank{rank}.pt")
    """
)


def test_two_processes_finish_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_tiny.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for part in ("sup", "gtan"):
        assert r0[part].keys() == r1[part].keys()
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{part}.{k} differs between ranks"
    assert (tmp_path / "sup.pt").exists() and (tmp_path / "gtan.pt").exists()  # rank 0 wrote the checkpoints
