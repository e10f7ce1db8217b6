"""CIFAR-FS and FC100: N-way K-shot classification on CIFAR-100, read from its official binary version.

CIFAR-100 (Krizhevsky 2009) has 100 classes of 600 32x32 colour images (500 in ``train.bin``,
100 in ``test.bin``), grouped into 20 super-classes of 5 classes each. Both families use all
600 images of a class, and differ in how the classes are split:

- ``cifar_fs`` (Bertinetto et al. 2019): 64 / 16 / 20 classes, the lists
  ``cifar-fs_splits/{train,val,test}.txt`` of https://github.com/bertinetto/r2d2 at commit
  9ed0090cb4979113c97d07f75789b9618a308e52 (removed from that repository later), shipped as
  ``metalens/tasks/splits/cifar_fs.json``.
- ``fc100`` (Oreshkin et al. 2018, "FC100"): by super-class, so that the splits share no
  super-class: 12 / 4 / 4 super-classes, hence 60 / 20 / 20 classes; the super-class labels of
  ``class_split`` in ``datasets/create_dataset_cifar100.py`` of https://github.com/ElementAI/TADAM
  (commit 476b024e08977143a01ed6b2fe7e479efa587197; also the paper's appendix), shipped as
  ``metalens/tasks/splits/fc100.json``.

A class is ``"<super-class>/<class>"`` (``"people/baby"``), with CIFAR-100's label names
(``metalens/tasks/splits/cifar100.json``: the fine and coarse label names in label order, and
the super-class of every class). Images are 32x32 colour by default (the records' own pixels,
undecoded; another ``size`` or ``channels`` decodes them as :func:`~metalens.data.load_image`
would a PNG of them); see :mod:`metalens.tasks.benchmarks` for what every benchmark shares.

What it reads (``task.root``; left empty, ``$METALENS_DATA/cifar100``, else
``../shared/data/cifar100``): CIFAR-100's *binary* version, as the archive
``cifar-100-binary.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz, MD5
03b5dce01913d631647c71ecec9e9cb8 as published on https://www.cs.toronto.edu/~kriz/cifar.html),
or its extracted ``cifar-100-binary/`` folder, or ``train.bin`` and ``test.bin`` themselves;
``task.root`` may also name the archive. A record is 3074 bytes: the coarse label, the fine
label, then 1024 red, 1024 green and 1024 blue bytes, row by row. The archive is read in memory
with :func:`metalens.data.archives.iter_tar`'s member checks. CIFAR's *python* version holds
pickles, which metalens never opens: it is refused with a message saying to use the binary
version. ``download=true`` fetches the binary archive into ``task.root`` (MD5-checked) when no
copy is there; nothing is downloaded otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from metalens.config import opt
from metalens.data.archives import download, iter_tar, md5sum
from metalens.errors import DataError
from metalens.files import NotRegular, read_regular
from metalens.registry import TASKS
from metalens.tasks.benchmarks import (
    SPLITS,
    Benchmark,
    BenchmarkOptions,
    Listing,
    Payload,
    Source,
    file_stamp,
    published_split,
    stamp_of,
)

__all__ = ["CifarFS", "FC100", "download_cifar100", "CIFAR100_URL", "CIFAR100_MD5", "CIFAR100_ARCHIVE"]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"
RECORD = 3074  # bytes: coarse label, fine label, 3 x 32 x 32 pixels
_CIFAR10_RECORD = 3073  # CIFAR-10's binary version: one label byte
_BINS = ("train.bin", "test.bin")
_NAMES = ("fine_label_names.txt", "coarse_label_names.txt")
_MAX_BIN_BYTES = 256 << 20  # train.bin is 153,700,000 bytes
_PYTHON = "CIFAR-100's python version, whose files are pickles, which metalens never opens (loading one can run " \
          "any code)"


def _use_binary(root: Path) -> str:
    return (f"use the binary version: put {CIFAR100_ARCHIVE} ({CIFAR100_URL}) in {root}, or add --set "
            "task.download=true")


def download_cifar100(root: str | os.PathLike, *, url: str | None = None,
                      opener: Callable[[str], Any] | None = None) -> Path:
    """Download CIFAR-100's binary archive into folder ``root`` (MD5-checked; see :func:`~metalens.data.download`).

    ``url`` defaults to :data:`CIFAR100_URL`; a mirror, or a local ``file://`` path, works the
    same. An archive already there is kept if its checksum is right; a wrong one is a
    :class:`~metalens.errors.DataError` (delete it to fetch it again). Returns its path.
    """
    path = Path(root) / CIFAR100_ARCHIVE
    if path.exists():
        if md5sum(path) != CIFAR100_MD5:
            raise DataError(f"{path} exists but its md5 is not the published {CIFAR100_MD5}; delete it to download "
                            "again")
        return path
    return download(url or CIFAR100_URL, path, md5=CIFAR100_MD5, opener=opener)


@dataclass(frozen=True)
class _Names:
    fine: list[str]  # label -> class name
    coarse: list[str]  # label -> super-class name
    coarse_of: list[int]  # fine label -> its coarse label


def _names() -> _Names:
    meta = published_split("cifar100")
    coarse = list(meta["coarse"])
    return _Names(list(meta["fine"]), coarse, [coarse.index(meta["coarse_of"][f]) for f in meta["fine"]])


def _records(data: bytes, where: str, names: _Names) -> np.ndarray:
    """CIFAR-100 binary records as ``uint8 [n, 3074]``, after checking that they are: not a pickle, not CIFAR-10,
    whole records, labels in range, each class in its own super-class."""
    if not data:
        raise DataError(f"{where} is empty; get {CIFAR100_ARCHIVE} again ({CIFAR100_URL})")
    if data[:1] == b"\x80":  # a pickle's PROTO opcode; a record starts with a coarse label < 20
        raise DataError(f"{where} is a Python pickle ({_PYTHON}); use the binary version {CIFAR100_ARCHIVE} "
                        f"({CIFAR100_URL})")
    if len(data) % RECORD:
        if len(data) % _CIFAR10_RECORD == 0:
            raise DataError(f"{where} holds {_CIFAR10_RECORD}-byte records: CIFAR-10's binary version, not "
                            f"CIFAR-100's ({RECORD} bytes: coarse label, fine label, pixels); use {CIFAR100_ARCHIVE}")
        raise DataError(f"{where} is {len(data)} bytes, not a whole number of CIFAR-100's {RECORD}-byte records: it "
                        f"is damaged or not CIFAR-100's binary version; get {CIFAR100_ARCHIVE} again ({CIFAR100_URL})")
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    coarse, fine = a[:, 0].astype(np.int64), a[:, 1].astype(np.int64)
    bad = np.flatnonzero((coarse >= len(names.coarse)) | (fine >= len(names.fine)))
    if len(bad) == 0:
        bad = np.flatnonzero(np.asarray(names.coarse_of)[fine] != coarse)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: record {i} has coarse label {coarse[i]} and fine label {fine[i]}, which CIFAR-100 "
                        f"does not pair; the file is damaged or not CIFAR-100's binary version; get "
                        f"{CIFAR100_ARCHIVE} again ({CIFAR100_URL})")
    return a


def _check_names(text: bytes, expected: list[str], where: str) -> None:
    got = [line.strip() for line in text.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if got != expected:
        raise DataError(f"{where} does not list CIFAR-100's {len(expected)} label names in label order (e.g. "
                        f"{got[:2]!r}); this is not CIFAR-100's binary version; get {CIFAR100_ARCHIVE} again")


def _listing(bins: dict[str, bytes], names: _Names, wanted: set[str], where: str) -> Listing:
    """The images of ``train.bin`` and ``test.bin`` whose class key is wanted."""
    keys, files, pixels = [], [], []
    for b in _BINS:
        a = _records(bins[b], f"{b} of {where}", names)
        key_of = [f"{names.coarse[names.coarse_of[f]]}/{names.fine[f]}" for f in range(len(names.fine))]
        for i, f in enumerate(a[:, 1].tolist()):
            if key_of[f] in wanted:
                keys.append(key_of[f])
                files.append(f"{b}#{i:05d}")
                pixels.append(a[i, 2:].reshape(3, 32, 32))  # channel-major R, G, B planes, row by row

    def payloads() -> Iterable[tuple[int, Payload]]:
        return enumerate(pixels)

    return Listing(keys, files, payloads)


class _Cifar100(Benchmark):
    """The families on CIFAR-100's binary version (CIFAR-FS, FC100): locating and reading it."""

    FOLDER = "cifar100"
    IMAGES_PER_CLASS = 600

    def _belongs(self) -> str:
        return f"the binary files are incomplete: get {CIFAR100_ARCHIVE} again ({CIFAR100_URL})"

    def _locate(self, path: Path, how: str) -> Source:
        c = self.config
        wanted = {k for keys in self.published_classes().values() for k in keys}
        if path.is_file():
            return self._archive_source(path, wanted)
        if path.is_dir():
            found = self._find(path, wanted)
            if found is not None:
                return found
        elif path.exists():
            raise DataError(f"{path} is neither a folder nor a regular file; point task.root at CIFAR-100's binary "
                            f"version ({self.DOCS})")
        if c.download:
            return self._archive_source(download_cifar100(path), wanted)
        raise self._absent(path, how, f"put {CIFAR100_ARCHIVE} ({CIFAR100_URL}) there, or its extracted "
                                      "train.bin and test.bin, or add --set task.download=true to fetch it "
                                      "(MD5-checked)")

    def _find(self, root: Path, wanted: set[str]) -> Source | None:
        """The binary version in folder ``root`` (the archive, its folder, or the two files), or None; the python
        version is refused."""
        if (root / CIFAR100_ARCHIVE).is_file():
            return self._archive_source(root / CIFAR100_ARCHIVE, wanted)
        for folder in (root / "cifar-100-binary", root):
            if any((folder / b).exists() for b in _BINS):
                return self._bins_source(folder, wanted)
        python = [p for p in (root / "cifar-100-python.tar.gz", root / "cifar-100-python", root / "meta")
                  if p.exists()]
        if python:
            raise DataError(f"{python[0]} is {_PYTHON}; {_use_binary(root)}")
        return None

    def _bins_source(self, folder: Path, wanted: set[str]) -> Source:
        missing = [b for b in _BINS if not (folder / b).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {missing[0]}; CIFAR-FS and FC100 read both train.bin and test.bin: "
                            f"extract all of {CIFAR100_ARCHIVE} there ({self.DOCS})")
        names = _names()

        def scan() -> Listing:
            data = {}
            for b in _BINS:
                try:
                    data[b] = read_regular(folder / b, limit=_MAX_BIN_BYTES, follow=False)
                except (OSError, NotRegular) as e:
                    raise DataError(f"cannot read {folder / b}: {e}") from None
            for n, expected in zip(_NAMES, (names.fine, names.coarse)):
                if (folder / n).is_file():
                    _check_names(read_regular(folder / n, limit=1 << 20, follow=False), expected, str(folder / n))
            return _listing(data, names, wanted, str(folder))

        return Source(folder.resolve(), stamp_of([folder / b for b in _BINS]), "cifar-100-binary", scan)

    def _archive_source(self, path: Path, wanted: set[str]) -> Source:
        if path.name.lower().startswith("cifar-100-python"):
            raise DataError(f"{path} is {_PYTHON}; {_use_binary(path.parent)}")
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        if head[:1] == b"\x80":
            raise DataError(f"{path} is a Python pickle ({_PYTHON}); {_use_binary(path.parent)}")
        names = _names()

        def scan() -> Listing:
            members: list[str] = []

            def take(name: str) -> bool:
                members.append(name)
                return PurePosixPath(name).name in _BINS + _NAMES

            data: dict[str, bytes] = {}
            for name, blob in iter_tar(path, take, limit=_MAX_BIN_BYTES):
                data[PurePosixPath(name).name] = blob
            if not any(b in data for b in _BINS):
                if any(PurePosixPath(m).name in ("train", "test", "meta") for m in members):
                    raise DataError(f"{path} is {_PYTHON}; {_use_binary(path.parent)}")
                raise DataError(f"{path} holds neither train.bin nor test.bin: it is not CIFAR-100's binary version; "
                                f"get {CIFAR100_ARCHIVE} ({CIFAR100_URL})")
            missing = [b for b in _BINS if b not in data]
            if missing:
                raise DataError(f"{path} lacks {missing[0]}; get {CIFAR100_ARCHIVE} again ({CIFAR100_URL})")
            for n, expected in zip(_NAMES, (names.fine, names.coarse)):
                if n in data:
                    _check_names(data[n], expected, f"{n} of {path}")
            return _listing(data, names, wanted, str(path))

        return Source(path.resolve(), [file_stamp(path)], "cifar-100-binary", scan)


@dataclass(frozen=True)
class _CifarOptions(BenchmarkOptions):
    root: str = opt("", "folder with cifar-100-binary.tar.gz (or its cifar-100-binary/ folder, or train.bin and "
                        "test.bin), or the archive itself ('': $METALENS_DATA/cifar100, else ../shared/data/cifar100)")
    size: int = opt(32, "images are resized to size x size (unless height and width say otherwise)", ge=1)
    download: bool = opt(False, "fetch cifar-100-binary.tar.gz into root if no copy is there (MD5-checked)")


@TASKS.register("cifar_fs")
class CifarFS(_Cifar100):
    """CIFAR-FS N-way K-shot (Bertinetto et al. 2019): CIFAR-100's 64/16/20-class split, 32x32 colour."""

    TITLE = "CIFAR-FS"
    DOCS = "docs/benchmarks-data/cifar-fs.md"

    @dataclass(frozen=True)
    class Config(_CifarOptions):
        """Options of the cifar_fs family."""

    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        lists, meta = published_split("cifar_fs"), published_split("cifar100")
        return {s: [f"{meta['coarse_of'][f]}/{f}" for f in lists[s]] for s in SPLITS}


@TASKS.register("fc100")
class FC100(_Cifar100):
    """FC100 N-way K-shot (Oreshkin et al. 2018): CIFAR-100 split by super-class, 12/4/4 -> 60/20/20 classes, 32x32."""

    TITLE = "FC100"
    DOCS = "docs/benchmarks-data/fc100.md"

    @dataclass(frozen=True)
    class Config(_CifarOptions):
        """Options of the fc100 family."""

    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        lists, meta = published_split("fc100"), published_split("cifar100")
        return {s: [f"{g}/{f}" for g in lists[s] for f in meta["fine"] if meta["coarse_of"][f] == g] for s in SPLITS}
