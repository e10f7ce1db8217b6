"""The field's few-shot image benchmarks, read from a user's local copy: what their families share.

The families ``mini_imagenet`` and ``tiered_imagenet`` (:mod:`metalens.tasks.mini_imagenet`,
:mod:`metalens.tasks.tiered_imagenet`), ``cifar_fs`` and ``fc100`` (:mod:`metalens.tasks.cifar`)
and ``cub`` (:mod:`metalens.tasks.cub`) are the episodes of the ``images`` family
(:class:`~metalens.tasks.images.ImageFolder`: N-way K-shot sampling, ``channels``, ``size``,
``normalize``, ``augment``) over a benchmark's *published* meta-train / validation / test
classes, read from the copy of the data set a user already has. This machine holds none of
these data sets; the tests build small copies in each one's real format.

Published splits. Each benchmark's class lists ship with metalens as JSON files under
``metalens/tasks/splits/`` (:func:`published_split`), each saying in its ``about`` where its
lists were taken from (the module of each family cites the same source). The splits are
fixed: there is no seed and no size to choose.

Where the data is. ``task.root`` names the folder (or, where the benchmark has one, the
archive) to read; left empty it is ``$METALENS_DATA/<folder>`` when ``METALENS_DATA`` is set,
else ``../shared/data/<folder>`` (:func:`data_root`), ``<folder>`` being the family's (e.g.
``mini_imagenet``). A root that is not there is a :class:`DataNotFound` saying which files to
put where. Nothing is downloaded unless asked for: ``download=true`` exists only where an
official address with a published checksum exists (CIFAR-100's binary version, CUB-200-2011),
and checks the MD5 before the file is moved into place (:func:`metalens.data.download`).

Checks, before any image is decoded. Every class of the published split must be in the copy:
a missing class is one :class:`~metalens.errors.DataError` naming it (the first ten, and how
many more) and where its images belong. Then, as in the ``images`` family: a class with fewer
images than ``shots + queries``, images that would not fit in memory at ``size``, and a split
with fewer classes than ``ways``: the meta-training split when the family is built, the others
when their tasks are drawn, so that a run can meta-train with more ways than the test split
has classes (Snell et al. 2017 train 30-way on miniImageNet) and be scored 5-way. Archives are read with :mod:`metalens.data.archives`'s member
checks (a member that could escape its folder, a link, a device refuses the whole archive);
pickles (CIFAR's python version, tieredImageNet's ``.pkl`` files) are refused, never opened.

Decoding and the cache. Every image goes through :func:`metalens.data.images.decode_u8`, the
decoding :func:`metalens.data.load_image` applies to a user's file, with the family's
``channels``, ``size`` (or ``height`` and ``width``), ``fit`` and ``resample``. The decoded
images are kept as a memory-mapped array beside the data (:mod:`metalens.data.cache`, written
once every check has passed), keyed on the sizes and modification times of what was read,
the decoding options and the classes read, so a later start maps them instead of decoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from metalens.config import opt
from metalens.data import cache as disk
from metalens.data.images import check_fits, decode_u8, image_shape, read_file
from metalens.data.sources import ImageSet, _folder_images, save_cache
from metalens.errors import DataError
from metalens.tasks.base import Split
from metalens.tasks.images import ImageFolder, ImageOptions, Plan, _channel_stats

__all__ = ["SPLITS", "DataNotFound", "published_split", "data_root", "Listing", "Source", "folder_source",
           "BenchmarkOptions", "Benchmark", "stamp_of", "file_stamp", "refuse_file_root"]

SPLITS: tuple[Split, ...] = ("train", "val", "test")
_SHOWN = 10  # a message names at most this many missing classes
_MEMORY_ENTRIES = 4  # decoded sources kept in memory (by cache key), beside the disk cache


class DataNotFound(DataError):
    """A benchmark's local copy is not where the family looks: nothing there to read (not a damaged copy)."""


# ------------------------------------------------------------------------------------------------
# Published splits and where the data is
# ------------------------------------------------------------------------------------------------
@functools.cache
def _split_text(name: str) -> str:
    return resources.files("metalens.tasks").joinpath("splits", f"{name}.json").read_text(encoding="utf-8")


def published_split(name: str) -> dict[str, Any]:
    """The published split ``name`` as shipped in ``metalens/tasks/splits/<name>.json`` (a fresh copy).

    ``"train"``, ``"val"`` and ``"test"`` hold the class lists (``tiered_imagenet``: a list per
    super-category; ``fc100``: CIFAR-100 super-classes); ``"about"`` says where they come from.

    >>> lists = published_split("mini_imagenet")
    >>> [len(lists[s]) for s in ("train", "val", "test")], lists["test"][0]
    ([64, 16, 20], 'n01930112')
    """
    try:
        return json.loads(_split_text(name))
    except FileNotFoundError:
        raise ValueError(f"no published split {name!r} in metalens/tasks/splits/") from None


def data_root(root: str, folder: str) -> tuple[Path, str]:
    """The path ``task.root`` names, and how it was named (for messages).

    ``''``: ``$METALENS_DATA/<folder>`` if ``METALENS_DATA`` is set, else ``../shared/data/<folder>``
    relative to the working directory.
    """
    if root:
        return Path(root).expanduser(), f"task.root={root!r}"
    env = os.environ.get("METALENS_DATA")
    if env:
        return Path(env) / folder, f"METALENS_DATA={env}"
    return Path("..") / "shared" / "data" / folder, f"the default ../shared/data/{folder}, relative to {os.getcwd()}"


# ------------------------------------------------------------------------------------------------
# What a local copy holds, and decoding it once
# ------------------------------------------------------------------------------------------------
Payload = bytes | np.ndarray  # an encoded image file, or raw RGB pixels uint8 [3, H, W] (CIFAR's records)


@dataclass(frozen=True)
class Listing:
    """The images of a local copy, before decoding: one entry per image of a class the family reads."""

    keys: list[str]  # class key of each image
    files: list[str]  # where each image comes from, for messages and the cache's index
    payloads: Callable[[], Iterable[tuple[int, Payload]]]  # (index into keys, payload), in any order, each once


@dataclass(frozen=True)
class Source:
    """A local copy as the cache knows it: what is read, its stamp, its layout, and how to list its images."""

    path: Path  # the folder or archive read (the decoded-image cache lives beside it)
    stamp: Any  # sizes and modification times of what is read (JSON): a change gives a new cache entry
    layout: str  # names the layout (part of the cache key)
    scan: Callable[[], Listing]  # the images (may read an archive's headers or a folder's names)


def file_stamp(path: Path) -> list[int]:
    """``[size, mtime_ns]`` of a file: what a cache entry is keyed on."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def refuse_file_root(path: Path, title: str, docs: str) -> None:
    """Refuse a root that is a file where a folder is read: an archive to extract, or a pickle never to open."""
    name = path.name.lower()
    if name.endswith((".pkl", ".pickle")):
        raise DataError(f"{path} is a Python pickle, which metalens never opens (loading one can run any code); "
                        f"lay out {title}'s images in a folder instead ({docs})")
    if name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        raise DataError(f"{path} is an archive; {title} is read from the folder of images it holds: extract it and "
                        f"point task.root at that folder ({docs})")
    raise DataError(f"{path} is a file; {title} is read from a folder of images: point task.root at it ({docs})")


def folder_source(root: Path, classes: dict[str, str], *, layout: str,
                  split_of: dict[str, str] | None = None) -> Source:
    """The images under folder ``root`` whose parent folder is named in ``classes`` (folder name -> class key).

    Images of other folders are left alone; hidden files and folders are skipped and symbolic
    links refused (as the ``images`` family reads a folder). With ``split_of`` (class key ->
    split), an image below a folder named ``train``, ``val`` or ``test`` that disagrees with its
    class's split is a :class:`DataError`: the copy follows another split.
    """
    keys, files = [], []
    for rel in _folder_images(root):
        parts = rel.split("/")
        if len(parts) < 2 or parts[-2] not in classes:
            continue
        key = classes[parts[-2]]
        if split_of is not None:
            said = [p for p in parts[:-2] if p in SPLITS]
            if said and said[-1] != split_of[key]:
                raise DataError(f"{root / rel} is in a {said[-1]}/ folder, but the published split puts class "
                                f"{parts[-2]} in {split_of[key]}: this copy follows another split; move the class's "
                                f"folder to {split_of[key]}/ (or drop the split folders)")
        keys.append(key)
        files.append(rel)
    stamp = [[rel, *file_stamp(root / rel)] for rel in files]

    def payloads() -> Iterable[tuple[int, Payload]]:
        for i, rel in enumerate(files):
            yield i, read_file(root / rel, follow=False, where=str(root / rel))

    listing = Listing(keys, files, payloads)
    return Source(root.resolve(), stamp, layout, lambda: listing)


def _decode(payload: Payload, where: str, *, height: int, width: int, channels: int, resample: str,
            fit: str) -> np.ndarray:
    """One image as ``uint8 [H, W]`` (grey) or ``[3, H, W]``, decoded exactly as :func:`load_image` decodes a file."""
    if isinstance(payload, np.ndarray):  # raw RGB pixels [3, h, w]
        if channels == 3 and payload.shape[1:] == (height, width):
            return payload  # what decode_u8 would return for this image saved losslessly
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(payload.transpose(1, 2, 0)), "RGB").save(buf, format="PNG")
        payload = buf.getvalue()
    return decode_u8(payload, height, resample, False, where=where, channels=channels, height=height, width=width,
                     fit=fit)


_MEMORY: OrderedDict[str, ImageSet] = OrderedDict()


def _recall(path: Path, entry: disk.CacheEntry) -> ImageSet | None:
    """The decoded images of ``entry``: kept in memory by this process, or mapped from the disk cache."""
    if entry.key in _MEMORY:
        _MEMORY.move_to_end(entry.key)
        return _MEMORY[entry.key]
    found = disk.load(path, entry)
    if found is None:
        return None
    array, meta = found
    counts = torch.tensor(meta["counts"], dtype=torch.int64)
    out = ImageSet(str(meta["name"]), tuple(meta["classes"]), torch.from_numpy(array),
                   torch.repeat_interleave(torch.arange(len(counts)), counts), tuple(meta["files"]), entry,
                   str(getattr(array, "filename", "") or "mapped"))
    _remember(out)
    return out


def _remember(images: ImageSet) -> None:
    if images.cache is not None:
        _MEMORY[images.cache.key] = images
        while len(_MEMORY) > _MEMORY_ENTRIES:
            _MEMORY.popitem(last=False)


def _decode_listing(listing: Listing, entry: disk.CacheEntry, name: str, *, height: int, width: int,
                    channels: int, resample: str, fit: str, where: str) -> ImageSet:
    """Decode every image of ``listing`` into one array, grouped by class key (then by file)."""
    n = len(listing.keys)
    check_fits(n, height, where=where, channels=channels, height=height, width=width)
    order = sorted(range(n), key=lambda i: (listing.keys[i], listing.files[i]))
    slot = np.empty(n, dtype=np.int64)
    slot[order] = np.arange(n)
    shape = (channels, height, width) if channels != 1 else (height, width)
    images = np.empty((n, *shape), dtype=np.uint8)
    done = np.zeros(n, dtype=bool)
    for i, payload in listing.payloads():
        images[slot[i]] = _decode(payload, listing.files[i], height=height, width=width, channels=channels,
                                  resample=resample, fit=fit)
        done[slot[i]] = True
    if not done.all():  # the source changed between listing and reading it
        lost = listing.files[order[int(np.argmin(done))]]
        raise DataError(f"{where}: {lost} was listed but could not be read again; the data changed while it was "
                        "read: try again")
    classes = sorted(set(listing.keys))
    index = {k: i for i, k in enumerate(classes)}
    labels = torch.tensor([index[listing.keys[i]] for i in order], dtype=torch.int64)
    out = ImageSet(name, tuple(classes), torch.from_numpy(images), labels,
                   tuple(listing.files[i] for i in order), entry)
    _remember(out)
    return out


# ------------------------------------------------------------------------------------------------
# The families' base
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkOptions(ImageOptions):
    """The options every benchmark family shares (each sets its own ``size``; colour by default)."""

    root: str = opt("", "the benchmark's folder (or archive) ('': $METALENS_DATA/<family folder>, else "
                        "../shared/data/<family folder>); see docs/benchmarks-data/")
    ways: int = opt(5, "classes per task (N)", ge=2)
    shots: int = opt(1, "support images per class (K)", ge=1)
    queries: int = opt(15, "query images per class", ge=1)
    channels: Literal[1, 3] = opt(3, "3: colour (the benchmarks' images); 1: grey, converted by luminance")
    resample: Literal["box", "lanczos"] = opt("box", "resizing filter: box (area average) or lanczos")
    fit: Literal["pad", "crop", "stretch"] = opt(
        "stretch", "an image of another aspect than height:width is stretched to it (as the benchmarks' published "
                   "84x84 versions were made), centre-cropped, or padded with black")


class Benchmark(ImageFolder):
    """Base of the benchmark families: a published split over a local copy, decoded and cached once."""

    TITLE: ClassVar[str]  # the benchmark's name in messages ("miniImageNet")
    FOLDER: ClassVar[str]  # its folder under $METALENS_DATA
    DOCS: ClassVar[str]  # the page that says how to lay out its data
    IMAGES_PER_CLASS: ClassVar[int | None] = None  # the most images a class of the benchmark has, where fixed

    # -- what each family says --------------------------------------------------------------------
    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        """The classes of each split of the benchmark's published split, as the family names them
        (``"<class>"``, or ``"<group>/<class>"`` where the benchmark has super-classes).

        >>> from metalens.tasks.cifar import FC100
        >>> {s: len(keys) for s, keys in FC100.published_classes().items()}
        {'train': 60, 'val': 20, 'test': 20}
        """
        raise NotImplementedError

    def _locate(self, path: Path, how: str) -> Source:
        """The local copy at ``path`` (named by ``how``); :class:`DataNotFound` if nothing is there."""
        raise NotImplementedError

    def _belongs(self) -> str:
        """Where the images of a missing class belong (the end of the message)."""
        raise NotImplementedError

    # -- ImageFolder's hooks -----------------------------------------------------------------------
    def _plan(self) -> Plan:
        c = self.config
        return Plan(c.root, (), "named", 0, 0, 0, {s: "" for s in SPLITS}, "none", c.size, c.resample, False,
                    channels=c.channels, height=c.height, width=c.width, fit=c.fit)

    def _more_classes(self, split: str) -> str:
        return f"the published {split} split of {self.TITLE} has no more"

    def _too_few(self, split: str, n: int) -> str:
        return (f"the {split} split of {self.TITLE} has {n} classes, fewer than ways = {self.config.ways}; lower "
                f"task.ways to at most {n}")

    def groups(self, split: Split = "train") -> list[str]:
        """The super-categories (tieredImageNet) or super-classes (CIFAR-100) with classes in ``split``, sorted;
        ``[]`` for a benchmark without them."""
        self._check_split(split)
        keys = [self._keys[i] for i in self._split_base[split].tolist()]
        return sorted({k.split("/", 1)[0] for k in keys if "/" in k})

    def _build(self, plan: Plan) -> None:
        c = self.config
        lists = self.published_classes()
        split_of = {k: s for s in SPLITS for k in lists[s]}
        if len(lists["train"]) < c.ways:  # val and test are checked when their tasks are drawn: a run may train
            raise DataError(self._too_few("train", len(lists["train"])))  # 30-way and be scored 5-way (Snell)
        path, how = data_root(c.root, self.FOLDER)
        source = self._locate(path, how)
        h, w = image_shape(plan.size, plan.height, plan.width)
        options = {"height": h, "width": w, "channels": plan.channels, "resample": plan.resample, "fit": plan.fit,
                   "invert": False, "layout": source.layout,
                   "classes": hashlib.sha256("\n".join(sorted(split_of)).encode()).hexdigest()[:16]}
        entry = disk.CacheEntry(disk.cache_key(source.path, source.stamp, options), str(source.path), options)
        data = _recall(source.path, entry)
        if data is None:
            listing = source.scan()
            self._check_classes(Counter(listing.keys), lists, source.path)
            data = _decode_listing(listing, entry, source.path.name, height=h, width=w, channels=plan.channels,
                                   resample=plan.resample, fit=plan.fit, where=str(source.path))
        counts = torch.bincount(data.labels, minlength=len(data.classes))
        self._check_classes(Counter(dict(zip(data.classes, counts.tolist()))), lists, source.path)

        self.root = source.path
        self.sources = (data.name,)
        self._keys = list(data.classes)
        self._images = data.images  # uint8 [n, 3, H, W] (or [n, H, W] grey), grouped by class
        members = torch.argsort(data.labels, stable=True)
        table = torch.zeros(len(self._keys), int(counts.max()), dtype=torch.int64)
        start = 0
        for i, n in enumerate(counts.tolist()):
            table[i, :n] = members[start: start + n]
            start += n
        self._class_images, self._counts = table, counts  # [classes, max images], [classes]
        index = {k: i for i, k in enumerate(self._keys)}
        self._split_base, self._split_rot, self._rotated = {}, {}, {}
        for s in SPLITS:
            base = torch.tensor(sorted(index[k] for k in lists[s]), dtype=torch.int64)
            self._split_base[s], self._split_rot[s], self._rotated[s] = base, torch.zeros_like(base), False
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        if c.normalize if c.normalize is not None else plan.channels == 3:
            train = torch.cat([table[i, : counts[i]] for i in self._split_base["train"].tolist()])
            self.mean, self.std = _channel_stats(self._images, train)
        save_cache(data)  # every check passed: keep the decoded images for the next start

    def _check_classes(self, counts: Counter[str], lists: dict[str, list[str]], where: Path) -> None:
        """Every class of the split is there, with at least shots + queries images (and no more than the
        benchmark has); checked on the listing, before anything is decoded."""
        c = self.config
        missing = [(s, k) for s in SPLITS for k in lists[s] if counts[k] == 0]
        total = sum(len(v) for v in lists.values())
        if len(missing) == total:
            raise DataNotFound(f"{where} holds none of the {total} classes of {self.TITLE}'s published split; "
                               f"{self._belongs()} ({self.DOCS})")
        if missing:
            shown = ", ".join(f"{k.rsplit('/', 1)[-1]} ({s})" for s, k in missing[:_SHOWN])
            more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
            raise DataError(f"{where} lacks {len(missing)} of the {total} classes of {self.TITLE}'s published "
                            f"split: {shown}{more}; {self._belongs()} ({self.DOCS})")
        most = self.IMAGES_PER_CLASS
        over = [k for s in SPLITS for k in lists[s] if most is not None and counts[k] > most]
        if over:
            raise DataError(f"{where} holds {counts[over[0]]} images of class {over[0].rsplit('/', 1)[-1]}, more than "
                            f"the {most} of {self.TITLE}: point task.root at {self.TITLE} itself ({self.DOCS})")
        need = c.shots + c.queries
        for s in SPLITS:
            short = [k for k in lists[s] if counts[k] < need]
            if short:
                fewest = min(counts[k] for k in short)
                raise DataError(
                    f"the {s} split has {len(short)} of its {len(lists[s])} classes with fewer than shots + queries "
                    f"= {need} images (e.g. {short[0].rsplit('/', 1)[-1]!r} has {counts[short[0]]}); lower "
                    f"task.shots + task.queries to at most {fewest}")

    def _absent(self, path: Path, how: str, what: str) -> DataNotFound:
        """The error for a copy that is not there: where metalens looked, and ``what`` to put there."""
        return DataNotFound(f"no {self.TITLE} at {path.resolve()} (from {how}); {what} ({self.DOCS}), or point "
                            "task.root at your copy")


def stamp_of(paths: Sequence[Path]) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of each file: what a cache entry of these files is keyed on."""
    return [[p.name, *file_stamp(p)] for p in paths]
