"""Where (B)'s time goes: Conv-4's first block, kernel by kernel, in the layouts PyTorch offers. Prints a table.

The MAML benchmark's configuration (B) (``maml_peers.py``) spends most of a meta-iteration on
one task's query batch -- 75 images, 64 channels at 28x28 after the first convolution -- going
forward and backward through Conv-4's first block: 3x3 convolution from 1 channel, batch norm
with the batch's statistics, 2x2 max-pool, ReLU. Every exact implementation (metalens and the
peers alike) runs PyTorch's kernels for these; this script times each of them on that batch,
in PyTorch's default layout (NCHW) and in channels-last, and the block after the convolution
under ``torch.compile`` (``--compile``: inductor's own kernels). The ``error`` column is the largest relative difference of the float32 gradient (input and
weights) from the same computation in float64, on conv outputs of sparse binary images
(Omniglot-like strokes: large constant regions).

Each time is the smallest, over ``--rounds`` interleaved rounds, of the median of ``--iters``
calls, in ms; ``fwd+bwd`` is forward then backward to the input (for the convolution, to its
weights: the input is data). A kernel whose output is a fresh 15 MB buffer may pay for the
allocator's page faults in some rounds (glibc returns such buffers to the system when freed): the
convolution's time at 1 thread varies by up to 4x between runs for that reason alone.

Run: .venv/bin/python benchmarks/conv4_kernels.py [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

CL = torch.channels_last


def timed(fns: dict[str, Callable[[], object]], iters: int, rounds: int) -> dict[str, float]:
    """Min over interleaved rounds of the median time (ms) of each function."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f(), f()
    for _ in range(rounds):
        for k, f in fns.items():
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            out[k].append(statistics.median(ts) * 1e3)
    return {k: min(v) for k, v in out.items()}


def block(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch norm (batch statistics), 2x2 max-pool, ReLU: the rest of Conv-4's block."""
    return F.relu(F.max_pool2d(F.batch_norm(z, None, None, w, b, training=True), 2))


def grad_error(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> float:
    """Largest relative difference of fn's float32 gradients from its float64 ones."""
    def grads(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
        # keep each input's memory format (float64 copies keep the strides)
        return torch.autograd.grad(fn(*xs), xs, grad_out.to(dtype))
    g32, g64 = grads(torch.float32), grads(torch.float64)
    return max(float((a.double() - c).abs().max() / c.abs().max()) for a, c in zip(g32, g64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the block under torch.compile (inductor)")
    args = ap.parse_args()
    for name in ("threads", "iters", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(75, 1, 28, 28, generator=g) < 0.15).float()  # sparse strokes on a blank page
    cw = torch.randn(64, 1, 3, 3, generator=g) / 3
    cb = torch.randn(64, generator=g) * 0.1
    z = F.conv2d(images, cw, cb, padding=1)  # the first block's conv output, NCHW
    nw = 1 + 0.1 * torch.randn(64, generator=g)
    nb = 0.1 * torch.randn(64, generator=g)
    rows: list[tuple[str, str, float, float, float | str]] = []

    # the convolution: forward, and backward to its weights
    w_, b_ = cw.clone().requires_grad_(), cb.clone().requires_grad_()
    gz = torch.randn(z.shape, generator=g)
    t = timed({"f": lambda: F.conv2d(images, w_, b_, padding=1),
               "fb": lambda: torch.autograd.grad(F.conv2d(images, w_, b_, padding=1), (w_, b_), gz)},
              args.iters, args.rounds)
    err = grad_error(lambda w, b: F.conv2d(images.to(w.dtype), w, b, padding=1), [cw, cb], gz)
    rows.append(("conv 3x3, 1 -> 64 channels (oneDNN)", "NCHW", t["f"], t["fb"], err))

    # batch norm, max-pool, and the whole block, in both layouts
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", CL)):
        x = z.contiguous(memory_format=fmt).requires_grad_()
        w, b = nw.clone().requires_grad_(), nb.clone().requires_grad_()
        y_bn = F.batch_norm(x, None, None, w, b, training=True)
        pooled = F.max_pool2d(y_bn.detach(), 2)
        g_bn = torch.randn(y_bn.shape, generator=g).contiguous(memory_format=fmt)
        g_pool = torch.randn(pooled.shape, generator=g).contiguous(memory_format=fmt)
        yd = y_bn.detach().contiguous(memory_format=fmt).requires_grad_()
        t = timed({
            "bn f": lambda: F.batch_norm(x, None, None, w, b, training=True),
            "bn fb": lambda: torch.autograd.grad(F.batch_norm(x, None, None, w, b, training=True), (x, w, b), g_bn),
            "pool f": lambda: F.max_pool2d_with_indices(yd, 2),
            "pool fb": lambda: torch.autograd.grad(F.max_pool2d(yd, 2), yd, g_pool),
            "block f": lambda: block(x, w, b),
            "block fb": lambda: torch.autograd.grad(block(x, w, b), (x, w, b), g_pool),
        }, args.iters, args.rounds)
        bn_err = grad_error(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), [x, nw, nb], g_bn)
        rows.append(("batch norm", layout, t["bn f"], t["bn fb"], bn_err))
        rows.append(("max-pool 2x2", layout, t["pool f"], t["pool fb"], "-"))
        rows.append(("block: batch norm, max-pool, ReLU", layout, t["block f"], t["block fb"],
                     grad_error(block, [x, nw, nb], g_pool)))
        if args.compile:
            cblock = torch.compile(block)
            t = timed({"f": lambda: cblock(x, w, b),
                       "fb": lambda: torch.autograd.grad(cblock(x, w, b), (x, w, b), g_pool)}, args.iters, args.rounds)
            rows.append(("block under torch.compile", layout, t["f"], t["fb"], grad_error(cblock, [x, nw, nb], g_pool)))

    print(f"Conv-4 first block on one task's query batch [75, 64, 28, 28], {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print()
    print("| kernel | layout | fwd ms | fwd+bwd ms | grad error vs float64 |")
    print("|---|---|---|---|---|")
    for name, layout, f, fb, err in rows:
        e = err if isinstance(err, str) else f"{err:.1e}"
        print(f"| {name} | {layout} | {f:.2f} | {fb:.2f} | {e} |")


if __name__ == "__main__":
    main()
