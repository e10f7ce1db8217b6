"""The driver side of the side-by-side benchmarks (``benchmarks/*_peers.py``): cells, rounds, tables.

A *cell* is one implementation at one thread count, run by ``benchmarks/peers/bench_cell.py``
in a fresh subprocess with the python of the implementation's environment (metalens and
the plain-PyTorch references: this project's .venv; a peer: ``benchmarks/peers/envs/.venv-*``,
built by ``benchmarks/peers/setup.sh``) and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``torch.set_num_threads`` set to the thread count. The cells of a workload are run in
``rounds``: the implementations in one order, then in the reverse order, and so on, so that
a slow spell of a shared machine falls on every implementation alike; a cell's time is the
median of every timed iteration of all its rounds. Before each cell the 1-minute load
average and the mean number of other runnable processes (``others busy``, sampled from
/proc/loadavg over ~0.5 s) are recorded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
PEERS = ROOT / "benchmarks" / "peers"
ENVS = Path(os.environ.get("PEER_ENVS", PEERS / "envs"))
FLOOR = 1e-3  # see grad_rel_diff
# Conv-4's convolution biases (the peers' nn.Sequential names): batch norm follows each, so their exact
# gradient is 0 and what is computed is float32 rounding noise; the check reports them apart
ZERO_GRAD = {"0.bias", "4.bias", "8.bias", "12.bias"}


def env_python(env: str) -> Path:
    """``metalens`` (this project's interpreter) or a peer's environment name."""
    if env == "metalens":
        return Path(sys.executable)
    return ENVS / f".venv-{env}" / "bin" / "python"


@dataclass
class Impl:
    name: str  # --impl of bench_cell.py
    env: str  # "metalens" or a peer environment (learn2learn, easyfsl, ...)
    label: str  # the table's row label
    peer: bool = True  # counts for "fastest peer path"
    check: str | None = "metalens"  # compare loss / gradient with this impl's (None: not the same model)


@dataclass
class Cell:
    impl: Impl
    threads: int
    runs: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def times(self) -> list[float]:
        return [t for r in self.runs for t in r["times"]]

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def others_running(samples: int = 5, interval: float = 0.1) -> float:
    """Mean number of runnable tasks besides this process (4th field of /proc/loadavg counts the reader)."""
    counts = []
    for _ in range(samples):
        with open("/proc/loadavg") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(interval)
    return sum(counts) / len(counts)


def run_once(workload: str, impl: Impl, data: Path, threads: int, warmup: int, iters: int, grad_out: Path | None,
             timeout: float) -> dict:
    py = env_python(impl.env)
    if not py.exists():
        return {"error": f"no environment ({py}); run: bash benchmarks/peers/setup.sh {impl.env}"}
    busy = others_running()
    load = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [str(py), str(PEERS / "bench_cell.py"), "--workload", workload, "--impl", impl.name, "--data", str(data),
           "--threads", str(threads), "--warmup", str(warmup), "--iters", str(iters)]
    if grad_out is not None:
        cmd += ["--grad-out", str(grad_out)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load1": load, "others_busy": busy}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail), "load1": load, "others_busy": busy}
    out = json.loads(lines[-1])
    out.update(load1=load, others_busy=busy)
    return out


def run_cells(workload: str, impls: list[Impl], data: Path, threads: list[int], *, rounds: int, warmup: int,
              iters: int, tmp: Path, timeout: float = 900) -> dict[tuple[str, int], Cell]:
    """Every implementation at every thread count, ``rounds`` times, alternating the order."""
    cells = {(i.name, t): Cell(i, t) for i in impls for t in threads}
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for t in threads:
            for impl in order:
                cell = cells[impl.name, t]
                if cell.error:
                    continue
                gpath = tmp / f"grad-{workload}-{impl.name}-{t}.pt" if r == 0 else None
                out = run_once(workload, impl, data, t, warmup, iters, gpath, timeout)
                if "error" in out:
                    cell.error = out["error"]
                else:
                    out["grad_path"] = str(gpath) if gpath else None
                    cell.runs.append(out)
                msg = cell.error or fmt_s(statistics.median(out["times"]))
                print(f"[{workload} round {r + 1}/{rounds} {impl.name} threads={t}] {msg}", file=sys.stderr,
                      flush=True)
    return cells


def grad_rel_diff(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``max_k max|g_k - ref_k| / max(max|ref_k|, FLOOR * max_j max|ref_j|)`` over the tensors ``k`` of ``ref``.

    The floor keeps tensors whose exact gradient is ~0 (biases before batch norm) from
    dividing by their rounding noise. A name missing from ``g``: nan.
    """
    if not set(ref) <= set(g):
        return float("nan")
    top = max(float(v.abs().max()) for v in ref.values())
    return max(float((g[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), FLOOR * top, 1e-30) for k in ref)


def load_grad(cell: Cell) -> dict[str, torch.Tensor] | None:
    if not cell.runs or not cell.runs[0].get("grad_path"):
        return None
    return torch.load(cell.runs[0]["grad_path"], weights_only=True)


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def header(title: str) -> str:
    la = os.getloadavg()
    return (f"{title} -- {time.strftime('%Y-%m-%d %H:%M:%S')}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}; load average {la[0]:.2f} / {la[1]:.2f} / "
            f"{la[2]:.2f} (1 / 5 / 15 min)")


def table(group: str, cells: dict[tuple[str, int], Cell], impls: list[Impl], threads: list[int], *,
          unit: str = "s / step", extra_check=None) -> tuple[list[str], list[str]]:
    """Markdown rows of one workload (``group``) and its goal lines: metalens vs the fastest peer path.

    ``x metalens`` = the row's time / metalens' time at that thread count (above 1: metalens is
    faster). ``check``: the loss's relative difference and the gradient's (``grad_rel_diff``) from
    the impl named in ``Impl.check``, on the first iteration; ``extra_check(impl, cell)`` may
    give the column's text instead.
    """
    rows = []
    ref_cells = {i.name: cells[i.name, threads[0]] for i in impls}
    for impl in impls:
        cols = []
        for t in threads:
            c, m = cells[impl.name, t], cells.get(("metalens", t))
            if c.error:
                cols += [f"error: {c.error[:70]}", "-"]
                continue
            ratio = c.median / m.median if m is not None and m.median else None
            cols += [fmt_s(c.median), "-" if ratio is None else f"{ratio:.2f}x"]
        check = "-"
        c0 = cells[impl.name, threads[0]]
        if extra_check is not None:
            check = extra_check(impl, c0) or "-"
        elif impl.check and impl.check != impl.name and c0.runs and ref_cells[impl.check].runs:
            ref = ref_cells[impl.check]
            l0, lr = c0.runs[0].get("loss0"), ref.runs[0].get("loss0")
            g, gr = load_grad(c0), load_grad(ref)
            parts = []
            if l0 is not None and lr is not None:
                parts.append(f"loss {abs(l0 - lr) / max(abs(lr), 1e-30):.1e}")
            if g is not None and gr is not None:
                zero = [k for k in gr if k in ZERO_GRAD]
                parts.append(f"grad {grad_rel_diff(g, {k: v for k, v in gr.items() if k not in zero}):.1e}")
                if zero:  # exact gradient 0: their difference against the largest gradient entry
                    top = max(float(v.abs().max()) for v in gr.values())
                    parts.append(f"pre-BN biases {max(float((g[k] - gr[k]).abs().max()) for k in zero) / top:.0e}")
            check = ", ".join(parts) or "-"
        loads = " / ".join(
            f"{statistics.mean(r['load1'] for r in cells[impl.name, t].runs):.2f} "
            f"({statistics.mean(r['others_busy'] for r in cells[impl.name, t].runs):.1f})"
            if cells[impl.name, t].runs else "-" for t in threads)
        n = len(cells[impl.name, threads[0]].times)
        rows.append(f"| {group} | {impl.label} | " + " | ".join(cols) + f" | {check} | {n} | {loads} |")
    goals = []
    for t in threads:
        m = cells.get(("metalens", t))
        peers = {i.name: cells[i.name, t].median for i in impls if i.peer and cells[i.name, t].median}
        if m is None or not m.median or not peers:
            continue
        fastest = min(peers, key=peers.get)
        goals.append(f"- {group}, {t} thr: fastest peer path `{fastest}` {fmt_s(peers[fastest])} / metalens "
                     f"{fmt_s(m.median)} = {peers[fastest] / m.median:.2f}x (goal >= 1.5x)")
    return rows, goals


def table_head(threads: list[int], unit: str) -> str:
    per = " | ".join(f"{unit}, {t} thr | x metalens, {t} thr" for t in threads)
    head = (f"| workload | implementation | {per} | check (first iteration) | timed iterations "
            f"| load1 (others busy), {' / '.join(f'{t} thr' for t in threads)} |")
    return head + "\n|" + "---|" * (head.count("|") - 1)


def save_json(path: Path, meta: dict, cells: dict[tuple[str, int], Cell]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [{"impl": c.impl.name, "env": c.impl.env, "threads": c.threads, "median_s": c.median, "error": c.error,
            "runs": c.runs} for c in cells.values()]
    path.write_text(json.dumps({**meta, "cells": out}, indent=1))
    print(f"\nraw results: {path}")


@dataclass
class Workload:
    group: str  # the table's first column
    name: str  # --workload of bench_cell.py
    make_data: object  # make_data(path): writes the .pt file (cfg, state, episodes)
    impls: list[Impl]
    iters: int  # timed iterations per round
    warmup: int = 3
    extra_check: object = None  # see table()
    unit: str = "s / step"


def arg_parser(doc: str, json_name: str):
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (first: the main one)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell")
    ap.add_argument("--iters-scale", type=float, default=1.0, help="multiply every workload's timed iterations")
    ap.add_argument("--only", nargs="+", default=None, help="workload names to run (default: all)")
    ap.add_argument("--impls", nargs="+", default=None, help="implementations to run (metalens always runs)")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                    help="first wait (up to --wait-max s) until the 1-minute load average is below LOAD")
    ap.add_argument("--wait-max", type=float, default=1200)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / json_name, help="raw results")
    return ap


def drive(title: str, setting: str, workloads: list[Workload], args) -> None:
    """Run every workload's cells and print one Markdown table, the goal lines and where the JSON went."""
    import tempfile

    if args.wait_quiet is not None:
        t0 = time.monotonic()
        while os.getloadavg()[0] >= args.wait_quiet and time.monotonic() - t0 < args.wait_max:
            time.sleep(30)
    load_start = os.getloadavg()
    rows, goals, raw = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for w in workloads:
            if args.only and w.name not in args.only and w.group not in args.only:
                continue
            impls = [i for i in w.impls if i.name == "metalens" or not args.impls or i.name in args.impls]
            data = tmp / f"{w.name}-{len(raw)}.pt"
            w.make_data(data)
            iters = max(1, round(w.iters * args.iters_scale))
            cells = run_cells(w.name, impls, data, args.threads, rounds=args.rounds, warmup=w.warmup, iters=iters,
                              tmp=tmp, timeout=args.timeout)
            r, g = table(w.group, cells, impls, args.threads, unit=w.unit, extra_check=w.extra_check)
            rows += r
            goals += g
            raw[w.group] = cells
    print("\n" + header(title) + f"; at start {load_start[0]:.2f}\n")
    print(setting + "\n")
    print(table_head(args.threads, workloads[0].unit))
    print("\n".join(rows))
    print("\nGoal (fastest peer path's time / metalens' time):")
    print("\n".join(goals))
    flat = {(f"{g}|{k[0]}", k[1]): c for g, cells in raw.items() for k, c in cells.items()}
    save_json(args.json, {"title": title, "setting": setting, "load_start": load_start,
                          "load_end": os.getloadavg(), "argv": sys.argv}, flat)
