"""Seconds per MAML meta-iteration (meta_loss + backward + Adam step). Prints a table.

Two configurations:

- (A) sinusoid: MLP 1-40-40-1, K = 10 support + 10 query points, 25 tasks a step,
  1 and 5 inner steps, 1 and 2 threads, tasks batched by vmap or by a Python loop;
- (B) Conv-4 with 64 channels on 28x28 inputs, 5-way 1-shot, 15 queries per class,
  8 tasks a step, 1 inner step (random inputs), vmap vs loop.

Each cell is the median over ``--iters`` timed iterations after ``--warmup`` untimed
ones, taken in a fresh process per cell (``torch.set_num_threads`` is set there).
The result picks ``AUTO_BATCHING`` in ``metalens/learners/gradient.py``.

Run: .venv/bin/python benchmarks/maml_speed.py [--iters 20] [--only A|B]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _workload(config: str, inner_steps: int, batching: str, threads: int, warmup: int, iters: int, q) -> None:
    import torch

    import metalens
    from metalens.episode import Episode, TaskSpec

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    if config == "A":
        family = metalens.make_task("sinusoid", shots=10, queries=10)
        learner = metalens.make_learner("maml", family, hidden=[40, 40], inner_steps=inner_steps,
                                        batching=batching)
        episodes = [family.episode(0, i, 25) for i in range(warmup + iters)]
    else:
        T, N, K, Q = 8, 5, 1, 15
        spec = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=N)
        learner = metalens.make_learner("maml", spec, backbone="conv4", channels=64, inner_steps=inner_steps,
                                        inner_lr=0.4, batching=batching)
        labels = torch.arange(N)
        episodes = [Episode(torch.randn(T, N * K, 1, 28, 28, generator=g), labels.repeat(T, K),
                            torch.randn(T, N * Q, 1, 28, 28, generator=g), labels.repeat(T, Q), num_classes=N)
                    for _ in range(warmup + iters)]
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    times = []
    for i, ep in enumerate(episodes):
        t0 = time.perf_counter()
        loss, _ = learner.meta_loss(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    q.put(statistics.median(times))


def measure(config: str, inner_steps: int, batching: str, threads: int, warmup: int, iters: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_workload, args=(config, inner_steps, batching, threads, warmup, iters, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed meta-iterations per cell")
    ap.add_argument("--warmup", type=int, default=3, help="untimed meta-iterations first")
    ap.add_argument("--only", choices=("A", "B"), default=None)
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}; median seconds per meta-iteration over {args.iters} iterations\n")
    print("| config | inner steps | batching | 1 thread | 2 threads |")
    print("|---|---|---|---|---|")
    cells = []
    if args.only in (None, "A"):
        cells += [("A", s, b) for s in (1, 5) for b in ("vmap", "loop")]
    if args.only in (None, "B"):
        cells += [("B", 1, b) for b in ("vmap", "loop")]
    for config, steps, batching in cells:
        name = "A: sinusoid MLP, 25 tasks" if config == "A" else "B: Conv-4 64ch 5-way 1-shot, 8 tasks"
        iters = args.iters if config == "A" else max(3, args.iters // 4)
        t1 = measure(config, steps, batching, 1, args.warmup, iters)
        t2 = measure(config, steps, batching, 2, args.warmup, iters)
        print(f"| {name} | {steps} | {batching} | {t1:.4f} | {t2:.4f} |", flush=True)


if __name__ == "__main__":
    main()
