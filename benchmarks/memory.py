"""Peak memory of one meta-iteration against the number of inner steps: MAML vs iMAML. Prints a table.

Configuration (B) of benchmarks/maml_peers.py: Conv-4 (64 channels) on 28x28 grey inputs
(random images), 5-way 1-shot, 15 queries per class, 8 tasks, inner lr 0.4, the learners'
default task batching; ``maml`` back-propagates through every inner step (its graph
grows with the steps), ``imaml`` runs its inner steps without a graph and gets its
meta-gradient implicitly (5 conjugate-gradient steps), so its memory should stay flat.

How it is measured: each point runs in a fresh process (``python benchmarks/memory.py
--point LEARNER STEPS``). After imports, the learner, the episode and the Adam optimiser
are built, the process's resident set size is read (``VmRSS`` of /proc/self/status:
the baseline); then ``--iters`` meta-iterations (``meta_loss``, ``backward``, Adam step)
run, and the peak resident set size of the process is read
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark). The table
shows that peak and its growth over the baseline -- what the meta-iterations added.
No tracemalloc (it does not see torch's allocations).

Run: .venv/bin/python benchmarks/memory.py [--steps 1 5 10 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def point(learner_name: str, steps: int, iters: int, batching: str | None) -> dict:
    import torch

    import metalens

    T, N, K, Q = 8, 5, 1, 15
    spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=N)
    opts = {"backbone": "conv4", "channels": 64, "inner_steps": steps, "inner_lr": 0.4}
    if batching:
        opts["batching"] = batching
    learner = metalens.make_learner(learner_name, spec, **opts)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N)
    ep = metalens.Episode(torch.randn(T, N * K, 1, 28, 28, generator=g), labels.repeat(T, K),
                          torch.randn(T, N * Q, 1, 28, 28, generator=g), labels.repeat(T, Q), num_classes=N)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    base = _rss_mb()
    t0 = time.perf_counter()
    losses = []
    for _ in range(iters):
        loss, metrics = learner.meta_loss(ep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(metrics["loss"])
    seconds = (time.perf_counter() - t0) / iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"learner": learner_name, "steps": steps, "baseline_mb": base, "peak_mb": peak,
            "growth_mb": peak - base, "s_per_iter": seconds, "loss": losses[-1],
            "batching": learner.batching, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--learners", nargs="+", default=["maml", "imaml"])
    ap.add_argument("--iters", type=int, default=2, help="meta-iterations per point")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batching", choices=("vmap", "loop"), default=None, help="default: the learners' own")
    ap.add_argument("--point", nargs=2, metavar=("LEARNER", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(point(args.point[0], int(args.point[1]), args.iters, args.batching)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    res: dict[tuple[str, int], dict] = {}
    for name in args.learners:
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--point", name, str(steps), "--iters", str(args.iters),
                   "--threads", str(args.threads)] + (["--batching", args.batching] if args.batching else [])
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{name}, {steps} steps failed:\n{p.stderr}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            res[name, steps] = r
            print(f"[{name} steps={steps}] peak {r['peak_mb']:.0f} MB, +{r['growth_mb']:.0f} MB, "
                  f"{r['s_per_iter']:.2f} s/iter", file=sys.stderr, flush=True)

    batching = {n: res[n, args.steps[0]]["batching"] for n in args.learners}
    print(f"\nPeak resident memory of a process running {args.iters} meta-iteration(s) of config B "
          f"(Conv-4 64ch, 5-way 1-shot, 15 queries/class, 8 tasks), {args.threads} thread(s); "
          "growth = peak RSS (getrusage ru_maxrss) minus the RSS after setup (VmRSS), fresh process per point; "
          + ", ".join(f"{n}: batching={b}" for n, b in batching.items()) + "\n")
    head = "| inner steps | " + " | ".join(f"{n}: peak RSS | {n}: growth | {n}: s / iter" for n in args.learners) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for steps in args.steps:
        cells = []
        for n in args.learners:
            r = res[n, steps]
            cells += [f"{r['peak_mb']:.0f} MB", f"+{r['growth_mb']:.0f} MB", f"{r['s_per_iter']:.2f}"]
        print(f"| {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
