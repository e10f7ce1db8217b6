"""Safe zip archives and checksummed downloads.

Zip members are read in memory, each with a cap (:func:`read_member`): a member larger
than the cap, or whose data does not match what its header declares (its size, its
CRC), is refused. An archive with a member whose path could escape a folder (absolute,
``..``, a drive letter, a symlink) is refused as a whole, whether read or extracted
(:func:`check_archive`; :func:`extract_zip` also never leaves a half-written folder). A
file that is not a zip, or a damaged one, is one :class:`~metalens.errors.DataError`
naming it (:func:`open_zip`), never ``zipfile``'s own exception.

Tar archives (plain, gzip, bzip2 or xz: CIFAR-100's ``cifar-100-binary.tar.gz``, CUB's
``CUB_200_2011.tgz``) are read in memory, in one pass in archive order (a compressed tar
cannot be read out of order without decompressing it again), with the same member checks
as zips plus tar's own kinds of member: a hard link, a device or a FIFO is refused like a
symbolic link (:func:`check_tar`, :func:`iter_tar`). :func:`iter_tar` checks every member
before it reads any data, and reads each member with a cap, checking that it holds the
bytes its header declares.

Nothing is ever downloaded unless asked for; :func:`download` checks the MD5 of what it
fetched before moving it into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metalens.errors import DataError, excerpt, reason

__all__ = ["UnsafeArchiveError", "check_archive", "open_zip", "read_member", "extract_zip", "md5sum", "download",
           "MAX_MEMBER_BYTES", "check_tar", "iter_tar"]

MAX_MEMBER_BYTES = 64 << 20  # read_member refuses a member larger than this unless told otherwise
_REDO = "download or re-create the archive"


class UnsafeArchiveError(DataError):
    """An archive holds a member whose path could escape the folder it is extracted into."""


def _unsafe_name(name: str) -> str | None:
    """Why a member called ``name`` could escape the folder it is extracted into (None: it cannot)."""
    if "\x00" in name:
        return "contains a NUL byte"
    posix = name.replace("\\", "/")
    if posix.startswith("/"):
        return "is an absolute path"
    if len(posix) >= 2 and posix[1] == ":":
        return "starts with a drive letter"
    if any(part == ".." for part in posix.split("/")):
        return "contains '..'"
    return None


def _unsafereason(info: zipfile.ZipInfo) -> str | None:
    why = _unsafe_name(info.filename)
    if why is None and stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return why


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


# ------------------------------------------------------------------------------------------------
# Tar archives
# ------------------------------------------------------------------------------------------------
def _tar_unsafe(info: tarfile.TarInfo) -> str | None:
    """Why tar member ``info`` could escape its folder or is not plain data (None: it is safe)."""
    why = _unsafe_name(info.name)
    if why is not None:
        return why
    if info.issym():
        return "is a symbolic link"
    if info.islnk():
        return "is a hard link"
    if info.ischr() or info.isblk() or info.isfifo():
        return "is a device or a FIFO"
    if not (info.isfile() or info.isdir()):
        return "is neither a file nor a folder"
    return None


def _tar_error(path: str, e: BaseException) -> DataError:
    """``e``, raised while reading the tar archive ``path``, as one line naming it."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if not head:
        return DataError(f"{path} is empty, not a tar archive; {_REDO}")
    if head[:2] == b"PK":
        return DataError(f"{path} is a zip file, not a tar archive; give the tar archive (.tar, .tar.gz, .tgz), "
                         "or the folder it holds")
    known = (head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"
             or head[257:262] == b"ustar")
    if not known:
        return DataError(f"{path} is not a tar archive (it starts {excerpt(head, 24)}); {_REDO}, or give the "
                         "folder of its files instead")
    return DataError(f"{path} is a damaged tar archive ({reason(e)}); {_REDO}")


def _tar_members(path: str | os.PathLike, where: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """``(archive, member)`` for every member of the tar archive ``path``, in archive order, in one pass.

    Every error of the archive (not a tar, damaged, truncated) is one :class:`DataError` naming it.
    """
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise DataError(f"{where} is not a regular file, so not a tar archive; {_REDO}")
        raise DataError(f"no such tar archive: {where}")
    try:
        archive = tarfile.open(os.fspath(path), mode="r|*")
    except OSError as e:
        if not isinstance(e, tarfile.TarError) and e.errno is not None:
            raise DataError(f"cannot read {where}: {e.strerror or e}") from None
        raise _tar_error(os.fspath(path), e) from None
    except Exception as e:  # tarfile.ReadError, CompressionError, EOFError, zlib.error, ...
        raise _tar_error(os.fspath(path), e) from None
    with archive:
        while True:
            try:
                info = archive.next()
            except Exception as e:  # a truncated or damaged stream
                raise _tar_error(os.fspath(path), e) from None
            if info is None:
                return
            yield archive, info


def check_tar(path: str | os.PathLike, *, where: str = "") -> list[tarfile.TarInfo]:
    """The members of the tar archive ``path``; :class:`UnsafeArchiveError` if any could escape its folder.

    One pass over the archive (headers only; the data is skipped, though a compressed archive
    is decompressed to do so). A member that is a symbolic or hard link, a device or a FIFO is
    refused like a path with ``..``: the archive as a whole, before anything is read from it.
    """
    where = where or os.fspath(path)
    members = []
    for _, info in _tar_members(path, where):
        why = _tar_unsafe(info)
        if why is not None:
            raise UnsafeArchiveError(f"refusing the archive {where}: member {info.name!r} {why}; nothing was read "
                                     "or written from it")
        members.append(info)
    return members


def iter_tar(path: str | os.PathLike, wanted: Callable[[str], bool], *, limit: int = MAX_MEMBER_BYTES,
             where: str = "") -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular member of the tar archive ``path`` whose name ``wanted`` accepts.

    The whole archive is checked first (:func:`check_tar`), so an unsafe archive yields
    nothing; then the members are read in archive order, each with a cap: a member whose
    header declares more than ``limit`` bytes is refused unread, one that holds fewer bytes
    than it declares (a truncated archive) is refused as damaged (:class:`DataError` naming
    the member and the archive).
    """
    where = where or os.fspath(path)
    check_tar(path, where=where)
    for archive, info in _tar_members(path, where):
        why = _tar_unsafe(info)
        if why is not None:  # the archive changed since it was checked
            raise UnsafeArchiveError(f"refusing the archive {where}: member {info.name!r} {why}")
        if not info.isfile() or not wanted(info.name):
            continue
        if info.size > limit:
            raise DataError(f"refusing member {info.name!r} of {where}: its header declares {info.size} bytes, "
                            f"more than {_mib(limit)} for one file")
        try:
            f = archive.extractfile(info)
            data = f.read(info.size + 1) if f is not None else b""
        except Exception as e:  # a truncated stream, a bad CRC of the compression, ...
            raise DataError(f"cannot read member {info.name!r} of {where}: the archive is damaged ({reason(e)}); "
                            f"{_REDO}") from None
        if len(data) != info.size:
            raise DataError(f"refusing member {info.name!r} of {where}: its header declares {info.size} bytes but "
                            f"it holds {len(data)}; the archive is damaged or truncated; {_REDO}")
        yield info.name, data
