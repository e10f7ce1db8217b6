"""Train-time augmentation of image batches, as the few-shot literature trains: torch ops on a whole batch.

Two recipes, each a pure function of a batch ``x [B, C, H, W]`` (float, in ``[0, 1]``,
before any normalisation) and an explicit ``torch.Generator``, from which every random
parameter is drawn, one vector of ``B`` per parameter, in a fixed order: the same
generator state gives the same images, bit for bit.

- :func:`natural` (natural images; the recipe of Lee et al. 2019 and Tian et al. 2020):
  a random crop, either pad-and-crop (``padding`` pixels of zeros on every side, then a
  random window of the original size) or a random resized crop (a window of ``scale`` of the
  area and aspect ``ratio``, resampled to the original size, bilinear), then a horizontal
  flip with probability ``flip``, then colour jitter: brightness, contrast and saturation
  each scaled by a factor drawn from ``[1 - jitter, 1 + jitter]`` (in that order; contrast
  about each image's mean grey level, saturation about each pixel's grey level, with
  ITU-R 601 luminance weights; clamped to ``[0, 1]`` after each).
- :func:`handwriting` (strokes on a blank background): a random affine map about the
  image's centre, ``p -> R(theta) Sh(phi) s p + t``, with ``theta`` uniform in
  ``[-rotation, rotation]`` degrees, a horizontal shear of angle ``phi`` uniform in
  ``[-shear, shear]`` degrees, a scale ``s`` uniform in ``scale`` and a translation ``t``
  uniform in ``[-translate, translate]`` of the width and height; bilinear resampling, 0
  (no ink) outside the image.

Crops are slicing (pad-and-crop) or ``torch.nn.functional.affine_grid`` /
``grid_sample`` (resized crops, affine maps); no image goes through PIL.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["natural", "handwriting", "pad_crop", "resized_crop", "flip", "jitter", "affine", "luminance"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as Pillow's convert("L") and torchvision's rgb_to_grayscale


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def luminance(x: Tensor) -> Tensor:
    """Grey level ``[B, 1, H, W]`` of ``x [B, C, H, W]``: ITU-R 601 weights for colour, ``x`` itself for grey."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * w).sum(1, keepdim=True)


def pad_crop(x: Tensor, padding: int, *, generator: torch.Generator) -> Tensor:
    """Pad every image by ``padding`` zeros on each side, then take a random window of the original size."""
    B, C, H, W = x.shape
    oy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    xp = F.pad(x, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(H))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(W))[:, None, :]  # [B, 1, W]
    out = xp[torch.arange(B)[:, None, None], :, rows, cols]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def resized_crop(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float], *,
                 generator: torch.Generator) -> Tensor:
    """A random window of ``scale`` of the area and aspect (width / height) ``ratio``, resampled to ``H x W``.

    A window that would not fit is clamped to the image's width or height (torchvision redraws
    up to ten times instead; a fixed number of draws keeps the generator's use independent of
    the images).
    """
    B = x.shape[0]
    area = _uniform(B, scale[0], scale[1], generator)
    r = torch.exp(_uniform(B, math.log(ratio[0]), math.log(ratio[1]), generator))
    cw = torch.sqrt(area * r).clamp(max=1.0)  # window width / image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(B, generator=generator, dtype=torch.float64) - 1)  # centre, in [-1, 1] units
    cy = (1 - ch) * (2 * torch.rand(B, generator=generator, dtype=torch.float64) - 1)
    zero = torch.zeros_like(cw)
    theta = torch.stack([torch.stack([cw, zero, cx], -1), torch.stack([zero, ch, cy], -1)], 1)  # [B, 2, 3]
    return _warp(x, theta)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Sample ``x`` at ``theta @ [u, v, 1]`` for every output pixel ``(u, v)`` (normalised coordinates), bilinear."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flip(x: Tensor, p: float, *, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    hit = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(hit[:, None, None, None], x.flip(-1), x)


def jitter(x: Tensor, strength: float, *, generator: torch.Generator) -> Tensor:
    """Brightness, contrast, then saturation, each scaled by a factor in ``[1 - strength, 1 + strength]``."""
    B = x.shape[0]
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    b, c, s = (_uniform(B, low, high, generator).to(x.dtype)[:, None, None, None] for _ in range(3))
    x = (x * b).clamp(0.0, 1.0)
    m = luminance(x).mean((-3, -2, -1), keepdim=True)
    x = ((x - m) * c + m).clamp(0.0, 1.0)
    if x.shape[1] > 1:
        g = luminance(x)
        x = ((x - g) * s + g).clamp(0.0, 1.0)
    return x


def affine(x: Tensor, *, rotation: float, shear: float, scale: tuple[float, float], translate: float,
           generator: torch.Generator) -> Tensor:
    """A random affine map of each image about its centre (see the module docstring); rotations are exact in
    pixels whatever the aspect."""
    B, _, H, W = x.shape
    theta = torch.deg2rad(_uniform(B, -rotation, rotation, generator))
    phi = torch.deg2rad(_uniform(B, -shear, shear, generator))
    s = _uniform(B, scale[0], scale[1], generator)
    t = torch.stack([_uniform(B, -translate, translate, generator),
                     _uniform(B, -translate, translate, generator)], -1) * 2  # [B, 2], normalised units
    cos, sin, tan = torch.cos(theta), torch.sin(theta), torch.tan(phi)
    # forward map in pixels: A = R(theta) Sh(phi) s; in normalised units D^-1 A D, D = diag(W, H) / 2
    a11, a12 = s * cos, s * (cos * tan - sin)
    a21, a22 = s * sin, s * (sin * tan + cos)
    a = torch.stack([torch.stack([a11, a12 * H / W], -1), torch.stack([a21 * W / H, a22], -1)], 1)  # [B, 2, 2]
    inv = torch.linalg.inv(a)  # output pixel p shows the input at A^-1 (p - t)
    theta_grid = torch.cat([inv, -(inv @ t[:, :, None])], 2)  # [B, 2, 3]
    return _warp(x, theta_grid)


def natural(x: Tensor, *, generator: torch.Generator, crop: Literal["pad", "resized", "none"] = "pad",
            padding: int = 8, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, jitter_strength: float = 0.4) -> Tensor:
    """The natural-image recipe on ``x [B, C, H, W]`` in ``[0, 1]``: crop, flip, colour jitter (module docstring).

    >>> x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> a = natural(x, generator=torch.Generator().manual_seed(1))
    >>> torch.equal(a, natural(x, generator=torch.Generator().manual_seed(1))), a.shape
    (True, torch.Size([4, 3, 16, 16]))
    """
    if crop == "pad":
        x = pad_crop(x, padding, generator=generator)
    elif crop == "resized":
        x = resized_crop(x, scale, ratio, generator=generator)
    elif crop != "none":
        raise ValueError(f"crop must be 'pad', 'resized' or 'none', got {crop!r}")
    if flip_p > 0:
        x = flip(x, flip_p, generator=generator)
    if jitter_strength > 0:
        x = jitter(x, jitter_strength, generator=generator)
    return x


def handwriting(x: Tensor, *, generator: torch.Generator, rotation: float = 10.0, shear: float = 10.0,
                scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1) -> Tensor:
    """The handwriting recipe on ``x [B, C, H, W]``: one random affine map per image (module docstring).

    >>> x = torch.zeros(2, 1, 9, 9); x[:, :, 4, 4] = 1.0
    >>> y = handwriting(x, generator=torch.Generator().manual_seed(0), rotation=0, shear=0, scale=(1, 1),
    ...                 translate=0)
    >>> torch.allclose(y, x, atol=1e-6)  # the identity map
    True
    """
    return affine(x, rotation=rotation, shear=shear, scale=scale, translate=translate, generator=generator)
