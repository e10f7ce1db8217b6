"""metalens' MAML against learn2learn, higher, TorchOpt and plain torch.func, side by side. Prints a table.

The same second-order MAML meta-iteration -- inner SGD steps on each task's support set,
query loss at the adapted weights averaged over tasks, backward through the inner steps
to the initial weights, one Adam step on them -- from identical initial weights on
identical tasks, in every implementation:

- (A) sinusoid: MLP 1-40-40-1, K = 10 support + 10 query points, 25 tasks, 1 and 5
  inner steps, inner lr 0.01, MSE;
- (B) Conv-4 (64 channels, batch norm, ReLU, max-pool) on 28x28 grey inputs (random
  images), 5-way 1-shot, 15 queries per class, 8 tasks, 1 inner step, inner lr 0.4,
  cross-entropy.

Each cell is the median of ``--iters-a`` / ``--iters-b`` timed meta-iterations after
``--warmup`` untimed ones, in a fresh subprocess per cell run by the python of the
implementation's own environment (metalens: this project's .venv; the peers:
``benchmarks/peers/envs/.venv-*``, built by ``benchmarks/peers/setup.sh``), with
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` set to each
``--threads`` count. ``x metalens`` is the implementation's time over metalens' (above 1:
metalens is faster). ``grad rel. diff`` checks that it is the same computation: the
largest, over the parameter tensors, of ``max |g - g_metalens| / max |g_metalens|`` for
the meta-gradient of the first iteration (initial weights, episode 0); see
:func:`grad_rel_diff` for the conv biases before batch norm, whose exact meta-gradient is
0 (their denominator is floored at 1e-3 of the largest gradient entry). The last column is
the 1-minute load average just before the cell ran (this benchmark's own previous cells
add to it: the average decays over about a minute) and, in brackets, the mean number of
other processes runnable at that moment (sampled from /proc/loadavg over ~2 s; 0 = the
machine was free). ``--wait-quiet LOAD`` waits for a 1-minute load average below LOAD
before starting; ``--cell-wait S`` waits up to S seconds before each cell for no other
process to be runnable.

Besides the peers (each used as its own docs and examples use it), two rows time
``torch.compile``: metalens with ``train.compile = true`` and, for a fair reading, plain
torch.func compiled by hand (vmap on (A), the per-task function in a loop on (B)), which no
peer's docs do.

What each implementation runs: ``benchmarks/peers/bench_one.py`` (docstring) and
``benchmarks/peers/README.md``.

Run: .venv/bin/python benchmarks/maml_peers.py [--threads 2 1] [--only A|B] [--wait-quiet 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))
from bench_one import make_model  # noqa: E402

ENVS = Path(os.environ.get("PEER_ENVS", PEERS / "envs"))
PYTHONS = {
    "metalens": Path(sys.executable),
    "learn2learn": ENVS / ".venv-learn2learn" / "bin" / "python",
    "higher": ENVS / ".venv-higher" / "bin" / "python",
    "torchopt": ENVS / ".venv-torchopt" / "bin" / "python",
}
LABELS = {
    "metalens": "metalens `maml` (default batching: {batching})",
    "metalens-vmap": "metalens `maml`, batching=vmap",
    "metalens-loop": "metalens `maml`, batching=loop",
    "metalens-compiled": "metalens `maml`, train.compile (torch.compile)",
    "learn2learn": "learn2learn `MAML` clone/adapt",
    "higher": "higher `innerloop_ctx`",
    "torchopt": "TorchOpt `MetaSGD` loop",
    "torchopt-vmap": "TorchOpt functorch/vmap example",
    "func-loop": "plain torch.func loop",
    "func-vmap": "plain torch.func vmap",
    "func-vmap-compiled": "plain torch.func vmap, torch.compile (by hand)",
    "func-loop-compiled": "plain torch.func loop, per-task function under torch.compile (by hand)",
}
PEER_IMPLS = ("learn2learn", "higher", "torchopt", "torchopt-vmap", "func-loop", "func-vmap")
# torch.compile rows per configuration (by hand: plain torch.func in its faster batching there); the others
# run only when named in --impls
COMPILED_FOR = {"A": ("metalens-compiled", "func-vmap-compiled"), "B": ("metalens-compiled", "func-loop-compiled")}
COMPILED_IMPLS = tuple(dict.fromkeys(i for rows in COMPILED_FOR.values() for i in rows))
# reference numbers measured earlier on this machine (seconds, 2 threads) for the same configurations
REFERENCE = {("A", 1): {"learn2learn": 0.059, "higher": 0.113, "torchopt": 0.047, "torchopt-vmap": 0.0077,
                        "func-vmap": 0.0088},
             ("B", 1): {"learn2learn": 1.16, "higher": 1.29, "torchopt": 1.29, "func-loop": 1.10, "func-vmap": 1.73}}


def env_python(impl: str) -> Path:
    if impl.startswith("metalens") or impl.startswith("func"):
        return PYTHONS["metalens"]  # plain torch.func: the project's env (the same torch wheel)
    return PYTHONS[impl.split("-")[0]]


# ------------------------------------------------------------------------------------------------
# shared inputs
# ------------------------------------------------------------------------------------------------
def make_data(config: str, n_episodes: int, seed: int, path: Path) -> None:
    """Initial weights (canonical names) and a pool of episodes, saved for every implementation."""
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in make_model(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    episodes = []
    if config == "A":
        import metalens

        family = metalens.make_task("sinusoid", shots=10, queries=10)
        for _ in range(n_episodes):
            ep = family.sample(25, generator=g)
            episodes.append([ep.support_x, ep.support_y, ep.query_x, ep.query_y])
        cfg = {"config": "A", "shots": 10, "queries": 10, "tasks": 25, "inner_lr": 0.01, "n_way": 5}
    else:
        T, N, K, Q = 8, 5, 1, 15
        labels = torch.arange(N)
        for _ in range(n_episodes):
            episodes.append([torch.randn(T, N * K, 1, 28, 28, generator=g), labels.repeat(T, K),
                             torch.randn(T, N * Q, 1, 28, 28, generator=g), labels.repeat(T, Q)])
        cfg = {"config": "B", "shots": K, "queries": Q, "tasks": T, "inner_lr": 0.4, "n_way": N}
    cfg["outer_lr"] = 1e-3
    torch.save({"cfg": cfg, "state": state, "episodes": episodes}, path)


def run_cell(impl: str, data: Path, steps: int, threads: int, warmup: int, iters: int, grad_out: Path,
             timeout: float, cell_wait: float = 0.0) -> dict:
    py = env_python(impl)
    if not py.exists():
        return {"impl": impl, "error": f"no environment ({py}); run: bash benchmarks/peers/setup.sh"}
    busy = wait_cell(cell_wait) if cell_wait > 0 else others_running(samples=5)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [str(py), str(PEERS / "bench_one.py"), "--impl", impl, "--data", str(data), "--steps", str(steps),
           "--threads", str(threads), "--warmup", str(warmup), "--iters", str(iters), "--grad-out", str(grad_out)]
    load = os.getloadavg()[0]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "error": f"timed out after {timeout:.0f} s", "load1": load, "others_busy": busy}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "error": f"exit {p.returncode}: " + " | ".join(tail), "load1": load,
                "others_busy": busy}
    out = json.loads(lines[-1])
    out["load1"] = load
    out["others_busy"] = busy
    return out


FLOOR = 1e-3


def grad_rel_diff(path: Path, ref: dict[str, torch.Tensor]) -> float:
    """``max_k max|g_k - ref_k| / max(max|ref_k|, FLOOR * max_j max|ref_j|)`` over parameter tensors ``k``.

    The floor matters only for tensors whose exact meta-gradient is 0 -- the biases of the
    convolutions that feed batch norm (batch statistics remove any per-channel shift), where
    the reference holds rounding noise only; there the difference is measured against
    ``FLOOR`` times the largest gradient entry, not against that noise.
    """
    g = torch.load(path, weights_only=True)
    if set(g) != set(ref):
        return float("nan")
    top = max(float(v.abs().max()) for v in ref.values())
    return max(float((g[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), FLOOR * top, 1e-30) for k in ref)


def others_running(samples: int = 20, interval: float = 0.1) -> float:
    """Mean number of runnable tasks on the machine besides this process, sampled over ~2 s
    (the 4th field of /proc/loadavg counts the reader itself)."""
    counts = []
    for _ in range(samples):
        with open("/proc/loadavg") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(interval)
    return sum(counts) / len(counts)


def wait_cell(max_wait: float) -> float:
    """Before a cell: wait (at most ``max_wait`` s) until no other process is busy; returns the last sample."""
    t0 = time.monotonic()
    while True:
        busy = others_running()
        if busy < 0.5 or time.monotonic() - t0 >= max_wait:
            return busy
        time.sleep(5)


def wait_quiet(limit: float, max_wait: float, poll: float = 30.0) -> float:
    """Wait until the 1-minute load average is below ``limit`` (at most ``max_wait`` seconds)."""
    t0 = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        if load < limit or time.monotonic() - t0 >= max_wait:
            return load
        print(f"(load average {load:.2f} >= {limit}; waiting, {time.monotonic() - t0:.0f} s so far)",
              file=sys.stderr, flush=True)
        time.sleep(poll)


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts (first: the main one)")
    ap.add_argument("--only", choices=("A", "B"), default=None)
    ap.add_argument("--impls", nargs="+", default=None, help="subset of implementations (metalens always runs)")
    ap.add_argument("--iters-a", type=int, default=30, help="timed meta-iterations per cell, config A")
    ap.add_argument("--iters-b", type=int, default=8, help="timed meta-iterations per cell, config B")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                    help="first wait until the 1-minute load average is below LOAD")
    ap.add_argument("--wait-max", type=float, default=1200, help="longest wait for --wait-quiet, seconds")
    ap.add_argument("--cell-wait", type=float, default=0, metavar="SECONDS",
                    help="before each cell, wait up to SECONDS until no other process is runnable")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "maml_peers.json",
                    help="raw results (every cell's JSON)")
    args = ap.parse_args()

    if args.wait_quiet is not None:
        wait_quiet(args.wait_quiet, args.wait_max)
    default_impls = ("metalens-other", "metalens-compiled") + PEER_IMPLS + ("func-vmap-compiled", "func-loop-compiled")
    impls = ["metalens"] + [i for i in (args.impls or default_impls) if i != "metalens"]
    cells = []
    if args.only in (None, "A"):
        cells += [("A", 1), ("A", 5)]
    if args.only in (None, "B"):
        cells += [("B", 1)]
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: list[dict] = []
    rows: list[str] = []
    nan = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for config in sorted({c for c, _ in cells}):
            iters = args.iters_a if config == "A" else args.iters_b
            make_data(config, iters + args.warmup + 1 if config == "A" else 4, args.seed, tmp / f"{config}.pt")
        for config, steps in cells:
            iters = args.iters_a if config == "A" else args.iters_b
            other = "metalens-loop" if config == "A" else "metalens-vmap"  # the non-default batching
            cell_impls = [other if i == "metalens-other" else i for i in impls
                          if args.impls or i not in COMPILED_IMPLS or i in COMPILED_FOR[config]]
            by: dict[tuple[str, int], dict] = {}
            ref_grad = None
            for impl in cell_impls:
                for threads in args.threads:
                    gpath = tmp / f"grad-{config}{steps}-{impl}-{threads}.pt"
                    r = run_cell(impl, tmp / f"{config}.pt", steps, threads, args.warmup, iters, gpath, args.timeout,
                                 args.cell_wait)
                    r.update(config=config, steps=steps, threads_requested=threads)
                    if "error" not in r:
                        if impl == "metalens" and threads == args.threads[0]:
                            ref_grad = torch.load(gpath, weights_only=True)
                        r["grad_rel_diff"] = grad_rel_diff(gpath, ref_grad) if ref_grad is not None else None
                    by[impl, threads] = r
                    results.append(r)
                    status = r.get("error") or f"{fmt_s(r['median_s'])}"
                    print(f"[{config} steps={steps} {impl} threads={threads}] {status}", file=sys.stderr, flush=True)
            for impl in cell_impls:
                base = by.get(("metalens", args.threads[0]), {})
                label = LABELS[impl].format(batching=base.get("versions", {}).get("batching", "?"))
                cols = []
                for threads in args.threads:
                    r = by[impl, threads]
                    m = by.get(("metalens", threads), {})
                    if "error" in r:
                        cols += [f"error: {r['error'][:80]}", "-"]
                        continue
                    ratio = r["median_s"] / m["median_s"] if "median_s" in m else None
                    cols += [fmt_s(r["median_s"]), "-" if ratio is None else f"{ratio:.2f}x"]
                r0 = by[impl, args.threads[0]]
                diff = r0.get("grad_rel_diff")
                ref = REFERENCE.get((config, steps), {}).get(impl)
                loads = " / ".join(f"{by[impl, t].get('load1', nan):.2f} ({by[impl, t].get('others_busy', nan):.1f})"
                                   for t in args.threads)
                rows.append(f"| {config} | {steps} | {label} | " + " | ".join(cols)
                            + f" | {'-' if diff is None else f'{diff:.1e}'} | {fmt_s(ref) if ref else '-'} | {loads} |")
    load_end = os.getloadavg()

    per_thread = " | ".join(f"s / iter, {t} thr | x metalens, {t} thr" for t in args.threads)
    head = (f"| config | inner steps | implementation | {per_thread} | grad rel. diff | reference (2 thr) "
            f"| load1 (others busy) before, {' / '.join(f'{t} thr' for t in args.threads)} |")
    print(f"\nmetalens MAML vs peers -- {started}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}; load average at start "
          f"{load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at end "
          f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (1 / 5 / 15 min)\n")
    print(f"median of {args.iters_a} (A) / {args.iters_b} (B) meta-iterations after {args.warmup} warm-up; "
          "A: sinusoid MLP 1-40-40-1, 25 tasks, 10+10 points, inner lr 0.01; "
          "B: Conv-4 64ch, 5-way 1-shot, 15 queries/class, 8 tasks, inner lr 0.4\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        print(row)
    summary(results, args.threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"started": started, "load_start": load_start, "load_end": load_end,
                                     "results": results}, indent=1))
    print(f"\nraw results: {args.json}")


def summary(results: list[dict], threads: list[int]) -> None:
    """The speed goals, per thread count: metalens >= 1.5x the fastest peer path (A and B),
    >= 5x learn2learn and higher (A)."""
    ok = [r for r in results if "median_s" in r]
    lines = []
    for t in threads:
        for config, steps in sorted({(r["config"], r["steps"]) for r in ok}):
            cell = {r["impl"]: r["median_s"] for r in ok if r["threads_requested"] == t
                    and r["config"] == config and r["steps"] == steps}
            if "metalens" not in cell:
                continue
            peers = {k: v for k, v in cell.items() if k in PEER_IMPLS}
            if not peers:
                continue
            fastest = min(peers, key=peers.get)
            for ours in ("metalens", "metalens-compiled"):
                if ours not in cell:
                    continue
                ml = cell[ours]
                msg = (f"- {config}, {steps} step(s), {t} thr: fastest peer path {fastest} {fmt_s(peers[fastest])} / "
                       f"{ours} {fmt_s(ml)} = {peers[fastest] / ml:.2f}x (goal >= 1.5x)")
                if config == "A":
                    for p in ("learn2learn", "higher"):
                        if p in peers:
                            msg += f"; {p} {peers[p] / ml:.1f}x (goal >= 5x)"
                by_hand = COMPILED_FOR[config][1]
                if ours == "metalens-compiled" and by_hand in cell:
                    msg += f"; {LABELS[by_hand]} {cell[by_hand] / ml:.2f}x"
                lines.append(msg)
    if lines:
        print("\nGoals (peer time / metalens time):")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
