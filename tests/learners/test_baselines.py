"""Baselines: the per-task fit equals a loop over tasks; scratch and pretrain do what they say."""

import pytest
import torch

import metalens
from metalens.evaluate import evaluate
from metalens.functional import fit_per_task, stack_params, task_apply
from metalens.nets import MLP

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


def test_stack_params_copies():
    p = {"w": torch.ones(2)}
    s = stack_params(p, 3)
    s["w"][0, 0] = 5.0
    assert p["w"][0] == 1.0 and s["w"].shape == (3, 2)
