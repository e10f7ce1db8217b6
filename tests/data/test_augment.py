"""Train-time augmentation (metalens.data.augment) against what each transform must do: the same generator state
gives the same images, pad-and-crop is a shift, a flip mirrors, an affine map with no strength is the identity and
a quarter turn is rot90, jitter stays in [0, 1], and nothing touches the global RNG.
"""

from __future__ import annotations

import pytest
import torch

from metalens.data import augment as aug

torch.set_num_threads(1)

SEED = 20240611


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 6, c: int = 3, h: int = 12, w: int = 12) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(SEED + 1))


@pytest.mark.parametrize("recipe", ["natural-pad", "natural-resized", "handwriting"])
def test_the_same_generator_state_gives_the_same_images_and_another_other_images(recipe):
    x = batch()

    def run(seed):
        if recipe == "handwriting":
            return aug.handwriting(x, generator=gen(seed))
        return aug.natural(x, generator=gen(seed), crop=recipe.split("-")[1])

    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b, c = run(SEED), run(SEED), run(SEED + 1)
    assert torch.equal(state, torch.get_rng_state()), "augmentation used the global RNG"
    assert a.shape == x.shape and torch.equal(a, b), f"seed {SEED}"
    assert not torch.equal(a, c) and not torch.equal(a, x), f"seeds {SEED}, {SEED + 1}"


def test_pad_crop_is_a_shift_with_zeros_coming_in():
    x = batch(b=40, c=2)
    y = aug.pad_crop(x, 3, generator=gen())
    g = gen()
    oy, ox = torch.randint(0, 7, (40,), generator=g), torch.randint(0, 7, (40,), generator=g)  # as drawn
    for i in range(40):
        ref = torch.nn.functional.pad(x[i], (3, 3, 3, 3))[:, oy[i]: oy[i] + 12, ox[i]: ox[i] + 12]
        assert torch.equal(y[i], ref), i
    assert bool((oy != 3).any())  # not all centred: some shift happened


def test_flip_mirrors_about_half_of_the_images():
    x = batch(b=200, c=1)
    y = aug.flip(x, 0.5, generator=gen())
    mirrored = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(200)]
    kept = [bool(torch.equal(y[i], x[i])) for i in range(200)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 70 < sum(mirrored) < 130, sum(mirrored)
    assert torch.equal(aug.flip(x, 0.0, generator=gen()), x)


def test_jitter_stays_in_the_unit_interval_and_keeps_grey_images_grey():
    x = batch(b=20)
    y = aug.jitter(x, 0.8, generator=gen())
    assert float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.equal(x, y)
    grey = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    z = aug.jitter(grey, 0.8, generator=gen())
    torch.testing.assert_close(z[:, 0], z[:, 1])
    torch.testing.assert_close(z[:, 1], z[:, 2])
    torch.testing.assert_close(aug.jitter(x, 0.0, generator=gen()), x)  # factors of exactly 1
    assert torch.equal(aug.natural(x, generator=gen(), crop="none", flip_p=0.0, jitter_strength=0.0), x)


def test_affine_with_no_strength_is_the_identity_and_a_quarter_turn_is_rot90():
    x = batch(b=4, c=1, h=9, w=9)
    same = aug.affine(x, rotation=0, shear=0, scale=(1, 1), translate=0, generator=gen())
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    # rotation drawn from [-90, 90] cannot be pinned; call the warp with a fixed quarter turn instead
    theta = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(4, 2, 3)
    turned = aug._warp(x, theta)
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))


def test_handwriting_moves_strokes_but_keeps_them_inside_mostly():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0  # a stroke in the middle, background 0
    y = aug.handwriting(x, generator=gen())
    assert not torch.equal(x, y) and float(y.min()) >= 0 and float(y.max()) <= 1 + 1e-6
    ink = y.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert bool(((ink > 0.6) & (ink < 1.5)).all()), ink  # scales of 0.9-1.1: about the same ink


def test_resized_crop_of_the_whole_image_is_the_image():
    x = batch(b=3)
    y = aug.resized_crop(x, (1.0, 1.0), (1.0, 1.0), generator=gen())
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
