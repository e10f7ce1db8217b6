"""metalens' in-context transformer against the same model on ``torch.nn.TransformerEncoder``. Prints a table.

Garg et al. (2022)'s in-context linear regression: sequences of 41 points ``(x_i, y_i)``,
``x ~ N(0, I_20)``, ``y = w^T x``, ``w ~ N(0, I/20)`` (metalens' ``linear`` family, d = 20,
40 + 1 points), 64 sequences a step; the squared error of the prediction at every position
from the points before it, its backward, one Adam step (lr 1e-3):

- ``metalens``: ``make_learner("transformer", spec, mode="sequence", dim=64, layers=4,
  heads=4)`` (pre-LayerNorm blocks, GELU MLP of width 256, no positional encoding): 41
  context tokens ``e_x(x_i) + e_y(y_i)`` and 41 query tokens ``e_x(x_t) + e_?``; context
  token i attends to context tokens j <= i, the query token of position t to context tokens
  j < t and to itself;
- ``torch``: ``nn.TransformerEncoder`` of four ``nn.TransformerEncoderLayer(64, 4, 256,
  dropout=0.0, activation="gelu", batch_first=True, norm_first=True)`` over the same 82 tokens,
  that attention pattern as its boolean ``mask``, then the same final LayerNorm and linear
  head on the query tokens; metalens' initial weights copied in (its fused q/k/v projection
  is ``in_proj_weight``).

Run: .venv/bin/python benchmarks/icl_peers.py [--threads 1 2] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from harness import Impl, Workload, arg_parser, drive

IMPLS = [Impl("metalens", "metalens", "metalens `transformer` (sequence mode)", peer=False, check=None),
         Impl("torch", "metalens", "`torch.nn.TransformerEncoder`, same model and weights")]


def make_data(path: Path, *, d: int = 20, n: int = 41, tasks: int = 64, pool: int = 8, seed: int = 0) -> None:
    import metalens

    family = metalens.make_task("linear", dim=d, shots=n - 1, queries=1)
    torch.manual_seed(seed)
    learner = metalens.make_learner("transformer", family.spec, mode="sequence", dim=64, layers=4, heads=4)
    g = torch.Generator().manual_seed(seed + 1)
    episodes = []
    for _ in range(pool):
        ep = family.sample(tasks, generator=g)
        episodes.append([ep.support_x, ep.support_y, ep.query_x, ep.query_y])
    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    torch.save({"cfg": {"d": d, "n": n, "tasks": tasks}, "state": state, "episodes": episodes}, path)


def main() -> None:
    args = arg_parser(__doc__, "icl_peers.json").parse_args()
    drive("In-context transformer: metalens vs torch.nn.TransformerEncoder",
          "linear regression in context, d = 20, 41 points, 64 sequences a step, dim 64, 4 blocks, 4 heads; median "
          "s per training step (loss, backward, Adam); x metalens above 1: metalens is faster",
          [Workload("linear d=20", "icl", make_data, IMPLS, iters=20)], args)


if __name__ == "__main__":
    main()
