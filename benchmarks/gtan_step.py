"""GTAN training step time / KD training step time at the 30k preset (goal <= 1.3).

Both steps are the real objectives of distill/objectives.py with AdamW, measured
interleaved in the same process on the same batch. A GTAN step's cost depends on the
assistant's current width, so it is timed at every width of the schedule; the headline
ratio weights them by the share of training each width gets (gtan.grow_until). With
--assistant-every K (gtan.assistant_every) the assistant's pass runs on one step in K; the other
steps (the student learning from the teacher alone) are timed too and weighted (K - 1) / K.

    .venv/bin/python benchmarks/gtan_step.py [--patch 64] [--batch 2] [--repeats 7] [--assistant-every 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liverkd.distill.gtan import assistant_index
from liverkd.distill.models import PRESETS, create_model
from liverkd.distill.objectives import GTANObjective, KnowledgeDistillation


def step_timer(objective, x, y, device):
    optimizer = torch.optim.AdamW(objective.module.parameters(), lr=1e-4)
    objective.module.to(device).train()
    objective.to(device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = objective.loss(objective.module(x), x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="student-30k")
    ap.add_argument("--assistant", default="ta", help="preset whose widths the assistant grows to")
    ap.add_argument("--patch", type=int, default=64, help="cubic patch edge (voxels)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--n-widths", type=int, default=4, help="gtan.n_widths")
    ap.add_argument("--grow-until", type=float, default=0.5, help="gtan.grow_until")
    ap.add_argument("--assistant-every", type=int, default=1, help="gtan.assistant_every")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    x = torch.rand(shape, device=device)
    y = (x[:, 0] > 0.5).long()
    teacher = create_model("teacher").to(device)
    kd = KnowledgeDistillation(create_model(args.student), teacher)
    gtan = GTANObjective(
        teacher, PRESETS[args.student], PRESETS[args.assistant], n_widths=args.n_widths, grow_until=args.grow_until
    )
    timers = {"kd": step_timer(kd, x, y, device)}
    for k in range(1, args.n_widths + 1):

        def at_width(k=k, step=step_timer(gtan, x, y, device)):
            gtan.module.assistant_k = k
            return step()

        timers[f"gtan@{k}"] = at_width
    if args.assistant_every > 1:

        def student_only(step=step_timer(gtan, x, y, device)):
            gtan.module.with_assistant = False
            try:
                return step()
            finally:
                gtan.module.with_assistant = True

        timers["gtan-student-only"] = student_only
    times = {name: [] for name in timers}
    for t in timers.values():  # warm-up
        t()
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, t in timers.items():
            times[name].append(t())
    med = {name: statistics.median(v) for name, v in times.items()}
    steps = 1000
    share = {k: 0 for k in range(1, args.n_widths + 1)}
    for s in range(steps):
        share[assistant_index(s, steps, args.n_widths, args.grow_until)] += 1 / steps
    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch} x {args.patch}^3, "
        f"student {args.student}, assistant {args.assistant}, teacher; median of {args.repeats}"
    )
    print(f"  KD step                  {med['kd'] * 1e3:8.1f} ms")
    for k in range(1, args.n_widths + 1):
        widths = gtan.slim.schedule[k]
        print(
            f"  GTAN step, assistant {str(list(widths)):<17} {med[f'gtan@{k}'] * 1e3:8.1f} ms  "
            f"ratio {med[f'gtan@{k}'] / med['kd']:.2f}  ({100 * share[k]:.0f}% of training)"
        )
    weighted = sum(share[k] * med[f"gtan@{k}"] for k in share)
    every = args.assistant_every
    if every > 1:
        print(f"  GTAN step, student only (no assistant pass) {med['gtan-student-only'] * 1e3:8.1f} ms")
        weighted = (weighted + (every - 1) * med["gtan-student-only"]) / every
    print(
        f"GTAN/KD step time over the growth schedule, assistant every {every}: "
        f"{weighted / med['kd']:.2f}  (goal <= 1.3)"
    )


if __name__ == "__main__":
    main()
