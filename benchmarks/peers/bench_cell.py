"""One cell of the side-by-side benchmarks ``benchmarks/{protonet,np,icl,eval}_peers.py``.

Run by the driver in a fresh subprocess, in the python of the implementation's environment
(metalens and the plain-PyTorch references: this project's .venv; learn2learn, easyfsl:
``benchmarks/peers/envs/.venv-*``). Reads the ``.pt`` file the driver wrote (``cfg``: the
workload's settings; ``state``: the initial weights; ``episodes``: the inputs), builds the
implementation, times ``--iters`` iterations after ``--warmup`` untimed ones and prints one
JSON line (``times`` in seconds). Training workloads: an iteration is one optimiser step --
zero the gradients, the loss, its backward, one ``torch.optim.Adam`` step (lr 1e-3) -- on
the next episode of the pool; the loss and gradient of the first one (initial weights,
episode 0) are saved to ``--grad-out`` under metalens' parameter names for the driver's
check. Evaluation workloads: an iteration is one pass over every held-out episode; the
per-task metric of the first pass is saved instead.

=====================  ========================================================================
workload / impl        what runs
=====================  ========================================================================
protonet / metalens    ``make_learner("protonet", spec, backbone="conv4")``; ``loss, _ =
                       learner.meta_loss(episode)`` on a ``metalens.Episode`` of one task
protonet / learn2learn learn2learn's ``examples/vision/protonet_miniimagenet.py``: ``fast_adapt``
                       (sort by label, embed the task's images as one batch, support rows by
                       index, prototypes ``support.reshape(ways, shot, -1).mean(1)``,
                       ``pairwise_distances_logits``, cross-entropy); learn2learn is imported
                       as the example does (its accuracy helper)
protonet / easyfsl     ``easyfsl.methods.PrototypicalNetworks(backbone)``; per step
                       ``model.process_support_set(sx, sy)``, ``scores = model(qx)``,
                       ``F.cross_entropy(scores, qy)`` (easyfsl's episodic-training notebook)
protonet / easyfsl-ref easyfsl's maths in plain PyTorch (support and query embedded in two batches,
                       ``-torch.cdist`` to the prototypes): checks easyfsl's gradient
np-cnp, np-anp /       metalens ``cnp`` / ``anp`` (default options: hidden 128; anp 8 heads, one
metalens               self-attention block per path, latent 128, conditional ELBO, one z sample)
np-* / torch           the same architecture in plain PyTorch (``nn.Sequential`` MLPs,
                       ``nn.MultiheadAttention`` with ``key_padding_mask``, ``nn.LayerNorm``,
                       ``torch.distributions``), weights copied from metalens' state
icl / metalens         ``make_learner("transformer", spec, mode="sequence")`` (dim 64, 4 blocks,
                       4 heads, MLP x4): its sequence loss over the 41 positions
icl / torch            ``nn.TransformerEncoder`` of 4 ``nn.TransformerEncoderLayer(64, 4, 256,
                       dropout=0, activation="gelu", batch_first=True, norm_first=True)`` over the
                       same 82 tokens with the same attention pattern as a boolean ``mask``
eval-protonet /        ``metalens.evaluate.score_tasks(learner.predict, episode, batch_tasks=100)``
metalens               (what ``metalens eval`` runs) on one 600-task Episode
eval-protonet /        per task, learn2learn's ``fast_adapt`` (its test loop: ``model.eval()``, no
learn2learn(-nograd)   ``torch.no_grad``; ``-nograd``: the same under ``torch.no_grad()``)
eval-maml / metalens   ``score_tasks`` of ``maml`` (MLP 1-40-40-1, 10 inner steps of 0.01) on 1000
                       sinusoid tasks
eval-maml /            per task ``learner = maml.clone()``, 10 x ``learner.adapt(mse)``, query MSE
learn2learn(-fo)       under ``torch.no_grad()``; ``MAML(first_order=False)`` as trained, ``-fo``:
                       ``first_order=True`` (no second-order graph: the faster way to evaluate)
=====================  ========================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------
# shared networks (canonical parameter names: the keys of these modules' state dicts)
# ------------------------------------------------------------------------------------------------
def conv4() -> nn.Sequential:
    """Conv-4 embedding: 4 x [3x3 conv 64 (padding 1), batch norm (batch statistics), ReLU, 2x2 max-pool]."""
    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 64
    return nn.Sequential(*layers, nn.Flatten())


def _copy(module: nn.Module, state: dict, rename=lambda k: k) -> None:
    own = {rename(k): p for k, p in module.named_parameters()}
    if set(own) != set(state):
        raise KeyError(f"parameter names differ: {sorted(set(own) ^ set(state))}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def _metalens_conv4_name(k: str) -> str:
    # ProtoNet's Conv4: embed.features.{i}.weight -> {i}.weight (the Sequential above)
    assert k.startswith("embed.features."), k
    return k[len("embed.features."):]


# ------------------------------------------------------------------------------------------------
# protonet (training)
# ------------------------------------------------------------------------------------------------
def protonet_metalens(cfg, state):
    import metalens

    spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=cfg["ways"])
    learner = metalens.make_learner("protonet", spec, backbone="conv4", channels=64)
    _copy(learner, state, _metalens_conv4_name)
    named = {_metalens_conv4_name(k): p for k, p in learner.named_parameters()}

    def prepare(ep):
        return metalens.Episode(*ep[:4], num_classes=cfg["ways"])

    def step(ep):
        loss, _ = learner.meta_loss(ep)
        loss.backward()
        return loss

    return named, step, prepare, {"metalens": metalens.__version__}


def pairwise_distances_logits(a, b):  # learn2learn's examples/vision/protonet_miniimagenet.py
    n = a.shape[0]
    m = b.shape[0]
    logits = -((a.unsqueeze(1).expand(n, m, -1) - b.unsqueeze(0).expand(n, m, -1)) ** 2).sum(dim=2)
    return logits


def l2l_fast_adapt(model, batch, ways, shot, query_num, metric=None, device=None):
    """learn2learn's examples/vision/protonet_miniimagenet.py ``fast_adapt``, as written there."""
    import numpy as np
    from learn2learn.utils import accuracy

    if metric is None:
        metric = pairwise_distances_logits
    data, labels = batch
    n_items = shot * ways  # noqa: F841 (as in the example)
    # Sort data samples by labels
    sort = torch.sort(labels)
    data = data.squeeze(0)[sort.indices].squeeze(0)
    labels = labels.squeeze(0)[sort.indices].squeeze(0)
    # Compute support and query embeddings
    embeddings = model(data)
    support_indices = np.zeros(data.size(0), dtype=bool)
    selection = np.arange(ways) * (shot + query_num)
    for offset in range(shot):
        support_indices[selection + offset] = True
    query_indices = torch.from_numpy(~support_indices)
    support_indices = torch.from_numpy(support_indices)
    support = embeddings[support_indices]
    support = support.reshape(ways, shot, -1).mean(dim=1)
    query = embeddings[query_indices]
    labels = labels[query_indices].long()
    logits = pairwise_distances_logits(query, support)
    loss = F.cross_entropy(logits, labels)
    acc = accuracy(logits, labels)
    return loss, acc


def l2l_order(ways, shot, query):
    """A learn2learn task batch's labels (each class's shot + query images together, as ``NWays`` /
    ``KShots(shot + query)`` give them) and, after ``fast_adapt``'s ``torch.sort``, which rows it takes as
    support and as queries: ``(labels, support_rows, query_rows)``. The drivers build metalens' and easyfsl's
    episodes from the same rows, so that every implementation embeds the same support and query images."""
    import numpy as np

    labels = torch.arange(ways).repeat_interleave(shot + query)
    order = torch.sort(labels).indices  # not a stable sort: equal labels may be permuted
    support = np.zeros(len(labels), dtype=bool)
    selection = np.arange(ways) * (shot + query)
    for offset in range(shot):
        support[selection + offset] = True
    return labels, order[torch.from_numpy(support)], order[torch.from_numpy(~support)]


def l2l_batch(ep, ways, shot, query):
    """The learn2learn batch of an episode entry ``[sx, sy, qx, qy, data, labels]`` (see ``l2l_order``)."""
    return ep[4][None], ep[5][None]


def protonet_learn2learn(cfg, state):
    import learn2learn as l2l

    model = conv4()
    model.load_state_dict(state)
    ways, shot, query = cfg["ways"], cfg["shot"], cfg["query"]

    def prepare(ep):
        return l2l_batch(ep, ways, shot, query)

    def step(batch):
        loss, _ = l2l_fast_adapt(model, batch, ways, shot, query, metric=pairwise_distances_logits)
        loss.backward()
        return loss

    return dict(model.named_parameters()), step, prepare, {"learn2learn": l2l.__version__}


def easyfsl_maths(model, sx, sy, qx):
    """easyfsl's PrototypicalNetworks in plain PyTorch: two backbone calls, class means, -cdist."""
    zs, zq = model(sx), model(qx)
    prototypes = torch.stack([zs[sy == n].mean(0) for n in range(int(sy.max()) + 1)])
    return -torch.cdist(zq, prototypes)


def protonet_easyfsl(cfg, state, reference=False):
    model = conv4()
    model.load_state_dict(state)
    versions = {}
    if not reference:
        import easyfsl
        from easyfsl.methods import PrototypicalNetworks

        fsl = PrototypicalNetworks(model)
        versions = {"easyfsl": easyfsl.__version__}

    def prepare(ep):
        return tuple(t[0] for t in ep[:4])  # the task's support_x, support_y, query_x, query_y

    def step(ep):
        sx, sy, qx, qy = ep
        if reference:
            scores = easyfsl_maths(model, sx, sy, qx)
        else:
            fsl.process_support_set(sx, sy)
            scores = fsl(qx)
        loss = F.cross_entropy(scores, qy)
        loss.backward()
        return loss

    return dict(model.named_parameters()), step, prepare, versions


# ------------------------------------------------------------------------------------------------
# Neural Processes (training): a plain-PyTorch reference of metalens' cnp / anp
# ------------------------------------------------------------------------------------------------
def mlp(i, o, width, layers):
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(i, width), nn.ReLU()]
        i = width
    return nn.Sequential(*mods, nn.Linear(i, o))


class RefMAB(nn.Module):
    """Set Transformer MAB: ``H = LN(X + MHA(X, X, X)); LN(H + relu(H W + b))``."""

    def __init__(self, d, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2, self.ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x, pad):
        h = self.norm1(x + self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0])
        return self.norm2(h + F.relu(self.ff(h)))


def masked_mean(h, mask):
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class RefNP(nn.Module):
    """CNP (``attentive=False``) or ANP, as in metalens.learners.neural_process, written plainly."""

    def __init__(self, attentive, hidden=128, latent=128, heads=8, dx=1, dy=1):
        super().__init__()
        self.attentive = attentive
        self.enc = mlp(dx + dy, hidden, hidden, 3)
        if attentive:
            self.sa = RefMAB(hidden, heads)
            self.query = mlp(dx, hidden, hidden, 2)
            self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
            self.lat_enc = mlp(dx + dy, hidden, hidden, 3)
            self.lat_sa = RefMAB(hidden, heads)
            self.lat_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = mlp(hidden + (latent if attentive else 0) + dx, 2 * dy, hidden, 3)

    def latent(self, x, y, mask):
        s = self.lat_sa(self.lat_enc(torch.cat([x, y], -1)), ~mask)
        mu, raw = self.lat_head(masked_mean(s, mask)).chunk(2, -1)
        return torch.distributions.Normal(mu, 0.1 + 0.9 * torch.sigmoid(raw))

    def loss(self, sx, sy, smask, qx, qy, qmask, generator):
        sx, sy = sx * smask[..., None], sy * smask[..., None]
        if not self.attentive:
            r = masked_mean(self.enc(torch.cat([sx, sy], -1)), smask)[:, None].expand(-1, qx.shape[1], -1)
            mean, raw = self.dec(torch.cat([r, qx], -1)).chunk(2, -1)
            nll = -torch.distributions.Normal(mean, 0.01 + 0.99 * F.softplus(raw)).log_prob(qy).sum(-1)
            m = qmask.to(nll.dtype)
            return ((nll * m).sum(-1) / m.sum(-1)).mean()
        qx, qy = qx * qmask[..., None], qy * qmask[..., None]
        prior = self.latent(sx, sy, smask)
        posterior = self.latent(torch.cat([sx, qx], 1), torch.cat([sy, qy], 1), torch.cat([smask, qmask], 1))
        eps = torch.randn(sx.shape[0], 1, posterior.loc.shape[-1], generator=generator)
        z = posterior.loc[:, None] + posterior.scale[:, None] * eps  # [T, 1, dz]
        v = self.sa(self.enc(torch.cat([sx, sy], -1)), ~smask)
        r = self.cross(self.query(qx), self.query(sx), v, key_padding_mask=~smask, need_weights=False)[0]
        Q = qx.shape[1]
        mean, raw = self.dec(torch.cat([r, z.expand(-1, Q, -1), qx], -1)).chunk(2, -1)
        log_p = torch.distributions.Normal(mean, 0.01 + 0.99 * F.softplus(raw)).log_prob(qy).sum(-1)  # [T, Q]
        nll = -(log_p * qmask).sum()
        kl = torch.distributions.kl_divergence(posterior, prior).sum(-1)
        return (nll + kl.sum()) / qmask.sum()


def _np_names(attentive: bool) -> dict[str, str]:
    """metalens parameter name -> reference name (attention projections handled in np_copy)."""
    names = {}
    for i, j in ((0, 0), (2, 2), (4, 4)):
        for w in ("weight", "bias"):
            if attentive:
                names[f"encoder.embed.layers.{i}.{w}"] = f"enc.{j}.{w}"
                names[f"latent.embed.layers.{i}.{w}"] = f"lat_enc.{j}.{w}"
            else:
                names[f"encoder.layers.{i}.{w}"] = f"enc.{j}.{w}"
            names[f"decoder.net.layers.{i}.{w}"] = f"dec.{j}.{w}"
    if attentive:
        for w in ("weight", "bias"):
            for i in (0, 2):
                names[f"encoder.query.layers.{i}.{w}"] = f"query.{i}.{w}"
                names[f"latent.head.{i}.{w}"] = f"lat_head.{i}.{w}"
            for src, dst in (("encoder.blocks.0", "sa"), ("latent.blocks.0", "lat_sa")):
                for part in ("norm1", "norm2", "ff"):
                    names[f"{src}.{part}.{w}"] = f"{dst}.{part}.{w}"
                names[f"{src}.attention.w_o.{w}"] = f"{dst}.mha.out_proj.{w}"
            names[f"encoder.cross.w_o.{w}"] = f"cross.out_proj.{w}"
    return names


ATTN = {"encoder.blocks.0.attention": "sa.mha", "latent.blocks.0.attention": "lat_sa.mha", "encoder.cross": "cross"}


def np_reference(attentive: bool, state: dict):
    """The reference model with metalens' weights; returns (model, grads-in-metalens-names function)."""
    ref = RefNP(attentive)
    names = _np_names(attentive)
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for k, v in names.items():
            own[v].copy_(state[k])
        for src, dst in (ATTN.items() if attentive else ()):
            own[f"{dst}.in_proj_weight"].copy_(torch.cat([state[f"{src}.w_{c}.weight"] for c in "qkv"]))
            own[f"{dst}.in_proj_bias"].zero_()  # metalens' projections have no bias: held at zero
            own[f"{dst}.in_proj_bias"].requires_grad_(False)
    used = set(names.values()) | {f"{d}.in_proj_weight" for d in (ATTN.values() if attentive else ())}
    assert used | {f"{d}.in_proj_bias" for d in ATTN.values()} >= set(own), set(own) - used

    def named_grads_view():
        out = {k: own[v] for k, v in names.items()}
        for src, dst in (ATTN.items() if attentive else ()):
            w = own[f"{dst}.in_proj_weight"]
            for c, part in zip("qkv", range(3)):
                out[f"{src}.w_{c}.weight"] = (w, part)
        return out

    return ref, named_grads_view


def np_workload(cfg, state, impl):
    attentive = cfg["model"] == "anp"
    gen = torch.Generator()
    if impl == "metalens":
        import metalens

        spec = metalens.make_task("gp").spec
        learner = metalens.make_learner(cfg["model"], spec)
        learner.load_state_dict(state)

        def prepare(ep):
            sx, sy, qx, qy, sm, qm = ep
            return metalens.Episode(sx, sy, qx, qy, support_mask=sm, query_mask=qm)

        def step(ep):
            gen.manual_seed(1234)
            loss, _ = learner.meta_loss(ep, generator=gen)
            loss.backward()
            return loss

        return dict(learner.named_parameters()), step, prepare, {"metalens": metalens.__version__}
    ref, view = np_reference(attentive, state)

    def step(ep):
        gen.manual_seed(1234)
        sx, sy, qx, qy, sm, qm = ep
        loss = ref.loss(sx, sy, sm, qx, qy, qm, gen)
        loss.backward()
        return loss

    return view(), step, None, {}


# ------------------------------------------------------------------------------------------------
# the in-context transformer (training)
# ------------------------------------------------------------------------------------------------
class RefICL(nn.Module):
    """metalens' transformer in sequence mode, on nn.TransformerEncoder."""

    def __init__(self, dx, dim=64, layers=4, heads=4, ratio=4):
        super().__init__()
        self.embed_x, self.embed_y = nn.Linear(dx, dim), nn.Linear(1, dim)
        self.query_token = nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(dim, heads, ratio * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1)

    @staticmethod
    def attention_mask(n):
        """``[2n, 2n]`` bool, True = may not attend: context token i sees context j <= i; the query token of
        position t sees context j < t and itself."""
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
        allowed[:n, :n] = tril
        allowed[n:, :n] = tril.tril(-1)
        allowed[n:, n:] = torch.eye(n, dtype=torch.bool)
        return ~allowed

    def forward(self, x, y, mask):
        ex = self.embed_x(x)
        h = torch.cat([ex + self.embed_y(y), ex + self.query_token], 1)
        h = self.encoder(h, mask=mask)
        return self.head(self.norm(h[:, x.shape[1]:]))


def icl_names(layers=4):
    names = {"embed_x.weight": "embed_x.weight", "embed_x.bias": "embed_x.bias", "embed_y.weight": "embed_y.weight",
             "embed_y.bias": "embed_y.bias", "query_token": "query_token", "norm.weight": "norm.weight",
             "norm.bias": "norm.bias", "head.weight": "head.weight", "head.bias": "head.bias"}
    for i in range(layers):
        for w in ("weight", "bias"):
            b, e = f"blocks.{i}", f"encoder.layers.{i}"
            names.update({f"{b}.norm1.{w}": f"{e}.norm1.{w}", f"{b}.norm2.{w}": f"{e}.norm2.{w}",
                          f"{b}.qkv.{w}": f"{e}.self_attn.in_proj_{w}", f"{b}.proj.{w}": f"{e}.self_attn.out_proj.{w}",
                          f"{b}.mlp.0.{w}": f"{e}.linear1.{w}", f"{b}.mlp.2.{w}": f"{e}.linear2.{w}"})
    return names


def icl_workload(cfg, state, impl):
    if impl == "metalens":
        import metalens

        spec = metalens.make_task("linear", dim=cfg["d"], shots=cfg["n"] - 1, queries=1).spec
        learner = metalens.make_learner("transformer", spec, mode="sequence", dim=64, layers=4, heads=4)
        learner.load_state_dict(state)

        def step(ep):
            loss, _ = learner.meta_loss(ep)
            loss.backward()
            return loss

        return dict(learner.named_parameters()), step, lambda ep: metalens.Episode(*ep), \
            {"metalens": metalens.__version__}
    ref = RefICL(cfg["d"])
    names = icl_names()
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for k, v in names.items():
            own[v].copy_(state[k])
    mask = RefICL.attention_mask(cfg["n"])

    def step(ep):
        sx, sy, qx, qy = ep
        x, y = torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)
        loss = F.mse_loss(ref(x, y, mask), y)
        loss.backward()
        return loss

    return {k: own[v] for k, v in names.items()}, step, None, {}


# ------------------------------------------------------------------------------------------------
# evaluation throughput
# ------------------------------------------------------------------------------------------------
def eval_workload(cfg, state, impl, episodes):
    """Returns (evaluate() -> per-task metric [T], versions)."""
    if cfg["workload"] == "eval-protonet":
        sx, sy, qx, qy, data, labels = episodes
        ways, shot, query = cfg["ways"], cfg["shot"], cfg["query"]
        if impl == "metalens":
            import metalens
            from metalens.evaluate import score_tasks

            spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=ways)
            learner = metalens.make_learner("protonet", spec, backbone="conv4", channels=64)
            _copy(learner, state, _metalens_conv4_name)
            learner.eval()
            ep = metalens.Episode(sx, sy, qx, qy, num_classes=ways)
            return lambda: torch.as_tensor(score_tasks(learner.predict, ep, with_nll=False)["accuracy"]), \
                {"metalens": metalens.__version__}
        import learn2learn as l2l

        model = conv4()
        model.load_state_dict(state)
        model.eval()

        def run():
            accs = []
            for t in range(sx.shape[0]):
                batch = data[t:t + 1], labels[None]
                _, acc = l2l_fast_adapt(model, batch, ways, shot, query, metric=pairwise_distances_logits)
                accs.append(float(acc))
            return torch.tensor(accs, dtype=torch.float64)

        if impl == "learn2learn-nograd":
            return torch.no_grad()(run), {"learn2learn": l2l.__version__}
        return run, {"learn2learn": l2l.__version__}
    # eval-maml: sinusoid, MLP 1-40-40-1
    sx, sy, qx, qy = episodes
    if impl == "metalens":
        import metalens
        from metalens.evaluate import score_tasks

        spec = metalens.make_task("sinusoid", shots=cfg["shots"], queries=cfg["queries"]).spec
        learner = metalens.make_learner("maml", spec, hidden=[40, 40], inner_lr=cfg["inner_lr"], inner_steps=1,
                                        eval_inner_steps=cfg["steps"])
        _copy(learner, state, lambda k: k[len("net.layers."):])
        learner.eval()
        ep = metalens.Episode(sx, sy, qx, qy)
        return lambda: torch.as_tensor(score_tasks(learner.predict, ep, with_nll=False)["mse"]), \
            {"metalens": metalens.__version__, "batching": learner.batching}
    import learn2learn as l2l

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model.load_state_dict(state)
    maml = l2l.algorithms.MAML(model, lr=cfg["inner_lr"], first_order=impl == "learn2learn-fo")

    def run():
        errs = []
        for t in range(sx.shape[0]):
            learner = maml.clone()
            for _ in range(cfg["steps"]):
                learner.adapt(F.mse_loss(learner(sx[t]), sy[t]))
            with torch.no_grad():
                errs.append(float(F.mse_loss(learner(qx[t]), qy[t])))
        return torch.tensor(errs, dtype=torch.float64)

    return run, {"learn2learn": l2l.__version__}


# ------------------------------------------------------------------------------------------------
def build_train(cfg, state, impl):
    w = cfg["workload"]
    if w == "protonet":
        if impl == "metalens":
            return protonet_metalens(cfg, state)
        if impl == "learn2learn":
            return protonet_learn2learn(cfg, state)
        return protonet_easyfsl(cfg, state, reference=impl == "easyfsl-ref")
    if w in ("np-cnp", "np-anp"):
        return np_workload(cfg, state, impl)
    if w == "icl":
        return icl_workload(cfg, state, impl)
    raise ValueError(f"unknown workload {w!r}")


def _grads(named) -> dict[str, torch.Tensor]:
    out = {}
    for k, p in named.items():
        if isinstance(p, tuple):  # (packed in_proj weight, chunk index)
            w, part = p
            out[k] = w.grad.detach().chunk(3)[part].clone()
        else:
            out[k] = p.grad.detach().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--impl", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--grad-out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True)
    cfg, state = {**data["cfg"], "workload": args.workload}, data["state"]
    times: list[float] = []
    loss0 = None
    if args.workload.startswith("eval-"):
        run, versions = eval_workload(cfg, state, args.impl, data["episodes"])
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            metric = run()
            dt = time.perf_counter() - t0
            if i == 0 and args.grad_out:
                torch.save({"per_task": metric.to(torch.float64)}, args.grad_out)
            if i >= args.warmup:
                times.append(dt)
        loss0 = float(metric.mean())
    else:
        named, step, prepare, versions = build_train(cfg, state, args.impl)
        episodes = [tuple(e) for e in data["episodes"]]
        if prepare is not None:
            episodes = [prepare(e) for e in episodes]
        params = [p[0] if isinstance(p, tuple) else p for p in named.values()]
        params = list({id(p): p for p in params}.values())
        opt = torch.optim.Adam(params, lr=1e-3)
        for i in range(1 + args.warmup + args.iters):
            ep = episodes[i % len(episodes)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = step(ep)
            if i == 0:  # the check: initial weights, episode 0 (not timed)
                loss0 = float(loss)
                if args.grad_out:
                    torch.save(_grads(named), args.grad_out)
            opt.step()
            dt = time.perf_counter() - t0
            if i > args.warmup:
                times.append(dt)
    import resource

    print(json.dumps({
        "impl": args.impl, "workload": args.workload, "threads": torch.get_num_threads(),
        "median_s": statistics.median(times), "times": times, "loss0": loss0,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "python": sys.executable,
        "torch": torch.__version__, "versions": versions, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }))


if __name__ == "__main__":
    main()
