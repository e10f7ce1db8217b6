"""One image file -> the models' input: grey, square, ``size x size``, ink as 1.

Every image metalens reads goes through :func:`decode_u8` (the families decode their
data with it; :func:`load_image` is the same for one file of a user's), so a drawing fed
to a trained learner is prepared exactly as its training images were.

Resizing uses Pillow's ``BOX`` filter by default: the exact area average, i.e. each
output pixel is the fraction of its area covered by ink (no ringing, unlike ``LANCZOS``,
which is offered as ``resample="lanczos"``).

Bad files are :class:`~metalens.errors.DataError` naming the file: anything Pillow cannot
identify or decode (text, a truncated or damaged file) and decompression bombs, i.e. an
image whose canvas (padded to a square) would exceed :data:`MAX_PIXELS`, refused from its
header before any pixel is decoded. :func:`check_fits` refuses, before decoding, a set of
images that could not fit in this machine's memory at the size asked for.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalens.errors import DataError, excerpt, reason
from metalens.files import NotRegular, read_regular

__all__ = ["IMAGE_SUFFIXES", "RESAMPLE", "MAX_PIXELS", "MAX_FILE_BYTES", "load_image", "decode_u8",
           "check_fits", "physical_memory", "read_file", "to_float"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
RESAMPLE = {"box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
MAX_PIXELS = 64_000_000  # an image whose square canvas is larger is refused as a decompression bomb
MAX_FILE_BYTES = 64 << 20  # an image file (or zip member) larger than this is refused unread
_FALLBACK_MEMORY = 1 << 40  # where the physical memory cannot be read: refuse only the absurd
_HOW_TO_FIX = "remove the file or replace it with a PNG, JPEG, BMP or GIF image"


def physical_memory() -> int:
    """This machine's physical memory in bytes (``sysconf``; 1 TiB where it cannot be read)."""
    try:
        n = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return _FALLBACK_MEMORY
    return n if n > 0 else _FALLBACK_MEMORY


def _gib(n: float) -> str:
    """Bytes for people: ``'1.5 GiB'``, ``'54.4 PiB'``."""
    for unit in ("GiB", "TiB", "PiB"):
        n /= 1 << (30 if unit == "GiB" else 10)
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # pragma: no cover


def check_fits(n_images: int, size: int, *, where: str, option: str = "task.size") -> None:
    """Raise :class:`DataError` if ``n_images`` decoded ``uint8 [size, size]`` images exceed the memory.

    Called before any image is decoded, so that an impossible size fails at once and says
    how much it would need.
    """
    need = n_images * size * size
    have = physical_memory()
    if need > have:
        raise DataError(f"{where}: decoding {n_images} image(s) at {size}x{size} needs {_gib(need)} of memory "
                        f"(uint8), more than the {_gib(have)} this machine has; lower {option}")


def _bomb(where: str, why: str) -> DataError:
    return DataError(f"image {where} is refused as a possible decompression bomb ({why}); {_HOW_TO_FIX}")


def decode_u8(data: bytes, size: int, resample: str, invert: bool, *, where: str = "(given as bytes)") -> np.ndarray:
    """Decode one image file's bytes to ``uint8 [size, size]``, ink high (255) when ``invert``.

    Transparent pixels are composited onto white; a non-square image is padded to a square
    with the background colour (centred) before resizing, so strokes keep their aspect.
    ``where`` names the file in errors: any failure is a :class:`DataError` saying what is
    wrong with the file, never Pillow's own exception.
    """
    try:
        with warnings.catch_warnings():  # Pillow warns (then raises) on huge images: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(where, reason(e).split(",")[0]) from None  # "Image size (N pixels) exceeds limit of M pixels"
    except Exception:  # anything Pillow cannot identify: Unidentified..., SyntaxError, struct.error, ...
        what = "is empty" if not data else f"is not an image Pillow can read (it starts {excerpt(data, 24)})"
        raise DataError(f"image {where} {what}; {_HOW_TO_FIX}") from None
    with im:
        w, h = im.size
        if max(w, h) ** 2 > MAX_PIXELS:  # from the header, before decoding a pixel
            raise _bomb(where, f"it declares {w}x{h} pixels, {max(w, h) ** 2 / 1e6:.0f} megapixels as a square, "
                               f"more than {MAX_PIXELS / 1e6:.0f}")
        if w < 1 or h < 1:
            raise DataError(f"image {where} declares {w}x{h} pixels; {_HOW_TO_FIX}")
        try:
            im.load()
            if "A" in im.getbands() or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("L")  # 1-bit Omniglot: 0 (ink) or 255
            if w != h:
                side = max(w, h)
                canvas = Image.new("L", (side, side), 255 if invert else 0)
                canvas.paste(im, ((side - w) // 2, (side - h) // 2))
                im = canvas
            if im.size != (size, size):
                im = im.resize((size, size), resample=RESAMPLE[resample])
            a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # truncated or damaged data: OSError, SyntaxError, zlib.error, ValueError, ...
            if isinstance(e, Image.DecompressionBombError):
                raise _bomb(where, reason(e).split(",")[0]) from None
            raise DataError(f"image {where} is truncated or damaged ({reason(e)}); {_HOW_TO_FIX}") from None
    return 255 - a if invert else a.copy()


def to_float(u8: Tensor) -> Tensor:
    """``uint8`` images -> float32 in ``[0, 1]`` (the one conversion used everywhere)."""
    return u8.to(torch.float32).div_(255.0)


def read_file(path: str | os.PathLike, *, limit: int = MAX_FILE_BYTES, follow: bool = True,
              where: str | None = None) -> bytes:
    """The bytes of the regular file ``path``; a :class:`DataError` if it is larger than ``limit`` or unreadable.

    With ``follow=False`` a symbolic link is refused instead of followed (where the OS can tell).
    ``where`` names the file in errors (default: its path).
    """
    where = os.fspath(path) if where is None else where
    try:
        return read_regular(path, limit=limit, follow=follow)
    except NotRegular as e:
        if "link" in str(e):
            raise DataError(f"{where} is a symbolic link; links inside a data folder are not followed (their "
                            "target could be anything): replace it with the file it points to") from None
        raise DataError(f"refusing image {where}: it {e}; {_HOW_TO_FIX}") from None
    except OSError as e:
        raise DataError(f"cannot read image {where}: {e.strerror or e}") from None


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
    their images with this very function's core (:func:`decode_u8`), so a user's own
    drawing fed through it matches what a learner saw in training. Add a task and a point
    dimension before ``predict``: ``x[None, None]`` is ``[1, 1, 1, size, size]``. A file
    that is missing, not an image, damaged or a decompression bomb is a
    :class:`~metalens.errors.DataError` naming it.

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
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), "(given as bytes)"
    else:
        data, where = read_file(path_or_bytes), os.fspath(path_or_bytes)
    check_fits(1, size, where=where, option="size")
    return to_float(torch.from_numpy(decode_u8(data, size, resample, invert, where=where)))[None]
