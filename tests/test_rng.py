import torch

from metalens import rng


def test_generators_depend_on_every_key_only():
    seen = set()
    for keys in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0), (0,)]:
        seed = rng.derive_seed(*keys)
        assert 0 <= seed < 2**63
        seen.add(seed)
        a = torch.rand(4, generator=rng.generator(*keys))
        torch.rand(100)  # the global generator must not matter
        assert torch.equal(a, torch.rand(4, generator=rng.generator(*keys)))
    assert len(seen) == 6


def test_negative_keys_rejected():
    import pytest

    with pytest.raises(ValueError, match="non-negative"):
        rng.derive_seed(0, -1)
