"""Data parallelism over tasks with ``torch.distributed``.

Each of the ``W`` ranks takes its share of every step's task batch: the episode of
step ``t`` is drawn exactly as in a single process, from ``(seed, t)``, and rank
``r`` keeps tasks ``[r * T/W, (r + 1) * T/W)``, so the union over ranks is the
single-process batch. After the backward pass the meta-gradients (and the loss) are
averaged over ranks with one ``all_reduce``; every rank then takes the same
optimiser step. Because learners' losses average over tasks, the result equals the
single-process run up to float rounding.

Why an explicit all-reduce rather than ``DistributedDataParallel``: DDP hooks the
autograd graph of ``module.forward``, while learners here compute their loss in
``meta_loss`` through ``torch.func`` inner loops (``functional_call``, ``grad``,
``vmap``), surrogate losses (Reptile, iMAML) or plain forwards. Averaging the
gradients after ``backward`` is the same arithmetic and composes with all of them.

Two ways to start:

- ``metalens train ... --nproc N``: :func:`launch` spawns ``N`` local processes
  (gloo on CPU, NCCL on CUDA), rendezvous on a free local port;
- ``torchrun --nproc_per_node=N [--nnodes=M --node_rank=i --rdzv_backend=c10d
  --rdzv_endpoint=HOST:PORT] -m metalens train ...``: each process finds its rank in
  the environment (:func:`init_from_env`).

Only rank 0 writes logs, checkpoints and reports. If any rank dies, the others stop
(the launcher terminates them; under torchrun its agent does) and the last complete
checkpoint stays as it was.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metalens.errors import Interrupted, RunFailed

__all__ = ["World", "world", "init_from_env", "launch", "shard", "average_gradients", "LaunchError"]

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this fails the run


class LaunchError(RunFailed):
    """A worker process of a multi-process run failed or died."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0


SINGLE = World(0, 1)


def world() -> World:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` when several processes share a node."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ...).

    Returns True when this process is part of a group of more than one process.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend_for(device) == "nccl":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    return True


def shard(n_tasks: int, w: World) -> slice:
    """The tasks of a ``n_tasks`` batch that rank ``w.rank`` trains on."""
    if n_tasks % w.size:
        raise ValueError(f"train.batch_tasks ({n_tasks}) must be divisible by the number of processes ({w.size})")
    per = n_tasks // w.size
    return slice(w.rank * per, (w.rank + 1) * per)


def average_gradients(params: Sequence[torch.nn.Parameter], loss: Tensor, w: World, *,
                      flag: bool = False) -> tuple[Tensor, bool]:
    """Average ``params``' gradients and ``loss`` over ranks in one ``all_reduce``.

    Missing gradients count as zeros, so every rank sends the same layout. ``flag`` (e.g. "stop after
    this step") rides along: the second value returned is True if it was set on any rank. Returns the
    averaged loss (non-finite on every rank if it was on any) and that flag.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    tail = torch.stack([loss.detach().reshape(()).to(grads[0].dtype), torch.tensor(float(flag), dtype=grads[0].dtype,
                                                                                    device=grads[0].device)])
    flat = torch.cat([g.reshape(-1) for g in grads] + [tail])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset: offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n
    return flat[-2], bool(flat[-1] > 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nproc: int, port: int, device: str, threads: int | None, fn: Callable[..., Any],
            args: tuple) -> None:
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # signals reach the launcher only, which forwards each one once (see launch)
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    init_from_env(device)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                 getattr(signal, "SIGHUP", None)) if s is not None)


def launch(nproc: int, fn: Callable[..., Any], args: tuple = (), *, device: str = "cpu",
           threads: int | None = None, run_dir: str | os.PathLike | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes forming one process group.

    ``threads`` sets each process's PyTorch CPU threads (default: PyTorch's own). ``fn`` must be
    importable (a module-level function). If a process fails or dies, the others are terminated
    and :class:`LaunchError` says which and why (and, given ``run_dir``, which checkpoint is intact).
    SIGINT, SIGTERM and SIGHUP received here are passed on to every process (which stop together
    after their current step, the first writing a checkpoint); the launcher then raises
    :class:`~metalens.errors.Interrupted`.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    import threading

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(nproc, _free_port(), device, threads, fn, args), nprocs=nproc,
                             join=False, start_method="spawn")
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if main else {}
    try:
        while not ctx.join(timeout=1.0):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if received:
            raise _interrupted(received[0], run_dir) from None
        if isinstance(e, mp.ProcessRaisedException):
            last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
            kind, _, msg = last.partition(": ")
            what = f"process {e.error_index} of {nproc} failed: {msg or kind}"
        else:
            how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
            what = f"process {e.error_index} of {nproc} died ({how}); the other processes were stopped"
        raise LaunchError(f"training stopped: {what}; {_kept(run_dir)}") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise _interrupted(received[0], run_dir)


def _kept(run_dir: str | os.PathLike | None) -> str:
    from metalens import checkpoint
    from metalens.errors import CheckpointError

    if run_dir is None:
        return "no run folder"
    try:
        return f"the last checkpoint is intact: {checkpoint.latest(run_dir)}"
    except CheckpointError:
        return "no checkpoint had been written yet"


def _interrupted(signum: int, run_dir: str | os.PathLike | None) -> Interrupted:
    name = signal.Signals(signum).name
    resume = f"; continue with: metalens train --resume --out {run_dir}" if run_dir is not None else ""
    return Interrupted(f"stopped by {name}; {_kept(run_dir)}{resume}", signum)
