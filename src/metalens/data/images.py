"""One image file -> the models' input: grey or colour, any size; by default grey, square, ``size x size``, ink as 1.

Every image metalens reads goes through :func:`decode_u8` (the families decode their
data with it; :func:`load_image` is the same for one file of a user's), so a drawing fed
to a trained learner is prepared exactly as its training images were.

Channels. ``channels=1`` (the default) converts to grey by luminance (Pillow's ``L``:
``0.299 R + 0.587 G + 0.114 B``), and ``invert`` (dark ink on light paper) makes ink 1;
``channels=3`` keeps colour (a grey image becomes three identical channels), never
inverted. Transparent pixels are composited onto white.

Size. ``size`` (square), or ``height`` and ``width``. An image whose aspect differs from
the target's is padded to it, centred, with the background (``fit="pad"``, the default:
white paper before inversion for grey, black for colour), centre-cropped to it
(``"crop"``) or stretched (``"stretch"``), then resized. Resizing uses Pillow's ``BOX``
filter by default: the exact area average, i.e. each output pixel is the fraction of its
area covered by ink (no ringing, unlike ``LANCZOS``, which is offered as
``resample="lanczos"``).

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
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalens.errors import DataError, excerpt, reason
from metalens.files import NotRegular, read_regular

__all__ = ["IMAGE_SUFFIXES", "RESAMPLE", "FITS", "CHANNELS", "MAX_PIXELS", "MAX_FILE_BYTES", "load_image",
           "decode_u8", "check_fits", "physical_memory", "read_file", "to_float", "normalize", "image_shape"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
RESAMPLE = {"box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
FITS = ("pad", "crop", "stretch")  # how an image meets a target of another aspect
CHANNELS = (1, 3)  # grey or colour
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


def image_shape(size: int, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """``(height, width)`` of decoded images: ``height`` and ``width`` where given, else ``size``."""
    return (size if height is None else height), (size if width is None else width)


def check_fits(n_images: int, size: int, *, where: str, option: str = "task.size", channels: int = 1,
               height: int | None = None, width: int | None = None) -> None:
    """Raise :class:`DataError` if ``n_images`` decoded ``uint8`` images of ``channels x height x width`` (default
    ``size x size``) exceed the memory.

    Called before any image is decoded, so that an impossible size fails at once and says
    how much it would need.
    """
    h, w = image_shape(size, height, width)
    need = n_images * channels * h * w
    have = physical_memory()
    if need > have:
        shape = f"{h}x{w}" + (f"x{channels}" if channels != 1 else "")
        raise DataError(f"{where}: decoding {n_images} image(s) at {shape} needs {_gib(need)} of memory "
                        f"(uint8), more than the {_gib(have)} this machine has; lower {option}")


def _bomb(where: str, why: str) -> DataError:
    return DataError(f"image {where} is refused as a possible decompression bomb ({why}); {_HOW_TO_FIX}")


def _fit(im: Image.Image, h: int, w: int, fit: str, background: int | tuple[int, ...], resample: str) -> Image.Image:
    """``im`` brought to ``w x h`` pixels: padded to that aspect (centred), centre-cropped to it, or stretched."""
    iw, ih = im.size
    if fit == "pad":
        cw, ch = max(iw, -(-ih * w // h)), max(ih, -(-iw * h // w))  # the smallest canvas of the target's aspect
        if (cw, ch) != (iw, ih):
            canvas = Image.new(im.mode, (cw, ch), background)
            canvas.paste(im, ((cw - iw) // 2, (ch - ih) // 2))
            im = canvas
    elif fit == "crop":
        if iw * h > ih * w:  # too wide
            cw = max(1, round(ih * w / h))
            im = im.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
        elif iw * h < ih * w:  # too tall
            ch = max(1, round(iw * h / w))
            im = im.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
    if im.size != (w, h):
        im = im.resize((w, h), resample=RESAMPLE[resample])
    return im


def decode_u8(data: bytes, size: int, resample: str, invert: bool, *, where: str = "(given as bytes)",
              channels: int = 1, height: int | None = None, width: int | None = None,
              fit: str = "pad") -> np.ndarray:
    """Decode one image file's bytes to ``uint8 [H, W]`` (``channels=1``, ink high (255) when ``invert``) or
    ``uint8 [3, H, W]`` (``channels=3``, RGB, never inverted); ``H, W`` are ``height, width``, else ``size``.

    Transparent pixels are composited onto white; an image of another aspect than ``H:W`` is
    padded (``fit="pad"``: centred, with the background colour, so strokes keep their aspect),
    centre-cropped (``"crop"``) or stretched (``"stretch"``) before resizing. ``where`` names
    the file in errors: any failure is a :class:`DataError` saying what is wrong with the
    file, never Pillow's own exception.
    """
    h, w_out = image_shape(size, height, width)
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
        w, ih = im.size
        if max(w, ih) ** 2 > MAX_PIXELS:  # from the header, before decoding a pixel
            raise _bomb(where, f"it declares {w}x{ih} pixels, {max(w, ih) ** 2 / 1e6:.0f} megapixels as a square, "
                               f"more than {MAX_PIXELS / 1e6:.0f}")
        if w < 1 or ih < 1:
            raise DataError(f"image {where} declares {w}x{ih} pixels; {_HOW_TO_FIX}")
        try:
            im.load()
            if "A" in im.getbands() or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            if channels == 1:
                im = _fit(im.convert("L"), h, w_out, fit, 255 if invert else 0, resample)  # 1-bit Omniglot: 0 or 255
            else:
                if im.mode not in ("RGB", "RGBA", "P", "L", "LA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("L")  # 16-bit and float grey: Pillow converts them to RGB only through L
                im = _fit(im.convert("RGB"), h, w_out, fit, (0, 0, 0), resample)
            a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # truncated or damaged data: OSError, SyntaxError, zlib.error, ValueError, ...
            if isinstance(e, Image.DecompressionBombError):
                raise _bomb(where, reason(e).split(",")[0]) from None
            raise DataError(f"image {where} is truncated or damaged ({reason(e)}); {_HOW_TO_FIX}") from None
    if channels != 1:
        return np.ascontiguousarray(a.transpose(2, 0, 1))  # [3, H, W]
    return 255 - a if invert else a.copy()


def to_float(u8: Tensor) -> Tensor:
    """``uint8`` images -> float32 in ``[0, 1]`` (the one conversion used everywhere)."""
    return u8.to(torch.float32).div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean_c) / std_c`` per channel of ``x [..., C, H, W]`` (float, in place): a data set's normalisation.

    >>> normalize(torch.ones(2, 3, 1, 1), (0.5, 0.5, 0.0), (0.5, 0.25, 1.0)).flatten(1)[0].tolist()
    [1.0, 2.0, 1.0]
    """
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    if m.shape[0] != x.shape[-3] or s.shape[0] != x.shape[-3]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[-3]}), got {len(mean)} and {len(std)}")
    return x.sub_(m).div_(s)


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
    channels: Literal[1, 3] = 1,
    height: int | None = None,
    width: int | None = None,
    fit: Literal["pad", "crop", "stretch"] = "pad",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """One image file (a path, or its bytes) as the models' input: ``[channels, H, W]`` float32.

    By default the image is converted to grey, padded to a square, resized to ``size x size``
    (``box``: the exact area average) and scaled to ``[0, 1]``; ``invert=True`` (dark ink on a
    light background, as in Omniglot) makes ink 1 and background 0. ``channels=3`` keeps
    colour (grey images become three identical channels; never inverted); ``height`` and
    ``width`` set a size other than a square, ``fit`` how an image of another aspect meets it
    (see :func:`decode_u8`); ``mean`` and ``std`` (one per channel) normalise the result as a
    family normalises its data set. The image families decode their images with this very
    function's core, so a user's own image fed through it with a family's options
    (``load_image(path, **family.image_options())``) matches what a learner saw in
    evaluation. Add a task and a point dimension before ``predict``: ``x[None, None]`` is
    ``[1, 1, C, H, W]``. A file that is missing, not an image, damaged or a decompression
    bomb is a :class:`~metalens.errors.DataError` naming it.

    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (105, 105), 255).save(buf, format="PNG")
    >>> x = load_image(buf.getvalue())
    >>> x.shape, x.dtype, float(x.max())  # white paper: no ink
    (torch.Size([1, 28, 28]), torch.float32, 0.0)
    >>> load_image(buf.getvalue(), channels=3, height=84, width=42).shape
    torch.Size([3, 84, 42])
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    for name, v in (("height", height), ("width", width)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    if (mean is None) != (std is None):
        raise ValueError("give mean and std together (one value per channel each), or neither")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), "(given as bytes)"
    else:
        data, where = read_file(path_or_bytes), os.fspath(path_or_bytes)
    check_fits(1, size, where=where, option="size", channels=channels, height=height, width=width)
    a = decode_u8(data, size, resample, invert, where=where, channels=channels, height=height, width=width, fit=fit)
    x = to_float(torch.from_numpy(a))
    x = x[None] if channels == 1 else x
    return normalize(x, mean, std) if mean is not None and std is not None else x
