"""Decoded images on disk: a memory-mapped ``uint8`` NumPy array per source and decoding, so a second start is fast.

A source decoded once (:func:`metalens.data.read_images`) is written as
``<dir>/.metalens-cache/<key>.npy`` (the images, NumPy's own format, read back with
``allow_pickle=False``) and ``<key>.json`` (its index: the classes, how many images each
has, the file of every image, the source and the decoding options). ``<dir>`` is the
source folder itself, or the folder that holds a zip file (hidden folders are never read
as data). The key is a hash of the source's resolved path, the size and modification time
of the zip or of every image file of a folder, and the decoding options, so a changed,
added or removed file gives another key: the stale entry is never read again (and is
removed when the new one is written).

Both files are written atomically (a temporary file beside the target, fsynced, then
renamed, as :mod:`metalens.files` does; the index last, so an index always describes a
complete array). A later start maps the array (``mmap_mode="c"``: pages are read on
demand, and writes, which metalens never makes, would stay private) instead of decoding.

Where a data folder cannot be written (read-only, as the shipped Omniglot data, whose permissions
grant no write: such a folder is left untouched even by root), the cache
goes to ``$METALENS_CACHE`` if set, else ``~/.cache/metalens``; where neither can be
written, images are decoded in memory as without a cache. ``METALENS_CACHE=off`` turns the
cache off (nothing is read or written). An entry that cannot be read back as written (a
damaged file, an index that does not match its array) is ignored and decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metalens.files import TMP_SUFFIX, UMASK, NotRegular, fsync_dir, read_regular, write_json_atomic

__all__ = ["CACHE_DIR", "CACHE_VERSION", "CacheEntry", "cache_dirs", "cache_key", "load", "save"]

CACHE_DIR = ".metalens-cache"
CACHE_VERSION = 1  # bump when the decoding changes in a way the options do not say
_MAX_INDEX_BYTES = 256 << 20  # an index larger than this is not one of ours


@dataclass(frozen=True)
class CacheEntry:
    """What identifies one decoded source on disk: its key, the source and the decoding options (JSON-ready)."""

    key: str
    source: str
    options: dict[str, Any]


def cache_key(source: Path, stamp: Any, options: dict[str, Any]) -> str:
    """A hash of the source's path, its files' sizes and modification times (``stamp``) and the decoding options."""
    text = json.dumps({"version": CACHE_VERSION, "source": str(source), "stamp": stamp, "options": options},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cache_dirs(source: Path) -> list[Path]:
    """Where the entries of ``source`` live, in the order they are tried: beside the data, then the fallback.

    ``[]`` when ``METALENS_CACHE=off``.
    """
    env = os.environ.get("METALENS_CACHE", "")
    if env.strip().lower() == "off":
        return []
    out = [(source if source.is_dir() else source.parent) / CACHE_DIR]
    try:
        fallback = Path(env).expanduser() if env else Path.home() / ".cache" / "metalens"
    except RuntimeError:  # no home directory
        return out
    if fallback not in out:
        out.append(fallback)
    return out


def load(source: Path, entry: CacheEntry) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The memory-mapped images and the index of ``entry``, or None if no sound copy is on disk."""
    for d in cache_dirs(source):
        index, array = d / f"{entry.key}.json", d / f"{entry.key}.npy"
        try:
            meta = json.loads(read_regular(index, limit=_MAX_INDEX_BYTES, follow=False).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("key") != entry.key or meta.get("version") != CACHE_VERSION:
                continue
            if os.path.islink(array):
                continue
            images = np.load(array, mmap_mode="c", allow_pickle=False)
            counts = meta["counts"]
            if (images.dtype != np.uint8 or list(images.shape) != meta["shape"] or len(meta["files"]) != len(images)
                    or len(counts) != len(meta["classes"]) or sum(counts) != len(images)):
                continue
            return images, meta
        except (OSError, ValueError, NotRegular, KeyError, TypeError, UnicodeDecodeError):
            continue  # missing, damaged, or not ours: decode again
    return None


def exists(source: Path, entry: CacheEntry) -> bool:
    """Whether an index of ``entry`` is already on disk (written by this process or another)."""
    return any((d / f"{entry.key}.json").is_file() for d in cache_dirs(source))


def _write_npy_atomic(path: Path, images: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK) if hasattr(os, "fchmod") else None  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(images), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _remove_stale(d: Path, entry: CacheEntry) -> None:
    """Remove the entries in ``d`` of the same source and options under another key (files since changed)."""
    for index in d.glob("*.json"):
        if index.stem == entry.key or index.is_symlink():
            continue
        try:
            meta = json.loads(read_regular(index, limit=_MAX_INDEX_BYTES, follow=False).decode("utf-8"))
        except (OSError, ValueError, NotRegular, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("source") == entry.source and meta.get("options") == entry.options:
            for p in (index, d / f"{index.stem}.npy"):
                p.unlink(missing_ok=True)


def _may_write(d: Path) -> bool:
    """Whether ``d`` (or the nearest folder above it that exists) may be written: the OS allows it and its
    permissions grant some write (a folder marked read-only stays untouched even for root, whom the OS lets
    write anywhere)."""
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = p.stat()
    except OSError:
        return False
    return p.is_dir() and bool(st.st_mode & 0o222) and os.access(p, os.W_OK | os.X_OK)


def save(source: Path, entry: CacheEntry, images: np.ndarray, index: dict[str, Any]) -> Path | None:
    """Write ``images`` and their ``index`` (classes, counts, files) as ``entry``; the array's path, or None if no
    cache folder can be written (then nothing is left behind)."""
    for d in cache_dirs(source):
        if not _may_write(d):
            continue
        created = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
            if d.is_symlink() or not d.is_dir():
                continue
            array = d / f"{entry.key}.npy"
            _write_npy_atomic(array, images)
            write_json_atomic(d / f"{entry.key}.json", {
                **index, "key": entry.key, "version": CACHE_VERSION, "source": entry.source,
                "options": entry.options, "shape": list(images.shape), "dtype": "uint8"})
            _remove_stale(d, entry)
            return array
        except OSError:  # read-only, full, no permission: try the next place, leaving nothing behind here
            for undo in ((d / f"{entry.key}.json").unlink, (d / f"{entry.key}.npy").unlink,
                         *((d.rmdir,) if created else ())):
                try:
                    undo()
                except OSError:
                    pass
    return None
