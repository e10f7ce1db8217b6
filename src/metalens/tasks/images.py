"""Few-shot image classification from a folder or zip files laid out as ``<group>/<class>/*.png``.

Two families:

- ``images``: any dataset in that layout (Omniglot's ``<alphabet>/<character>/``), read
  straight from a folder or from zip files; classes split into disjoint meta-train /
  validation / test sets by a seed (over classes or over whole groups) or by naming the
  groups of each split.
- ``omniglot``: the same, preconfigured for Omniglot (Lake et al. 2015) and its standard
  protocols (``protocol``): ``small`` (the default: the two "minimal" background sets
  shipped in ``../shared/data/omniglot``), ``lake``, ``finn`` and ``vinyals`` (the full
  dataset, as folders or as the official zips; ``download=true`` fetches the zips and
  verifies their MD5 checksums).

An N-way K-shot task draws ``ways`` classes of the split, then ``shots + queries``
distinct images of each class; the support set holds ``shots`` images per class and
the query set ``queries``, each in a random order, labelled ``0..N-1`` in the order the
classes were drawn. Images are ``[1, size, size]`` float32 in ``[0, 1]`` with ink as 1
(:func:`load_image`). With ``rotations`` the rotations of every class by 90, 180 and 270
degrees are classes of their own (Santoro et al. 2016; Vinyals et al. 2016), in the
meta-train split only (``train``) or in every split (``all``); the rotations of a
character always fall in the same split as the character.

Where the data is. ``root`` names a folder, or one zip file. Left empty it is
``$METALENS_DATA/omniglot`` when the environment variable ``METALENS_DATA`` is set
(a folder holding one folder per dataset), else ``../shared/data/omniglot`` relative
to the working directory (where the repository keeps the Omniglot minimal sets).
A source (the root, or each of ``sources`` inside it) is a zip file or a folder; an
image's class is its parent folder and its group the folder above that (anything above
is ignored, so ``images_background/<alphabet>/<character>/x.png`` and
``<alphabet>/<character>/x.png`` both work). A folder with no images in it stands for
the zip files directly inside it. A class found in several sources (Omniglot's Greek and
Latin are in both minimal sets) is read from the first.

Performance. Every source is decoded once into a ``uint8`` tensor (cached in memory
per file, size and modification time), so that sampling an episode is pure indexing;
rotations are applied with ``torch.rot90`` to the drawn images. Resizing uses Pillow's
``BOX`` filter by default: the exact area average, i.e. each output pixel is the
fraction of its area covered by ink (no ringing, unlike ``LANCZOS``, which is offered
as ``resample="lanczos"``).

Safety. Zip members are read in memory; an archive with a member whose path could
escape a folder (absolute, ``..``, a drive letter, a symlink) is refused as a whole,
whether read or extracted (:func:`extract_zip`, which also never leaves a half-written
folder). Nothing is ever downloaded unless asked for (:func:`download_omniglot`,
``omniglot`` with ``download=true``); downloads are checked against their MD5 before
they are moved into place.

>>> import io, tempfile, zipfile
>>> from PIL import Image, ImageDraw
>>> def png(i):  # a dark stroke on white, drawn differently for every class
...     im = Image.new("L", (105, 105), 255)
...     ImageDraw.Draw(im).line([(10, 10 + 8 * i), (95, 95 - 8 * i)], fill=0, width=9)
...     buf = io.BytesIO(); im.save(buf, format="PNG"); return buf.getvalue()
>>> tmp = tempfile.mkdtemp()
>>> with zipfile.ZipFile(f"{tmp}/toy.zip", "w") as z:
...     for g in range(2):
...         for c in range(5):
...             for k in range(4):
...                 z.writestr(f"toy/group{g}/class{c}/{k}.png", png(5 * g + c))
>>> family = ImageFolder(ImageFolder.Config(root=f"{tmp}/toy.zip", ways=3, shots=1, queries=2,
...                                         split="named", train_groups="group0", test_groups="group1"))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.support_y.shape, ep.query_x.shape
(torch.Size([4, 3, 1, 28, 28]), torch.Size([4, 3]), torch.Size([4, 6, 1, 28, 28]))
>>> family.classes("test")[:2]
['group1/class0', 'group1/class1']
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalens import rng
from metalens.config import opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = [
    "load_image", "ImageSet", "read_images", "ImageFolder", "Omniglot", "UnsafeArchiveError",
    "check_archive", "extract_zip", "download", "download_omniglot", "md5sum", "default_root",
    "OMNIGLOT_FILES", "OMNIGLOT_URL", "OMNIGLOT_PROTOCOLS", "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
RESAMPLE = {"box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
SPLITS: tuple[Split, ...] = ("train", "val", "test")
_MAX_MEMBER_BYTES = 64 << 20  # refuse single images larger than this (zip bombs)
_SPLIT_KEY = 0x5B17  # seeds the class split: rng.derive_seed(split_seed, _SPLIT_KEY), apart from rng.Stream

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
# name -> (bytes, md5) of the official zips (the MD5s published with torchvision's Omniglot
# and, for the minimal sets, in ../shared/data/omniglot/README.md).
OMNIGLOT_FILES: dict[str, tuple[int | None, str]] = {
    "images_background": (None, "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (None, "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1": (1_319_022, "e704a628b5459e08445c13499850abc4"),
    "images_background_small2": (1_580_917, "b75a71a51d3b13f821f212756fe481fd"),
}


# ------------------------------------------------------------------------------------------------
# One image -> the model's input
# ------------------------------------------------------------------------------------------------
def _decode_u8(src: str | os.PathLike | bytes | BinaryIO, size: int, resample: str, invert: bool) -> np.ndarray:
    """Decode one image to ``uint8 [size, size]`` with ink high (255) when ``invert``.

    Transparent pixels are composited onto white; a non-square image is padded to a square
    with the background colour (centred) before resizing, so strokes keep their aspect.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    with Image.open(src) as im:
        im.load()
        if "A" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("L")  # 1-bit Omniglot: 0 (ink) or 255
        w, h = im.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("L", (side, side), 255 if invert else 0)
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            im = canvas
        if im.size != (size, size):
            im = im.resize((size, size), resample=RESAMPLE[resample])
        a = np.asarray(im, dtype=np.uint8)
    return 255 - a if invert else a.copy()


def _to_float(u8: Tensor) -> Tensor:
    """``uint8`` images -> float32 in ``[0, 1]`` (the one conversion used everywhere)."""
    return u8.to(torch.float32).div_(255.0)


def load_image(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    size: int = 28,
    resample: Literal["box", "lanczos"] = "box",
    invert: bool = True,
) -> Tensor:
    """One image file (a path, or its bytes) as the models' input: ``[1, size, size]`` float32.

    The image is converted to grey, padded to a square, resized to ``size x size`` (``box``:
    the exact area average) and scaled to ``[0, 1]``; ``invert=True`` (dark ink on a light
    background, as in Omniglot) makes ink 1 and background 0. The image families decode
    their images with this very function, so a user's own drawing fed through it matches
    what a learner saw in training. Add a task and a point dimension before ``predict``:
    ``x[None, None]`` is ``[1, 1, 1, size, size]``.

    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (105, 105), 255).save(buf, format="PNG")
    >>> x = load_image(buf.getvalue())
    >>> x.shape, x.dtype, float(x.max())  # white paper: no ink
    (torch.Size([1, 28, 28]), torch.float32, 0.0)
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    return _to_float(torch.from_numpy(_decode_u8(path_or_bytes, size, resample, invert)))[None]


# ------------------------------------------------------------------------------------------------
# Archives: safe names, safe extraction
# ------------------------------------------------------------------------------------------------
class UnsafeArchiveError(ValueError):
    """An archive holds a member whose path could escape the folder it is extracted into."""


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
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
        why = _unsafe_reason(info)
        if why is not None:
            raise UnsafeArchiveError(
                f"refusing the archive {where or archive.filename}: member {info.filename!r} {why}; "
                "nothing was read or written from it")


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the zip file ``archive`` into the new folder ``dest``, all or nothing.

    Every member name is checked before anything is written (:class:`UnsafeArchiveError`
    for a member that could escape ``dest``); the members are written into a temporary
    folder beside ``dest`` that is renamed to ``dest`` only when all of them are there, and
    removed on any error. ``dest`` must not exist yet. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; extract_zip writes a new folder only")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        check_archive(z, where=str(archive))
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
                with z.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


# ------------------------------------------------------------------------------------------------
# Downloads (only when asked for)
# ------------------------------------------------------------------------------------------------
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
    binary stream (default ``urllib.request.urlopen``; ``file://`` URLs work too).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, (opener or urllib.request.urlopen)(url) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != md5.lower():
            raise ValueError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}; "
                             f"nothing was written to {dest}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def download_omniglot(
    root: str | os.PathLike,
    names: Sequence[str] = ("images_background", "images_evaluation"),
    *,
    base_url: str | None = None,
    opener: Callable[[str], Any] | None = None,
) -> list[Path]:
    """Download the official Omniglot zips ``names`` into ``root`` (MD5-checked; see :func:`download`).

    ``base_url`` defaults to :data:`OMNIGLOT_URL` (Lake's repository); a mirror, or a local
    ``file://`` folder, works the same.

    A zip already in ``root`` is kept if its checksum is right; a wrong one raises (delete
    it to fetch it again). Returns the paths of the zips.
    """
    root = Path(root)
    out = []
    for name in names:
        if name not in OMNIGLOT_FILES:
            raise ValueError(f"unknown Omniglot file {name!r}; known: {', '.join(OMNIGLOT_FILES)}")
        md5 = OMNIGLOT_FILES[name][1]
        path = root / f"{name}.zip"
        if path.exists():
            if md5sum(path) != md5:
                raise ValueError(f"{path} exists but its md5 is not the published {md5}; delete it to download again")
        else:
            download(f"{(base_url or OMNIGLOT_URL).rstrip('/')}/{name}.zip", path, md5=md5, opener=opener)
        out.append(path)
    return out


# ------------------------------------------------------------------------------------------------
# Reading a source (a folder or a zip file) into memory, once
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSet:
    """The decoded images of one source.

    ``classes``: class keys ``"<group>/<class>"``, sorted; ``images``: ``uint8 [n, size, size]``
    with ink high; ``labels``: ``int64 [n]``, the index in ``classes`` of each image;
    ``files``: where each image came from (member or relative path). Images are in the
    order of (class key, file name). Treat the tensors as read-only: they are shared.
    """

    name: str
    classes: tuple[str, ...]
    images: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    files: tuple[str, ...] = field(repr=False)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(sorted({k.split("/", 1)[0] for k in self.classes}))


def _key_of(rel: str) -> str | None:
    """``"<group>/<class>"`` of an image at relative path ``rel``, or None to skip the file."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not rel.lower().endswith(IMAGE_SUFFIXES) or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if len(parts) < 3:
        raise ValueError(f"image {rel!r} is not in a <group>/<class>/ folder; the layout is <group>/<class>/*.png")
    return f"{parts[-3]}/{parts[-2]}"


def _folder_images(path: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(path):  # never follows symlinked folders
        dirnames.sort()
        rel = Path(dirpath).relative_to(path)
        found += [(rel / f).as_posix() for f in sorted(filenames) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def read_images(path: str | os.PathLike, *, size: int = 28, resample: str = "box", invert: bool = True) -> ImageSet:
    """Decode every image of one source, a zip file or a folder, laid out as ``<group>/<class>/*``.

    Cached in memory per (path, size, modification time, options): building many families on
    the same data decodes it once. Raises :class:`UnsafeArchiveError` for a zip with a
    member that could escape its folder, ``ValueError`` for images outside a class folder.
    """
    path = Path(path).resolve()
    if path.is_file():
        stamp: Any = _stamp(path)
    elif path.is_dir():
        stamp = tuple((f, *_stamp(path / f)) for f in _folder_images(path))
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    return _read_images_cached(str(path), stamp, size, resample, invert)


@functools.lru_cache(maxsize=16)
def _read_images_cached(path_str: str, stamp: Any, size: int, resample: str, invert: bool) -> ImageSet:
    path = Path(path_str)
    entries: list[tuple[str, str, Callable[[], bytes]]] = []  # (key, file, read)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is neither a folder nor a zip file")
        z = zipfile.ZipFile(path)
        check_archive(z, where=str(path))
        for info in z.infolist():
            if info.is_dir():
                continue
            key = _key_of(info.filename)
            if key is None:
                continue
            if info.file_size > _MAX_MEMBER_BYTES:
                raise ValueError(f"refusing {path}: member {info.filename!r} is {info.file_size} bytes uncompressed")
            entries.append((key, info.filename, functools.partial(z.read, info)))
        name = path.stem
    else:
        z = None
        for rel, *_ in stamp:
            key = _key_of(rel)
            if key is not None:
                entries.append((key, rel, (path / rel).read_bytes))
        name = path.name
    try:
        entries.sort(key=lambda e: (e[0], e[1]))
        if not entries:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {path}")
        classes = tuple(sorted({k for k, _, _ in entries}))
        index = {k: i for i, k in enumerate(classes)}
        images = np.empty((len(entries), size, size), dtype=np.uint8)
        for i, (_, f, read) in enumerate(entries):
            try:
                images[i] = _decode_u8(read(), size, resample, invert)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot decode image {f!r} in {path}: {e}") from None
    finally:
        if z is not None:
            z.close()
    labels = torch.tensor([index[k] for k, _, _ in entries], dtype=torch.int64)
    return ImageSet(name, classes, torch.from_numpy(images), labels, tuple(f for _, f, _ in entries))


def default_root() -> Path:
    """``$METALENS_DATA/omniglot`` if ``METALENS_DATA`` is set, else ``../shared/data/omniglot`` (from the CWD)."""
    env = os.environ.get("METALENS_DATA")
    return Path(env) / "omniglot" if env else Path("..") / "shared" / "data" / "omniglot"


def _resolve_root(root: str) -> Path:
    path = Path(root).expanduser() if root else default_root()
    if not path.exists():
        how = (f"task.root={root!r}" if root else
               ("METALENS_DATA=" + os.environ["METALENS_DATA"] if os.environ.get("METALENS_DATA")
                else "the default ../shared/data/omniglot, relative to the working directory " + os.getcwd()))
        raise ValueError(
            f"no image data at {path.resolve()} (from {how}); point the family at your data with "
            "--set task.root=/path/to/folder-or-zip, or set METALENS_DATA to a folder holding omniglot/"
            " (omniglot can also fetch the official zips with --set task.download=true)")
    return path


def _source_paths(root: Path, sources: Sequence[str]) -> list[Path]:
    """The files or folders to read: ``root/<name>`` or ``root/<name>.zip`` for each name, or the root itself."""
    if not sources:
        if root.is_dir() and not _folder_images(root):
            zips = sorted(p for p in root.iterdir() if p.suffix.lower() == ".zip" and p.is_file())
            if not zips:
                raise ValueError(f"{root} holds neither images in <group>/<class>/ folders nor zip files")
            return zips
        return [root]
    out = []
    for name in sources:
        cands = [root / name, root / f"{name}.zip"]
        found = next((p for p in cands if p.exists()), None)
        if found is None:
            have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise ValueError(f"source {name!r} not found: looked for {cands[0]} and {cands[1]}; "
                             f"{root} holds {', '.join(have) or 'nothing'}")
        out.append(found)
    return out


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def _size(value: float, n: int, name: str) -> int:
    """``value < 1``: a fraction of ``n``; ``>= 1``: a count (scikit-learn's test_size convention)."""
    if value < 1:
        return int(round(value * n))
    if not float(value).is_integer():
        raise ValueError(f"{name} >= 1 is a number of classes or groups and must be whole, got {value}")
    return int(value)


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _named_split(groups: dict[str, set[str]], lists: dict[str, list[str]]) -> dict[str, list[str]]:
    """Assign groups to splits by name patterns (``group`` or ``source/group``, shell wildcards).

    A split whose only pattern is ``*`` gets every group no other split names. A group named
    by two splits, or a pattern that names no group, is an error.
    """
    def matches(pattern: str, group: str) -> bool:
        if "/" in pattern:
            src, grp = pattern.split("/", 1)
            return fnmatch.fnmatchcase(group, grp) and any(fnmatch.fnmatchcase(s, src) for s in groups[group])
        return fnmatch.fnmatchcase(group, pattern)

    rest = [s for s, pats in lists.items() if pats == ["*"]]
    if len(rest) > 1:
        raise ValueError(f"only one split may be '*' (the groups no other split names), got {', '.join(rest)}")
    out: dict[str, list[str]] = {s: [] for s in lists}
    owner: dict[str, str] = {}
    for split, pats in lists.items():
        if split in rest:
            continue
        for pat in pats:
            hit = [g for g in sorted(groups) if matches(pat, g)]
            if not hit:
                raise ValueError(f"{split}_groups: {pat!r} names no group; groups: {', '.join(sorted(groups))}")
            for g in hit:
                if owner.get(g, split) != split:
                    raise ValueError(f"group {g!r} is named by both {owner[g]}_groups and {split}_groups; "
                                     "the splits must be disjoint")
                owner[g] = split
    for g in sorted(groups):
        if g in owner:
            out[owner[g]].append(g)
        elif rest:
            out[rest[0]].append(g)
    return out


@dataclass(frozen=True)
class _Plan:
    """A resolved description of what to read and how to split it."""

    root: str
    sources: tuple[str, ...]
    split: str
    split_seed: int
    val_size: float
    test_size: float
    groups: dict[str, str]  # split -> comma-separated patterns ("named")
    rotations: str
    size: int
    resample: str
    invert: bool


# ------------------------------------------------------------------------------------------------
# The families
# ------------------------------------------------------------------------------------------------
def _check_common(c: Any) -> None:
    if c.ways < 2:
        raise ValueError(f"ways must be >= 2, got {c.ways}")
    if c.shots < 1:
        raise ValueError(f"shots must be >= 1, got {c.shots}")
    if c.queries < 1:
        raise ValueError(f"queries must be >= 1, got {c.queries}")
    if c.rotations not in ("none", "train", "all"):
        raise ValueError(f"rotations must be 'none', 'train' or 'all', got {c.rotations!r}")
    if not isinstance(c.root, str):
        raise ValueError(f"root must be a path (a string), got {c.root!r}")
    if c.split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {c.split_seed}")


@TASKS.register("images")
class ImageFolder(TaskFamily):
    """N-way K-shot classification of images laid out as <group>/<class>/*.png (a folder or zips)."""

    @dataclass(frozen=True)
    class Config:
        root: str = opt("", "a folder or a zip file ('': $METALENS_DATA/omniglot, else ../shared/data/omniglot)")
        sources: str = opt("", "comma-separated zips or folders inside root to read ('': root itself; a "
                               "folder without images: every zip in it)")
        ways: int = opt(5, "classes per task (N)")
        shots: int = opt(1, "support images per class (K)")
        queries: int = opt(15, "query images per class")
        split: Literal["class", "group", "named"] = opt(
            "class", "how classes are split into train/val/test: by a seed over classes (class) or over "
                     "whole groups (group), or by the groups each split names (named)")
        split_seed: int = opt(0, "seed of the random split (split = class or group)")
        val_size: float = opt(0.1, "class/group split: validation classes or groups, a fraction (< 1) or a count")
        test_size: float = opt(0.2, "class/group split: test classes or groups, a fraction (< 1) or a count")
        train_groups: str = opt("", "named split: comma-separated groups (or source/group, wildcards) of "
                                    "meta-train; '*' alone: every group no other split names")
        val_groups: str = opt("", "named split: the validation groups (as train_groups)")
        test_groups: str = opt("", "named split: the test groups (as train_groups)")
        rotations: Literal["none", "train", "all"] = opt(
            "none", "rotations by 90/180/270 degrees as new classes: none, meta-train only, or every split")
        size: int = opt(28, "images are resized to size x size")
        resample: Literal["box", "lanczos"] = opt("box", "resizing filter: box (area average) or lanczos")
        invert: bool = opt(True, "dark ink on light paper: invert so that ink is 1")

        def __post_init__(self) -> None:
            _check_common(self)
            if self.split not in ("class", "group", "named"):
                raise ValueError(f"split must be 'class', 'group' or 'named', got {self.split!r}")
            for name in ("val_size", "test_size"):
                v = getattr(self, name)
                if not v >= 0:
                    raise ValueError(f"{name} must be >= 0 (a fraction < 1 or a count), got {v}")
                if v >= 1 and not float(v).is_integer():
                    raise ValueError(f"{name} >= 1 is a count and must be whole, got {v}")
            if self.val_size < 1 and self.test_size < 1 and self.val_size + self.test_size >= 1:
                raise ValueError(f"val_size + test_size must leave classes for meta-training, got "
                                 f"{self.val_size} + {self.test_size}")
            if self.size < 1:
                raise ValueError(f"size must be >= 1, got {self.size}")
            if self.resample not in RESAMPLE:
                raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {self.resample!r}")
            for name in ("sources", "train_groups", "val_groups", "test_groups"):
                if not isinstance(getattr(self, name), str):
                    raise ValueError(f"{name} must be a comma-separated string, got {getattr(self, name)!r}")
            if self.split == "named" and not (self.train_groups.strip() and self.test_groups.strip()):
                raise ValueError("split = 'named' needs train_groups and test_groups (e.g. train_groups='*' "
                                 "test_groups='Tagalog'); val_groups may be empty")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self._build(self._plan())

    # -- what to read and how to split it (Omniglot overrides this) -------------------------------
    def _plan(self) -> _Plan:
        c = self.config
        return _Plan(c.root, tuple(_patterns(c.sources)), c.split, c.split_seed, c.val_size, c.test_size,
                     {"train": c.train_groups, "val": c.val_groups, "test": c.test_groups},
                     c.rotations, c.size, c.resample, c.invert)

    def _build(self, plan: _Plan) -> None:
        c = self.config
        root = _resolve_root(plan.root)
        sets = [read_images(p, size=plan.size, resample=plan.resample, invert=plan.invert)
                for p in _source_paths(root, plan.sources)]
        self.root = root
        self.sources = tuple(s.name for s in sets)
        # merge the sources: the first source that has a class provides its images
        keys: list[str] = []
        images: list[Tensor] = []
        members: list[Tensor] = []  # image indices of each class
        groups: dict[str, set[str]] = {}  # group -> names of the sources it appears in
        seen: set[str] = set()
        n_images = 0
        for s in sets:
            for i, k in enumerate(s.classes):
                groups.setdefault(k.split("/", 1)[0], set()).add(s.name)
                if k in seen:
                    continue
                seen.add(k)
                idx = (s.labels == i).nonzero().flatten()
                members.append(torch.arange(n_images, n_images + len(idx)))
                images.append(s.images[idx])
                keys.append(k)
                n_images += len(idx)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = [keys[i] for i in order]
        self._images = torch.cat(images)  # uint8 [n_images, size, size], ink high
        counts = torch.tensor([len(members[i]) for i in order])
        table = torch.zeros(len(order), int(counts.max()), dtype=torch.int64)
        for row, i in enumerate(order):
            table[row, : len(members[i])] = members[i]
        self._class_images, self._counts = table, counts  # [n_classes, max images], [n_classes]
        group_of = [k.split("/", 1)[0] for k in self._keys]

        # split the (base) classes
        if plan.split == "named":
            lists = {s: _patterns(plan.groups[s]) for s in SPLITS}
            by_group = _named_split(groups, lists)
            split_classes = {s: [i for i, g in enumerate(group_of) if g in set(by_group[s])] for s in SPLITS}
        else:
            units = sorted(groups) if plan.split == "group" else list(self._keys)
            n = len(units)
            n_val = _size(plan.val_size, n, "val_size")
            n_test = _size(plan.test_size, n, "test_size")
            if n_val + n_test >= n:
                what = "groups" if plan.split == "group" else "classes"
                raise ValueError(f"val_size and test_size take {n_val} + {n_test} of the {n} {what}, "
                                 "leaving none for meta-training")
            g = torch.Generator().manual_seed(rng.derive_seed(plan.split_seed, _SPLIT_KEY))
            perm = torch.randperm(n, generator=g).tolist()
            part = {"test": perm[:n_test], "val": perm[n_test: n_test + n_val], "train": perm[n_test + n_val:]}
            if plan.split == "group":
                chosen = {s: {units[i] for i in part[s]} for s in SPLITS}
                split_classes = {s: [i for i, g_ in enumerate(group_of) if g_ in chosen[s]] for s in SPLITS}
            else:
                split_classes = {s: sorted(part[s]) for s in SPLITS}

        # with rotations: (base class, quarter turns) pairs
        self._split_base: dict[str, Tensor] = {}  # [C] base class of each class of the split
        self._split_rot: dict[str, Tensor] = {}  # [C] its quarter turns (0..3)
        self._rotated: dict[str, bool] = {}
        for s in SPLITS:
            base = torch.tensor(split_classes[s], dtype=torch.int64)
            turns = 4 if plan.rotations == "all" or (plan.rotations == "train" and s == "train") else 1
            self._split_base[s] = base.repeat_interleave(turns)
            self._split_rot[s] = torch.arange(turns).repeat(len(base))
            self._rotated[s] = turns == 4
        need = c.shots + c.queries
        used = torch.cat([self._split_base[s] for s in SPLITS]).unique()
        short = [i for i in used.tolist() if self._counts[i] < need]
        if short:
            raise ValueError(f"{len(short)} classes have fewer than shots + queries = {need} images (e.g. "
                             f"{self._keys[short[0]]!r} has {int(self._counts[short[0]])}); lower shots or queries")
        # the splits the trainer and the evaluator use must hold a task; val is checked when sampled
        for s in ("train", "test"):
            n = len(self._split_base[s])
            if n < c.ways:
                raise ValueError(f"the {s} split has {n} classes, fewer than ways = {c.ways}")

    # -- what is in each split ---------------------------------------------------------------------
    def classes(self, split: Split = "train") -> list[str]:
        """The classes of ``split``: ``"<group>/<class>"``, with ``"/rot090"`` etc. where rotations apply."""
        self._check_split(split)
        keys = [self._keys[i] for i in self._split_base[split].tolist()]
        if not self._rotated[split]:
            return keys
        return [f"{k}/rot{90 * r:03d}" for k, r in zip(keys, self._split_rot[split].tolist())]

    def groups(self, split: Split = "train") -> list[str]:
        """The groups (alphabets) that have classes in ``split``, sorted."""
        self._check_split(split)
        return sorted({self._keys[i].split("/", 1)[0] for i in self._split_base[split].tolist()})

    def n_images(self, split: Split = "train") -> int:
        """Distinct images (before rotation) of the classes of ``split``."""
        self._check_split(split)
        return int(self._counts[self._split_base[split].unique()].sum())

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    # -- the contract -------------------------------------------------------------------------------
    @property
    def spec(self) -> TaskSpec:
        s = self._images.shape[-1]
        return TaskSpec(kind="classification", x_shape=(1, s, s), num_classes=self.config.ways,
                        train_classes=len(self._split_base["train"]))

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` N-way K-shot tasks from the classes of ``split``.

        Returns ``support_x [T, N*K, 1, s, s]``, ``support_y [T, N*K]`` (int64),
        ``query_x [T, N*Q, 1, s, s]``, ``query_y [T, N*Q]``, each set in a random order.
        Meta-training tasks also carry ``classes [T, N]``, the index in :meth:`classes`
        of each local label's class (rotations count as classes).
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self._check_split(split)
        c = self.config
        g, T, N, K, Q = generator, n_tasks, c.ways, c.shots, c.queries
        base, rot = self._split_base[split], self._split_rot[split]
        C = len(base)
        if C < N:
            raise ValueError(f"the {split} split has {C} classes, fewer than ways = {N}"
                             + ("; set val_size or val_groups to have a validation split" if C == 0 else ""))
        pick = torch.argsort(torch.rand(T, C, generator=g), dim=1)[:, :N]  # [T, N] classes of each task
        cls, turns = base[pick], rot[pick]  # [T, N]
        M = self._class_images.shape[1]
        keys = torch.rand(T, N, M, generator=g)
        keys = keys.masked_fill(torch.arange(M) >= self._counts[cls][..., None], 2.0)  # padding sorts last
        slots = torch.argsort(keys, dim=2)[..., : K + Q]  # [T, N, K+Q] distinct images of each class
        idx = self._class_images[cls[..., None], slots]  # [T, N, K+Q]
        x = self._images[idx]  # uint8 [T, N, K+Q, s, s]
        for r in (1, 2, 3):
            sel = turns == r
            if bool(sel.any()):
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = _to_float(x)[:, :, :, None]  # [T, N, K+Q, 1, s, s]

        def shuffled(part: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
            y = torch.arange(N).repeat_interleave(per_class).expand(T, -1)  # [T, P] class-major
            xs = part.reshape(T, N * per_class, *part.shape[3:])
            perm = torch.argsort(torch.rand(T, N * per_class, generator=g), dim=1)
            return xs[torch.arange(T)[:, None], perm], y.gather(1, perm)

        sx, sy = shuffled(x[:, :, :K], K)
        qx, qy = shuffled(x[:, :, K:], Q)
        return Episode(sx, sy, qx, qy, num_classes=N, classes=pick if split == "train" else None)


OMNIGLOT_PROTOCOLS: dict[str, dict[str, Any]] = {
    # the protocol on the two minimal sets: meta-train on small1, test on the alphabets of
    # small2 that are not in small1 (Japanese (katakana), Sanskrit, Tagalog)
    "small": {"sources": ("images_background_small1", "images_background_small2"), "split": "named",
              "groups": {"train": "images_background_small1/*", "val": "", "test": "*"}},
    # Lake et al. (2015): background set (30 alphabets, 964 characters) vs evaluation set (20, 659)
    "lake": {"sources": ("images_background", "images_evaluation"), "split": "named",
             "groups": {"train": "images_background/*", "val": "", "test": "images_evaluation/*"}},
    # Finn et al. (2017): all 1623 characters, 1200 for meta-training (100 of them held out for
    # validation, as in their code) and 423 for test, drawn by split_seed
    "finn": {"sources": ("images_background", "images_evaluation"), "split": "class",
             "val_size": 100, "test_size": 423},
    # Vinyals et al. (2016) sizes, 1028 / 172 / 423 characters, drawn by split_seed; the published
    # lists (whole alphabets; Snell et al.'s splits/vinyals/*.txt) are not shipped here: name their
    # alphabets with the `images` family's named split to use them exactly
    "vinyals": {"sources": ("images_background", "images_evaluation"), "split": "class",
                "val_size": 172, "test_size": 423},
}


@TASKS.register("omniglot")
class Omniglot(ImageFolder):
    """Omniglot N-way K-shot (Lake et al. 2015) with the standard protocols; rotations as new classes."""

    @dataclass(frozen=True)
    class Config:
        root: str = opt("", "folder with the Omniglot zips or their folders ('': $METALENS_DATA/omniglot, "
                            "else ../shared/data/omniglot)")
        protocol: Literal["small", "lake", "finn", "vinyals"] = opt(
            "small", "small: train on images_background_small1, test on the small2-only alphabets; lake: "
                     "background vs evaluation set; finn: 1100/100/423 characters; vinyals: 1028/172/423")
        ways: int = opt(5, "characters per task (N)")
        shots: int = opt(1, "support images per character (K)")
        queries: int = opt(15, "query images per character (shots + queries <= 20)")
        rotations: Literal["none", "train", "all"] = opt(
            "train", "rotations by 90/180/270 degrees as new classes: none, meta-train only, or every split")
        split_seed: int = opt(0, "seed of the character split of the finn and vinyals protocols")
        download: bool = opt(False, "fetch the protocol's official zips into root if missing (MD5-checked)")

        def __post_init__(self) -> None:
            _check_common(self)
            if self.protocol not in OMNIGLOT_PROTOCOLS:
                raise ValueError(f"protocol must be one of {', '.join(OMNIGLOT_PROTOCOLS)}, got {self.protocol!r}")

    def _plan(self) -> _Plan:
        c = self.config
        p = OMNIGLOT_PROTOCOLS[c.protocol]
        if c.download:
            root = Path(c.root).expanduser() if c.root else default_root()
            missing = [s for s in p["sources"] if not (root / s).exists() and not (root / f"{s}.zip").exists()]
            if missing:
                download_omniglot(root, missing)
        else:
            root = _resolve_root(c.root)
            missing = [s for s in p["sources"] if not (root / s).exists() and not (root / f"{s}.zip").exists()]
            if missing:
                raise ValueError(
                    f"the {c.protocol!r} protocol reads {' and '.join(p['sources'])} (zips or folders) from "
                    f"{root.resolve()}, which lacks {', '.join(missing)}; add --set task.download=true to fetch "
                    "the official zips (MD5-checked), or point task.root at a folder that has them")
        groups = p.get("groups", {"train": "", "val": "", "test": ""})
        return _Plan(c.root, p["sources"], p["split"], c.split_seed, p.get("val_size", 0), p.get("test_size", 0),
                     groups, c.rotations, 28, "box", True)
