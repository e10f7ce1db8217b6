"""Evaluation throughput: metalens' evaluator against a learn2learn-style evaluation loop. Prints a table.

The time to score a fixed set of held-out tasks with trained-style weights (the initial
weights here: the time does not depend on them), in two workloads:

- ``eval-protonet``: 600 Omniglot-shaped 5-way 1-shot tasks (random 28x28 grey images, 15
  queries per class), Prototypical Networks on Conv-4 (64 channels): per-task accuracy.
  metalens: ``metalens.evaluate.score_tasks(learner.predict, episode)`` on one 600-task
  ``Episode`` -- what ``metalens eval`` runs once the held-out episodes are drawn (100 tasks
  a call, each task's images one batch for batch norm). learn2learn: its protonet example's
  test loop, ``fast_adapt`` on one task at a time after ``model.eval()`` (the example has no
  ``torch.no_grad``: ``learn2learn``), and the same under ``torch.no_grad()``
  (``learn2learn-nograd``).
- ``eval-maml``: 1000 sinusoid tasks (metalens' ``sinusoid`` family, 10 support + 10 query
  points), MAML's MLP 1-40-40-1 adapted by 10 SGD steps of 0.01 on each task's support set,
  then the query MSE. metalens: ``score_tasks`` of ``make_learner("maml", ...,
  eval_inner_steps=10)``. learn2learn: per task ``learner = maml.clone()``, 10 x
  ``learner.adapt(loss)``, the query MSE under ``torch.no_grad()``, with
  ``MAML(first_order=False)`` as for training (``learn2learn``) and ``first_order=True``
  (``learn2learn-fo``: no second-order graph, the faster way to evaluate).

The check column compares the per-task metric (accuracy, MSE) with metalens': the largest
absolute difference over the tasks. A cell's time is one pass over every task; the table
gives it per task as well.

Run: .venv/bin/python benchmarks/eval_peers.py [--threads 1 2] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from bench_cell import conv4, l2l_order
from harness import Impl, Workload, arg_parser, drive, fmt_s, load_grad

PROTONET = [Impl("metalens", "metalens", "metalens `score_tasks` (`protonet`)", peer=False, check=None),
            Impl("learn2learn", "learn2learn", "learn2learn example test loop (no `no_grad`)"),
            Impl("learn2learn-nograd", "learn2learn", "learn2learn example test loop under `torch.no_grad()`")]
MAML = [Impl("metalens", "metalens", "metalens `score_tasks` (`maml`)", peer=False, check=None),
        Impl("learn2learn", "learn2learn", "learn2learn `MAML` clone/adapt loop"),
        Impl("learn2learn-fo", "learn2learn", "learn2learn `MAML(first_order=True)` clone/adapt loop")]


def make_protonet(path: Path, *, tasks: int = 600, ways: int = 5, shot: int = 1, query: int = 15,
                  seed: int = 0) -> None:
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in conv4().named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    labels, support, queries = l2l_order(ways, shot, query)  # the same support and query rows everywhere
    data = torch.rand(tasks, len(labels), 1, 28, 28, generator=g)
    episodes = [data[:, support], labels[support].repeat(tasks, 1), data[:, queries], labels[queries].repeat(tasks, 1),
                data, labels]
    torch.save({"cfg": {"ways": ways, "shot": shot, "query": query}, "state": state, "episodes": episodes}, path)


def make_maml(path: Path, *, tasks: int = 1000, seed: int = 0) -> None:
    import metalens

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ep = metalens.make_task("sinusoid", shots=10, queries=10).eval_episodes(seed, tasks)
    torch.save({"cfg": {"shots": 10, "queries": 10, "inner_lr": 0.01, "steps": 10}, "state": state,
                "episodes": [ep.support_x, ep.support_y, ep.query_x, ep.query_y]}, path)


def main() -> None:
    args = arg_parser(__doc__, "eval_peers.json").parse_args()
    metalens_cells: dict[str, object] = {}

    def check(impl, cell):
        if cell.runs:
            per_task = fmt_s(cell.median / (600 if cell.runs[0]["workload"] == "eval-protonet" else 1000))
        else:
            return None
        if impl.name == "metalens":
            metalens_cells[cell.runs[0]["workload"]] = cell
            return f"{per_task} a task"
        ref = metalens_cells.get(cell.runs[0]["workload"])
        g, r = load_grad(cell), load_grad(ref) if ref is not None else None
        diff = float((g["per_task"] - r["per_task"]).abs().max()) if g is not None and r is not None else float("nan")
        return f"{per_task} a task; max per-task diff {diff:.1e}"

    workloads = [Workload("protonet, 600 tasks", "eval-protonet", make_protonet, PROTONET, iters=1, warmup=0,
                          extra_check=check, unit="s / pass"),
                 Workload("maml, 1000 tasks", "eval-maml", make_maml, MAML, iters=1, warmup=0, extra_check=check,
                          unit="s / pass")]
    drive("Evaluation throughput: metalens vs a learn2learn-style loop",
          "one pass over every held-out task (protonet: 600 5-way 1-shot tasks, Conv-4; maml: 1000 sinusoid tasks, "
          "10 inner steps); median s per pass; x metalens above 1: metalens is faster; the check column: time per "
          "task and the largest per-task difference of the metric from metalens'", workloads, args)


if __name__ == "__main__":
    main()
