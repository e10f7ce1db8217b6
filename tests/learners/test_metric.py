"""Metric learners: shapes, determinism, masks, ProtoNet against nearest class mean, Matching
attention, and short trainings that must beat chance by a wide margin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.episode import Episode, TaskSpec
from metalens.evaluate import evaluate
from metalens.learners.metric import MatchingNet, ProtoNet
from metalens.plots import plot_decision_regions
from metalens.train import TrainConfig, train

torch.set_num_threads(1)

SEED = 7
DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot minimal sets not found at {DATA}")

IMAGE_SPEC = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=3)
SMALL_CONV = {"backbone": "conv4", "channels": 8}


def clusters_episode(n_tasks: int = 6, seed: int = SEED, **options) -> tuple[metalens.TaskFamily, Episode]:
    fam = metalens.make_task("clusters", **options)
    return fam, fam.sample(n_tasks, generator=torch.Generator().manual_seed(seed))


def image_episode(n_tasks: int = 4, seed: int = SEED) -> Episode:
    """Random 3-way 2-shot image tasks (what the pixels are does not matter for these checks)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(2).expand(n_tasks, -1).contiguous()
    return Episode(torch.rand(n_tasks, 6, 1, 28, 28, generator=g), y, torch.rand(n_tasks, 5, 1, 28, 28, generator=g),
                   torch.randint(0, 3, (n_tasks, 5), generator=g), num_classes=3)


LEARNERS = [("protonet", {"backbone": "mlp"}), ("protonet", SMALL_CONV), ("matching", {"backbone": "mlp"}),
            ("matching", SMALL_CONV), ("matching", {**SMALL_CONV, "fce": True}), ("protonet", {"backbone": "identity"})]
IDS = ["proto-mlp", "proto-conv4", "match-mlp", "match-conv4", "match-conv4-fce", "proto-identity"]


def build(name: str, options: dict, seed: int = SEED):
    if options.get("backbone") == "conv4":
        return metalens.make_learner(name, IMAGE_SPEC, seed=seed, **options), image_episode()
    fam, ep = clusters_episode()
    return metalens.make_learner(name, fam, seed=seed, **options), ep


@pytest.mark.parametrize("name,options", LEARNERS, ids=IDS)
def test_predict_shapes_and_a_normalised_distribution(name, options):
    learner, ep = build(name, options)
    d = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    T, Q, N = ep.n_tasks, ep.n_query, ep.num_classes
    assert isinstance(d, torch.distributions.Categorical)
    assert d.logits.shape == (T, Q, N) and tuple(d.batch_shape) == (T, Q)
    assert bool(torch.isfinite(d.logits).all())
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(T, Q))
    loss, metrics = learner.meta_loss(ep)
    assert loss.shape == () and bool(torch.isfinite(loss)) and metrics["loss"] == pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("name,options", LEARNERS, ids=IDS)
def test_same_seed_same_learner_and_a_task_does_not_depend_on_its_batch(name, options):
    a, ep = build(name, options, seed=SEED)
    b, _ = build(name, options, seed=SEED)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f"seed {SEED}"
    with torch.no_grad():
        whole = a.predict(ep.support_x, ep.support_y, ep.query_x).logits
        part = ep[1:3]
        alone = a.predict(part.support_x, part.support_y, part.query_x).logits
        torch.testing.assert_close(whole[1:3], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole, b.predict(ep.support_x, ep.support_y, ep.query_x).logits)
    if sa:
        c, _ = build(name, options, seed=SEED + 1)
        assert any(not torch.equal(v, c.state_dict()[k]) for k, v in sa.items()), f"seeds {SEED}, {SEED + 1}"


@pytest.mark.parametrize("name,options", LEARNERS, ids=IDS)
def test_padded_support_points_change_nothing(name, options):
    learner, ep = build(name, options)
    g = torch.Generator().manual_seed(SEED + 1)
    T, S = ep.n_tasks, ep.n_support
    junk_x = torch.rand(T, 3, *ep.support_x.shape[2:], generator=g) * 3
    junk_y = torch.randint(0, ep.num_classes, (T, 3), generator=g)
    sx, sy = torch.cat([junk_x, ep.support_x], 1), torch.cat([junk_y, ep.support_y], 1)
    mask = torch.cat([torch.zeros(T, 3, dtype=torch.bool), torch.ones(T, S, dtype=torch.bool)], 1)
    mask[0, :2] = True  # task 0 keeps two of its junk points: a mix of padded and unpadded tasks
    with torch.no_grad():
        ref = learner.predict(ep.support_x, ep.support_y, ep.query_x).logits
        padded = learner.predict(sx, sy, ep.query_x, support_mask=mask).logits
        unmasked = learner.predict(sx, sy, ep.query_x).logits
    torch.testing.assert_close(padded[1:], ref[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(padded[0], ref[0], atol=1e-3), "the two real junk points of task 0 had no effect"
    assert not torch.allclose(unmasked[1:], ref[1:], atol=1e-3), "junk points had no effect: the test is vacuous"


def test_protonet_with_identity_embedding_is_the_nearest_class_mean_classifier():
    fam, ep = clusters_episode(n_tasks=20, seed=SEED, ways=4, shots=3, queries=5)
    learner = metalens.make_learner("protonet", fam, backbone="identity")
    assert not learner.trainable and len(list(learner.parameters())) == 0
    ep64 = ep.to(dtype=torch.float64)
    d = learner.predict(ep64.support_x, ep64.support_y, ep64.query_x)
    for t in range(ep.n_tasks):  # directly, one task and one class at a time
        neg_d2 = torch.empty(ep.n_query, 4, dtype=torch.float64)
        for n in range(4):
            mean = ep64.support_x[t][ep64.support_y[t] == n].mean(0)
            neg_d2[:, n] = -((ep64.query_x[t] - mean) ** 2).sum(-1)
        # the Categorical's logits are normalised: log softmax(-d^2)
        torch.testing.assert_close(d.logits[t], torch.log_softmax(neg_d2, -1))
        assert torch.equal(d.probs[t].argmax(-1), neg_d2.argmax(-1))  # the nearest class mean
    # and with padding: the class means of the real points only
    mask = torch.ones(ep.n_tasks, ep.n_support, dtype=torch.bool)
    mask[:, 0] = False
    t = 0
    masked = learner.predict(ep64.support_x, ep64.support_y, ep64.query_x, support_mask=mask).logits[t]
    neg_d2 = torch.empty(ep.n_query, 4, dtype=torch.float64)
    for n in range(4):  # shots=3: every class keeps a real point
        mean = ep64.support_x[t, 1:][ep64.support_y[t, 1:] == n].mean(0)
        neg_d2[:, n] = -((ep64.query_x[t] - mean) ** 2).sum(-1)
    torch.testing.assert_close(masked, torch.log_softmax(neg_d2, -1))


@pytest.mark.parametrize("options", [{"backbone": "mlp"}, {"backbone": "mlp", "fce": True}], ids=["plain", "fce"])
def test_matching_attention_sums_to_one_and_gives_the_class_probabilities(options):
    fam, ep = clusters_episode(n_tasks=5)
    learner = metalens.make_learner("matching", fam, seed=SEED, **options)
    mask = torch.ones(ep.n_tasks, ep.n_support, dtype=torch.bool)
    mask[2, 0] = False  # a padded point (its class keeps no support point in task 2: fine for attention)
    with torch.no_grad():
        for m in (None, mask):
            a = learner.attention(ep.support_x, ep.query_x, support_mask=m)  # [T, Q, S]
            assert a.shape == (ep.n_tasks, ep.n_query, ep.n_support)
            assert bool((a >= 0).all())
            torch.testing.assert_close(a.sum(-1), torch.ones(ep.n_tasks, ep.n_query))
        assert bool((a[2, :, 0] == 0).all()) and bool((a[[0, 1, 3, 4], :, 0] > 0).all())
        a = learner.attention(ep.support_x, ep.query_x)
        probs = learner.predict(ep.support_x, ep.support_y, ep.query_x).probs
        onehot = torch.nn.functional.one_hot(ep.support_y, ep.num_classes).float()  # [T, S, N]
        torch.testing.assert_close(probs, a @ onehot)  # p(y = n | x) = sum_{i: y_i = n} a(x, x_i)


def test_conv4_needs_images_and_metric_learners_need_classification():
    fam = metalens.make_task("clusters")
    with pytest.raises(ValueError, match="needs image inputs"):
        metalens.make_learner("protonet", fam, backbone="conv4")
    with pytest.raises(ValueError, match="regression"):
        metalens.make_learner("matching", metalens.make_task("sinusoid"))
    with pytest.raises(ValueError, match="^backbone must be one of 'auto', 'conv4', 'resnet12', 'mlp', 'identity', got 'resnet'$"):
        ProtoNet.Config(backbone="resnet")
    for name, options, message in [
        ("protonet", {"embedding_dim": 0}, "learner.embedding_dim must be >= 1, got 0"),
        ("matching", {"scale": 0}, "learner.scale must be > 0, got 0.0"),
        ("matching", {"fce": "yes"}, "learner.fce must be true or false, got 'yes'"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            metalens.make_learner(name, fam, **options)


def test_a_learner_trained_20_way_evaluates_5_way():
    a = metalens.make_learner("protonet", TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=20),
                              seed=SEED, **SMALL_CONV)
    b = metalens.make_learner("matching", IMAGE_SPEC, seed=SEED + 1, **SMALL_CONV)
    five = metalens.make_learner("protonet", IMAGE_SPEC, seed=SEED + 2, **SMALL_CONV)
    five.load_state_dict(a.state_dict())  # no parameter depends on N
    ep = image_episode()
    assert five.predict(ep.support_x, ep.support_y, ep.query_x).logits.shape == (4, 5, 3)
    assert isinstance(b, MatchingNet)


# -- learning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["protonet", "matching"])
def test_short_training_on_clusters_approaches_the_oracle(name):
    fam = metalens.make_task("clusters")  # 5-way 1-shot: chance 20%, nearest class mean ~50%, oracle ~52%
    learner = metalens.make_learner(name, fam, seed=SEED, backbone="mlp")
    train(learner, fam, TrainConfig(steps=150, batch_tasks=25, lr=1e-3, seed=SEED), progress=False)
    ev = evaluate(learner, fam, episodes=300, seed=SEED)
    acc, oracle = ev.metrics["accuracy"].mean, ev.oracle["accuracy"].mean
    assert acc > 0.42, f"{name}, seed {SEED}: accuracy {acc:.3f} (chance 0.2, oracle {oracle:.3f})"


@needs_data
@pytest.mark.parametrize("name", ["protonet", "matching"])
def test_short_training_on_omniglot_beats_chance_by_a_wide_margin(name):
    """Meta-train 20-way 1-shot on small1 (100 steps, 16 channels), test 5-way 1-shot on held-out alphabets."""
    options = {"backbone": "conv4", "channels": 16}
    fam = metalens.make_task("omniglot", root=str(DATA), ways=20, shots=1, queries=3)
    learner = metalens.make_learner(name, fam, seed=SEED, **options)
    test = metalens.make_task("omniglot", root=str(DATA), ways=5, shots=1, queries=5)
    five_way = metalens.make_learner(name, test, seed=SEED, **options)
    before = evaluate(five_way, test, episodes=40, seed=SEED, batch_tasks=10).metrics["accuracy"].mean
    train(learner, fam, TrainConfig(steps=100, batch_tasks=1, lr=3e-3, seed=SEED), progress=False)
    five_way.load_state_dict(learner.state_dict())
    acc = evaluate(five_way, test, episodes=40, seed=SEED, batch_tasks=10).metrics["accuracy"].mean
    # chance is 0.2; this budget reaches about 0.75
    assert acc > 0.6 and acc > before + 0.2, f"{name}, seed {SEED}: accuracy {before:.3f} -> {acc:.3f}"


def test_decision_region_figure(tmp_path):
    fam, ep = clusters_episode(n_tasks=2)
    learner = metalens.make_learner("protonet", fam, seed=SEED, backbone="identity")
    path = plot_decision_regions(tmp_path / "regions.png", ep, {"protonet": learner.predict, "oracle": fam.oracle},
                                 resolution=40)
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="2-D classification"):
        plot_decision_regions(tmp_path / "x.png", image_episode(), {"p": learner.predict})


# -- Conv-4 and ResNet-12 on 84x84 colour images; DropBlock in meta-training only ------------------------------
def colour_episode(n_tasks: int = 1, ways: int = 2, shots: int = 1, queries: int = 1, side: int = 84,
                   seed: int = SEED) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(n_tasks, ways * shots, 3, side, side, generator=g), labels.repeat(n_tasks, shots),
                   torch.randn(n_tasks, ways * queries, 3, side, side, generator=g), labels.repeat(n_tasks, queries),
                   num_classes=ways)


@pytest.mark.parametrize("name", ["protonet", "matching"])
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_metric_learners_on_84x84_colour_images(name, backbone):
    spec = TaskSpec(kind="classification", x_shape=(3, 84, 84), num_classes=2)
    opts = {"channels": 4} if backbone == "conv4" else {"resnet_channels": [4, 4, 4, 4]}
    lrn = metalens.make_learner(name, spec, seed=SEED, backbone=backbone, **opts)
    assert lrn.embedding_dim == 4 * 5 * 5
    ep = colour_episode(2)
    with torch.no_grad():
        d = lrn.predict(ep.support_x, ep.support_y, ep.query_x)
    assert d.logits.shape == (2, 2, 2) and bool(torch.isfinite(d.logits).all())
    loss, _ = lrn.meta_loss(ep, generator=torch.Generator().manual_seed(SEED))
    loss.backward()
    grads = [p.grad for p in lrn.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), f"{name}/{backbone}, seed {SEED}"
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_dropblock_changes_the_meta_loss_deterministically_and_never_the_predictions():
    spec = TaskSpec(kind="classification", x_shape=(3, 32, 32), num_classes=3)
    opts = dict(backbone="resnet12", resnet_channels=[4, 4, 4, 4], dropblock=0.2, dropblock_size=2)
    lrn = metalens.make_learner("protonet", spec, seed=SEED, **opts)
    plain = metalens.make_learner("protonet", spec, seed=SEED, **{**opts, "dropblock": 0.0})
    ep = colour_episode(3, ways=3, shots=2, queries=2, side=32)

    def loss(learner, seed):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return float(learner.meta_loss(ep, generator=g)[0].detach())

    assert loss(lrn, SEED) == loss(lrn, SEED) and loss(lrn, SEED) != loss(lrn, SEED + 1), f"seed {SEED}"
    assert loss(lrn, SEED) != loss(plain, SEED) and loss(lrn, None) == loss(plain, None)
    with torch.no_grad():  # predictions: every unit, no randomness
        a = lrn.predict(ep.support_x, ep.support_y, ep.query_x).logits
        b = plain.predict(ep.support_x, ep.support_y, ep.query_x).logits
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="dropblock applies to the resnet12 backbone, not conv4"):
        metalens.make_learner("protonet", spec, seed=SEED, dropblock=0.1)  # auto: conv4
