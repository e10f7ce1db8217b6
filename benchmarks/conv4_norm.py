"""Conv-4's per-task batch norm: primitive ops against PyTorch's fused kernel. Prints a table.

Seconds per meta-training step (median of ``--steps`` after 2 warm-up steps) of
``protonet`` and ``matching`` on Omniglot, 20-way, 1- and 5-shot, 5 queries per class,
one task per step (the omniglot study's training configuration), with
``TaskBatchNorm2d.fused`` off and on; the last column is the loss difference of the two
after the same steps from the same weights.

Run: .venv/bin/python benchmarks/conv4_norm.py [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import metalens
from metalens.nets import TaskBatchNorm2d


def seconds_per_step(name: str, shots: int, fused: bool, steps: int) -> tuple[float, float]:
    family = metalens.make_task("omniglot", ways=20, shots=shots, queries=5)
    learner = metalens.make_learner(name, family, seed=0)
    for m in learner.modules():
        if isinstance(m, TaskBatchNorm2d):
            m.fused = fused
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    times, loss = [], torch.zeros(())
    for step in range(steps + 2):
        episode = family.episode(0, step, 1)
        t = time.perf_counter()
        loss, _ = learner.meta_loss(episode)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times), float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| learner | shots | primitive ops s/step | fused s/step | speed-up | loss difference |")
    print("|---|---|---|---|---|---|")
    for name in ("protonet", "matching"):
        for shots in (1, 5):
            plain, loss_p = seconds_per_step(name, shots, False, args.steps)
            fused, loss_f = seconds_per_step(name, shots, True, args.steps)
            print(f"| {name} | {shots} | {plain:.3f} | {fused:.3f} | {plain / fused:.2f}x | "
                  f"{abs(loss_p - loss_f):.1e} |", flush=True)


if __name__ == "__main__":
    main()
