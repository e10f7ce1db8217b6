"""projected: held-out tasks never reuse training examples, pools that are really finite and fixed by
their seed, and episodes built exactly from their task's projection and label map."""

from __future__ import annotations

import re

import pytest
import torch

import metalens
from metalens import rng
from metalens.config import ConfigError
from metalens.tasks.projected import Projected

torch.set_num_threads(1)

SEED = 20240611


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_splits_partition_the_examples_by_class():
    family = metalens.make_task("projected")
    parts = {s: set(family.split_examples(s).tolist()) for s in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
    assert not (parts["val"] & parts["test"])
    assert set().union(*parts.values()) == set(range(family.data.x.shape[0]))
    y = family.data.y
    for s, frac in (("test", 0.2), ("val", 0.1)):
        per_class = torch.bincount(y[torch.tensor(sorted(parts[s]))], minlength=10).double()
        assert bool(((per_class / torch.bincount(y, minlength=10) - frac).abs() < 0.01).all()), s


@pytest.mark.parametrize("split", ["val", "test"])
def test_held_out_tasks_never_reuse_training_examples(split):
    family = metalens.make_task("projected", pool_log2=4)
    train = set(family.split_examples("train").tolist())
    own = set(family.split_examples(split).tolist())
    seen = set()
    for c in range(5):  # the evaluator's chunks
        ids, examples, _ = family.sample_with_ids(50, generator=rng.generator(SEED, rng.Stream.EVAL, c),
                                                     split=split)
        assert ids is None
        seen |= set(examples.flatten().tolist())
    assert seen <= own and not (seen & train), f"{split} tasks (seed {SEED}) used training examples"
    assert len(seen) > 0.9 * len(own)  # and they do use the held-out examples
    _, tr_examples, _ = family.sample_with_ids(50, generator=gen(SEED), split="train")
    assert set(tr_examples.flatten().tolist()) <= train


def test_held_out_inputs_are_held_out_images_black_box():
    """Without the projection the inputs are the (standardised) images themselves: every input of a test
    task is a test image, none a training image."""
    family = metalens.make_task("projected", projection="none", ways=10)
    ep = family.eval_episodes(SEED, 60)  # the evaluator's test tasks
    x = torch.cat([ep.support_x, ep.query_x], 1).reshape(-1, family.in_features)
    data = family.data.x
    nearest = torch.cdist(x, data, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert float(nearest.values.max()) < 1e-4  # every input is an image of the data set
    test = set(family.split_examples("test").tolist())
    assert set(nearest.indices.tolist()) <= test, f"seed {SEED}: a test task showed a non-test image"


def test_episodes_follow_their_tasks_projection_and_label_map():
    family = metalens.make_task("projected", pool_log2=3, ways=4, shots=2, queries=3, dim=12)
    ids, examples, ep = family.sample_with_ids(20, generator=gen(SEED))
    classes, A = family.pool_tasks(ids)
    S = ep.n_support
    labels = torch.cat([ep.support_y, ep.query_y], 1)
    x = torch.cat([ep.support_x, ep.query_x], 1)
    # the data set's class of each example is the class behind its label in that task
    torch.testing.assert_close(family.data.y[examples], classes.gather(1, labels))
    torch.testing.assert_close(x, family.data.x[examples] @ A.transpose(1, 2))
    # every class has its shots in the support set and its queries in the query set; no example twice
    assert bool((torch.stack([(ep.support_y == j).sum(1) for j in range(4)]) == 2).all())
    assert bool((torch.stack([(ep.query_y == j).sum(1) for j in range(4)]) == 3).all())
    assert all(len(set(row.tolist())) == examples.shape[1] for row in examples)
    assert examples.shape == (20, S + ep.n_query)


def test_a_pool_is_really_finite_fixed_by_its_seed_and_nested():
    family = metalens.make_task("projected", pool_log2=2)
    ids, _, _ = family.sample_with_ids(200, generator=gen(SEED))
    assert set(ids.tolist()) == {0, 1, 2, 3}, f"seed {SEED}"
    classes, A = family.pool_tasks(ids)
    distinct = {(tuple(c.tolist()), round(float(a[0, 0]), 6)) for c, a in zip(classes, A)}
    assert len(distinct) == 4, f"seed {SEED}: {len(distinct)} distinct tasks in a pool of 4"
    again = metalens.make_task("projected", pool_log2=5, shots=3)  # a bigger pool holds the smaller one
    c2, A2 = again.pool_tasks(torch.arange(4))
    c1, A1 = family.pool_tasks(torch.arange(4))
    assert torch.equal(c1, c2) and torch.equal(A1, A2)
    other = metalens.make_task("projected", pool_log2=2, pool_seed=1)
    assert not torch.equal(other.pool_tasks(torch.arange(4))[1], A1)
    # unseen tasks are not pool tasks: sample(split="test") starts by drawing new tasks from its generator
    unseen = family.draw_tasks(50, generator=gen(SEED))[1]
    assert not any(torch.allclose(a, b) for a in unseen for b in A1)


def test_labels_are_permuted_per_task_unless_asked_not_to():
    fam = metalens.make_task("projected")
    classes, _ = fam.draw_tasks(50, generator=gen(SEED))
    assert bool((classes.sort(1).values == torch.arange(10)).all())  # all 10 classes, each once
    assert len({tuple(c.tolist()) for c in classes}) == 50  # in a different order each time
    fixed = metalens.make_task("projected", permute_labels=False)
    assert bool((fixed.draw_tasks(5, generator=gen(SEED))[0] == torch.arange(10)).all())


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="ways must be at most the 10 classes"):
        metalens.make_task("projected", ways=11)
    with pytest.raises(ValueError, match="fewer than shots \\+ queries"):
        metalens.make_task("projected", shots=30, queries=20)
    with pytest.raises(ValueError, match="^val_fraction \\+ test_fraction must be < 1"):
        Projected.Config(val_fraction=0.5, test_fraction=0.5)
    for options, message in [
        ({"val_fraction": 0.6, "test_fraction": 0.4},
         "task.val_fraction + test_fraction must be < 1 (some examples must be left to train on), got 0.6 + 0.4"),
        ({"test_fraction": 1}, "task.test_fraction must be >= 0 and < 1, got 1.0"),  # lt
        ({"projection": "pca"}, "task.projection must be one of 'gaussian', 'none', got 'pca'"),
        ({"split_seed": -2}, "task.split_seed must be >= 0, got -2"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            metalens.make_task("projected", **options)
    with pytest.raises(ValueError, match="^shots must be >= 1, got 0$"):
        Projected.Config(shots=0)
    family = metalens.make_task("projected", val_fraction=0.0)
    with pytest.raises(ValueError, match="val split has no examples"):
        family.sample(2, generator=gen(SEED), split="val")
