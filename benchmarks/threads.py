"""How many PyTorch threads should metalens use by default? Prints a table.

Times two typical small-model workloads with 1 and 2 threads, on an idle machine and
while another process keeps one core busy (as when tests, a second run or an editor
share a 2-core machine):

- train: 200 meta-training steps of ``pretrain`` on ``sinusoid`` (MLP 1-40-40-1, 25 tasks);
- eval: ``scratch`` on 200 held-out sinusoid tasks (100 Adam steps per task, vmapped).

Run: .venv/bin/python benchmarks/threads.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x += i * i


def _workload(kind: str, threads: int, q) -> None:
    import torch

    import metalens
    from metalens.train import TrainConfig, train

    torch.set_num_threads(threads)
    fam = metalens.make_task("sinusoid")
    if kind == "train":
        lrn = metalens.make_learner("pretrain", fam)
        t = time.perf_counter()
        train(lrn, fam, TrainConfig(steps=200, batch_tasks=25), progress=False)
    else:
        lrn = metalens.make_learner("scratch", fam)
        t = time.perf_counter()
        metalens.evaluate(lrn, fam, episodes=200, with_oracle=False)
    q.put(time.perf_counter() - t)


def measure(kind: str, threads: int, busy: bool, repeats: int = 3) -> float:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    hog = ctx.Process(target=_busy, args=(stop,)) if busy else None
    if hog:
        hog.start()
    times = []
    try:
        for _ in range(repeats):
            q = ctx.Queue()
            p = ctx.Process(target=_workload, args=(kind, threads, q))
            p.start()
            times.append(q.get())
            p.join()
    finally:
        if hog:
            stop.set()
            hog.join()
    return min(times)


def main() -> None:
    print(f"cores: {os.cpu_count()}; best of 3 runs, seconds (lower is better)\n")
    print("| workload | machine | 1 thread | 2 threads | 2 / 1 |")
    print("|---|---|---|---|---|")
    for kind in ("train", "eval"):
        for busy in (False, True):
            t1, t2 = measure(kind, 1, busy), measure(kind, 2, busy)
            print(f"| {kind} | {'one core busy' if busy else 'idle'} | {t1:.2f} | {t2:.2f} | {t2 / t1:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
