"""CUB-200-2011 N-way K-shot classification of bird species (Wah et al. 2011) with Chen et al.'s split (2019).

200 species of North American birds, 11,788 images (41 to 60 a species), split 100 / 50 / 50
into meta-train / validation / test species as Chen et al. (2019, "A Closer Look at Few-shot
Classification") did in ``filelists/CUB/write_CUB_filelist.py`` of
https://github.com/wyharveychen/CloserLookFewShot (commit
0f0b05f8048fe455f03782361c206f4e1739a477): the 200 class folders of ``CUB_200_2011/images``
sorted, folder ``i`` (from 0) in meta-train if ``i % 2 == 0``, validation if ``i % 4 == 1``, test
if ``i % 4 == 3``. The lists, with the folder names of the archive (``001.Black_footed_Albatross``,
...), ship as ``metalens/tasks/splits/cub.json``. Images are 84x84 colour by default (Chen et
al.'s Conv-4 input size), stretched to that size; see :mod:`metalens.tasks.benchmarks` for
the checks, decoding and cache every benchmark shares.

What it reads (``task.root``; left empty, ``$METALENS_DATA/cub``, else ``../shared/data/cub``):
the official archive ``CUB_200_2011.tgz`` (https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz,
MD5 97eceeb196236b17998738112f37df78), read in memory with
:func:`metalens.data.archives.iter_tar`'s member checks, or the folder it extracts to,
``CUB_200_2011/`` (``images/<class>/*.jpg``, with ``classes.txt`` and the other files beside it,
which are not needed); ``task.root`` may name the archive, the folder holding it or
``CUB_200_2011/``, or ``CUB_200_2011/`` itself. Only ``images/`` is read: bounding boxes, parts
and attributes are not used, as in Chen et al. ``download=true`` fetches the archive into
``task.root`` (MD5-checked) when no copy is there; nothing is downloaded otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from metalens.config import opt
from metalens.data.archives import check_tar, download, iter_tar, md5sum
from metalens.data.images import IMAGE_SUFFIXES, MAX_FILE_BYTES
from metalens.errors import DataError
from metalens.registry import TASKS
from metalens.tasks.benchmarks import (
    SPLITS,
    Benchmark,
    BenchmarkOptions,
    Listing,
    Payload,
    Source,
    file_stamp,
    folder_source,
    published_split,
)

__all__ = ["CUB", "download_cub", "CUB_URL", "CUB_MD5", "CUB_ARCHIVE"]

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_ARCHIVE = "CUB_200_2011.tgz"


def download_cub(root: str | os.PathLike, *, url: str | None = None,
                 opener: Callable[[str], Any] | None = None) -> Path:
    """Download ``CUB_200_2011.tgz`` into folder ``root`` (MD5-checked; see :func:`~metalens.data.download`).

    ``url`` defaults to :data:`CUB_URL`; a mirror, or a local ``file://`` path, works the same.
    An archive already there is kept if its checksum is right; a wrong one is a
    :class:`~metalens.errors.DataError` (delete it to fetch it again). Returns its path.
    """
    path = Path(root) / CUB_ARCHIVE
    if path.exists():
        if md5sum(path) != CUB_MD5:
            raise DataError(f"{path} exists but its md5 is not the published {CUB_MD5}; delete it to download again")
        return path
    return download(url or CUB_URL, path, md5=CUB_MD5, opener=opener)


def _image_class(name: str, classes: set[str]) -> str | None:
    """The class of archive member ``name`` (``.../images/<class>/<file>``), or None if it is not one of ours."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] != "images" or parts[-2] not in classes:
        return None
    if parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    return parts[-2]


@TASKS.register("cub")
class CUB(Benchmark):
    """CUB-200-2011 bird species N-way K-shot (Wah et al. 2011), Chen et al.'s 100/50/50-class split, 84x84 colour."""

    TITLE = "CUB-200-2011"
    FOLDER = "cub"
    DOCS = "docs/benchmarks-data/cub.md"

    @dataclass(frozen=True)
    class Config(BenchmarkOptions):
        root: str = opt("", "folder with CUB_200_2011.tgz or CUB_200_2011/ (images/<class>/*.jpg), that folder "
                            "itself, or the archive ('': $METALENS_DATA/cub, else ../shared/data/cub)")
        size: int = opt(84, "images are resized to size x size (unless height and width say otherwise)", ge=1)
        download: bool = opt(False, "fetch CUB_200_2011.tgz into root if no copy is there (MD5-checked)")

    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        lists = published_split("cub")
        return {s: list(lists[s]) for s in SPLITS}

    def _belongs(self) -> str:
        return "extract all of CUB_200_2011.tgz: each class's images are in CUB_200_2011/images/<class>/"

    def _locate(self, path: Path, how: str) -> Source:
        classes = {k for keys in self.published_classes().values() for k in keys}
        if path.is_file():
            return self._archive_source(path, classes)
        if path.is_dir():
            if (path / CUB_ARCHIVE).is_file():
                return self._archive_source(path / CUB_ARCHIVE, classes)
            for images in (path / "CUB_200_2011" / "images", path / "images"):
                if images.is_dir():
                    return folder_source(images, {k: k for k in classes}, layout="cub-images")
        elif path.exists():
            raise DataError(f"{path} is neither a folder nor a regular file; point task.root at CUB-200-2011 "
                            f"({self.DOCS})")
        if self.config.download:
            return self._archive_source(download_cub(path), classes)
        raise self._absent(path, how, f"put {CUB_ARCHIVE} ({CUB_URL}) there, or the CUB_200_2011/ folder it "
                                      "extracts to, or add --set task.download=true to fetch it (MD5-checked)")

    def _archive_source(self, path: Path, classes: set[str]) -> Source:
        def scan() -> Listing:
            keys, files = [], []
            for info in check_tar(path):  # one pass over the headers: which members are our images
                k = _image_class(info.name, classes) if info.isfile() else None
                if k is not None:
                    keys.append(k)
                    files.append(info.name)
            index = {name: i for i, name in enumerate(files)}

            def payloads() -> Iterable[tuple[int, Payload]]:
                for name, data in iter_tar(path, index.__contains__, limit=MAX_FILE_BYTES):
                    yield index[name], data

            return Listing(keys, files, payloads)

        return Source(path.resolve(), [file_stamp(path)], "cub-archive", scan)
