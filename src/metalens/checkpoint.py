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
a half-written one; the temporary entries it may leave (``.*.tmp``) are removed by
:func:`remove_leftovers` at the next start. Reading is strict: ``latest`` must be a
small regular file naming a checkpoint folder, ``state.json`` must have the schema
:func:`save` writes (its step equal to its folder's number), and no file is read
through a symbolic link. A lost or damaged ``latest`` is recovered from the newest
complete checkpoint (:func:`recover_latest`).

>>> import tempfile, torch
>>> d = tempfile.mkdtemp()
>>> p = save(d, step=3, model={"w": torch.ones(2)}, optimizer={"state": {}, "param_groups": []}, state={"seed": 0})
>>> ckpt = load(latest(d))
>>> ckpt.step, ckpt.model["w"].tolist(), ckpt.state["seed"]
(3, [1.0, 1.0], 0)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from metalens.errors import CheckpointError, RunFailed, excerpt
from metalens.files import TMP_SUFFIX, UMASK, NotRegular, fsync_dir, read_regular, write_text_atomic

__all__ = ["Checkpoint", "CheckpointError", "save", "load", "latest", "complete", "recover_latest", "remove_leftovers",
           "complete_names", "mismatches", "non_finite", "read_small"]

FORMAT = "metalens-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d{8,})")
_MAX_SMALL = 1 << 20  # state.json, latest, config.json: larger files are not ours


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimiser state_dict, ready for load_state_dict
    state: dict[str, Any]  # JSON extras (seed, metrics, ...)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                extras[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "state_extras": extras, "tensors": sorted(tensors)}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("state_extras", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def read_small(path: str | Path, *, what: str, limit: int = _MAX_SMALL) -> bytes:
    """The bytes of a small file of a run folder, never through a symbolic link (:class:`CheckpointError`
    otherwise; ``FileNotFoundError`` if it is missing)."""
    try:
        return read_regular(path, limit=limit)
    except FileNotFoundError:
        raise
    except NotRegular as e:
        how = "; a run folder holds only its own files (remove the link)" if "link" in str(e) else ""
        raise CheckpointError(f"{what} {path} {e}{how}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None


def save(
    run_dir: str | Path,
    *,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, Any] | None,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` into ``run_dir/checkpoints`` atomically; keep the newest ``keep`` (0: all).

    A write that fails (a full or read-only disk) raises :class:`~metalens.errors.RunFailed`, leaving the
    previous checkpoint and ``latest`` as they were and no temporary entry behind.
    """
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink():
        raise CheckpointError(f"{root} is a symbolic link; a run folder holds only its own files (remove the link)")
    name = f"step_{step:08d}"
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=root))
        os.chmod(tmp, 0o777 & ~UMASK)  # a checkpoint folder as any other folder the user makes
        model_t = {k: v.detach().cpu().contiguous() for k, v in model.items()}
        opt_t, opt_meta = _flatten_optimizer(optimizer or {"state": {}, "param_groups": []})
        save_file(model_t, tmp / "model.safetensors", metadata={"format": FORMAT})
        save_file(opt_t, tmp / "optimizer.safetensors", metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "optimizer": opt_meta, **state,
                "sha256": {f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")}}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        if final.exists() and not final.is_symlink():  # an older save of the same step (a run resumed and re-saved)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tmp = None
        fsync_dir(root)
        write_text_atomic(root / "latest", name + "\n")
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e)
        try:
            kept = f"the previous checkpoint is intact: {latest(run_dir)}"
        except CheckpointError:
            kept = "no earlier checkpoint exists"
        raise RunFailed(f"cannot write checkpoint {name} in {root}: {reason}; {kept}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        done = [p for p in complete_names(root)]
        for old in done[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def complete_names(root: Path) -> list[str]:
    """Names of the checkpoint folders in ``root`` (real folders, not links), oldest first."""
    if not root.is_dir() or root.is_symlink():
        return []
    names = [p.name for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(names, key=lambda n: int(n[5:]))


def latest(run_dir: str | Path) -> Path:
    """The newest complete checkpoint folder of a run, as ``checkpoints/latest`` names it."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        raw = read_small(pointer, what="checkpoints/latest", limit=64)
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no checkpoint (no checkpoints/latest)") from None
    name = raw.decode("ascii", errors="replace").strip()
    path = pointer.parent / name
    if not _NAME.fullmatch(name) or path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"checkpoints/latest in {run_dir} names {excerpt(raw)}, which is not a checkpoint "
                              "folder")
    return path


def complete(run_dir: str | Path) -> list[Path]:
    """Every checkpoint folder of a run that loads (all three files, a valid ``state.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    for name in complete_names(root):
        try:
            load(root / name)
        except CheckpointError:
            continue
        out.append(root / name)
    return out


def recover_latest(run_dir: str | Path, *, rewrite: bool = True) -> tuple[Path | None, str]:
    """The checkpoint a run continues from, and a note when ``latest`` had to be recovered.

    ``latest`` is a pointer; the checkpoint folders are the data. A checkpoint folder is written
    completely before ``latest`` names it, so a crash can leave ``latest`` one checkpoint behind, or
    lost, but never a damaged folder. Hence:

    - ``latest`` sound and naming a complete checkpoint that is the newest one: that checkpoint;
    - ``latest`` lost, unreadable, or naming a missing folder or an older one: the newest checkpoint
      folder, if it is complete, with a note; ``rewrite`` makes ``latest`` name it;
    - a newest checkpoint folder that is damaged (named by ``latest`` or not), and a ``latest`` that
      is a folder or a link: refused (:class:`~metalens.errors.CheckpointError`), nothing changed;
    - no checkpoint folder at all: ``(None, "")`` (the run stopped before its first checkpoint).
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_symlink() or pointer.is_dir():
        what = "a symbolic link" if pointer.is_symlink() else "a folder"
        raise CheckpointError(f"{pointer} is {what}, not the small file naming the newest checkpoint; remove it "
                              "to continue from the newest complete checkpoint")
    if root.is_dir() and not root.is_symlink():
        for p in root.iterdir():
            if _NAME.fullmatch(p.name) and (p.is_symlink() or not p.is_dir()):
                what = "a symbolic link" if p.is_symlink() else "not a folder"
                raise CheckpointError(f"{p} is {what}; a run folder holds only its own checkpoint folders (remove it)")
    names = complete_names(root)
    if not names:
        return None, ""
    newest = root / names[-1]
    try:
        named: Path | None = latest(run_dir)
        why = ""
    except CheckpointError as e:
        named, why = None, str(e)
    try:
        load(newest)
    except CheckpointError as e:
        raise CheckpointError(f"the newest checkpoint is damaged ({e}); a run never continues from an older "
                              f"checkpoint on its own: move {newest.name} out of {root} to continue from the one "
                              "before it") from None
    if named == newest:
        return newest, ""
    why = why or f"checkpoints/latest names {named.name if named else '?'}, not the newest checkpoint"
    if rewrite:
        write_text_atomic(pointer, newest.name + "\n")
    return newest, f"{why}; continuing from the newest checkpoint, {newest.name}"


def remove_leftovers(folder: str | Path) -> list[str]:
    """Remove the temporary entries (``.*.tmp``) a crash may have left in a run folder and its ``checkpoints``.

    Never follows a symbolic link. Returns the names removed.
    """
    removed = []
    for d in (Path(folder), Path(folder) / "checkpoints"):
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def _read_json(path: Path, what: str) -> Any:
    raw = read_small(path, what=what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{what} {path} is not valid JSON (it starts {excerpt(raw, 30)})") from None


def _check_state(path: Path, meta: Any) -> None:
    """Refuse a ``state.json`` that does not have the schema :func:`save` writes."""
    where = f"checkpoint {path}: state.json"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metalens checkpoint (state.json format is "
                              f"{excerpt(str(meta.get('format')))})")
    version, step = meta.get("version"), meta.get("step")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: version must be an integer, got {excerpt(repr(version))}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer metalens (format {version}); upgrade metalens")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: step must be a whole number >= 0, got {excerpt(repr(step))}")
    if path.name != f"step_{step:08d}":
        raise CheckpointError(f"{where} says step {step}, but the folder is {path.name}")
    opt = meta.get("optimizer")
    if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])
            and isinstance(opt.get("state_extras", {}), dict)):
        raise CheckpointError(f"{where}: optimizer must hold param_groups (a list of tables with params)")
    if "seed" in meta and (not isinstance(meta["seed"], int) or isinstance(meta["seed"], bool)):
        raise CheckpointError(f"{where}: seed must be an integer, got {excerpt(repr(meta['seed']))}")


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder written by :func:`save` (no pickle involved), checking its schema."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder of its run")
    for name in ("state.json", "model.safetensors", "optimizer.safetensors"):
        f = path / name
        if f.is_symlink():
            raise CheckpointError(f"{f} is a symbolic link; a run folder holds only its own files (remove the link)")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    meta = _read_json(path / "state.json", "checkpoint state")
    _check_state(path, meta)
    sums = meta.pop("sha256", None)
    if isinstance(sums, dict):
        for f, digest in sums.items():
            if f in ("model.safetensors", "optimizer.safetensors") and _sha256(path / f) != digest:
                raise CheckpointError(f"checkpoint {path}: {f} does not match the checksum state.json holds for it; "
                                      "the file was changed or damaged after it was written")
    try:
        model = load_file(path / "model.safetensors", device=str(map_location))
        opt_t = load_file(path / "optimizer.safetensors", device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {str(e)[:200]}") from None
    opt_meta = meta.pop("optimizer")
    if "tensors" in opt_meta and sorted(opt_t) != opt_meta["tensors"]:
        raise CheckpointError(f"checkpoint {path}: optimizer.safetensors holds {len(opt_t)} tensors where state.json "
                              f"lists {len(opt_meta['tensors'])}")
    try:
        optimizer = _unflatten_optimizer(opt_t, opt_meta)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {path}: optimizer.safetensors does not match state.json") from None
    step = meta.pop("step")
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, state=meta)


def mismatches(saved: dict[str, Tensor], own: dict[str, Tensor]) -> list[str]:
    """How a checkpoint's tensors differ from a module's ``state_dict`` (names, shapes, dtypes); empty if they fit."""
    out = [f"missing {k}" for k in own if k not in saved]
    out += [f"unexpected {k}" for k in saved if k not in own]
    out += [f"{k}: {list(saved[k].shape)} {saved[k].dtype} vs {list(v.shape)} {v.dtype}" for k, v in own.items()
            if k in saved and (tuple(saved[k].shape) != tuple(v.shape) or saved[k].dtype != v.dtype)]
    return out


def non_finite(saved: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in saved.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
