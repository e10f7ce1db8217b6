"""metalens' Conditional and Attentive Neural Processes against the same models in plain PyTorch. Prints a table.

One training step -- the loss, its backward, one Adam step (lr 1e-3) -- on batches of 16 tasks
of metalens' ``gp`` family (1-D functions from a GP with an RBF kernel; 3-50 context and
3-50 target points per task, padded to the batch's largest counts and masked):

- ``cnp``: metalens ``make_learner("cnp", spec)`` (hidden 128, 3-layer encoder and decoder),
  the Gaussian negative log-likelihood of the targets;
- ``anp``: metalens ``make_learner("anp", spec)`` (hidden and latent 128, 8 heads, one
  self-attention block in each encoder path, 2-layer query MLP), the conditional ELBO with
  one z sample drawn from a generator seeded alike on both sides;
- ``torch``: the same architecture written plainly in PyTorch -- ``nn.Sequential`` MLPs,
  ``nn.MultiheadAttention(batch_first=True)`` with ``key_padding_mask`` (its packed input
  projection holding metalens' three, its bias held at zero), ``nn.LayerNorm``,
  ``torch.distributions`` -- with metalens' initial weights copied in.

The ``neuralprocesses`` package (Bruinsma et al.) is not a row: its models are built by its own
constructors (``construct_gnp``, ``construct_agnp``) with their own architecture and
parameterisation, so the same weights cannot be loaded, and it installs a multi-backend stack
(plum, lab, wbml, stheno, ...) besides torch. See docs/benchmarks.md.

Run: .venv/bin/python benchmarks/np_peers.py [--threads 1 2] [--rounds 3] [--only np-cnp np-anp]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from harness import Impl, Workload, arg_parser, drive

IMPLS = [Impl("metalens", "metalens", "metalens", peer=False, check=None),
         Impl("torch", "metalens", "plain PyTorch, same architecture and weights")]


def make_data(path: Path, *, model: str, tasks: int = 16, pool: int = 8, seed: int = 0) -> None:
    import metalens

    family = metalens.make_task("gp")
    torch.manual_seed(seed)
    learner = metalens.make_learner(model, family.spec)
    g = torch.Generator().manual_seed(seed + 1)
    episodes = []
    for _ in range(pool):
        ep = family.sample(tasks, generator=g)
        episodes.append([ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.support_mask, ep.query_mask])
    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    torch.save({"cfg": {"model": model, "tasks": tasks}, "state": state, "episodes": episodes}, path)


def main() -> None:
    args = arg_parser(__doc__, "np_peers.json").parse_args()
    workloads = [Workload("cnp", "np-cnp", partial(make_data, model="cnp"), IMPLS, iters=40),
                 Workload("anp", "np-anp", partial(make_data, model="anp"), IMPLS, iters=15)]
    drive("Neural Processes: metalens vs plain PyTorch",
          "gp family, 16 tasks a step, 3-50 context and 3-50 target points (padded, masked); median s per "
          "training step (loss, backward, Adam); x metalens above 1: metalens is faster", workloads, args)


if __name__ == "__main__":
    main()
