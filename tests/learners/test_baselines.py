"""Baselines: the per-task fit equals a loop over tasks; scratch and pretrain do what they say."""

import re
import typing
from pathlib import Path

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.episode import Episode
from metalens.evaluate import evaluate
from metalens.functional import fit_per_task, stack_params, task_apply
from metalens.nets import ACTIVATIONS, MLP, Activation
from metalens.train import TrainConfig, train

SEED = 0


def test_vmapped_fit_equals_loop_over_tasks():
    torch.manual_seed(SEED)
    fam = metalens.make_task("sinusoid", shots=5)
    ep = fam.episode(SEED, 0, 4)
    net = MLP((1,), 1, (8, 8))
    init = dict(net.named_parameters())
    for optimizer in ("sgd", "adam"):
        batched = fit_per_task(net, init, ep.support_x, ep.support_y, None, steps=5, lr=0.05,
                               optimizer=optimizer, classification=False)
        for t in range(4):
            one = fit_per_task(net, init, ep.support_x[t:t + 1], ep.support_y[t:t + 1], None, steps=5,
                               lr=0.05, optimizer=optimizer, classification=False)
            for k in init:
                torch.testing.assert_close(batched[k][t], one[k][0], rtol=1e-5, atol=1e-6)
        # and against plain autograd for one task with torch.optim
        ref = MLP((1,), 1, (8, 8))
        ref.load_state_dict(net.state_dict())
        opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(ref.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            ((ref(ep.support_x[2]) - ep.support_y[2]) ** 2).mean().backward()
            opt.step()
        for k, v in ref.named_parameters():
            torch.testing.assert_close(batched[k][2], v.detach(), rtol=1e-5, atol=1e-6)


def test_fit_ignores_masked_support_points():
    fam = metalens.make_task("sinusoid", shots=6)
    ep = fam.episode(SEED, 1, 2)
    net = MLP((1,), 1, (8,))
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    y = ep.support_y.clone()
    y[:, 4:] = 100.0  # garbage in padded points
    a = fit_per_task(net, dict(net.named_parameters()), ep.support_x, y, mask, steps=3, lr=0.1,
                     classification=False)
    b = fit_per_task(net, dict(net.named_parameters()), ep.support_x[:, :4], ep.support_y[:, :4], None,
                     steps=3, lr=0.1, classification=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_scratch_beats_the_prior_mean_and_oracle_beats_scratch():
    fam = metalens.make_task("sinusoid", shots=10)
    scratch = metalens.make_learner("scratch", fam, seed=SEED)
    ev = evaluate(scratch, fam, episodes=100, seed=SEED)
    tasks = fam.eval_episodes(SEED, 100)
    zero_mse = (tasks.query_y ** 2).mean().item()
    assert ev.metrics["mse"].mean < 0.8 * zero_mse, (ev.metrics["mse"], zero_mse)
    assert ev.oracle["mse"].mean < ev.metrics["mse"].mean


def test_clusters_oracle_accuracy_above_scratch():
    fam = metalens.make_task("clusters")
    scratch = metalens.make_learner("scratch", fam, seed=SEED)
    ev = evaluate(scratch, fam, episodes=200, seed=SEED)
    assert ev.metrics["accuracy"].mean > 1.0 / fam.spec.num_classes + 0.1  # well above chance
    assert ev.oracle["accuracy"].mean > ev.metrics["accuracy"].mean + ev.metrics["accuracy"].ci95


def test_pretrain_pooled_loss_and_plain_prediction():
    fam = metalens.make_task("sinusoid", shots=5)
    lrn = metalens.make_learner("pretrain", fam, seed=SEED, finetune_steps=0)
    ep = fam.episode(SEED, 0, 3)
    loss, _ = lrn.meta_loss(ep)
    x = torch.cat([ep.support_x, ep.query_x], 1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    torch.testing.assert_close(loss, ((lrn.net(x) - y) ** 2).mean())
    torch.testing.assert_close(lrn.predict(ep.support_x, ep.support_y, ep.query_x).mean, lrn.net(ep.query_x))


def test_pretrain_finetuning_uses_the_support_set():
    fam = metalens.make_task("sinusoid", shots=10)
    lrn = metalens.make_learner("pretrain", fam, seed=SEED, finetune_steps=20, finetune_lr=0.02)
    ep = fam.episode(SEED, 0, 50)
    before = ((lrn.net(ep.support_x) - ep.support_y) ** 2).mean()
    params = fit_per_task(lrn.net, dict(lrn.net.named_parameters()), ep.support_x, ep.support_y, None,
                          steps=20, lr=0.02, classification=False)
    after = ((task_apply(lrn.net, params, ep.support_x) - ep.support_y) ** 2).mean()
    assert after < before


def test_oracle_learner_needs_an_oracle():
    spec = metalens.TaskSpec(kind="regression", x_shape=(1,))
    with pytest.raises(ValueError, match="no tractable oracle"):
        metalens.make_learner("oracle", spec)


@pytest.mark.parametrize("name, options, message", [
    ("pretrain", {"hidden": []}, "learner.hidden must hold at least 1 value(s), got ()"),  # min_len
    ("scratch", {"hidden": [8, -1]}, "learner.hidden values must be >= 1, got (8, -1)"),
    ("scratch", {"optimizer": "rmsprop"}, "learner.optimizer must be one of 'adam', 'sgd', got 'rmsprop'"),
    ("scratch", {"lr": float("nan")}, "learner.lr must be finite, got nan"),
    ("pretrain", {"finetune_steps": -1}, "learner.finetune_steps must be >= 0, got -1"),
    ("pretrain", {"finetune_lr": 0}, "learner.finetune_lr must be > 0, got 0.0"),
    ("pretrain", {"backbone": "conv5"}, "learner.backbone must be one of 'mlp', 'conv4', 'resnet12', got 'conv5'"),
    ("oracle", {"hidden": [8]}, "unknown option 'learner.hidden' for learner 'oracle'; valid options: (none)"),
])
def test_options_outside_their_declared_constraint_are_refused(name, options, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        metalens.make_learner(name, metalens.make_task("sinusoid"), **options)


def test_the_activation_choice_is_the_networks():
    assert set(typing.get_args(Activation)) == set(ACTIVATIONS)


def test_stack_params_copies():
    p = {"w": torch.ones(2)}
    s = stack_params(p, 3)
    s["w"][0, 0] = 5.0
    assert p["w"][0] == 1.0 and s["w"].shape == (3, 2)


# -- pretrain on families with global training classes (the image families) -----------------------
def _global_spec(ways: int = 3) -> metalens.TaskSpec:
    return metalens.TaskSpec(kind="classification", x_shape=(2,), num_classes=ways, train_classes=6)


def _global_episode(T: int = 2, N: int = 3, K: int = 2, Q: int = 3, classes=None) -> Episode:
    g = torch.Generator().manual_seed(SEED)
    sy = torch.arange(N).repeat(K).expand(T, -1).clone()
    qy = torch.arange(N).repeat(Q).expand(T, -1).clone()
    return Episode(torch.randn(T, N * K, 2, generator=g), sy, torch.randn(T, N * Q, 2, generator=g), qy,
                   num_classes=N, classes=classes)


def test_pretrain_trains_on_global_classes_and_no_parameter_depends_on_the_way():
    lrn = metalens.make_learner("pretrain", _global_spec(3), seed=SEED, hidden=[8])
    other = metalens.make_learner("pretrain", _global_spec(5), seed=SEED, hidden=[8])
    assert {k: v.shape for k, v in lrn.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}
    assert lrn.net(torch.zeros(1, 2)).shape == (1, 6)  # a classifier over the 6 training classes
    ids = torch.tensor([[5, 0, 3], [1, 4, 2]])
    ep = _global_episode(classes=ids)
    loss, _ = lrn.meta_loss(ep)
    terms = []  # by hand: every point's cross-entropy against its global class
    for t in range(2):
        for x, y in zip(torch.cat([ep.support_x[t], ep.query_x[t]]), torch.cat([ep.support_y[t], ep.query_y[t]])):
            terms.append(torch.nn.functional.cross_entropy(lrn.net(x[None]), ids[t, y][None]))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    with pytest.raises(ValueError, match="carries none"):
        lrn.meta_loss(_global_episode())
    with pytest.raises(ValueError, match="class id 6, outside the family's 6 training classes"):
        lrn.meta_loss(_global_episode(classes=torch.tensor([[6, 0, 3], [1, 4, 2]])))


def test_pretrain_fits_a_fresh_head_on_frozen_features():
    steps, lr = 4, 0.5
    lrn = metalens.make_learner("pretrain", _global_spec(3), seed=SEED, hidden=[8], finetune_steps=steps,
                                finetune_lr=lr)
    ep = _global_episode()
    logits = lrn.predict(ep.support_x, ep.support_y, ep.query_x).logits
    for t in range(2):  # reference: plain SGD on a zero-initialised linear head, one task at a time
        with torch.no_grad():
            f_s, f_q = lrn.net.embed(ep.support_x[t]), lrn.net.embed(ep.query_x[t])
        w = torch.zeros(3, f_s.shape[1], requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(f_s @ w.T + b, ep.support_y[t])
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                w -= lr * gw
                b -= lr * gb
        ref = torch.log_softmax(f_q @ w.T + b, -1)
        torch.testing.assert_close(logits[t], ref.detach(), rtol=1e-5, atol=1e-6)
    # no steps: the fresh head stays at zero, every class equally likely
    lrn0 = metalens.make_learner("pretrain", _global_spec(3), seed=SEED, hidden=[8], finetune_steps=0)
    torch.testing.assert_close(lrn0.predict(ep.support_x, ep.support_y, ep.query_x).probs,
                               torch.full((2, 9, 3), 1 / 3))


DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()


@pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_pretrain_on_omniglot_learns_features_that_transfer_to_held_out_alphabets():
    """Pre-train on small1's 544 classes (300 steps of 20-way tasks), test 5-way 1-shot on held-out alphabets."""
    options = {"backbone": "conv4", "channels": 16, "finetune_steps": 100, "finetune_lr": 0.1}
    torch.set_num_threads(1)
    fam = metalens.make_task("omniglot", root=str(DATA), ways=20, shots=1, queries=3)
    learner = metalens.make_learner("pretrain", fam, seed=SEED, **options)
    test = metalens.make_task("omniglot", root=str(DATA), ways=5, shots=1, queries=5)
    five_way = metalens.make_learner("pretrain", test, seed=SEED, **options)
    before = evaluate(five_way, test, episodes=40, seed=SEED, batch_tasks=10).metrics["accuracy"].mean
    train(learner, fam, TrainConfig(steps=300, batch_tasks=1, lr=3e-3, seed=SEED), progress=False)
    five_way.load_state_dict(learner.state_dict())
    acc = evaluate(five_way, test, episodes=40, seed=SEED, batch_tasks=10).metrics["accuracy"].mean
    # chance is 0.2; a linear probe on the random initial features reaches about 0.36, this budget about 0.66
    assert acc > 0.55 and acc > before + 0.2, f"seed {SEED}: accuracy {before:.3f} -> {acc:.3f}"


# -- Conv-4 and ResNet-12 on 84x84 colour images ------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_pretrain_on_84x84_colour_images(backbone):
    spec = metalens.TaskSpec(kind="classification", x_shape=(3, 84, 84), num_classes=2, train_classes=5)
    opts = {"channels": 4} if backbone == "conv4" else {"resnet_channels": [4, 4, 4, 4]}
    lrn = metalens.make_learner("pretrain", spec, seed=SEED, backbone=backbone, finetune_steps=2, **opts)
    assert lrn.net(torch.zeros(1, 2, 3, 84, 84)).shape == (1, 2, 5)  # a classifier over the training classes
    g = torch.Generator().manual_seed(SEED)
    ep = Episode(torch.randn(2, 2, 3, 84, 84, generator=g), torch.tensor([[0, 1]] * 2),
                 torch.randn(2, 2, 3, 84, 84, generator=g), torch.tensor([[0, 1]] * 2), num_classes=2,
                 classes=torch.tensor([[4, 0], [2, 3]]))
    loss, _ = lrn.meta_loss(ep, generator=torch.Generator().manual_seed(SEED))
    loss.backward()
    grads = [p.grad for p in lrn.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), f"{backbone}, seed {SEED}"
    with torch.no_grad():
        d = lrn.predict(ep.support_x, ep.support_y, ep.query_x)
    assert d.logits.shape == (2, 2, 2) and bool(torch.isfinite(d.logits).all())


def test_pretrain_dropblock_regularises_pretraining_only():
    spec = metalens.TaskSpec(kind="classification", x_shape=(3, 32, 32), num_classes=2, train_classes=4)
    opts = dict(backbone="resnet12", resnet_channels=[4, 4, 4, 4], dropblock=0.3, dropblock_size=2)
    lrn = metalens.make_learner("pretrain", spec, seed=SEED, **opts)
    g = torch.Generator().manual_seed(SEED)
    ep = Episode(torch.randn(2, 4, 3, 32, 32, generator=g), torch.tensor([[0, 1, 0, 1]] * 2),
                 torch.randn(2, 4, 3, 32, 32, generator=g), torch.tensor([[0, 1, 0, 1]] * 2), num_classes=2,
                 classes=torch.tensor([[0, 1], [2, 3]]))

    def loss(seed):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return float(lrn.meta_loss(ep, generator=g)[0].detach())

    assert loss(SEED) == loss(SEED) and loss(SEED) != loss(SEED + 1) and loss(SEED) != loss(None), f"seed {SEED}"
    with pytest.raises(ConfigError, match="dropblock applies to the resnet12 backbone, not conv4"):
        metalens.make_learner("pretrain", spec, seed=SEED, backbone="conv4", dropblock=0.1)
