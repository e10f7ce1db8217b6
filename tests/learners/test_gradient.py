"""Gradient learners (MAML, FOMAML, Meta-SGD, ANIL, Reptile, iMAML) against independent references.

Every reference here is computed without the code under test: plain autograd loops over
tasks, central finite differences in float64, closed forms of linear least squares.
Each test uses the seed ``SEED`` (or says which).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.episode import Episode, TaskSpec
from metalens.learners.gradient import adapt, conjugate_gradient, head_names, sgd, solve_proximal, support_loss
from metalens.nets import MLP
from metalens.rng import seeded_init
from metalens.train import TrainConfig, train

SEED = 0
GRADIENT_LEARNERS = ["maml", "fomaml", "metasgd", "anil", "reptile", "imaml"]
F64 = torch.float64


# -- helpers ------------------------------------------------------------------------------------------
def sinusoid_episode(n_tasks: int, *, shots: int = 5, queries: int = 6, step: int = 0) -> Episode:
    return metalens.make_task("sinusoid", shots=shots, queries=queries).episode(SEED, step, n_tasks)


def image_spec(ways: int = 3) -> TaskSpec:
    return TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=ways)


def image_episode(n_tasks: int, *, ways: int = 3, shots: int = 1, queries: int = 2, seed: int = SEED) -> Episode:
    """Random 28x28 'images'; labels in order, every class present."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(n_tasks, ways * shots, 1, 28, 28, generator=g), labels.repeat(n_tasks, shots),
                   torch.randn(n_tasks, ways * queries, 1, 28, 28, generator=g), labels.repeat(n_tasks, queries),
                   num_classes=ways)


def meta_grads(learner, episode) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(episode)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in learner.named_parameters()}


def directional_check(learner, episode, *, seed: int, eps: float = 1e-6, rtol: float = 1e-6) -> None:
    """grad . v against the central difference (f(theta + eps v) - f(theta - eps v)) / 2 eps, float64."""
    g = meta_grads(learner, episode)
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in learner.named_parameters()}
    analytic = sum((g[k] * v[k]).sum() for k in g).item()
    params = dict(learner.named_parameters())
    saved = {k: p.detach().clone() for k, p in params.items()}

    def f(sign: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k] + sign * eps * v[k])
        loss, _ = learner.meta_loss(episode)
        return loss.item()

    numeric = (f(+1) - f(-1)) / (2 * eps)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    print(f"seed={seed} grad.v={analytic:.12g} finite-difference={numeric:.12g}")
    assert abs(analytic - numeric) <= rtol * max(1.0, abs(numeric)), (analytic, numeric)


def sgd_loop(net, x, y, *, steps: int, lr: float, classification: bool = False):
    """Plain torch: a copy of ``net`` after ``steps`` SGD steps on one task's mean loss."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        loss = (torch.nn.functional.cross_entropy(out, y) if classification else ((out - y) ** 2).mean())
        loss.backward()
        opt.step()
    return net


# -- batching: vmap equals a loop over tasks ---------------------------------------------------------
@pytest.mark.parametrize("backbone", ["mlp", "conv4"])
def test_vmapped_adaptation_equals_loop_over_tasks(backbone):
    print(f"seed={SEED}")
    if backbone == "mlp":
        spec, ep = metalens.make_task("sinusoid").spec, sinusoid_episode(4)
        opts = dict(hidden=[16, 16], inner_lr=0.05)
    else:
        spec, ep = image_spec(), image_episode(3)
        opts = dict(backbone="conv4", channels=4, inner_lr=0.1)
    learners = {b: metalens.make_learner("maml", spec, seed=SEED, inner_steps=2, batching=b, **opts)
                for b in ("vmap", "loop")}
    lrn = learners["vmap"]
    theta = lrn.theta()
    batched = lrn.adapt_tasks(theta, ep.support_x, ep.support_y, None, steps=2)
    for t in range(ep.n_tasks):  # the one-task function called by hand, task by task
        one = adapt(lrn.net, theta, ep.support_x[t], ep.support_y[t], steps=2, step=sgd(opts["inner_lr"]),
                    classification=spec.is_classification)
        for k in theta:
            torch.testing.assert_close(batched[k][t], one[k], rtol=1e-5, atol=1e-6)
    looped = learners["loop"].adapt_tasks(theta, ep.support_x, ep.support_y, None, steps=2)
    for k in theta:
        torch.testing.assert_close(batched[k], looped[k], rtol=1e-5, atol=1e-6)
    # and the meta-gradients of the two batchings agree
    gv, gl = meta_grads(learners["vmap"], ep), meta_grads(learners["loop"], ep)
    for k in gv:
        torch.testing.assert_close(gv[k], gl[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", GRADIENT_LEARNERS)
def test_every_learner_gives_the_same_meta_gradient_under_vmap_and_loop(name):
    print(f"seed={SEED}")
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(3).to(dtype=F64)  # float64: CG (iMAML) amplifies float32 rounding differences
    grads = [meta_grads(metalens.make_learner(name, fam, seed=SEED, hidden=[16], inner_steps=2,
                                              batching=b).double(), ep)
             for b in ("vmap", "loop")]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)


# -- MAML against finite differences ------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences_mlp(steps):
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    lrn = metalens.make_learner("maml", fam, seed=SEED, hidden=[16, 16], activation="tanh", inner_steps=steps,
                                inner_lr=0.05).double()
    directional_check(lrn, sinusoid_episode(3).to(dtype=F64), seed=SEED + steps)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences_conv4(steps, batching):
    # the full 4 blocks on 28x28 with TaskBatchNorm2d, few channels; both batchings (the BN trap is under vmap).
    # ReLU and max-pool make the inner gradient, hence the post-adaptation loss, jump where an activation
    # pattern changes: thousands of units, so eps is kept small enough (1e-7, float64) not to cross one.
    lrn = metalens.make_learner("maml", image_spec(), seed=SEED, backbone="conv4", channels=4, inner_steps=steps,
                                inner_lr=0.2, batching=batching).double()
    directional_check(lrn, image_episode(2).to(dtype=F64), seed=SEED + 10 * steps, eps=1e-7)


@pytest.mark.parametrize("name", ["metasgd", "anil"])
def test_variant_meta_gradients_match_finite_differences(name):
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    lrn = metalens.make_learner(name, fam, seed=SEED, hidden=[16, 16], activation="tanh", inner_steps=2,
                                inner_lr=0.05).double()
    directional_check(lrn, sinusoid_episode(3).to(dtype=F64), seed=SEED + 7)


def test_maml_finite_differences_check_can_fail():
    """The check above catches a meta-gradient without the second-order term."""
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    lrn = metalens.make_learner("fomaml", fam, seed=SEED, hidden=[16, 16], activation="tanh", inner_steps=1,
                                inner_lr=0.2).double()
    with pytest.raises(AssertionError):
        directional_check(lrn, sinusoid_episode(3).to(dtype=F64), seed=SEED)


# -- FOMAML ---------------------------------------------------------------------------------------------
def test_fomaml_is_the_query_gradient_at_the_adapted_parameters():
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(4).to(dtype=F64)
    opts = dict(hidden=[16, 16], inner_lr=0.1, inner_steps=1)
    fo = metalens.make_learner("fomaml", fam, seed=SEED, **opts).double()
    so = metalens.make_learner("maml", fam, seed=SEED, **opts).double()
    g_fo, g_so = meta_grads(fo, ep), meta_grads(so, ep)
    # reference: adapt each task by plain SGD, take the query-loss gradient there, average over tasks
    ref = {k: torch.zeros_like(v) for k, v in g_fo.items()}
    for t in range(ep.n_tasks):
        phi = sgd_loop(fo.net, ep.support_x[t], ep.support_y[t], steps=1, lr=0.1)
        loss = ((phi(ep.query_x[t]) - ep.query_y[t]) ** 2).mean() / ep.n_tasks
        for (k, _), gk in zip(phi.named_parameters(), torch.autograd.grad(loss, list(phi.parameters()))):
            ref["net." + k] += gk
    for k in ref:
        torch.testing.assert_close(g_fo[k], ref[k], rtol=1e-10, atol=1e-12)
    diff = sum(((g_fo[k] - g_so[k]) ** 2).sum() for k in g_fo).sqrt()
    norm = sum((g_so[k] ** 2).sum() for k in g_so).sqrt()
    print(f"seed={SEED} |g_fomaml - g_maml| / |g_maml| = {diff / norm:.3g}")
    assert diff > 1e-3 * norm  # the second-order term is really there in MAML


# -- Reptile ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner_data", ["support", "support+query"])
def test_reptile_sgd_step_moves_theta_toward_the_mean_adapted_parameters(inner_data):
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(4).to(dtype=F64)
    steps, alpha, eps = 3, 0.05, 0.3
    lrn = metalens.make_learner("reptile", fam, seed=SEED, hidden=[16, 16], inner_steps=steps, inner_lr=alpha,
                                inner_data=inner_data).double()
    theta = {k: p.detach().clone() for k, p in lrn.net.named_parameters()}
    phis = []
    for t in range(ep.n_tasks):
        x, y = ep.support_x[t], ep.support_y[t]
        if inner_data == "support+query":
            x, y = torch.cat([x, ep.query_x[t]]), torch.cat([y, ep.query_y[t]])
        phis.append(dict(sgd_loop(lrn.net, x, y, steps=steps, lr=alpha).named_parameters()))
    expected = {k: theta[k] + eps * (torch.stack([p[k].detach() for p in phis]).mean(0) - theta[k]) for k in theta}
    # one trainer-style step with outer SGD
    opt = torch.optim.SGD(lrn.parameters(), lr=eps)
    opt.zero_grad()
    loss, metrics = lrn.meta_loss(ep)
    loss.backward()
    opt.step()
    for k, p in lrn.net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-12, atol=1e-12)
    assert metrics["loss"] > 0


# -- iMAML against the closed form of ridge-regularised least squares ------------------------------------
def test_imaml_meta_gradient_matches_the_exact_implicit_gradient():
    T, d, S, Q, lam = 4, 3, 8, 6, 2.0
    fam = metalens.make_task("linear", dim=d, shots=S, queries=Q, noise_std=0.1)
    ep = fam.episode(SEED, 0, T).to(dtype=F64)
    mask = torch.ones(T, S, dtype=torch.bool)
    mask[1, -3:] = False  # padded support points must be ignored
    ep = Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, support_mask=mask)
    # a linear model (MLP without hidden layers), converged inner problem, exact CG (d + 1 unknowns)
    lrn = metalens.make_learner("imaml", fam, seed=SEED, hidden=[], lam=lam, inner_lr=0.1, inner_steps=800,
                                cg_steps=d + 1).double()
    with torch.no_grad():
        for p in lrn.parameters():
            p.normal_(generator=torch.Generator().manual_seed(SEED + 1))
    layer = lrn.net.layers[0]
    theta = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
    loss, metrics = lrn.meta_loss(ep)
    loss.backward()
    got = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
    ref, q_loss = torch.zeros(d + 1, dtype=F64), 0.0
    I = torch.eye(d + 1, dtype=F64)
    for t in range(T):
        m = mask[t]
        X = torch.cat([ep.support_x[t][m], torch.ones(int(m.sum()), 1, dtype=F64)], 1)
        y = ep.support_y[t][m, 0]
        Xq = torch.cat([ep.query_x[t], torch.ones(Q, 1, dtype=F64)], 1)
        H = 2 / len(y) * X.T @ X  # Hessian of the mean squared support loss
        phi = torch.linalg.solve(H + lam * I, 2 / len(y) * X.T @ y + lam * theta)  # ridge toward theta
        grad_q = 2 / Q * Xq.T @ (Xq @ phi - ep.query_y[t, :, 0])
        ref += torch.linalg.solve(I + H / lam, grad_q) / T
        q_loss += ((Xq @ phi - ep.query_y[t, :, 0]) ** 2).mean().item() / T
    print(f"seed={SEED} imaml={got.tolist()} exact={ref.tolist()}")
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    assert metrics["loss"] == pytest.approx(q_loss, rel=1e-8)
    assert metrics["inner_residual"] < 1e-8  # the inner problem is solved: the premise of the check
    # and it is not just the query gradient at phi (the implicit correction matters here)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_imaml_inner_residual_measures_how_far_the_inner_problem_is_from_solved():
    fam = metalens.make_task("linear", dim=3, shots=8, queries=6)
    ep = fam.episode(SEED, 2, 3).to(dtype=F64)
    residual = {}
    for steps in (0, 5, 50):
        lrn = metalens.make_learner("imaml", fam, seed=SEED, hidden=[], lam=0.5, inner_lr=0.1,
                                    inner_steps=steps, inner_solver="gd").double()
        residual[steps] = lrn.meta_loss(ep)[1]["inner_residual"]
    assert residual[0] == pytest.approx(1.0)  # no step taken: the residual is the gradient at theta
    assert 1.0 > residual[5] > residual[50] > 0
    # the same quantity computed by hand for one task after 5 steps of gradient descent
    lrn = metalens.make_learner("imaml", fam, seed=SEED, hidden=[], lam=0.5, inner_lr=0.1, inner_steps=5,
                                inner_solver="gd").double()
    layer = lrn.net.layers[0]
    w = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
    X = torch.cat([ep.support_x[0], torch.ones(8, 1, dtype=F64)], 1)
    y = ep.support_y[0, :, 0]
    grad = lambda v: 2 / 8 * X.T @ (X @ v - y)  # noqa: E731
    phi = w.clone()
    for _ in range(5):
        phi = phi - 0.1 * (grad(phi) + 0.5 * (phi - w))
    theta = {k: v.detach() for k, v in lrn.theta().items()}
    adapted = lrn.adapt_tasks(theta, ep.support_x[:1], ep.support_y[:1], None, steps=5)
    got = lrn.inner_residual(theta, {k: v[0] for k, v in adapted.items()}, ep.support_x[0], ep.support_y[0], None)
    expected = (grad(phi) + 0.5 * (phi - w)).norm() / grad(w).norm()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_solve_proximal_reaches_the_ridge_solution_and_never_raises_the_objective():
    fam = metalens.make_task("linear", dim=3, shots=8, queries=6, noise_std=0.1)
    ep = fam.episode(SEED, 3, 1).to(dtype=F64)
    with seeded_init(SEED):
        net = MLP((3,), 1, hidden=()).double()
    theta = {k: v.detach() for k, v in net.named_parameters()}
    X = torch.cat([ep.support_x[0], torch.ones(8, 1, dtype=F64)], 1)
    y, lam = ep.support_y[0, :, 0], 0.3
    w = torch.cat([theta["layers.0.weight"].flatten(), theta["layers.0.bias"]])
    ridge = torch.linalg.solve(2 / 8 * X.T @ X + lam * torch.eye(4, dtype=F64), 2 / 8 * X.T @ y + lam * w)
    # a first rate far too large for fixed steps (lr * (L + lam) >> 2): undone and halved, then BB rates
    phi = solve_proximal(net, theta, ep.support_x[0], ep.support_y[0], lam=lam, steps=60, lr=5.0,
                         classification=False)
    got = torch.cat([phi["layers.0.weight"].flatten(), phi["layers.0.bias"]])
    torch.testing.assert_close(got, ridge, rtol=1e-8, atol=1e-10)

    # a network (non-convex): the inner objective never rises, whatever the first rate
    fam = metalens.make_task("sinusoid", shots=10)
    ep = fam.episode(SEED, 0, 1)
    with seeded_init(SEED):
        net = MLP((1,), 1, hidden=(40, 40))
    theta = {k: v.detach() for k, v in net.named_parameters()}

    def objective(p):
        d = sum(((p[k] - theta[k]) ** 2).sum() for k in p)
        return float(support_loss(net, p, ep.support_x[0], ep.support_y[0], None, classification=False) + lam / 2 * d)

    values = [objective(solve_proximal(net, theta, ep.support_x[0], ep.support_y[0], lam=lam, steps=n, lr=1.0,
                                       classification=False)) for n in range(0, 16)]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    print(f"seed={SEED} inner objective {values[0]:.4f} -> {values[-1]:.4f}")
    assert values[-1] < 0.5 * values[0]


def test_imaml_with_few_cg_steps_is_only_approximate():
    """The closed-form check is sharp: one CG step on a 4-unknown system misses the exact gradient."""
    T, d = 3, 3
    fam = metalens.make_task("linear", dim=d, shots=8, queries=6)
    ep = fam.episode(SEED, 1, T).to(dtype=F64)
    exact = metalens.make_learner("imaml", fam, seed=SEED, hidden=[], lam=0.5, inner_lr=0.1, inner_steps=400,
                                  cg_steps=d + 1).double()
    rough = metalens.make_learner("imaml", fam, seed=SEED, hidden=[], lam=0.5, inner_lr=0.1, inner_steps=400,
                                  cg_steps=1).double()
    ga, gb = meta_grads(exact, ep), meta_grads(rough, ep)
    assert not all(torch.allclose(ga[k], gb[k], rtol=1e-3) for k in ga)


def test_conjugate_gradient_solves_spd_systems_and_stops_at_negative_curvature():
    g = torch.Generator().manual_seed(SEED)
    print(f"seed={SEED}")
    B = torch.randn(5, 5, generator=g, dtype=F64)
    M = B @ B.T + 0.5 * torch.eye(5, dtype=F64)
    b = torch.randn(5, generator=g, dtype=F64)
    x = conjugate_gradient(lambda v: {"x": M @ v["x"]}, {"x": b}, steps=5)["x"]
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)
    # negative definite: the first direction has p^T A p < 0, so CG stops at x = 0 instead of diverging
    x = conjugate_gradient(lambda v: {"x": -M @ v["x"]}, {"x": b}, steps=5)["x"]
    assert torch.equal(x, torch.zeros_like(b))


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


@pytest.mark.parametrize("name", ["reptile", "imaml"])
def test_reptile_and_imaml_keep_no_graph_of_the_inner_steps(name):
    """Memory independent of the number of inner steps: the graph of the loss does not grow with them."""
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(2)
    sizes = {n: {s: _graph_size(metalens.make_learner(n, fam, seed=SEED, hidden=[8], inner_steps=s).meta_loss(ep)[0])
                 for s in (1, 6)} for n in (name, "maml")}
    assert sizes[name][1] == sizes[name][6], sizes
    assert sizes["maml"][6] > sizes["maml"][1], sizes  # the counter does see MAML's unrolled steps


# -- the linear family: one inner step from theta = 0 ----------------------------------------------------
def test_one_maml_step_from_zero_on_linear_regression_is_the_closed_form():
    d, S, alpha = 4, 7, 0.15
    fam = metalens.make_task("linear", dim=d, shots=S, queries=5)
    ep = fam.episode(SEED, 0, 3)
    lrn = metalens.make_learner("maml", fam, seed=SEED, hidden=[], inner_lr=alpha, inner_steps=1,
                                eval_inner_steps=1)
    with torch.no_grad():
        for p in lrn.parameters():
            p.zero_()
    phi = lrn.adapt_tasks(lrn.theta(), ep.support_x, ep.support_y, None, steps=1)
    X, y = ep.support_x, ep.support_y  # [T, S, d], [T, S, 1]
    # loss mean_i (w.x_i + b - y_i)^2 at w = b = 0: gradient -(2/S) X^T y, so phi = (2 alpha / S) X^T y
    w = 2 * alpha / S * (X.transpose(1, 2) @ y)[..., 0]  # [T, d]
    b = 2 * alpha / S * y.sum((1, 2))  # [T]
    torch.testing.assert_close(phi["layers.0.weight"][:, 0], w)
    torch.testing.assert_close(phi["layers.0.bias"][:, 0], b)
    with torch.no_grad():
        mean = lrn.predict(ep.support_x, ep.support_y, ep.query_x).mean
    torch.testing.assert_close(mean[..., 0], (ep.query_x @ w[..., None])[..., 0] + b[:, None])


# -- Meta-SGD and ANIL -------------------------------------------------------------------------------------
def test_metasgd_steps_elementwise_with_its_learned_rates():
    fam = metalens.make_task("sinusoid", shots=5)
    ep = sinusoid_episode(3)
    lrn = metalens.make_learner("metasgd", fam, seed=SEED, hidden=[8], inner_steps=1)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for a in lrn.alpha:
            assert torch.all(a == 0.01)  # initialised to inner_lr
            a.copy_(torch.rand(a.shape, generator=gen) * 0.1)
    phi = lrn.adapt_tasks(lrn.theta(), ep.support_x, ep.support_y, None, steps=1)
    alphas = lrn.alphas()
    for t in range(3):
        net = copy.deepcopy(lrn.net)
        loss = ((net(ep.support_x[t]) - ep.support_y[t]) ** 2).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        for (k, p), gk in zip(net.named_parameters(), grads):
            torch.testing.assert_close(phi[k][t], p - alphas[k] * gk)
    g = meta_grads(lrn, ep)
    for i in range(len(lrn.alpha)):
        assert torch.isfinite(g[f"alpha.{i}"]).all() and g[f"alpha.{i}"].abs().sum() > 0


def test_anil_adapts_only_the_head_and_meta_trains_the_body():
    fam = metalens.make_task("sinusoid", shots=5)
    ep = sinusoid_episode(3)
    lrn = metalens.make_learner("anil", fam, seed=SEED, hidden=[8, 8], inner_steps=2, inner_lr=0.1)
    head = set(head_names(lrn.net))
    assert head == {"layers.4.weight", "layers.4.bias"}
    theta = lrn.theta()
    phi = lrn.adapt_tasks(theta, ep.support_x, ep.support_y, None, steps=2)
    for k in theta:
        moved = (phi[k] - theta[k].detach()).abs().amax().item()
        assert (moved > 1e-4) if k in head else (moved == 0.0), (k, moved)
    g = meta_grads(lrn, ep)
    assert all(g[f"net.{k}"].abs().sum() > 0 for k in theta)  # the body gets meta-gradients too
    conv = metalens.make_learner("anil", image_spec(), backbone="conv4", channels=4)
    assert head_names(conv.net) == ("head.weight", "head.bias")


# -- eval_inner_steps -------------------------------------------------------------------------------------
def test_predict_uses_eval_inner_steps_and_meta_loss_uses_inner_steps():
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(3)
    lrn = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_steps=1, eval_inner_steps=4,
                                inner_lr=0.05)

    def query_out(steps):
        phi = lrn.adapt_tasks(lrn.theta(), ep.support_x, ep.support_y, None, steps=steps)
        return lrn.apply_tasks(phi, ep.query_x).detach()

    for mode in (lrn.train, lrn.eval):  # module.training changes nothing
        mode()
        with torch.no_grad():
            mean = lrn.predict(ep.support_x, ep.support_y, ep.query_x).mean
        torch.testing.assert_close(mean, query_out(4))
        assert not torch.allclose(mean, query_out(1))
        loss, _ = lrn.meta_loss(ep)
        torch.testing.assert_close(loss.detach(), ((query_out(1) - ep.query_y) ** 2).mean())
    same = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_steps=2, eval_inner_steps=0)
    assert same.eval_steps == 2
    assert metalens.make_learner("metasgd", fam).eval_steps == 1  # Meta-SGD: as many as in training


# -- masks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRADIENT_LEARNERS)
def test_masked_points_are_ignored(name):
    fam = metalens.make_task("sinusoid", shots=6, queries=5)
    ep = sinusoid_episode(2, shots=6, queries=5)
    lrn = metalens.make_learner(name, fam, seed=SEED, hidden=[8], inner_steps=2)
    smask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    qmask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    sy, qy = ep.support_y.clone(), ep.query_y.clone()
    sy[:, 4:] = 100.0  # garbage in padded points
    qy[:, 3:] = -100.0
    padded = Episode(ep.support_x, sy, ep.query_x, qy, smask, qmask)
    short = Episode(ep.support_x[:, :4], ep.support_y[:, :4], ep.query_x[:, :3], ep.query_y[:, :3])
    with torch.no_grad():
        a = lrn.predict(padded.support_x, padded.support_y, padded.query_x, support_mask=smask).mean
        b = lrn.predict(short.support_x, short.support_y, padded.query_x).mean
    torch.testing.assert_close(a, b)
    ga, gb = meta_grads(lrn, padded), meta_grads(lrn, short)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-6)


# -- the contract, for every gradient learner on a regression and a classification family ------------------
@pytest.mark.parametrize("task", ["sinusoid", "clusters"])
@pytest.mark.parametrize("name", GRADIENT_LEARNERS)
def test_contract(name, task):
    fam = metalens.make_task(task)
    lrn = metalens.make_learner(name, fam, seed=SEED)
    ep = fam.episode(SEED, 0, 4)
    with torch.no_grad():
        d1 = lrn.predict(ep.support_x, ep.support_y, ep.query_x)
        d2 = lrn.predict(ep.support_x, ep.support_y, ep.query_x)
    if fam.spec.is_classification:
        assert d1.logits.shape == (4, ep.n_query, fam.spec.num_classes)
        assert torch.isfinite(d1.logits).all() and torch.equal(d1.logits, d2.logits)
    else:
        assert d1.mean.shape == (4, ep.n_query, 1)
        assert torch.isfinite(d1.mean).all() and torch.equal(d1.mean, d2.mean)
    assert not lrn.probabilistic
    loss, metrics = lrn.meta_loss(ep, generator=torch.Generator().manual_seed(SEED))
    assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(torch.tensor(metrics["loss"]))
    loss.backward()
    for k, p in lrn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    assert sum(p.grad.abs().sum() for p in lrn.parameters()) > 0


@pytest.mark.parametrize("name", GRADIENT_LEARNERS)
def test_contract_conv4(name):
    ep = image_episode(2)
    lrn = metalens.make_learner(name, image_spec(), seed=SEED, backbone="conv4", channels=4, inner_steps=2,
                                inner_lr=0.1)
    with torch.no_grad():
        logits = lrn.predict(ep.support_x, ep.support_y, ep.query_x).logits
    assert logits.shape == (2, ep.n_query, 3) and torch.isfinite(logits).all()
    loss, _ = lrn.meta_loss(ep)
    assert torch.isfinite(loss)
    loss.backward()
    for k, p in lrn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k


@pytest.mark.parametrize("name", GRADIENT_LEARNERS)
def test_short_training_lowers_held_out_mse(name):
    fam = metalens.make_task("sinusoid")
    steps = 150 if name == "imaml" else 300
    ev0 = metalens.evaluate(metalens.make_learner(name, fam, seed=SEED), fam, episodes=100, seed=SEED,
                            with_oracle=False)
    lrn = metalens.make_learner(name, fam, seed=SEED)
    train(lrn, fam, TrainConfig(steps=steps, batch_tasks=10, seed=SEED), progress=False)
    ev1 = metalens.evaluate(lrn, fam, episodes=100, seed=SEED, with_oracle=False)
    gain = ev0.per_task["mse"] - ev1.per_task["mse"]  # the same held-out tasks: a paired comparison
    half = 1.96 * gain.std(ddof=1) / len(gain) ** 0.5
    print(f"seed={SEED} {name}: held-out mse {ev0.metrics['mse']} -> {ev1.metrics['mse']} "
          f"(paired gain {gain.mean():.3g} +- {half:.2g})")
    assert gain.mean() > half and ev1.metrics["mse"].mean < 0.9 * ev0.metrics["mse"].mean


# -- configuration errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, opts, message", [
    ("maml", {"backbone": "resnet"}, "learner.backbone must be one of 'mlp', 'conv4', 'resnet12', got 'resnet'"),
    ("maml", {"inner_lr": 0.0}, "learner.inner_lr must be > 0, got 0.0"),
    ("maml", {"inner_lr": float("inf")}, "learner.inner_lr must be finite, got inf"),
    ("maml", {"hidden": [4, 0]}, "learner.hidden values must be >= 1, got (4, 0)"),
    ("maml", {"batching": "threads"}, "learner.batching must be one of 'auto', 'vmap', 'loop', got 'threads'"),
    ("metasgd", {"eval_inner_steps": -1}, "learner.eval_inner_steps must be >= 0, got -1"),
    ("reptile", {"inner_steps": 0}, "learner.inner_steps must be >= 1, got 0"),
    ("reptile", {"inner_data": "query"}, "learner.inner_data must be one of 'support', 'support+query', got 'query'"),
    ("imaml", {"lam": 100.0, "inner_lr": 0.05}, "learner.inner_lr * lam must be < 2 or the inner steps diverge on "
                                                "the proximal term, got 0.05 * 100.0; lower inner_lr or lam"),
    ("imaml", {"inner_solver": "newton"}, "learner.inner_solver must be one of 'bb', 'gd', got 'newton'"),
    ("imaml", {"cg_damping": -1}, "learner.cg_damping must be >= 0, got -1.0"),
    ("maml", {"backbone": "conv4"}, "learner 'maml': backbone 'conv4' needs image inputs [channels, height, width], "
                                    "got x_shape (1,); use backbone 'mlp'"),
])
def test_config_errors_say_how_to_fix_them(name, opts, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        metalens.make_learner(name, metalens.make_task("sinusoid"), **opts)


def test_linear_model_backbone_and_registration():
    assert set(GRADIENT_LEARNERS) <= set(metalens.LEARNERS.names())
    lrn = metalens.make_learner("maml", metalens.make_task("linear", dim=3), hidden=[])
    assert isinstance(lrn.net, MLP) and [k for k, _ in lrn.net.named_parameters()] == ["layers.0.weight",
                                                                                       "layers.0.bias"]


# -- meta_batches = "independent" (Fallah et al. 2020) ----------------------------------------------------------
def test_independent_batches_meta_gradient_against_an_autograd_reference():
    """g_t = (I - alpha H(theta; D_h)) grad L(theta - alpha grad L(theta; S); D_o), by plain autograd per task."""
    print(f"seed={SEED}")
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(3).to(dtype=F64)
    lrn = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_lr=0.05, meta_batches="independent").double()
    g = meta_grads(lrn, ep)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in lrn.net.named_parameters()}
    ref = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(ep.n_tasks):
        def loss(p, x, y):
            return ((torch.func.functional_call(lrn.net, p, (x,)) - y) ** 2).mean()
        gs = torch.autograd.grad(loss(theta, ep.support_x[t], ep.support_y[t]), list(theta.values()))
        phi = {k: (v - 0.05 * gk).detach().requires_grad_(True) for (k, v), gk in zip(theta.items(), gs)}
        qx, qy = ep.query_x[t], ep.query_y[t]
        go = torch.autograd.grad(loss(phi, qx[0::2], qy[0::2]), list(phi.values()))  # D_o: even query points
        gh = torch.autograd.grad(loss(theta, qx[1::2], qy[1::2]), list(theta.values()), create_graph=True)
        hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gh, go)), list(theta.values()))  # H_h g_o
        for (k, _), a, b in zip(theta.items(), go, hv):
            ref[k] += (a - 0.05 * b) / ep.n_tasks
    for k, expected in ref.items():
        torch.testing.assert_close(g[f"net.{k}"], expected, rtol=1e-9, atol=1e-12)


def test_independent_batches_under_vmap_and_loop_and_first_order():
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(3).to(dtype=F64)
    grads = [meta_grads(metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_steps=2, batching=b,
                                              meta_batches="independent").double(), ep) for b in ("vmap", "loop")]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)
    # FOMAML: no Hessian, so the independent estimate is the first-order one on the even query points
    half = Episode(ep.support_x, ep.support_y, ep.query_x[:, 0::2], ep.query_y[:, 0::2])
    fo = meta_grads(metalens.make_learner("fomaml", fam, seed=SEED, hidden=[8], meta_batches="independent").double(), ep)
    fo_half = meta_grads(metalens.make_learner("fomaml", fam, seed=SEED, hidden=[8]).double(), half)
    for k in fo:
        torch.testing.assert_close(fo[k], fo_half[k], rtol=1e-12, atol=1e-14)
    # the option leaves prediction alone, and needs two query points
    a, b = (metalens.make_learner("maml", fam, seed=SEED, hidden=[8], meta_batches=m) for m in ("shared", "independent"))
    with torch.no_grad():
        torch.testing.assert_close(a.predict(ep.support_x.float(), ep.support_y.float(), ep.query_x.float()).mean,
                                   b.predict(ep.support_x.float(), ep.support_y.float(), ep.query_x.float()).mean)
    with pytest.raises(ValueError, match="at least 2 query points per task, got 1"):
        b.meta_loss(sinusoid_episode(2, queries=1))


# -- inner_lr_cap = "curvature" ---------------------------------------------------------------------------------
def test_curvature_is_the_top_eigenvalue_of_the_support_loss_hessian_of_the_adapted_parameters():
    fam = metalens.make_task("sinusoid", shots=5)
    ep = sinusoid_episode(1)
    for name in ("maml", "anil"):
        lrn = metalens.make_learner(name, fam, seed=SEED, hidden=[6, 6]).double()
        theta = {k: v.detach() for k, v in lrn.theta().items()}
        names = [k for k in theta if lrn.adapted is None or k in lrn.adapted]
        sx, sy = ep.support_x[0].double(), ep.support_y[0].double()

        def f(v, theta=theta, names=names, lrn=lrn, sx=sx, sy=sy):
            p, i = dict(theta), 0
            for k in names:
                p[k] = v[i: i + theta[k].numel()].view(theta[k].shape)
                i += theta[k].numel()
            return support_loss(lrn.net, p, sx, sy, None, classification=False)

        H = torch.func.hessian(f)(torch.cat([theta[k].reshape(-1) for k in names]))
        exact = float(torch.linalg.eigvalsh(H)[-1])
        print(f"seed={SEED} {name}: exact {exact:.6f}, lanczos {float(lrn.curvature(theta, sx, sy, None)):.6f}")
        assert float(lrn.curvature(theta, sx, sy, None)) == pytest.approx(exact, rel=1e-6)


def test_the_cap_is_the_plain_inner_loop_with_rate_min_alpha_c_over_lambda():
    fam = metalens.make_task("sinusoid", shots=5, queries=6)
    ep = sinusoid_episode(4)
    plain = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_lr=0.5, eval_inner_steps=3)
    capped = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_lr=0.5, eval_inner_steps=3,
                                   inner_lr_cap="curvature", inner_lr_cap_c=1.5)
    theta = plain.theta()
    with torch.no_grad():
        out = capped.predict(ep.support_x, ep.support_y, ep.query_x).mean
    for t in range(ep.n_tasks):
        lam = float(plain.curvature(theta, ep.support_x[t], ep.support_y[t], None))
        rate = min(0.5, 1.5 / lam)
        phi = adapt(plain.net, theta, ep.support_x[t], ep.support_y[t], steps=3, step=sgd(rate), classification=False)
        ref = torch.func.functional_call(plain.net, phi, (ep.query_x[t],))
        torch.testing.assert_close(out[t], ref.detach(), rtol=1e-4, atol=1e-5)
    # a cap that never binds changes nothing
    loose = metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_lr=0.01, eval_inner_steps=3,
                                  inner_lr_cap="curvature", inner_lr_cap_c=1e6)
    with torch.no_grad():
        torch.testing.assert_close(loose.predict(ep.support_x, ep.support_y, ep.query_x).mean,
                                   metalens.make_learner("maml", fam, seed=SEED, hidden=[8], inner_lr=0.01,
                                                         eval_inner_steps=3).predict(
                                       ep.support_x, ep.support_y, ep.query_x).mean)


def test_predict_returns_non_finite_tasks_instead_of_raising_and_the_cap_keeps_them_finite():
    fam = metalens.make_task("sinusoid")
    ep = fam.eval_episodes(0, 20)
    opts = {"seed": SEED, "inner_lr": 0.3}  # an untrained network at 30x the rate: some tasks diverge, not all
    with torch.no_grad():
        mean = metalens.make_learner("maml", fam, **opts).predict(ep.support_x, ep.support_y, ep.query_x).mean
        finite = torch.isfinite(mean).all(-1).all(-1)
        print(f"seed={SEED}: {int((~finite).sum())} of 20 tasks diverged")
        assert 0 < int((~finite).sum()) < 20
        capped = metalens.make_learner("maml", fam, inner_lr_cap="curvature", **opts).predict(
            ep.support_x, ep.support_y, ep.query_x).mean
    assert bool(torch.isfinite(capped).all())
    # tasks are independent: the finite ones are those of each task predicted alone
    with torch.no_grad():
        one = metalens.make_learner("maml", fam, **opts).predict(ep.support_x[:1], ep.support_y[:1], ep.query_x[:1])
    assert torch.equal(torch.isfinite(one.mean).all(), finite[0])


@pytest.mark.parametrize("name, opts, message", [
    ("metasgd", {"inner_lr_cap": "curvature"}, ("inner_lr_cap caps one inner rate, and Meta-SGD learns a rate per "
                                                "parameter: leave inner_lr_cap = none")),
    ("imaml", {"inner_lr_cap": "curvature"}, ("inner_lr_cap applies to inner_solver = gd (bb chooses its own rates, "
                                              "at most 1/lam): set inner_solver = gd or inner_lr_cap = none")),
    ("maml", {"inner_lr_cap": "always"}, "learner.inner_lr_cap must be one of 'none', 'curvature', got 'always'"),
    ("maml", {"meta_batches": "split"}, "learner.meta_batches must be one of 'shared', 'independent', got 'split'"),
    ("reptile", {"meta_batches": "independent"}, "unknown option 'learner.meta_batches' for learner 'reptile'"),
])
def test_new_option_errors_say_how_to_fix_them(name, opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        metalens.make_learner(name, metalens.make_task("sinusoid"), **opts)
    metalens.make_learner("imaml", metalens.make_task("sinusoid"), inner_lr_cap="curvature", inner_solver="gd")


# -- ResNet-12, and both image backbones on 84x84 colour images -------------------------------------------------
SMALL_RESNET = dict(backbone="resnet12", resnet_channels=[2, 3, 3, 4])


def colour_episode(n_tasks: int, *, side: int = 16, ways: int = 3, shots: int = 1, queries: int = 2,
                   seed: int = SEED) -> Episode:
    """Random ``3 x side x side`` 'images'; labels in order, every class present."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(n_tasks, ways * shots, 3, side, side, generator=g), labels.repeat(n_tasks, shots),
                   torch.randn(n_tasks, ways * queries, 3, side, side, generator=g), labels.repeat(n_tasks, queries),
                   num_classes=ways)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences_resnet12(steps, batching):
    # four residual blocks with per-task batch norm in every conv and shortcut, few channels, 16x16 colour inputs.
    # Leaky ReLU and max-pool have kinks where an activation pattern changes: eps small enough not to cross one.
    spec = TaskSpec(kind="classification", x_shape=(3, 16, 16), num_classes=3)
    lrn = metalens.make_learner("maml", spec, seed=SEED, inner_steps=steps, inner_lr=0.2, batching=batching,
                                **SMALL_RESNET).double()
    assert lrn.batching == batching
    directional_check(lrn, colour_episode(2).to(dtype=F64), seed=SEED + 10 * steps, eps=1e-7)


def test_resnet12_adaptation_is_the_same_under_vmap_and_loop():
    # float64: the two orders of summation agree to rounding (float32 leaves ~1e-6 apart on tiny gradients)
    spec, ep = TaskSpec(kind="classification", x_shape=(3, 16, 16), num_classes=3), colour_episode(3).to(dtype=F64)
    lrns = {b: metalens.make_learner("maml", spec, seed=SEED, inner_steps=2, inner_lr=0.1, batching=b,
                                     **SMALL_RESNET).double() for b in ("vmap", "loop")}
    assert metalens.make_learner("maml", spec, seed=SEED, **SMALL_RESNET).batching == "loop"  # auto
    gv, gl = meta_grads(lrns["vmap"], ep), meta_grads(lrns["loop"], ep)
    for k in gv:
        torch.testing.assert_close(gv[k], gl[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_maml_on_84x84_colour_images(backbone):
    spec = TaskSpec(kind="classification", x_shape=(3, 84, 84), num_classes=2)
    opts = {"channels": 4} if backbone == "conv4" else {"resnet_channels": [4, 4, 4, 4]}
    lrn = metalens.make_learner("maml", spec, seed=SEED, backbone=backbone, inner_steps=1, eval_inner_steps=1,
                                **opts)
    assert lrn.net.embedding_dim == 4 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    ep = colour_episode(1, side=84, ways=2, queries=1)
    with torch.no_grad():
        logits = lrn.predict(ep.support_x, ep.support_y, ep.query_x).logits
    assert logits.shape == (1, 2, 2) and bool(torch.isfinite(logits).all())
    loss, _ = lrn.meta_loss(ep)
    loss.backward()
    grads = {k: p.grad for k, p in lrn.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values()), f"seed {SEED}"
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
