"""miniImageNet N-way K-shot classification (Vinyals et al. 2016) with Ravi & Larochelle's split (2017).

100 ImageNet classes of 600 images each, split 64 / 16 / 20 into meta-train / validation /
test classes as Ravi & Larochelle (2017) did: the class column of
``data/miniImagenet/{train,val,test}.csv`` in https://github.com/twitter/meta-learning-lstm
(commit af4c58a3838636c7ad6bb54038a67a26f37892ec), shipped with metalens as
``metalens/tasks/splits/mini_imagenet.json``. Images are 84x84 colour by default, stretched
to that size as the published 84x84 versions were made (``fit``), normalised with the
meta-training split's channel statistics; ``augment=natural`` crops, flips and jitters the
meta-training images (see :mod:`metalens.tasks.images` and :mod:`metalens.tasks.benchmarks`
for what every benchmark family shares: checks, decoding, the cache).

What it reads (``task.root``; left empty, ``$METALENS_DATA/mini_imagenet``, else
``../shared/data/mini_imagenet``), any of:

- a folder of class folders named by WordNet id: ``<root>/<wnid>/*.jpg``;
- the same by split: ``<root>/{train,val,test}/<wnid>/*.jpg`` (a class found in another split's
  folder than Ravi & Larochelle's is refused: that copy follows another split);
- Ravi & Larochelle's layout: ``<root>/images/*.jpg`` beside ``train.csv``, ``val.csv`` and
  ``test.csv`` (rows ``filename,label``; a CSV that names a class of another split, or a file
  that is not in ``images/``, is refused); without the CSVs, the class of
  ``images/n0153282900000005.jpg`` is the WordNet id its name begins with.

Folders of classes that are not miniImageNet's are left alone; a class with more than 600
images is refused (that is ImageNet itself, not miniImageNet). miniImageNet has no official
download address, so there is no ``download`` option: the error for a missing copy says what
to put where (docs/benchmarks-data/mini-imagenet.md).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from metalens.config import opt
from metalens.data.images import read_file
from metalens.data.sources import _folder_images
from metalens.errors import DataError
from metalens.files import NotRegular, read_regular
from metalens.registry import TASKS
from metalens.tasks.benchmarks import (
    SPLITS,
    Benchmark,
    BenchmarkOptions,
    Listing,
    Source,
    file_stamp,
    folder_source,
    published_split,
    refuse_file_root,
    stamp_of,
)

__all__ = ["MiniImageNet"]

_WNID = re.compile(r"n\d{8}")
_MAX_CSV_BYTES = 16 << 20  # Ravi & Larochelle's train.csv is 1.3 MB


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """The ``(filename, label)`` rows of one of Ravi & Larochelle's CSVs (its ``filename,label`` header skipped)."""
    try:
        text = read_regular(path, limit=_MAX_CSV_BYTES, follow=False).decode("utf-8")
    except (OSError, NotRegular, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; it should be Ravi & Larochelle's CSV (rows filename,label)") \
            from None
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or (n == 1 and [f.strip() for f in row] == ["filename", "label"]):
            continue
        if len(row) != 2:
            raise DataError(f"{path}, line {n}: expected filename,label, got {len(row)} fields; it should be Ravi & "
                            "Larochelle's CSV")
        rows.append((row[0].strip(), row[1].strip()))
    return rows


@TASKS.register("mini_imagenet")
class MiniImageNet(Benchmark):
    """miniImageNet N-way K-shot (Vinyals et al. 2016), Ravi & Larochelle's 64/16/20-class split, 84x84 colour."""

    TITLE = "miniImageNet"
    FOLDER = "mini_imagenet"
    DOCS = "docs/benchmarks-data/mini-imagenet.md"
    IMAGES_PER_CLASS = 600

    @dataclass(frozen=True)
    class Config(BenchmarkOptions):
        root: str = opt("", "miniImageNet's folder: <wnid>/*.jpg, {train,val,test}/<wnid>/*.jpg, or images/ with "
                            "train.csv, val.csv, test.csv ('': $METALENS_DATA/mini_imagenet, else "
                            "../shared/data/mini_imagenet)")
        size: int = opt(84, "images are resized to size x size (unless height and width say otherwise)", ge=1)

    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        lists = published_split("mini_imagenet")
        return {s: list(lists[s]) for s in SPLITS}

    def _belongs(self) -> str:
        return ("put each class's images in <root>/<wnid>/ (or <root>/<split>/<wnid>/), or Ravi & Larochelle's "
                "images/ with train.csv, val.csv, test.csv")

    def _locate(self, path: Path, how: str) -> Source:
        if not path.exists():
            raise self._absent(path, how, "put miniImageNet there as <wnid>/*.jpg class folders (or "
                                          "{train,val,test}/<wnid>/), or as Ravi & Larochelle's images/ with "
                                          "train.csv, val.csv and test.csv")
        if not path.is_dir():
            refuse_file_root(path, self.TITLE, self.DOCS)
        split_of = {k: s for s, keys in self.published_classes().items() for k in keys}
        if (path / "images").is_dir():
            return self._images_source(path, split_of)
        return folder_source(path, {k: k for k in split_of}, layout="class-folders", split_of=split_of)

    def _images_source(self, root: Path, split_of: dict[str, str]) -> Source:
        """Ravi & Larochelle's layout: ``images/`` with the CSVs (or, without them, classes from the file names)."""
        images = root / "images"
        csvs = [root / f"{s}.csv" for s in SPLITS if (root / f"{s}.csv").is_file()]
        keys: list[str] = []
        files: list[str] = []
        if csvs:
            for path in csvs:
                split = path.stem
                for name, label in _csv_rows(path):
                    if label not in split_of:
                        raise DataError(f"{path} lists class {label!r}, which is not one of miniImageNet's 100 "
                                        "classes: use Ravi & Larochelle's CSVs (twitter/meta-learning-lstm, "
                                        f"data/miniImagenet/) ({self.DOCS})")
                    if split_of[label] != split:
                        raise DataError(f"{path} lists class {label} in {split}, but Ravi & Larochelle's split puts it "
                                        f"in {split_of[label]}: these CSVs describe another split; use Ravi & "
                                        f"Larochelle's (twitter/meta-learning-lstm, data/miniImagenet/) ({self.DOCS})")
                    if "/" in name or "\\" in name or name.startswith("."):
                        raise DataError(f"{path} names {name!r}, not a file name in images/")
                    if not (images / name).is_file():
                        raise DataError(f"{path} lists {name}, which is not in {images}: the images/ folder is "
                                        f"incomplete; extract all of miniImageNet's images there ({self.DOCS})")
                    keys.append(label)
                    files.append(name)
            stamp = stamp_of(csvs)
        else:
            for rel in _folder_images(images):
                m = _WNID.match(rel)
                if "/" not in rel and m is not None and m.group(0) in split_of:
                    keys.append(m.group(0))
                    files.append(rel)
            stamp = []
        stamp += [[name, *file_stamp(images / name)] for name in files]

        def payloads():
            for i, name in enumerate(files):
                yield i, read_file(images / name, follow=False, where=str(images / name))

        listing = Listing(keys, [f"images/{name}" for name in files], payloads)
        return Source(root.resolve(), stamp, "ravi-csv" if csvs else "ravi-images", lambda: listing)
