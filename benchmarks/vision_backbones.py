"""Per-step time and memory of Conv-4 and ResNet-12 at 84x84x3 for protonet and maml. Prints a table.

The miniImageNet-sized configuration of the few-shot literature: 84x84 colour inputs (random
images), 5-way 1-shot, 15 queries per class, one task per step. Backbones at their default
widths: Conv-4 with 64 channels (a 1600-d embedding), ResNet-12 with 64-160-320-640 channels
(12.4M parameters, a 16000-d embedding). ``protonet`` embeds the 80 images of the task;
``maml`` takes ``--inner-steps`` second-order inner steps (5 by default, as Finn et al. 2017
on miniImageNet) at inner lr 0.01 and back-propagates through them.

How it is measured: each point runs in a fresh process (``--point LEARNER BACKBONE``). The
learner, the episode and the Adam optimiser are built, the resident set size is read (the
baseline, ``VmRSS``); then ``--warmup`` + ``--steps`` meta-training steps run (``meta_loss``,
``backward``, Adam step) and the table shows the median seconds of the last ``--steps`` and
the process's peak resident set size (``ru_maxrss``), with its growth over the baseline. On
CUDA (``--device cuda``) the memory columns are ``torch.cuda.max_memory_allocated`` instead,
and each step is synchronised before its time is read.

Run: .venv/bin/python benchmarks/vision_backbones.py [--threads 1] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

POINTS = [("protonet", "conv4"), ("protonet", "resnet12"), ("maml", "conv4"), ("maml", "resnet12")]
N, K, Q, SIDE = 5, 1, 15, 84


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def point(learner_name: str, backbone: str, *, steps: int, warmup: int, inner_steps: int, device: str) -> dict:
    import torch

    import metalens

    spec = metalens.TaskSpec(kind="classification", x_shape=(3, SIDE, SIDE), num_classes=N)
    opts: dict = {"backbone": backbone}
    if learner_name == "maml":
        opts.update(inner_steps=inner_steps, inner_lr=0.01)
    learner = metalens.make_learner(learner_name, spec, seed=0, **opts).to(device)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N)
    ep = metalens.Episode(torch.randn(1, N * K, 3, SIDE, SIDE, generator=g), labels.repeat(1, K),
                          torch.randn(1, N * Q, 3, SIDE, SIDE, generator=g), labels.repeat(1, Q),
                          num_classes=N).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() / 2 ** 20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss, metrics = learner.meta_loss(ep, generator=torch.Generator(device=device).manual_seed(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in learner.parameters())
    return {"learner": learner_name, "backbone": backbone, "s_per_step": statistics.median(times),
            "baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base, "params": params,
            "embedding": learner.net.embedding_dim if learner_name == "maml" else learner.embedding_dim,
            "loss": metrics["loss"], "threads": torch.get_num_threads(), "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per point (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=5, help="maml's inner steps in meta-training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="+", default=None, help="points to run, e.g. protonet/conv4 maml/resnet12")
    ap.add_argument("--point", nargs=2, metavar=("LEARNER", "BACKBONE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(point(*args.point, steps=args.steps, warmup=args.warmup, inner_steps=args.inner_steps,
                               device=args.device)))
        return
    rows = []
    for learner, backbone in POINTS:
        if args.only and f"{learner}/{backbone}" not in args.only:
            continue
        cmd = [sys.executable, __file__, "--point", learner, backbone, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--inner-steps", str(args.inner_steps), "--threads", str(args.threads),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{learner}/{backbone} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {learner}/{backbone}", file=sys.stderr)
    mem = "GPU memory (max allocated)" if args.device.startswith("cuda") else "peak RSS"
    print(f"84x84x3, 5-way 1-shot, 15 queries, 1 task per step; maml: {args.inner_steps} inner steps; "
          f"device {args.device}, {args.threads} thread(s); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"| learner | backbone | parameters | embedding | s / step | {mem} | growth over baseline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['learner']}` | {r['backbone']} | {r['params'] / 1e6:.2f}M | {r['embedding']} | "
              f"{r['s_per_step']:.2f} | {r['peak_mb']:.0f} MB | {r['growth_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
