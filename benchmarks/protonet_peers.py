"""metalens' Prototypical Networks against learn2learn's and easyfsl's, side by side. Prints a table.

One training step of Prototypical Networks (Snell et al. 2017) -- embed a task's support and
query images with Conv-4 (4 x [3x3 conv 64, batch norm with batch statistics, ReLU, 2x2
max-pool], a 64-d embedding of 28x28 images), class means of the support embeddings, a
softmax over negative distances, the query cross-entropy, its backward and one Adam step
(lr 1e-3) -- on one Omniglot-shaped task (random 28x28 grey images, as many as an
Omniglot episode has) a step, 5-way 1-shot and 20-way 1-shot with 15 queries per class:

- ``metalens``: ``make_learner("protonet", spec, backbone="conv4")``, ``learner.meta_loss(episode)``;
- ``learn2learn`` 0.2.0: its ``examples/vision/protonet_miniimagenet.py`` ``fast_adapt``
  (support and queries embedded in one batch, squared Euclidean distances): the same model,
  so the loss and gradient must agree with metalens';
- ``easyfsl`` 1.5.0: ``PrototypicalNetworks(backbone)``, ``process_support_set`` then
  ``model(query_images)`` (its episodic-training notebook). Not the same model: the support
  and the queries go through the backbone as two batches (batch norm statistics of each)
  and scores are ``-torch.cdist`` (Euclidean, not squared). Its gradient is checked against
  ``easyfsl-ref``, those maths written in plain PyTorch in metalens' environment.

Every implementation loads the same initial weights (``torch.manual_seed(0)``) and the
same pool of episodes from one ``.pt`` file. Cells, rounds, the load columns:
``benchmarks/peers/harness.py``; what each implementation runs: ``benchmarks/peers/bench_cell.py``.

Run: .venv/bin/python benchmarks/protonet_peers.py [--threads 1 2] [--rounds 3] [--only protonet-5w protonet-20w]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from bench_cell import conv4, l2l_order
from harness import Impl, Workload, arg_parser, drive

IMPLS = [
    Impl("metalens", "metalens", "metalens `protonet`", peer=False, check=None),
    Impl("learn2learn", "learn2learn", "learn2learn protonet example (`fast_adapt`)"),
    Impl("easyfsl", "easyfsl", "easyfsl `PrototypicalNetworks`", check="easyfsl-ref"),
    Impl("easyfsl-ref", "metalens", "easyfsl's maths in plain PyTorch (check only)", peer=False, check=None),
]


def make_data(path: Path, *, ways: int, shot: int = 1, query: int = 15, pool: int = 6, seed: int = 0) -> None:
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in conv4().named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    labels, support, queries = l2l_order(ways, shot, query)
    episodes = []
    for _ in range(pool):  # one task per step; the same rows are support and queries everywhere (l2l_order)
        data = torch.rand(len(labels), 1, 28, 28, generator=g)
        episodes.append([data[support][None], labels[support][None], data[queries][None], labels[queries][None],
                         data, labels])
    torch.save({"cfg": {"ways": ways, "shot": shot, "query": query}, "state": state, "episodes": episodes}, path)


def main() -> None:
    args = arg_parser(__doc__, "protonet_peers.json").parse_args()
    workloads = [Workload("5-way 1-shot", "protonet", partial(make_data, ways=5), IMPLS, iters=20),
                 Workload("20-way 1-shot", "protonet", partial(make_data, ways=20), IMPLS, iters=8)]
    if args.only:
        workloads = [w for w in workloads if w.group in args.only or w.group.split()[0] in args.only]
        args.only = None
    # metalens' own row is compared with learn2learn's (the same model): its check column is on that row
    for w in workloads:
        w.impls = [Impl(**{**i.__dict__, "check": "metalens"}) if i.name == "learn2learn" else i for i in w.impls]
    drive("Prototypical Networks: metalens vs learn2learn and easyfsl",
          "Conv-4 (64 ch), 28x28 grey images, one task per step, 15 queries per class; median s per training "
          "step (loss, backward, Adam); x metalens above 1: metalens is faster", workloads, args)


if __name__ == "__main__":
    main()
