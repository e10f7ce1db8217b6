"""Reading an image source, a zip file or a folder laid out as ``<group>/<class>/*.png``, into memory once.

A source is a zip file or a folder; an image's class is its parent folder and its group
the folder above that (anything above is ignored, so ``images_background/<alphabet>/
<character>/x.png`` and ``<alphabet>/<character>/x.png`` both work). Hidden files and
folders (``.DS_Store``) and macOS's ``__MACOSX/`` are skipped; files that are not images
(:data:`~metalens.data.images.IMAGE_SUFFIXES`) are ignored.

Where the data is (:func:`resolve_root`, :func:`source_paths`). A root names a folder or
one zip file. Left empty it is ``$METALENS_DATA/omniglot`` when the environment variable
``METALENS_DATA`` is set (a folder holding one folder per dataset), else
``../shared/data/omniglot`` relative to the working directory (where the repository
keeps the Omniglot minimal sets). A folder with no images in it stands for the zip files
directly inside it that hold images; zips without images (Omniglot's
``strokes_*.zip``, pen trajectories as text) are skipped, and it is an error only if none
holds images. A zip that cannot be read is an error, not skipped.

Links. metalens follows the paths it is given (the root, each named source) but never a
symbolic link it finds inside a source folder: a linked class or group folder, or a
linked image file, is refused with a :class:`~metalens.errors.DataError` naming the link
(its target could be anything, anywhere).

Performance. Every source is decoded once into a ``uint8`` tensor, cached in memory per
path, size, modification time and options, so that building many families on the same
data decodes it once and sampling an episode is pure indexing; and on disk, as a
memory-mapped NumPy array beside the data (:mod:`metalens.data.cache`), so that a later
process maps it instead of decoding. Before decoding, the memory the decoded images need
is checked against the machine's (:func:`~metalens.data.images.check_fits`).
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metalens.data import cache as disk
from metalens.data.archives import check_archive, open_zip, read_member
from metalens.data.images import CHANNELS, FITS, IMAGE_SUFFIXES, MAX_FILE_BYTES, RESAMPLE, check_fits, decode_u8, \
    image_shape, read_file
from metalens.errors import DataError

__all__ = ["ImageSet", "read_images", "save_cache", "count_images", "default_root", "resolve_root", "source_paths"]


@dataclass(frozen=True)
class ImageSet:
    """The decoded images of one source.

    ``classes``: class keys ``"<group>/<class>"``, sorted; ``images``: ``uint8 [n, H, W]`` (grey,
    ink high unless not inverted) or ``uint8 [n, 3, H, W]`` (colour); ``labels``: ``int64 [n]``,
    the index in ``classes`` of each image; ``files``: where each image came from (member or
    relative path). Images are in the order of (class key, file name). Treat the tensors as
    read-only: they are shared (and may map a file of the disk cache). ``cache``: how the
    set is known to the disk cache (None: not cached); ``cached``: the array it was mapped
    from ('' if it was decoded).
    """

    name: str
    classes: tuple[str, ...]
    images: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    files: tuple[str, ...] = field(repr=False)
    cache: disk.CacheEntry | None = field(default=None, repr=False, compare=False)
    cached: str = field(default="", repr=False, compare=False)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(sorted({k.split("/", 1)[0] for k in self.classes}))


def _shown(path: Path) -> str:
    """A path found inside a source, as an error message quotes it: on one line whatever its name."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _skipped(name: str) -> bool:
    """A hidden file or folder, or macOS's resource forks: never read."""
    return name.startswith(".") or name == "__MACOSX"


def _is_image(rel: str) -> bool:
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    return rel.lower().endswith(IMAGE_SUFFIXES) and not any(_skipped(p) for p in parts)


def _key_of(rel: str, where: str) -> str | None:
    """``"<group>/<class>"`` of an image at relative path ``rel`` of source ``where``, or None to skip the file."""
    if not _is_image(rel):
        return None
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if len(parts) < 3:
        raise DataError(f"image {rel!r} in {where} is not in a <group>/<class>/ folder; the layout is "
                        "<group>/<class>/*.png: move it into one")
    return f"{parts[-3]}/{parts[-2]}"


def _link(path: Path, what: str) -> DataError:
    return DataError(f"{_shown(path)} is a symbolic link to a {what}; links inside a data folder are not followed "
                     f"(their target could be anything): replace the link with the {what} itself, or point task.root "
                     "at it")


def _walk_error(e: OSError) -> None:
    raise DataError(f"cannot read the folder {_shown(Path(e.filename or '?'))}: {e.strerror or e}")


def _folder_images(path: Path) -> list[str]:
    """The image files under folder ``path`` (relative POSIX paths, sorted); symbolic links are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=_walk_error):  # never descends into links
        here = Path(dirpath)
        rel = here.relative_to(path)
        keep = []
        for d in sorted(dirnames):
            if _skipped(d):
                continue
            if (here / d).is_symlink():
                raise _link(here / d, "folder")
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not _is_image(f):
                continue
            if (here / f).is_symlink():
                raise _link(here / f, "file")
            found.append((rel / f).as_posix())
    return found


def _zip_images(z: zipfile.ZipFile, where: str) -> list[tuple[str, zipfile.ZipInfo]]:
    """``(class key, member)`` of every image member of ``z``."""
    out = []
    for info in z.infolist():
        if not info.is_dir():
            key = _key_of(info.filename, where)
            if key is not None:
                out.append((key, info))
    return out


def _zip_has_images(path: Path) -> bool:
    with open_zip(path) as z:
        return any(not info.is_dir() and _is_image(info.filename) for info in z.infolist())


def count_images(path: str | os.PathLike) -> int:
    """How many images source ``path`` (a zip file or a folder) holds, without decoding any."""
    path = Path(path)
    if path.is_dir():
        return len(_folder_images(path))
    with open_zip(path) as z:
        return len(_zip_images(z, str(path)))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_size, st.st_mtime_ns


def read_images(path: str | os.PathLike, *, size: int = 28, resample: str = "box", invert: bool = True,
                channels: int = 1, height: int | None = None, width: int | None = None, fit: str = "pad",
                cache: Literal["use", "read", "off"] = "use") -> ImageSet:
    """Decode every image of one source, a zip file or a folder, laid out as ``<group>/<class>/*``.

    Images are decoded by :func:`~metalens.data.images.decode_u8` with the options given
    (``channels``, ``size`` or ``height`` and ``width``, ``fit``, ``resample``, ``invert``).
    Cached in memory per (path, size, modification time, options): building many families on
    the same data decodes it once. With ``cache="use"`` a copy decoded by an earlier process is
    mapped from the disk cache (:mod:`metalens.data.cache`), and a source decoded here is
    written to it; ``"read"`` only maps (write it later with :func:`save_cache`, as the
    families do once the data has passed their checks); ``"off"`` neither. Every problem with
    the data is a :class:`~metalens.errors.DataError` naming the file (and the member, in a
    zip): a missing path, a file that is not a zip, an unsafe or damaged archive
    (:class:`~metalens.data.archives.UnsafeArchiveError` for a member that could escape its
    folder), a symbolic link inside a folder, an image outside a class folder, a file that is
    not an image or is damaged, a decompression bomb, more images than the memory holds at
    ``size``.
    """
    if cache not in ("use", "read", "off"):
        raise ValueError(f"cache must be 'use', 'read' or 'off', got {cache!r}")
    if channels not in CHANNELS or fit not in FITS or resample not in RESAMPLE:
        raise ValueError(f"channels must be one of {CHANNELS}, fit one of {FITS} and resample one of "
                         f"{tuple(RESAMPLE)}; got {channels!r}, {fit!r} and {resample!r}")
    path = Path(path).resolve()
    if path.is_file():
        stamp: Any = _stamp(path)
    elif path.is_dir():
        stamp = tuple((f, *_stamp(path / f)) for f in _folder_images(path))
    else:
        raise DataError(f"no such file or folder: {path}")
    h, w = image_shape(size, height, width)
    out = _read_images_cached(str(path), stamp, h, w, channels, resample, invert, fit, cache != "off")
    if cache == "use":
        save_cache(out)
    return out


def save_cache(images: ImageSet) -> Path | None:
    """Write a decoded source to the disk cache (:mod:`metalens.data.cache`) unless it is there already.

    Returns where the array is (None: caching is off for this set, or no cache folder can be written).
    """
    entry = images.cache
    if entry is None:
        return None
    source = Path(entry.source)
    if images.cached or disk.exists(source, entry):
        return Path(images.cached) if images.cached else None
    counts = torch.bincount(images.labels, minlength=len(images.classes)).tolist()
    return disk.save(source, entry, images.images.numpy(), {"classes": list(images.classes), "counts": counts,
                                                             "files": list(images.files), "name": images.name})


@functools.lru_cache(maxsize=16)
def _read_images_cached(path_str: str, stamp: Any, height: int, width: int, channels: int, resample: str,
                        invert: bool, fit: str, use_disk: bool) -> ImageSet:
    path = Path(path_str)
    options = {"height": height, "width": width, "channels": channels, "resample": resample, "invert": invert,
               "fit": fit}
    entry = disk.CacheEntry(disk.cache_key(path, stamp, options), path_str, options) if use_disk else None
    if entry is not None:
        found = disk.load(path, entry)
        if found is not None:
            array, meta = found
            counts = torch.tensor(meta["counts"], dtype=torch.int64)
            return ImageSet(str(meta["name"]), tuple(meta["classes"]), torch.from_numpy(array),
                            torch.repeat_interleave(torch.arange(len(counts)), counts), tuple(meta["files"]),
                            entry, str(getattr(array, "filename", "") or "mapped"))

    def decode(data: bytes, where: str) -> np.ndarray:
        return decode_u8(data, height, resample, invert, where=where, channels=channels, height=height, width=width,
                         fit=fit)

    shape = (channels, height, width) if channels != 1 else (height, width)
    if path.is_file():
        if path.suffix.lower() != ".zip" and not zipfile.is_zipfile(path):
            raise DataError(f"{path} is neither a folder nor a zip file; give a folder of <group>/<class>/ "
                            "images or a zip of one")
        with open_zip(path) as z:
            check_archive(z, where=str(path))
            members = sorted(_zip_images(z, str(path)), key=lambda e: (e[0], e[1].filename))
            keys, files = [k for k, _ in members], [info.filename for _, info in members]

            def decode_member(info: zipfile.ZipInfo) -> np.ndarray:
                data = read_member(z, info, limit=MAX_FILE_BYTES, where=str(path))
                return decode(data, f"{info.filename!r} in {path}")

            images = _decode_all(path, shape, len(members), map(decode_member, (info for _, info in members)))
        name = path.stem
    else:
        entries = sorted((k, rel) for rel, *_ in stamp if (k := _key_of(rel, str(path))) is not None)
        keys, files = [k for k, _ in entries], [rel for _, rel in entries]

        def decode_file(rel: str) -> np.ndarray:
            where = _shown(path / rel)
            return decode(read_file(path / rel, follow=False, where=where), where)

        images = _decode_all(path, shape, len(files), map(decode_file, files))
        name = path.name
    classes = tuple(sorted(set(keys)))
    index = {k: i for i, k in enumerate(classes)}
    labels = torch.tensor([index[k] for k in keys], dtype=torch.int64)
    return ImageSet(name, classes, torch.from_numpy(images), labels, tuple(files), entry)


def _decode_all(path: Path, shape: tuple[int, ...], n: int, decoded: Iterator[np.ndarray]) -> np.ndarray:
    """``uint8 [n, *shape]`` from an iterator of ``n`` decoded images, after checking that they fit."""
    if n == 0:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {path}; the layout is "
                        "<group>/<class>/*.png")
    check_fits(n, shape[-2], where=str(path), channels=shape[0] if len(shape) == 3 else 1, height=shape[-2],
               width=shape[-1])
    images = np.empty((n, *shape), dtype=np.uint8)
    for i, a in enumerate(decoded):
        images[i] = a
    return images


def default_root() -> Path:
    """``$METALENS_DATA/omniglot`` if ``METALENS_DATA`` is set, else ``../shared/data/omniglot`` (from the CWD)."""
    env = os.environ.get("METALENS_DATA")
    return Path(env) / "omniglot" if env else Path("..") / "shared" / "data" / "omniglot"


def resolve_root(root: str) -> Path:
    """The folder or zip file ``root`` names (``''``: :func:`default_root`); a :class:`DataError` if there is none."""
    path = Path(root).expanduser() if root else default_root()
    if not path.exists():
        how = (f"task.root={root!r}" if root else
               ("METALENS_DATA=" + os.environ["METALENS_DATA"] if os.environ.get("METALENS_DATA")
                else "the default ../shared/data/omniglot, relative to the working directory " + os.getcwd()))
        raise DataError(
            f"no image data at {path.resolve()} (from {how}); point the family at your data with "
            "--set task.root=/path/to/folder-or-zip, or set METALENS_DATA to a folder holding omniglot/"
            " (omniglot can also fetch the official zips with --set task.download=true)")
    if not (path.is_dir() or path.is_file()):  # a FIFO, a device: reading it could block or never end
        raise DataError(f"{path} is neither a folder nor a regular file; point task.root at a folder or a zip file")
    return path


def source_paths(root: Path, sources: Sequence[str]) -> list[Path]:
    """The files or folders to read: ``root/<name>`` or ``root/<name>.zip`` for each name, or the root itself.

    With no names, a folder that holds no images stands for the zip files directly in it
    that hold images (the others are skipped); it is a :class:`DataError` if none does.
    """
    if not sources:
        if root.is_dir() and not _folder_images(root):
            zips = sorted(p for p in root.iterdir() if p.suffix.lower() == ".zip" and p.is_file())
            if not zips:
                raise DataError(f"{root} holds neither images in <group>/<class>/ folders nor zip files; "
                                "point task.root at your data")
            with_images = [p for p in zips if _zip_has_images(p)]
            if not with_images:
                raise DataError(f"none of the zip files in {root} holds images ({', '.join(p.name for p in zips)}; "
                                f"looked for {', '.join(IMAGE_SUFFIXES)}); point task.root at your images")
            return with_images
        return [root]
    out = []
    for name in sources:
        cands = [root / name, root / f"{name}.zip"]
        found = next((p for p in cands if p.exists()), None)
        if found is None:
            have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise DataError(f"source {name!r} not found: looked for {cands[0]} and {cands[1]}; "
                            f"{root} holds {', '.join(have) or 'nothing'}")
        if not (found.is_dir() or found.is_file()):
            raise DataError(f"source {found} is neither a folder nor a regular file")
        out.append(found)
    return out
