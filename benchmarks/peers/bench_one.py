"""Time one MAML implementation in this interpreter; print one JSON line.

Run by :mod:`benchmarks.maml_peers` (the driver) with the python of the environment that
has the library: metalens in the project's ``.venv``, each peer in its own
``benchmarks/peers/envs/.venv-*`` (see ``setup.sh``). Only torch and the one library are
imported, so this file runs in any of them.

One meta-iteration, the unit timed, is the same computation everywhere: for each of the
``T`` tasks of an episode, ``steps`` plain SGD steps (rate ``inner_lr``) on the support
loss from the shared initial weights, the query loss at the adapted weights, the mean
over tasks, backward to the initial weights through the inner steps (second order), and
one ``torch.optim.Adam`` step (lr 1e-3) on them. Loss: MSE (config A) or cross-entropy
(config B). Each peer is written the way its own documentation and examples use it:

=================  ==========================================================================
impl               what runs
=================  ==========================================================================
metalens           ``metalens.make_learner("maml", ...)``; ``loss, _ = learner.meta_loss(ep)``;
                   ``loss.backward()``; ``opt.step()`` (task batching: the learner's default)
metalens-vmap,     the same learner with ``batching="vmap"`` / ``"loop"`` forced
metalens-loop
metalens-compiled  the same learner under ``torch.compile`` as ``train.compile = true`` runs
                   it (``learner.compiled_meta_loss()``: on the loop over tasks, one task's
                   function compiled and called per task); the first iteration compiles it
learn2learn        ``l2l.algorithms.MAML(model, lr, first_order=False)``; per task ``clone()``,
                   ``adapt()`` x steps, query loss ``.backward()``; grads scaled by ``1/T``
                   (examples/vision/maml_omniglot.py)
higher             per task ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``,
                   ``diffopt.step(loss)`` x steps, query loss ``.backward()`` inside the
                   context; grads scaled by ``1/T`` (examples/maml-omniglot.py)
torchopt           ``torchopt.MetaSGD(net, lr)``; per task ``inner_opt.step(loss)`` x steps,
                   query loss kept, ``recover_state_dict`` of net and optimiser; mean of the
                   query losses ``.backward()`` (examples/few-shot/maml_omniglot.py)
torchopt-vmap      TorchOpt's functorch example (examples/FuncTorch/maml_omniglot_vmap.py):
                   ``functorch.make_functional_with_buffers``, per task ``functorch.grad`` +
                   ``torchopt.sgd`` (``update``/``apply_updates``, ``inplace=False``), tasks
                   by ``functorch.vmap``; the mean (the example: sum) of the query losses
func-loop          plain ``torch.func``: ``functional_call`` + ``torch.func.grad`` per task in
                   a Python loop
func-vmap          the same per-task function under ``torch.func.vmap``
func-vmap-compiled the same, the loss function under ``torch.compile`` (what a user could
                   write by hand; no peer's docs do this)
func-loop-compiled func-loop with the per-task function under ``torch.compile``, called for
                   each task (by hand, likewise)
=================  ==========================================================================

The peers' Conv-4 uses ``nn.BatchNorm2d(64, track_running_stats=False)`` (batch
statistics in training and under vmap, as TorchOpt's vmap example needs); metalens' Conv4
uses per-task batch statistics written in primitive ops (``TaskBatchNorm2d``): the same
maths.

Inputs come from a ``.pt`` file written by the driver: the initial weights (canonical
names of the peers' ``nn.Sequential``) and a pool of episodes, so every implementation
starts from the same weights and sees the same tasks. The meta-gradient of the first
iteration (episode 0, initial weights, before the Adam step) is saved to ``--grad-out``
for the driver's agreement check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")  # deprecation notes of the peers' older APIs

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

IMPLS = ("metalens", "metalens-vmap", "metalens-loop", "metalens-compiled", "learn2learn", "higher", "torchopt",
         "torchopt-vmap", "func-loop", "func-vmap", "func-vmap-compiled", "func-loop-compiled")
HEAD = 17  # index of the Linear head in the peers' Conv-4 nn.Sequential


def make_model(config: str, n_way: int = 5) -> nn.Sequential:
    """The peers' network (its parameter names are the canonical ones)."""
    if config == "A":  # sinusoid MLP 1-40-40-1 (Finn et al. 2017)
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):  # Conv-4: 3x3 conv (64, padding 1), batch norm, ReLU, 2x2 max-pool; 28 -> 14 -> 7 -> 3 -> 1
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 64
    layers += [nn.Flatten(), nn.Linear(64, n_way)]
    assert isinstance(layers[HEAD], nn.Linear)
    return nn.Sequential(*layers)


def loss_fn(config: str):
    return F.mse_loss if config == "A" else F.cross_entropy


# ------------------------------------------------------------------------------------------------
# implementations: each returns (named meta-parameters {canonical name: Parameter}, forward_backward)
# where forward_backward(episode) zeroes the grads, runs the meta-loss and its backward, and
# returns the loss; the caller then steps Adam on the meta-parameters.
# ------------------------------------------------------------------------------------------------
def build_metalens(cfg, state, batching=None, compiled=False):
    import metalens

    if cfg["config"] == "A":
        spec = metalens.make_task("sinusoid", shots=cfg["shots"], queries=cfg["queries"]).spec
        opts = {"hidden": [40, 40]}
    else:
        spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=cfg["n_way"])
        opts = {"backbone": "conv4", "channels": 64}
    if batching:
        opts["batching"] = batching
    learner = metalens.make_learner("maml", spec, inner_steps=cfg["steps"], inner_lr=cfg["inner_lr"], **opts)
    named = {}
    for k, p in learner.named_parameters():  # learner.state_dict() keys: net.layers.* / net.features.*, net.head.*
        assert k.startswith("net."), k
        k = k[len("net."):]
        if cfg["config"] == "A":
            canon = k[len("layers."):]
        elif k.startswith("features."):
            canon = k[len("features."):]
        else:
            canon = f"{HEAD}." + k[len("head."):]
        named[canon] = p
    _copy_into(named, state)

    def episode(ep):
        sx, sy, qx, qy = ep
        return metalens.Episode(sx, sy, qx, qy, num_classes=None if cfg["config"] == "A" else cfg["n_way"])

    meta_loss = learner.compiled_meta_loss() if compiled else learner.meta_loss  # what train.compile does

    def forward_backward(ep):
        learner.zero_grad(set_to_none=True)
        loss, _ = meta_loss(ep)
        loss.backward()
        return loss

    return named, forward_backward, episode, {"metalens": metalens.__version__, "batching": learner.batching}


def build_learn2learn(cfg, state):
    import learn2learn as l2l

    model = make_model(cfg["config"], cfg["n_way"])
    model.load_state_dict(state)
    maml = l2l.algorithms.MAML(model, lr=cfg["inner_lr"], first_order=False)
    lf, steps = loss_fn(cfg["config"]), cfg["steps"]

    def forward_backward(ep):
        sx, sy, qx, qy = ep
        T = sx.shape[0]
        maml.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(T):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(lf(learner(sx[t]), sy[t]))
            evaluation_error = lf(learner(qx[t]), qy[t])
            evaluation_error.backward()
            total += evaluation_error.item()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / T)
        return torch.tensor(total / T)

    return dict(model.named_parameters()), forward_backward, None, {"learn2learn": l2l.__version__}


def build_higher(cfg, state):
    import higher

    model = make_model(cfg["config"], cfg["n_way"])
    model.load_state_dict(state)
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"])
    lf, steps = loss_fn(cfg["config"]), cfg["steps"]

    def forward_backward(ep):
        sx, sy, qx, qy = ep
        T = sx.shape[0]
        model.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(T):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(lf(fnet(sx[t]), sy[t]))
                qry_loss = lf(fnet(qx[t]), qy[t])
                qry_loss.backward()
                total += qry_loss.item()
        for p in model.parameters():
            p.grad.data.mul_(1.0 / T)
        return torch.tensor(total / T)

    version = getattr(higher, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("higher")
    return dict(model.named_parameters()), forward_backward, None, {"higher": version}


def build_torchopt(cfg, state):
    import torchopt

    net = make_model(cfg["config"], cfg["n_way"])
    net.load_state_dict(state)
    named = dict(net.named_parameters())  # the original tensors; recover_state_dict puts them back
    inner_opt = torchopt.MetaSGD(net, lr=cfg["inner_lr"])
    lf, steps = loss_fn(cfg["config"]), cfg["steps"]

    def forward_backward(ep):
        sx, sy, qx, qy = ep
        T = sx.shape[0]
        for p in named.values():
            p.grad = None
        qry_losses = []
        net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(T):
            for _ in range(steps):
                inner_opt.step(lf(net(sx[i]), sy[i]))
            qry_losses.append(lf(net(qx[i]), qy[i]))
            torchopt.recover_state_dict(net, net_state_dict)
            torchopt.recover_state_dict(inner_opt, optim_state_dict)
        qry_losses = torch.mean(torch.stack(qry_losses))
        qry_losses.backward()
        return qry_losses

    return named, forward_backward, None, {"torchopt": torchopt.__version__}


def build_torchopt_vmap(cfg, state):
    import functools

    import torchopt
    from functorch import grad, make_functional_with_buffers, vmap

    net = make_model(cfg["config"], cfg["n_way"])
    net.load_state_dict(state)
    net.train()
    names = [k for k, _ in net.named_parameters()]
    fnet, params, buffers = make_functional_with_buffers(net)
    lf, lr, n_inner_iter = loss_fn(cfg["config"]), cfg["inner_lr"], cfg["steps"]

    def loss_for_task(n_inner_iter, x_spt, y_spt, x_qry, y_qry):  # as in TorchOpt's example
        opt = torchopt.sgd(lr=lr)
        opt_state = opt.init(params)

        def compute_loss(new_params, buffers, x, y):
            return lf(fnet(new_params, buffers, x), y)

        new_params = params
        for _ in range(n_inner_iter):
            grads = grad(compute_loss)(new_params, buffers, x_spt, y_spt)
            updates, opt_state = opt.update(grads, opt_state, inplace=False)
            new_params = torchopt.apply_updates(new_params, updates, inplace=False)
        return lf(fnet(new_params, buffers, x_qry), y_qry)

    def forward_backward(ep):
        for p in params:
            p.grad = None
        compute_loss_for_task = functools.partial(loss_for_task, n_inner_iter)
        qry_losses = vmap(compute_loss_for_task)(*ep)
        loss = qry_losses.mean()  # the example sums; the mean is what every other path optimises
        loss.backward()
        return loss

    return dict(zip(names, params)), forward_backward, None, {"torchopt": torchopt.__version__}


def build_func(cfg, state, vmapped: bool, compiled: bool = False):
    from torch.func import functional_call, grad, vmap

    model = make_model(cfg["config"], cfg["n_way"])
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    lf, lr, steps = loss_fn(cfg["config"]), cfg["inner_lr"], cfg["steps"]

    def task_loss(params, sx, sy, qx, qy):
        def inner(p):
            return lf(functional_call(model, p, (sx,)), sy)

        p = params
        for _ in range(steps):
            g = grad(inner)(p)
            p = {k: p[k] - lr * g[k] for k in p}
        return lf(functional_call(model, p, (qx,)), qy)

    batched = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    if compiled:
        if vmapped:
            batched = torch.compile(batched)
        else:
            task_loss = torch.compile(task_loss)

    def forward_backward(ep):
        for p in params.values():
            p.grad = None
        sx, sy, qx, qy = ep
        if vmapped:
            loss = batched(params, sx, sy, qx, qy).mean()
        else:
            loss = torch.stack([task_loss(params, sx[t], sy[t], qx[t], qy[t]) for t in range(sx.shape[0])]).mean()
        loss.backward()
        return loss

    return params, forward_backward, None, {}


def _copy_into(named: dict, state: dict) -> None:
    if set(named) != set(state):
        raise KeyError(f"parameter names differ: {sorted(named)} vs {sorted(state)}")
    with torch.no_grad():
        for k, p in named.items():
            if p.shape != state[k].shape:
                raise ValueError(f"{k}: shape {tuple(p.shape)} vs {tuple(state[k].shape)}")
            p.copy_(state[k])


def build(impl: str, cfg: dict, state: dict):
    if impl == "metalens":
        return build_metalens(cfg, state)
    if impl in ("metalens-vmap", "metalens-loop"):
        return build_metalens(cfg, state, batching=impl.split("-")[1])
    if impl == "metalens-compiled":
        return build_metalens(cfg, state, compiled=True)
    if impl == "func-vmap-compiled":
        return build_func(cfg, state, vmapped=True, compiled=True)
    if impl == "func-loop-compiled":
        return build_func(cfg, state, vmapped=False, compiled=True)
    if impl == "learn2learn":
        return build_learn2learn(cfg, state)
    if impl == "higher":
        return build_higher(cfg, state)
    if impl == "torchopt":
        return build_torchopt(cfg, state)
    if impl == "torchopt-vmap":
        return build_torchopt_vmap(cfg, state)
    if impl in ("func-loop", "func-vmap"):
        return build_func(cfg, state, vmapped=impl == "func-vmap")
    raise ValueError(f"unknown impl {impl!r}; one of {', '.join(IMPLS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=IMPLS)
    ap.add_argument("--data", required=True, help=".pt file from the driver: initial weights and episodes")
    ap.add_argument("--steps", type=int, required=True, help="inner steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--grad-out", default=None, help="save the first meta-gradient here (torch.save)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True)
    cfg = {**data["cfg"], "steps": args.steps}
    state = data["state"]
    named, forward_backward, to_episode, versions = build(args.impl, cfg, state)
    episodes = [tuple(e) for e in data["episodes"]]
    if to_episode is not None:
        episodes = [to_episode(e) for e in episodes]
    opt = torch.optim.Adam(list(named.values()), lr=cfg["outer_lr"])

    # first iteration: the meta-gradient at the initial weights on episode 0, for the agreement check
    loss0 = float(forward_backward(episodes[0]))
    grads = {k: p.grad.detach().clone() for k, p in named.items()}
    if args.grad_out:
        torch.save(grads, args.grad_out)
    opt.step()

    times = []
    for i in range(1, 1 + args.warmup + args.iters):
        ep = episodes[i % len(episodes)]
        t0 = time.perf_counter()
        forward_backward(ep)
        opt.step()
        dt = time.perf_counter() - t0
        if i > args.warmup:
            times.append(dt)
    import resource

    print(json.dumps({
        "impl": args.impl, "config": cfg["config"], "steps": args.steps, "threads": torch.get_num_threads(),
        "median_s": statistics.median(times), "min_s": min(times), "times": times, "loss0": loss0,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "python": sys.executable, "torch": torch.__version__, "versions": versions,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }))


if __name__ == "__main__":
    main()
