"""Atomic checkpoints: safetensors for tensors, JSON for everything else. Never pickle.

Layout inside a run folder::

    checkpoints/
      step_00000500/
        model.safetensors      the learner's state_dict (parameters and buffers)
        optimizer.safetensors  the optimiser's tensor state (e.g. Adam moments)
        state.json             step, seed, optimiser hyper-parameters, metrics
      latest                   the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name, every file flushed and
fsync-ed, then renamed into place; ``latest`` is replaced atomically after that.
A crash at any moment leaves either the previous checkpoint or the new one, never
a half-written one.

>>> import tempfile, torch
>>> d = tempfile.mkdtemp()
>>> p = save(d, step=3, model={"w": torch.ones(2)}, optimizer={"state": {}, "param_groups": []}, state={"seed": 0})
>>> ckpt = load(latest(d))
>>> ckpt.step, ckpt.model["w"].tolist(), ckpt.state["seed"]
(3, [1.0, 1.0], 0)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from metalens.errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "save", "load", "latest", "write_json_atomic", "write_text_atomic"]

FORMAT = "metalens-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimiser state_dict, ready for load_state_dict
    state: dict[str, Any]  # JSON extras (seed, metrics, ...)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file beside it, fsync and rename: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                extras[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "state_extras": extras}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("state_extras", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    run_dir: str | Path,
    *,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, Any] | None,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` into ``run_dir/checkpoints`` atomically; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        model_t = {k: v.detach().cpu().contiguous() for k, v in model.items()}
        opt_t, opt_meta = _flatten_optimizer(optimizer or {"state": {}, "param_groups": []})
        save_file(model_t, tmp / "model.safetensors", metadata={"format": FORMAT})
        save_file(opt_t, tmp / "optimizer.safetensors", metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "optimizer": opt_meta, **state}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # an older save of the same step (e.g. a run resumed and re-saved)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / "latest"
    fd, tmp_ptr = tempfile.mkstemp(prefix=".latest.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_ptr, pointer)
    _fsync_dir(root)
    if keep > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path:
    """The newest complete checkpoint folder of a run."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no checkpoint (no checkpoints/latest)") from None
    path = pointer.parent / name
    if not name.startswith("step_") or "/" in name or not path.is_dir():
        raise CheckpointError(f"checkpoints/latest in {run_dir} names {name!r}, which is not a checkpoint folder")
    return path


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder written by :func:`save` (no pickle involved)."""
    path = Path(path)
    for name in ("state.json", "model.safetensors", "optimizer.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model = load_file(path / "model.safetensors", device=str(map_location))
        opt_t = load_file(path / "optimizer.safetensors", device=str(map_location))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metalens checkpoint")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer metalens (format {meta['version']})")
    optimizer = _unflatten_optimizer(opt_t, meta.pop("optimizer"))
    step = int(meta.pop("step"))
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, state=meta)
