"""Safe zip archives and checksummed downloads.

Zip members are read in memory, each with a cap (:func:`read_member`): a member larger
than the cap, or whose data does not match what its header declares (its size, its
CRC), is refused. An archive with a member whose path could escape a folder (absolute,
``..``, a drive letter, a symlink) is refused as a whole, whether read or extracted
(:func:`check_archive`; :func:`extract_zip` also never leaves a half-written folder). A
file that is not a zip, or a damaged one, is one :class:`~metalens.errors.DataError`
naming it (:func:`open_zip`), never ``zipfile``'s own exception.

Nothing is ever downloaded unless asked for; :func:`download` checks the MD5 of what it
fetched before moving it into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metalens.errors import DataError, excerpt, reason

__all__ = ["UnsafeArchiveError", "check_archive", "open_zip", "read_member", "extract_zip", "md5sum", "download",
           "MAX_MEMBER_BYTES"]

MAX_MEMBER_BYTES = 64 << 20  # read_member refuses a member larger than this unless told otherwise
_REDO = "download or re-create the archive"


class UnsafeArchiveError(DataError):
    """An archive holds a member whose path could escape the folder it is extracted into."""


def _unsafereason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if "\x00" in name:
        return "contains a NUL byte"
    posix = name.replace("\\", "/")
    if posix.startswith("/"):
        return "is an absolute path"
    if len(posix) >= 2 and posix[1] == ":":
        return "starts with a drive letter"
    if any(part == ".." for part in posix.split("/")):
        return "contains '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return None


def check_archive(archive: zipfile.ZipFile, *, where: str = "") -> None:
    """Raise :class:`UnsafeArchiveError` if any member of ``archive`` could escape its folder."""
    for info in archive.infolist():
        why = _unsafereason(info)
        if why is not None:
            raise UnsafeArchiveError(
                f"refusing the archive {where or archive.filename}: member {info.filename!r} {why}; "
                "nothing was read or written from it")


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """Open the zip file ``path`` for reading; a file that is not one, or a damaged one, is a :class:`DataError`."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise DataError(f"{os.fspath(path)} is not a regular file, so not a zip file; {_REDO}")
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"no such zip file: {os.fspath(path)}") from None
    except zipfile.BadZipFile as e:
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError:
            head = b""
        if not head:
            raise DataError(f"{os.fspath(path)} is empty, not a zip file; {_REDO}") from None
        if head[:2] != b"PK":
            raise DataError(f"{os.fspath(path)} is not a zip file (it starts {excerpt(head, 24)}); "
                            f"{_REDO}, or give the folder of images instead") from None
        raise DataError(f"{os.fspath(path)} is a damaged zip file ({reason(e)}); {_REDO}") from None
    except OSError as e:
        raise DataError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    except Exception as e:  # zipfile's parser on forged headers: ValueError, struct.error, EOFError, ...
        raise DataError(f"{os.fspath(path)} is a damaged zip file ({reason(e)}); {_REDO}") from None


def _member_error(where: str, info: zipfile.ZipInfo, e: BaseException) -> DataError:
    return DataError(f"cannot read member {info.filename!r} of {where}: the archive is damaged ({reason(e)}); "
                     f"{_REDO}")


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limit: int = MAX_MEMBER_BYTES,
                where: str = "") -> bytes:
    """The bytes of member ``info``, read with a cap: never more than ``limit`` nor than its header declares.

    A member whose header declares more than ``limit`` bytes is refused unread; one whose
    data decompresses to more or fewer bytes than declared, or fails its CRC, is refused
    as damaged or forged (:class:`DataError` naming the member and the archive).
    """
    where = where or str(archive.filename)
    if info.file_size > limit:
        raise DataError(f"refusing member {info.filename!r} of {where}: its header declares {info.file_size} bytes, "
                        f"more than {_mib(limit)} for one file")
    try:
        with archive.open(info) as f:
            data = f.read(info.file_size + 1)  # zipfile stops at the declared size; one more byte to tell
    except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, encrypted or unknown compression, ...
        raise _member_error(where, info, e) from None
    if len(data) != info.file_size:
        raise DataError(f"refusing member {info.filename!r} of {where}: its header declares {info.file_size} bytes "
                        f"but it holds {len(data)}{' or more' if len(data) > info.file_size else ''}; the archive "
                        f"is damaged or forged; {_REDO}")
    return data


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the zip file ``archive`` into the new folder ``dest``, all or nothing.

    Every member name is checked before anything is written (:class:`UnsafeArchiveError`
    for a member that could escape ``dest``); the members are written into a temporary
    folder beside ``dest`` that is renamed to ``dest`` only when all of them are there, and
    removed on any error. ``dest`` must not exist yet. A damaged archive (a member failing
    its CRC, ...) is a :class:`DataError`. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; extract_zip writes a new folder only")
    with open_zip(archive) as z:
        check_archive(z, where=str(archive))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            top = tmp.resolve()
            for info in z.infolist():
                target = (tmp / info.filename.replace("\\", "/")).resolve()
                if target != top and top not in target.parents:  # belt and braces after check_archive
                    raise UnsafeArchiveError(f"refusing {archive}: member {info.filename!r} escapes the folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    try:
                        src = z.open(info)
                    except Exception as e:
                        raise _member_error(str(archive), info, e) from None
                    with src:
                        while True:
                            try:  # zipfile never yields more than the declared size, and checks the CRC
                                block = src.read(1 << 20)
                            except Exception as e:
                                raise _member_error(str(archive), info, e) from None
                            if not block:
                                break
                            out.write(block)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The MD5 hex digest of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str, dest: str | os.PathLike, *, md5: str, opener: Callable[[str], Any] | None = None
) -> Path:
    """Fetch ``url`` into ``dest``, verifying its MD5 before moving it into place.

    The bytes go to a temporary file beside ``dest``; on a checksum mismatch or any error
    it is deleted and ``dest`` is left as it was. ``opener(url)`` returns a readable
    binary stream (default ``urllib.request.urlopen``; ``file://`` URLs work too). A
    mismatch, or an address that cannot be fetched, is a :class:`DataError`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                src = (opener or urllib.request.urlopen)(url)
            except urllib.error.URLError as e:
                raise DataError(f"cannot download {url}: {reason(e.reason)}; check the address and the network, "
                                f"or put the file at {dest} by hand") from None
            with src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
        if h.hexdigest() != md5.lower():
            raise DataError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}; "
                            f"nothing was written to {dest}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
