"""synthetic_tables: balanced tasks of varying classes, shots and widths, standardised by their support set, and
labels that carry information about the inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metalens
from metalens.config import ConfigError
from metalens.tasks.synthetic_tables import SyntheticTables, fit_width, standardize_by_support

torch.set_num_threads(1)

SEED = 20240611


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nearest_class_mean_accuracy(ep) -> float:
    onehot = F.one_hot(ep.support_y, ep.num_classes).double()  # [T, S, C]
    means = onehot.transpose(1, 2) @ ep.support_x.double() / onehot.sum(1)[..., None]  # [T, C, D]
    d2 = ((ep.query_x.double()[:, :, None] - means[:, None]) ** 2).sum(-1)
    return float((d2.argmin(-1) == ep.query_y).double().mean())


def test_classes_and_shots_vary_per_batch_and_every_class_is_balanced():
    family = metalens.make_task("synthetic_tables", max_features=12, max_classes=6, min_classes=2, shots=4,
                                min_shots=1, queries=3)
    assert family.spec.num_classes == 6 and family.spec.x_shape == (12,) and family.class_range == (2, 6)
    seen_c, seen_k = set(), set()
    for step in range(25):
        ep = family.episode(SEED, step, 5)
        C, S = ep.num_classes, ep.n_support
        K = S // C
        seen_c.add(C)
        seen_k.add(K)
        assert 2 <= C <= 6 and 1 <= K <= 4 and S == C * K and ep.n_query == 3 * C, f"seed {SEED}, step {step}"
        assert bool((torch.bincount(ep.support_y.flatten(), minlength=C) == 5 * K).all())
        assert bool((torch.bincount(ep.query_y.flatten(), minlength=C) == 5 * 3).all())
        assert ep.support_mask is None
    assert len(seen_c) >= 4 and len(seen_k) >= 3, (seen_c, seen_k)
    held_out = family.eval_episodes(SEED, 60)  # chunks concatenate: max_classes-way, shots-shot
    assert held_out.num_classes == 6 and held_out.n_support == 24 and held_out.n_tasks == 60


def test_inputs_are_standardised_by_the_support_set_and_zero_padded():
    family = metalens.make_task("synthetic_tables", max_features=16, min_features=2, max_classes=3, shots=8,
                                queries=4, clip=100.0)
    ep = family.sample(40, generator=gen(SEED))
    sx = ep.support_x  # [T, S, D]
    std = sx.std(1, unbiased=False)
    real = std > 1e-3  # features that vary on the support set
    assert torch.allclose(sx.mean(1), torch.zeros_like(std), atol=1e-4)
    assert torch.allclose(std[real], torch.ones_like(std[real]), atol=1e-3)
    widths = real.sum(1)
    assert int(widths.min()) >= 1 and int(widths.max()) <= 16 and len(set(widths.tolist())) > 3
    # the features beyond a task's width are zero in the support and the query set
    for t in range(ep.n_tasks):
        last = int(real[t].nonzero().max())
        assert float(ep.query_x[t, :, last + 1:].abs().sum()) == 0.0


@pytest.mark.parametrize("labeler", ["mlp", "tree"])
def test_labels_depend_on_the_inputs(labeler):
    family = metalens.make_task("synthetic_tables", max_features=8, max_classes=3, shots=10, queries=10,
                                labeler=labeler)
    ep = family.sample(200, generator=gen(SEED))
    acc = nearest_class_mean_accuracy(ep)
    assert acc > 0.45, f"{labeler}, seed {SEED}: nearest class mean {acc:.3f}, chance 0.333"


def test_standardize_by_support_ignores_masked_points_and_zeroes_constant_features():
    sx = torch.tensor([[[1.0, 2.0], [3.0, 2.0], [100.0, -50.0]]])
    mask = torch.tensor([[True, True, False]])
    s, q = standardize_by_support(sx, torch.tensor([[[2.0, 7.0]]]), mask)
    ref_s, ref_q = standardize_by_support(sx[:, :2], torch.tensor([[[2.0, 7.0]]]))
    assert torch.equal(s[:, :2], ref_s) and torch.equal(q, ref_q)
    assert s[0, 2].abs().sum() == 0 and q[0, 0, 1] == 0  # padded point zero; constant feature zero
    assert fit_width(torch.ones(1, 5), 3).shape == (1, 3) and fit_width(torch.ones(1, 2), 3).tolist() == [[1, 1, 0]]


def test_options_between_fields_are_checked():
    with pytest.raises(ConfigError, match="min_classes must be <= max_classes"):
        SyntheticTables.Config(max_classes=3, min_classes=4)
    with pytest.raises(ConfigError, match="min_shots must be <= shots"):
        SyntheticTables.Config(shots=2, min_shots=3)
    with pytest.raises(ConfigError, match="min_features must be <= max_features"):
        SyntheticTables.Config(max_features=4, min_features=5)
    inputs = metalens.make_task("synthetic_tables", max_classes=7).user_inputs()
    assert inputs == {"standardize": "support", "pad_features": True, "clip": 6.0, "class_range": [2, 7]}
