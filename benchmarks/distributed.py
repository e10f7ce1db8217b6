"""Meta-iterations per second and scaling efficiency of data-parallel training.

Trains the same run (same total task batch, same seed) with 1, 2, ... processes
through ``metalens train --nproc N`` and reads the training time from the run's
log (process start-up excluded). Prints a Markdown table.

Run: .venv/bin/python benchmarks/distributed.py [--nproc 1 2] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import metalens

WORKLOADS = [
    # (learner, task, options, steps) -- the batch is split over processes
    ("pretrain", "sinusoid", ["--set", "train.batch_tasks=32"], 300),
    ("maml", "sinusoid", ["--set", "train.batch_tasks=32", "--set", "learner.inner_steps=5"], 300),
    # a compute-bound workload: Conv-4 on Omniglot (needs ../shared/data/omniglot)
    ("protonet", "omniglot", ["--set", "train.batch_tasks=8"], 20),
]


def time_run(learner: str, task: str, opts: list[str], nproc: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "metalens", "train", "--task", task, "--learner", learner, "--steps",
               str(steps), "--out", str(out), "--nproc", str(nproc), "--quiet", "--threads", "1",
               "--set", f"train.log_every={steps}", *opts]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return rows[-1]["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="meta-iterations per run (default: per workload)")
    args = ap.parse_args()
    print("1 thread per process; the same total task batch and seed for every process count\n")
    print("| learner | processes | meta-iterations / s | speed-up | scaling efficiency |")
    print("|---|---|---|---|---|")
    for learner, task, opts, steps in WORKLOADS:
        if learner not in metalens.LEARNERS or task not in metalens.TASKS:
            continue
        steps = args.steps or steps
        base = None
        for n in args.nproc:
            secs = time_run(learner, task, opts, n, steps)
            rate = steps / secs
            base = base or rate
            print(f"| {learner} | {n} | {rate:.1f} | {rate / base:.2f}x | {rate / base / n:.0%} |", flush=True)


if __name__ == "__main__":
    main()
