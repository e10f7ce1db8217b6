"""Run-folder integrity: one writer per folder, no symbolic links inside, no leftovers from a crash.

Every command that writes a folder (training, resuming, a study or the tour) holds the
folder's exclusive lock for as long as it runs: :func:`lock` takes an OS lock on
``FOLDER/.lock`` (``flock`` on POSIX, ``msvcrt.locking`` on Windows), which the OS releases
if the process dies, so a crash never leaves a folder locked. A second writer is refused at
once with :class:`~metalens.errors.RunFolderBusy` naming the holder (its pid, host, start
time and command, which the holder writes into the lock file). Locks are re-entrant within
a process: a study holding its folder may train runs inside it, and ``train`` may be called
on a folder its caller already holds.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> with lock(d):
...     with lock(d):  # re-entrant in one process
...         (d / ".lock").exists()
True
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from metalens.errors import RunFolderBusy, RunFolderError, excerpt

__all__ = ["lock", "holder", "check_no_links", "make_folder", "LOCK_NAME"]

LOCK_NAME = ".lock"

_held: dict[str, tuple[int, int]] = {}  # real path of a held folder -> (lock file descriptor, depth)
_guard = threading.Lock()


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(300).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text.replace("\n", "; ") if text else "a process that has not written its name yet"


def holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock (pid, host, start, command), or None when no other process holds it.

    Probes the lock without creating anything; this process's own locks count as free.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if os.path.realpath(folder) in _held or path.is_symlink() or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None  # free (closing the descriptor releases the probe)
        return _holder(path)
    finally:
        os.close(fd)


def make_folder(folder: Path) -> bool:
    """Create ``folder`` (and its parents) if needed; True when this call created it.

    An ``OSError`` (a parent that is a file, a read-only disk, a name too long) becomes a one-line
    :class:`~metalens.errors.RunFolderError`.
    """
    if folder.is_dir():
        return False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        return True
    except FileExistsError:
        if folder.is_dir():
            return False
        raise RunFolderError(f"cannot use {folder} as a folder: a file of that name exists") from None
    except OSError as e:
        raise RunFolderError(f"cannot create the folder {folder}: {e.strerror or e}") from None


@contextlib.contextmanager
def lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the duration of the ``with`` block.

    Raises :class:`~metalens.errors.RunFolderBusy` at once if another process holds it. A folder this
    call created is removed again if the lock cannot be taken or the block raises before anything
    but the lock file was written in it.
    """
    folder = Path(folder)
    created = make_folder(folder)
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield folder
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return
    path = folder / LOCK_NAME
    if path.is_symlink():
        raise RunFolderError(f"{path} is a symbolic link; a run folder holds only its own files (remove the link)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        _discard(folder, created)
        raise RunFolderError(f"cannot lock {folder}: {e.strerror or e}") from None
    if not _try_lock(fd):
        os.close(fd)
        raise RunFolderBusy(f"{folder} is in use by another metalens process ({_holder(path)}); wait for it to "
                            "finish, or choose another --out folder")
    try:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {' '.join(sys.argv)[:160]}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8", errors="replace"), 0) if hasattr(os, "pwrite") else os.write(fd, info.encode())
    except OSError:
        pass  # the name of the holder is a courtesy; the lock is what matters
    with _guard:
        _held[key] = (fd, 1)
    ok = False
    try:
        yield folder
        ok = True
    finally:
        with _guard:
            del _held[key]
        if not ok:
            _discard(folder, created)
        os.close(fd)  # releases the OS lock


def _discard(folder: Path, created: bool) -> None:
    """Remove a folder this command created if it holds nothing but the lock file."""
    if not created:
        return
    try:
        if all(p.name == LOCK_NAME for p in folder.iterdir()):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass


def check_no_links(folder: str | Path) -> None:
    """Refuse a run folder with a symbolic link anywhere inside it (the folder itself may be one).

    metalens never writes or deletes through a link, so that nothing outside the folder it was
    given is ever touched.
    """
    folder = Path(folder)
    for dirpath, dirnames, filenames in os.walk(folder):  # os.walk does not descend into linked folders
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = excerpt(os.readlink(p), 60)
                raise RunFolderError(f"{p} is a symbolic link (to {target}); a run folder holds only its own "
                                     "files: remove the link")
