"""Decoding one image: the tensor a learner sees, and one DataError naming the file for every bad file.

Bad files are generated here (nothing is downloaded); the shipped Omniglot data lives at
<repo>/../shared/data/omniglot (as in CI).
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalens.data import MAX_PIXELS, load_image, read_images
from metalens.data import images as data_images
from metalens.errors import DataError

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1 = DATA / "images_background_small1.zip"
SEED = 20240611


def png(w: int = 105, h: int = 105, *, seed: int = SEED, fmt: str = "PNG") -> bytes:
    """A random black-and-white image (incompressible enough that half of it is not an image)."""
    ink = np.random.RandomState(seed).rand(h, w) < 0.3
    buf = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def declaring(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose header declares ``w x h`` pixels (a decompression bomb's header)."""
    data = bytearray(png(1, 1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# name -> (the file's bytes, what the message says about it)
BAD_IMAGES = {
    "text": (b"this is not an image, it is a note\n", r"is not an image Pillow can read \(it starts 'this is not"),
    "empty": (b"", "is empty"),
    "png_cut_in_half": (png()[: len(png()) // 2], "is truncated or damaged"),
    "jpeg_cut_in_half": (png(fmt="JPEG")[:400], "is truncated or damaged"),
    "bomb_pillow_refuses": (declaring(100_000, 100_000), r"decompression bomb \(Image size \(10000000000 pixels\) "
                                                         r"exceeds limit"),  # Pillow's DecompressionBombError
    "bomb_pillow_warns": (declaring(10_000, 10_000), "decompression bomb"),  # DecompressionBombWarning
    "bomb_over_our_limit": (declaring(9_000, 9_000), r"is refused as a possible decompression bomb \(it declares "
                                                     r"9000x9000 pixels, 81 megapixels as a square, more than 64\)"),
    "bomb_thin_strip": (declaring(60_000_000, 1), "decompression bomb"),  # padded to a square: 3.6e15 pixels
}


# -- one image -> tensor ------------------------------------------------------------------------
@pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_load_image_gives_the_same_tensor_for_a_file_and_its_bytes(tmp_path):
    with zipfile.ZipFile(SMALL1) as z:
        name = "images_background_small1/Korean/character07/0649_03.png"
        data = z.read(name)
    (tmp_path / "x.png").write_bytes(data)
    a, b = load_image(tmp_path / "x.png"), load_image(data)
    assert a.shape == (1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(load_image(str(tmp_path / "x.png")), a)
    s = read_images(SMALL1)  # the family decodes with the same function
    cached = s.images[s.files.index(name)].float() / 255
    assert torch.equal(a[0], cached)
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64) / 255
    assert float(a.max()) == 1.0 and abs(float(a.mean()) - (1 - raw.mean())) < 0.01  # ink coverage preserved
    big = load_image(data, size=105)  # no resizing: exactly the inverted 1-bit image
    assert torch.equal(big[0].double(), torch.from_numpy(1 - raw))


def test_a_large_image_under_the_limit_decodes():
    side = int(MAX_PIXELS ** 0.5) // 4
    x = load_image(png(side, side // 2, seed=1), size=14)  # non-square: padded, then resized
    assert x.shape == (1, 14, 14) and bool(torch.isfinite(x).all())


# -- bad files: one DataError naming the file -----------------------------------------------------
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_image_is_one_data_error_naming_it(tmp_path, name):
    data, says = BAD_IMAGES[name]
    with pytest.raises(DataError, match=says) as e:
        load_image(data)
    assert "\n" not in str(e.value)
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    with pytest.raises(DataError, match=says) as e:
        load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400


def test_load_image_of_a_missing_file_or_a_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot read image .*nowhere\.png: No such file"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"refusing image .*: it is not a regular file"):
        load_image(tmp_path)


def test_an_image_file_larger_than_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png())
    with pytest.raises(DataError, match=r"refusing image .*huge\.png: it is \d+ bytes, more than"):
        data_images.read_file(path, limit=100)


# -- memory ---------------------------------------------------------------------------------------
def test_sizes_that_cannot_fit_in_memory_are_refused_before_decoding(monkeypatch):
    assert data_images.physical_memory() > 0
    monkeypatch.setattr(data_images, "physical_memory", lambda: 1 << 30)
    with pytest.raises(DataError, match=r"at 100000x100000 needs 9\.3 GiB of memory \(uint8\), more than the "
                                        r"1\.0 GiB this machine has; lower size"):
        load_image(png(), size=100_000)
    data_images.check_fits(1000, 28, where="x")  # 784 kB: fine


def test_physical_memory_falls_back_where_sysconf_cannot_tell(monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(data_images.os, "sysconf", no_sysconf)
    assert data_images.physical_memory() == 1 << 40


# -- colour, other sizes, other aspects, normalisation -----------------------------------------------
def colour(w: int = 30, h: int = 20, *, seed: int = SEED, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random colour image (RGB, or RGBA with a random alpha channel)."""
    a = np.random.RandomState(seed).randint(0, 256, (h, w, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_colour_images_keep_their_channels_and_grey_ones_become_three_identical_channels():
    data = colour(24, 24)
    x = load_image(data, channels=3, size=24)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    assert x.shape == (3, 24, 24) and torch.equal(x, torch.from_numpy(rgb))  # no resizing: the pixels, exactly
    g = load_image(png(24, 24), channels=3, size=24)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey: three identical channels
    # never inverted in colour: white paper stays 1
    assert torch.equal(g[0], 1 - load_image(png(24, 24), size=24)[0])


def test_colour_becomes_grey_by_luminance_as_pillow_converts_it():
    data = colour(24, 24, seed=1)
    x = load_image(data, size=24, invert=False)
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255  # 0.299 R + 0.587 G + ...
    assert x.shape == (1, 24, 24) and torch.equal(x[0], torch.from_numpy(grey))
    c = load_image(data, channels=3, size=24)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    assert float((lum - x[0]).abs().max()) <= 1 / 255 + 1e-6  # Pillow rounds to integers


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_jpeg_png_and_transparent_colour_images_decode(fmt):
    x = load_image(colour(40, 30, fmt=fmt), channels=3, size=16)
    assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    y = load_image(colour(40, 30, mode="RGBA"), channels=3, size=16)  # composited onto white
    assert y.shape == (3, 16, 16) and bool(torch.isfinite(y).all())


def test_height_width_and_fit_pad_crop_or_stretch():
    im = Image.new("RGB", (40, 20), (255, 0, 0))  # a red 2:1 strip
    buf = io.BytesIO(); im.save(buf, format="PNG")
    data = buf.getvalue()
    assert load_image(data, channels=3, height=10, width=20).shape == (3, 10, 20)
    assert torch.equal(load_image(data, channels=3, height=10, width=20, fit="pad"),
                       load_image(data, channels=3, height=10, width=20, fit="stretch"))  # same aspect: no padding
    pad = load_image(data, channels=3, size=20)  # padded to a square with black: red in the middle rows only
    assert float(pad[0, 10, 10]) == 1.0 and float(pad[0, 0, 10]) == 0.0 and float(pad[0, 19, 10]) == 0.0
    for fit in ("crop", "stretch"):  # no padding: red everywhere
        full = load_image(data, channels=3, size=20, fit=fit)
        assert bool((full[0] == 1).all()) and bool((full[1:] == 0).all()), fit
    grey = load_image(data, size=20)  # grey pads with white paper, i.e. no ink once inverted
    assert float(grey[0, 0, 10]) == 0.0 and float(grey[0, 10, 10]) > 0.5


def test_square_targets_decode_exactly_as_before():
    """The general padding reduces, for a square target, to the square canvas of max(w, h) metalens always used."""
    data = png(50, 30, seed=3)
    im = Image.open(io.BytesIO(data)).convert("L")
    canvas = Image.new("L", (50, 50), 255)
    canvas.paste(im, (0, 10))
    ref = 255 - np.asarray(canvas.resize((28, 28), resample=Image.Resampling.BOX), dtype=np.uint8)
    assert np.array_equal(data_images.decode_u8(data, 28, "box", True), ref)


def test_load_image_normalises_with_a_family_mean_and_std():
    data = colour(12, 12, seed=2)
    x = load_image(data, channels=3, size=12)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    y = load_image(data, channels=3, size=12, mean=mean, std=std)
    torch.testing.assert_close(y, (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])


@pytest.mark.parametrize("options,message", [
    ({"channels": 2}, "channels must be 1 (grey) or 3 (colour), got 2"),
    ({"height": 0}, "height must be >= 1, got 0"),
    ({"fit": "zoom"}, "fit must be one of pad, crop, stretch, got 'zoom'"),
    ({"mean": (0.5,)}, "give mean and std together"),
    ({"mean": (0.5, 0.5), "std": (1.0, 1.0)}, "mean and std need one value per channel (1), got 2 and 2"),
])
def test_load_image_refuses_bad_options_saying_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_image(png(8, 8), **options)
