"""Files as metalens writes and reads them: written atomically, read without following links.

:func:`write_text_atomic` writes a temporary file beside the target (named
``.<name>.<random>.tmp``, :data:`TMP_SUFFIX`), fsyncs it and renames it into place, so a
reader sees the old file or the new one, never half of one. :func:`read_regular` reads a
file that must be a regular file of at most ``limit`` bytes, refusing (``follow=False``) a
symbolic link, and never blocking on a FIFO.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
>>> write_json_atomic(p, {"x": 1})
>>> read_regular(p, limit=100)
b'{\\n  "x": 1\\n}\\n'
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "UMASK", "NotRegular", "read_regular", "write_text_atomic", "write_json_atomic", "fsync_dir"]

TMP_SUFFIX = ".tmp"  # every temporary entry metalens writes is named ".<name>.<random>.tmp"
UMASK = os.umask(0)  # the process's umask, read once: temporary files get the mode a plain open() would give
os.umask(UMASK)


class NotRegular(ValueError):
    """A path that :func:`read_regular` refuses: a symbolic link, not a regular file, or too large."""


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike, *, limit: int, follow: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit`` of them).

    Raises :class:`NotRegular` (with the reason: "is a symbolic link", "is not a regular file", "is N bytes,
    more than the limit") and ``OSError`` from the OS (``FileNotFoundError`` for a missing file).
    ``follow=False`` refuses a symbolic link instead of following it.
    """
    if not follow and os.path.islink(path):
        raise NotRegular("is a symbolic link")
    # O_NONBLOCK: a FIFO must not hang the open; O_NOFOLLOW closes the race with the check above
    flags = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
             | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular("is not a regular file")
        if st.st_size > limit:
            raise NotRegular(f"is {st.st_size} bytes, more than the {limit} expected")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise NotRegular(f"is more than the {limit} bytes expected")
    return data


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file beside it, fsync and rename (see the module docstring)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK) if hasattr(os, "fchmod") else None  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
