"""Omniglot's pen strokes: reading the trajectories, matching them with the images, perturbing and rendering them.

Every Omniglot image was drawn online; the ``strokes_*`` zips (Lake et al. 2015) hold the pen
trajectory behind each image of the matching ``images_*`` zip, under the same name with
``.txt`` for ``.png`` (``<group>/<class>/<id>_<drawer>.txt``). A file is a series of ``x,y,t``
lines (``t`` in milliseconds) that begins with ``START``; ``BREAK`` marks a pen-up, the end of
a stroke. ``x`` runs right and ``-y`` down in the pixels of the 105x105 image. Sampling is
raw (non-uniform in space and time), so every stroke is resampled at a uniform ``spacing``
along its length when read (:func:`resample`). macOS's ``__MACOSX/`` and hidden files
(``.DS_Store``) are skipped; zips are read with the safe readers of
:mod:`metalens.data.archives` (every member capped, paths that could escape refused), and
every problem with the data is one :class:`~metalens.errors.DataError` naming the file.

- :func:`read_strokes`: one source (a zip or a folder) -> a :class:`StrokeSet`, the resampled
  trajectories as padded tensors, cached in memory and on disk like decoded images
  (:mod:`metalens.data.cache`: int16 fixed point, 1/32 pixel, so a later start maps them instead
  of parsing), since they never change;
- :func:`check_match`: refuses strokes that do not go with the images (other characters or
  drawers), naming what differs;
- :func:`perturb`: new drawings of the same characters, as if other people drew them, a pure
  function of the points and a ``torch.Generator``: per-stroke jitter (each stroke rotated,
  scaled and shifted about its centroid), a smooth local warp (a displacement field
  interpolated bicubically from a coarse grid of random offsets) and a global affine map
  (rotation, shear, anisotropic scale, translation about the centre of the canvas), with a
  stroke width per drawing (:class:`Perturbation` gives the magnitudes);
- :func:`render`: trajectories -> ``uint8`` images, drawn with Pillow's ``ImageDraw`` on the
  105x105 canvas of the scans (round joints and caps, ink 255), then brought to the target
  size exactly as the scans are (:func:`metalens.data.images.decode_u8`: padded to the aspect,
  box-filtered), which anti-aliases them the same way.

>>> import torch
>>> strokes = parse_strokes("START\\n10,-10,0\\n60,-10,40\\nBREAK\\n30,-40,90\\n30,-90,130\\nBREAK\\n")
>>> [s.tolist() for s in strokes]  # two strokes of (x, y) in image pixels, y down
[[[10.0, 10.0], [60.0, 10.0]], [[30.0, 40.0], [30.0, 90.0]]]
>>> points, stroke = pad([resample(strokes, spacing=5.0)])
>>> points.shape, int(stroke.max())  # 11 + 11 points, two strokes
(torch.Size([1, 22, 2]), 1)
>>> moved = perturb(points, stroke, generator=torch.Generator().manual_seed(0))
>>> render(moved.points, stroke, moved.widths, size=28).shape
(1, 28, 28)
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from metalens.data import cache as disk
from metalens.data.archives import check_archive, open_zip, read_member
from metalens.data.images import FITS, RESAMPLE, _fit, image_shape
from metalens.errors import DataError, excerpt

__all__ = ["StrokeSet", "Perturbation", "Perturbed", "CANVAS", "parse_strokes", "resample", "pad", "read_strokes",
           "drawing_key", "check_match", "perturb", "render"]

CANVAS = 105  # the side of Omniglot's scans, in whose pixels the trajectories are given
MAX_STROKE_FILE_BYTES = 4 << 20  # a strokes file larger than this is refused unread (Omniglot's are < 20 kB)
_FIXED = 32.0  # the disk cache keeps coordinates as int16 in 1/32 pixel
_FORMAT = 1  # bump when the cached representation changes


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def parse_strokes(text: str, *, where: str = "(given as text)") -> list[np.ndarray]:
    """The strokes of one drawing: ``[n_i, 2]`` float64 arrays of ``(x, y)`` pixels, ``y`` down (the file's ``-y``).

    ``START`` begins the drawing, ``BREAK`` ends a stroke (a last stroke without one is kept),
    ``x,y,t`` adds a pen position (``t`` is read and not kept: the strokes are resampled in
    space). Blank lines are ignored; any other line, a value that is not a finite number, or a
    drawing without any point is a :class:`DataError` naming ``where`` and the line.
    """
    strokes: list[np.ndarray] = []
    current: list[tuple[float, float]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line == "START":
            current = []
        elif line == "BREAK":
            if current:
                strokes.append(np.array(current, dtype=np.float64))
            current = []
        else:
            parts = line.split(",")
            try:
                x, y = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                raise DataError(f"strokes file {where}, line {number}: {excerpt(line, 40)} is neither START, BREAK "
                                "nor x,y,t; the file is damaged: replace it with the original") from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise DataError(f"strokes file {where}, line {number}: {excerpt(line, 40)} is not a finite position; "
                                "the file is damaged: replace it with the original")
            current.append((x, -y))
    if current:
        strokes.append(np.array(current, dtype=np.float64))
    if not strokes:
        raise DataError(f"strokes file {where} holds no pen positions (x,y,t lines); replace it with the original")
    return strokes


def resample(strokes: Sequence[np.ndarray], *, spacing: float = 1.0) -> list[np.ndarray]:
    """Every stroke at points ``spacing`` pixels apart along its length (both ends kept; a stroke that never
    moves is one point), linearly interpolated: the raw sampling is uneven in space and time."""
    out = []
    for s in strokes:
        xy = np.asarray(s, dtype=np.float64)[:, :2]
        step = np.sqrt((np.diff(xy, axis=0) ** 2).sum(1))
        keep = np.concatenate([[True], step > 0])
        xy, step = xy[keep], step[step > 0]
        if len(xy) == 1:
            out.append(xy.copy())
            continue
        along = np.concatenate([[0.0], np.cumsum(step)])  # arc length at each raw point
        m = max(2, int(math.ceil(along[-1] / spacing)) + 1)
        s_new = np.linspace(0.0, along[-1], m)
        out.append(np.stack([np.interp(s_new, along, xy[:, 0]), np.interp(s_new, along, xy[:, 1])], 1))
    return out


def pad(drawings: Sequence[Sequence[np.ndarray]], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Drawings (lists of ``[n_i, 2]`` strokes) as ``points`` float32 ``[B, L, 2]`` and ``stroke`` int64 ``[B, L]``
    (each point's stroke, 0, 1, ...; -1 for padding); ``L`` is the longest drawing's point count, or ``length``."""
    counts = [sum(len(s) for s in d) for d in drawings]
    L = max(counts, default=1) if length is None else length
    points = np.zeros((len(drawings), L, 2), dtype=np.float32)
    stroke = np.full((len(drawings), L), -1, dtype=np.int64)
    for b, d in enumerate(drawings):
        i = 0
        for k, s in enumerate(d):
            points[b, i: i + len(s)] = s
            stroke[b, i: i + len(s)] = k
            i += len(s)
    return torch.from_numpy(points), torch.from_numpy(stroke)


@dataclass(frozen=True)
class StrokeSet:
    """The resampled trajectories of one source.

    ``keys``: ``"<group>/<class>/<stem>"`` of every drawing, sorted (the stem is the file name
    without ``.txt``: ``<id>_<drawer>`` in Omniglot); ``points``: float32 ``[n, L, 2]`` pen positions
    in pixels of the 105x105 image (x right, y down), padded; ``stroke``: int64 ``[n, L]``, the
    stroke of each point (-1: padding). Treat the tensors as read-only: they are shared.
    """

    name: str
    keys: tuple[str, ...]
    points: Tensor = field(repr=False)
    stroke: Tensor = field(repr=False)
    spacing: float = 1.0
    cached: str = field(default="", repr=False, compare=False)

    def index(self) -> dict[str, int]:
        """``{key: row}``."""
        return {k: i for i, k in enumerate(self.keys)}


def _skipped(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def drawing_key(rel: str, suffixes: tuple[str, ...] = (".txt",), where: str = "") -> str | None:
    """``"<group>/<class>/<stem>"`` of a file at relative path ``rel`` with one of ``suffixes``, or None for a file
    to skip (another suffix, hidden, ``__MACOSX``); a file outside a ``<group>/<class>/`` folder is a DataError."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p and p != "."]
    if not parts or any(_skipped(p) for p in parts) or not rel.lower().endswith(suffixes):
        return None
    if len(parts) < 3:
        raise DataError(f"{rel!r} in {where} is not in a <group>/<class>/ folder; the layout is <group>/<class>/"
                        "<drawing>.txt: move it into one")
    return f"{parts[-3]}/{parts[-2]}/{parts[-1].rsplit('.', 1)[0]}"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"strokes file {where} is not text (it starts {excerpt(data, 24)}); replace it with the "
                        "original") from None


def _link(path: Path) -> DataError:
    return DataError(f"{path} is a symbolic link; links inside a data folder are not followed (their target could "
                     "be anything): replace the link with what it points to")


def _folder_files(path: Path) -> list[str]:
    """The ``.txt`` files under ``path`` (relative POSIX paths, sorted), hidden ones and ``__MACOSX`` skipped, links
    refused."""
    found = []

    def refuse(e: OSError) -> None:
        raise DataError(f"cannot read the folder {e.filename or path}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(path, onerror=refuse):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if _skipped(d):
                continue
            if (here / d).is_symlink():
                raise _link(here / d)
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if _skipped(f) or not f.lower().endswith(".txt"):
                continue
            if (here / f).is_symlink():
                raise _link(here / f)
            found.append((here / f).relative_to(path).as_posix())
    return found


def _stamp(path: Path) -> Any:
    if path.is_file():
        st = path.lstat()
        return st.st_size, st.st_mtime_ns
    return tuple((f, (path / f).lstat().st_size, (path / f).lstat().st_mtime_ns) for f in _folder_files(path))


def read_strokes(path: str | os.PathLike, *, spacing: float = 1.0,
                 cache: Literal["use", "off"] = "use") -> StrokeSet:
    """Read, parse and resample every drawing of one source, a zip file or a folder laid out as
    ``<group>/<class>/<drawing>.txt`` (anything above ``<group>`` is ignored; hidden files and ``__MACOSX/``
    skipped; other files ignored).

    Cached in memory per (path, modification time, ``spacing``), and on disk beside the data
    (or in the fallback of :mod:`metalens.data.cache`) unless ``cache="off"``. A missing path,
    an unsafe or damaged zip, a member larger than 4 MiB, a file that is not text or not in the
    format (:func:`parse_strokes`), a source without any strokes file: each a
    :class:`DataError` naming the file.
    """
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    if cache not in ("use", "off"):
        raise ValueError(f"cache must be 'use' or 'off', got {cache!r}")
    path = Path(path).resolve()
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"no such file or folder: {path}")
    return _read_cached(str(path), _stamp(path), float(spacing), cache == "use")


@functools.lru_cache(maxsize=8)
def _read_cached(path_str: str, stamp: Any, spacing: float, use_disk: bool) -> StrokeSet:
    path = Path(path_str)
    name = path.stem if path.is_file() else path.name
    options = {"kind": "strokes", "format": _FORMAT, "spacing": spacing}
    entry = disk.CacheEntry(disk.cache_key(path, stamp, options), path_str, options) if use_disk else None
    if entry is not None:
        found = disk.load(path, entry)
        if found is not None:
            array, meta = found
            fixed = np.asarray(array).view("<i2").reshape(len(array), -1, 3)
            points = torch.from_numpy(fixed[..., :2].astype(np.float32) / _FIXED)
            stroke = torch.from_numpy(fixed[..., 2].astype(np.int64))
            return StrokeSet(str(meta["name"]), tuple(meta["files"]), points, stroke, spacing,
                             str(getattr(array, "filename", "") or "mapped"))
    drawings: dict[str, list[np.ndarray]] = {}
    if path.is_file():
        if path.suffix.lower() != ".zip" and not zipfile.is_zipfile(path):
            raise DataError(f"{path} is neither a folder nor a zip file; give a folder of <group>/<class>/*.txt "
                            "strokes or a zip of one")
        with open_zip(path) as z:
            check_archive(z, where=str(path))
            for info in z.infolist():
                key = None if info.is_dir() else drawing_key(info.filename, where=str(path))
                if key is None:
                    continue
                where = f"{info.filename!r} in {path}"
                data = read_member(z, info, limit=MAX_STROKE_FILE_BYTES, where=str(path))
                drawings[key] = resample(parse_strokes(_decode(data, where), where=where), spacing=spacing)
    else:
        for rel in _folder_files(path):
            key = drawing_key(rel, where=str(path))
            if key is None:
                continue
            f = path / rel
            if f.stat().st_size > MAX_STROKE_FILE_BYTES:
                raise DataError(f"refusing {f}: {f.stat().st_size} bytes, more than 4 MiB for a strokes file")
            drawings[key] = resample(parse_strokes(_decode(f.read_bytes(), str(f)), where=str(f)), spacing=spacing)
    if not drawings:
        raise DataError(f"no strokes files (<group>/<class>/<drawing>.txt) found in {path}")
    keys = tuple(sorted(drawings))
    points, stroke = pad([drawings[k] for k in keys])
    out = StrokeSet(name, keys, points, stroke, spacing)
    if entry is not None and float(points.abs().max()) * _FIXED < 32767 and int(stroke.max()) < 32767:
        fixed = np.concatenate([np.round(points.numpy() * _FIXED), stroke.numpy()[..., None]], -1).astype("<i2")
        classes = sorted({k.rsplit("/", 1)[0] for k in keys})
        counts = [sum(1 for k in keys if k.rsplit("/", 1)[0] == c) for c in classes]
        disk.save(path, entry, fixed.view(np.uint8).reshape(len(keys), -1),
                  {"classes": classes, "counts": counts, "files": list(keys), "name": name})
    return out


# ------------------------------------------------------------------------------------------------
# Matching with the images
# ------------------------------------------------------------------------------------------------
def check_match(image_files: Iterable[str], strokes: StrokeSet, *, images_name: str) -> None:
    """Refuse strokes that do not go with the images: every image file (relative paths, as
    :attr:`metalens.data.ImageSet.files` lists them) must have a strokes file of the same
    ``<group>/<class>/<stem>`` and every strokes file an image. A mismatch is one
    :class:`DataError` naming how many drawings differ each way, with examples.
    """
    from metalens.data.images import IMAGE_SUFFIXES

    image_keys = {k for f in image_files if (k := drawing_key(f, IMAGE_SUFFIXES, images_name)) is not None}
    stroke_keys = set(strokes.keys)
    if image_keys == stroke_keys:
        return

    def some(keys: set[str]) -> str:
        shown = sorted(keys)[:3]
        return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if image_keys - stroke_keys:
        n = len(image_keys - stroke_keys)
        parts.append(f"{n} image(s) of {images_name} have no strokes file ({some(image_keys - stroke_keys)})")
    if stroke_keys - image_keys:
        n = len(stroke_keys - image_keys)
        parts.append(f"{n} strokes file(s) of {strokes.name} have no image ({some(stroke_keys - image_keys)})")
    raise DataError(f"the strokes of {strokes.name} do not match the images of {images_name}: {'; '.join(parts)}; "
                    "use the strokes zip that goes with these images (same characters and drawers), or set "
                    "task.strokes = none")


# ------------------------------------------------------------------------------------------------
# New drawings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Perturbation:
    """The magnitudes of :func:`perturb` (pixels are those of the 105x105 canvas; ``strength`` scales all but the
    stroke width)."""

    rotation: float = 10.0  # global rotation, uniform in [-rotation, rotation] degrees
    shear: float = 10.0  # global horizontal shear, uniform in [-shear, shear] degrees
    scale: float = 0.15  # global scales of x and y, each log-uniform in [1 / (1 + scale), 1 + scale]
    translate: float = 6.0  # global translation, uniform in [-translate, translate] pixels on each axis
    stroke_rotation: float = 8.0  # each stroke about its centroid, uniform in [-stroke_rotation, ...] degrees
    stroke_scale: float = 0.1  # each stroke about its centroid, uniform in [1 - stroke_scale, 1 + stroke_scale]
    stroke_shift: float = 3.0  # each stroke shifted uniformly in [-stroke_shift, stroke_shift] pixels on each axis
    warp: float = 2.5  # local warp: offsets of the control points, normal with this standard deviation in pixels
    warp_grid: int = 4  # local warp: control points on each side of the canvas (bicubic in between)
    width: tuple[float, float] = (3.5, 6.5)  # stroke width of each drawing, uniform, rounded to whole pixels
    strength: float = 1.0  # multiplies every magnitude above but the width

    def scaled(self) -> Perturbation:
        """The magnitudes with ``strength`` applied (``strength`` then 1)."""
        s = self.strength
        return Perturbation(self.rotation * s, self.shear * s, (1 + self.scale) ** s - 1, self.translate * s,
                            self.stroke_rotation * s, self.stroke_scale * s, self.stroke_shift * s, self.warp * s,
                            self.warp_grid, self.width, 1.0)


class Perturbed(NamedTuple):
    """New drawings: ``points [B, L, 2]`` (padding unchanged) and each drawing's stroke ``widths [B]`` in pixels."""

    points: Tensor
    widths: Tensor


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> Tensor:
    return (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1) * bound


def perturb(points: Tensor, stroke: Tensor, *, generator: torch.Generator,
            p: Perturbation = Perturbation()) -> Perturbed:
    """New drawings of ``points [B, L, 2]`` (``stroke [B, L]``, -1 for padding), as if other people drew them.

    In pixels of the canvas (centre ``c``), each drawing ``b``, stroke ``s`` with centroid ``m_s``::

        p <- m_s + R(alpha_s) sigma_s (p - m_s) + d_s          per-stroke jitter
        p <- p + u(p)                                           smooth local warp
        p <- c + R(theta) Sh(phi) diag(s_x, s_y) (p - c) + t    global affine

    ``u`` is the bicubic interpolation of a ``warp_grid x warp_grid`` grid of normal offsets
    over the canvas. Every random number comes from ``generator``, in a fixed order and a fixed
    number given the shapes (stroke parameters for as many strokes as the batch's longest
    drawing has): the same generator state gives the same drawings, bit for bit.
    """
    q = p.scaled()
    B, L, _ = points.shape
    S = int(stroke.max()) + 1 if stroke.numel() else 1
    g = generator
    x = points.to(torch.float64)
    valid = stroke >= 0  # [B, L]
    # per-stroke jitter about each stroke's centroid
    alpha = torch.deg2rad(_uniform((B, S), q.stroke_rotation, g))
    sigma = 1 + _uniform((B, S), q.stroke_scale, g)
    shift = _uniform((B, S, 2), q.stroke_shift, g)
    onehot = F.one_hot(stroke.clamp_min(0), S).to(torch.float64) * valid[..., None]  # [B, L, S]
    centroid = (onehot.transpose(1, 2) @ x) / onehot.sum(1).clamp_min(1.0)[..., None]  # [B, S, 2]
    sid = stroke.clamp_min(0)
    m = centroid.gather(1, sid[..., None].expand(B, L, 2))  # [B, L, 2]
    a, sg, d = alpha.gather(1, sid), sigma.gather(1, sid), shift.gather(1, sid[..., None].expand(B, L, 2))
    r = x - m
    cos, sin = torch.cos(a), torch.sin(a)
    x = m + sg[..., None] * torch.stack([cos * r[..., 0] - sin * r[..., 1], sin * r[..., 0] + cos * r[..., 1]], -1) + d
    # smooth local warp: offsets on a coarse grid, bicubic in between
    k = q.warp_grid
    field_ = torch.randn(B, 2, k, k, generator=g, dtype=torch.float64) * q.warp
    where = (x / CANVAS * 2 - 1)[:, None]  # [B, 1, L, 2] in [-1, 1]
    u = F.grid_sample(field_, where, mode="bicubic", padding_mode="border", align_corners=True)  # [B, 2, 1, L]
    x = x + u[:, :, 0].transpose(1, 2)
    # global affine about the centre
    theta = torch.deg2rad(_uniform((B,), q.rotation, g))
    phi = torch.deg2rad(_uniform((B,), q.shear, g))
    log_s = _uniform((B, 2), math.log1p(q.scale), g)
    t = _uniform((B, 2), q.translate, g)
    sx, sy = torch.exp(log_s[:, 0]), torch.exp(log_s[:, 1])
    cos, sin, tan = torch.cos(theta), torch.sin(theta), torch.tan(phi)
    # A = R(theta) Sh(phi) diag(sx, sy), Sh = [[1, tan phi], [0, 1]]
    A = torch.stack([torch.stack([cos * sx, (cos * tan - sin) * sy], -1),
                     torch.stack([sin * sx, (sin * tan + cos) * sy], -1)], 1)  # [B, 2, 2]
    c = CANVAS / 2
    x = c + (x - c) @ A.transpose(1, 2) + t[:, None]
    widths = q.width[0] + (q.width[1] - q.width[0]) * torch.rand(B, generator=g, dtype=torch.float64)
    x = torch.where(valid[..., None], x, points.to(torch.float64))
    return Perturbed(x.to(points.dtype), widths.to(torch.float32))


def render(points: Tensor, stroke: Tensor, widths: Tensor | float, *, size: int = 28, height: int | None = None,
           width: int | None = None, fit: str = "pad", resample: str = "box") -> np.ndarray:
    """Draw trajectories as ``uint8 [B, H, W]`` images, ink 255 on 0, as :func:`~metalens.data.images.decode_u8`
    prepares Omniglot's scans (``invert``: ink high).

    Each stroke is a polyline of width ``widths[b]`` pixels (rounded; at least 1) with round
    caps (a stroke of one point is a dot; resampled strokes need no joints: their points are
    about a pixel apart, so the wide segments overlap), drawn on the scans' 105x105 canvas
    (``k`` times larger, lines ``k`` times wider, for targets above 105 pixels), then padded to
    the target's aspect and resized with ``resample`` (``box``: each pixel the fraction of its
    area under ink), as the scans are.
    """
    if fit not in FITS or resample not in RESAMPLE:
        raise ValueError(f"fit must be one of {FITS} and resample one of {tuple(RESAMPLE)}; got {fit!r} and "
                         f"{resample!r}")
    h, w = image_shape(size, height, width)
    zoom = max(1, math.ceil(max(h, w) / CANVAS))
    R = CANVAS * zoom
    B = points.shape[0]
    pts = (points.detach().to(torch.float64) * zoom).numpy()
    sid = stroke.numpy()
    wid = np.broadcast_to(np.asarray(widths.detach().numpy() if isinstance(widths, Tensor) else widths,
                                     dtype=np.float64), (B,))
    out = np.empty((B, h, w), dtype=np.uint8)
    for b in range(B):
        im = Image.new("L", (R, R), 0)
        draw = ImageDraw.Draw(im)
        lw = max(1, int(round(float(wid[b]) * zoom)))
        rad = lw / 2
        ids = sid[b]
        n = int((ids >= 0).sum())
        cuts = np.flatnonzero(np.diff(ids[:n])) + 1
        for seg in np.split(pts[b, :n], cuts):
            if len(seg) == 0:
                continue
            if len(seg) > 1:  # points about a pixel apart: the wide segments overlap, no joints needed
                draw.line(seg.ravel().tolist(), fill=255, width=lw)
            for x_, y_ in (seg[0], seg[-1]):  # round caps (and the dot of a one-point stroke)
                draw.ellipse([x_ - rad, y_ - rad, x_ + rad, y_ + rad], fill=255)
        out[b] = np.asarray(_fit(im, h, w, fit, 0, resample), dtype=np.uint8)
    return out
