"""The Bayesian lens: Neural Processes pool the support set into a representation and decode a Gaussian.

A Neural Process approximates the posterior predictive ``p(y_t | x_t, C)`` of a task
given its context set ``C = {(x_i, y_i)}`` (the support set) with an amortised
encoder-decoder, meta-trained over a distribution of tasks. Three variants, built
from the same parts:

=======  ===========================================  ==================  ===========================
learner  deterministic path r_t                       latent path z       trained on
=======  ===========================================  ==================  ===========================
cnp      mean of MLP(x_i, y_i)                        none                Gaussian NLL of the targets
lnp      mean of MLP(x_i, y_i)                        mean-pooled q(z|.)  conditional ELBO
anp      self-attention over MLP(x_i, y_i), then      self-attention,     conditional ELBO
         multi-head cross-attention from x_t to x_i   mean-pooled q(z|.)
=======  ===========================================  ==================  ===========================

The decoder maps ``[r_t, z, x_t]`` to ``Normal(mu_t, sigma_t)`` with
``sigma_t = min_scale + (1 - min_scale) softplus(.)``, positive and bounded below
(Le et al. 2018 use 0.1 + 0.9 softplus; the default floor here is 0.01 because the
``gp`` family's noise, 0.05, lies below 0.1). The latent ``q(z | .)`` is
``Normal(mu_z, 0.1 + 0.9 sigmoid(.))`` (Kim et al. 2019).

Papers: CNP, Garnelo et al. (2018a), "Conditional Neural Processes"; NP, Garnelo et
al. (2018b), "Neural Processes"; ANP, Kim et al. (2019), "Attentive Neural Processes";
objectives and evaluation, Le et al. (2018), "Empirical Evaluation of Neural Process
Objectives"; attention, Vaswani et al. (2017), Lee et al. (2019, Set Transformer).

**Training of the latent models** (conditional ELBO, Garnelo et al. 2018b eq. 9, with
the context-conditioned prior of Le et al.)::

    log p(y_T | x_T, C) >= E_{q(z | C u T)} [ sum_t log p(y_t | x_t, r_t, z) ] - KL( q(z | C u T) || q(z | C) )

``T`` is the query set (disjoint from the context). ``meta_loss`` returns the negative
ELBO of the batch divided by its number of real target points; ``z`` is drawn (with
the reparameterisation trick) from the trainer's ``generator`` only. ``objective = "ml"``
trains instead on NP-ML (Foong et al. 2020, "Meta-Learning Stationary Stochastic Process
Prediction with Convolutional Neural Processes"): ``log (1/L) sum_l p(y_T | x_T, r, z_l)``
with ``z_l ~ q(z | C)`` (``L = train_samples``), a biased but consistent estimate of the
predictive log-likelihood the models are scored on; the decoder then never sees a z drawn
from q(z | C u T), which is never available at prediction.

**Evaluation of the latent models**: ``predict`` returns the per-point marginal
predictive ``p(y_t | x_t, C) = E_{z ~ q(z | C)} p(y_t | x_t, r_t, z)`` as an equal-weight
mixture over ``eval_samples`` (K, default 32) samples ``z_k ~ q(z | C)``, a
``MixtureSameFamily``. Its ``log_prob(y_t)`` is ``log (1/K) sum_k p(y_t | z_k)``:
importance sampling with the conditional prior as proposal (all weights 1), an
unbiased estimate of the density whose log is consistent (negatively biased by
O(1/K)). This per-target marginal log-likelihood is what the evaluator reports for
every model, CNP and the exact GP oracle included: the same quantity for all. It is
never the ELBO. :meth:`LatentNeuralProcess.joint_log_likelihood` gives the other
convention of the NP literature, the joint ``log p(y_T | x_T, C)`` by importance
sampling with proposal ``q(z | C u T)``. With ``y_dim > 1`` the mixture is taken per
output dimension. The K draws come from a generator derived from ``eval_seed`` and
are shared by all tasks of a call (common random numbers), so a task's estimate does
not depend on the batch it is scored in and ``predict`` is deterministic.

**Masks**: padded context points (``support_mask == False``) are zeroed on entry,
left out of every mean pool and given zero attention weight; padded targets are left
out of the loss. An empty context set pools to the zero vector (and cross-attention
over it to zero), so the models also predict from no context at all.

>>> import torch
>>> from metalens.episode import TaskSpec
>>> spec = TaskSpec(kind="regression", x_shape=(1,))
>>> anp = ANP(spec, ANP.Config(hidden=16, latent_dim=8, heads=2, eval_samples=4))
>>> sx, sy, qx = torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(3, 7, 1)
>>> dist = anp.predict(sx, sy, qx, support_mask=torch.arange(5) < torch.tensor([[5], [2], [1]]))
>>> dist.batch_shape, dist.log_prob(torch.zeros(3, 7, 1)).shape
(torch.Size([3, 7, 1]), torch.Size([3, 7, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, MixtureSameFamily, Normal, kl_divergence

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.learners.base import Learner
from metalens.nets import Activation, MLP, MultiheadAttention, SelfAttentionBlock
from metalens.registry import LEARNERS

__all__ = [
    "mean_pool", "GaussianDecoder", "LatentEncoder",
    "CNPConfig", "LNPConfig", "ANPConfig", "CNP", "LatentNeuralProcess", "LNP", "ANP",
]



# --------------------------------------------------------------------------------------------
# Set operations with masks
# --------------------------------------------------------------------------------------------
def mean_pool(h: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``h [T, P, d]`` over each task's real points (``mask [T, P]``) -> ``[T, d]``.

    An empty set (no real point) pools to zero.

    >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[True, True, False]]))
    tensor([[2.]])
    """
    if mask is None:
        return h.mean(1)
    m = mask[..., None]
    return torch.where(m, h, 0.0).sum(1) / m.sum(1).clamp_min(1).to(h.dtype)


def _mlp(in_features: int, out_features: int, width: int, layers: int, activation: str) -> MLP:
    """``layers`` linear layers of ``width`` units (the last one has ``out_features``)."""
    return MLP((in_features,), out_features, (width,) * (layers - 1), activation)


class LatentEncoder(nn.Module):
    """``q(z | D)`` for a set ``D``: ``s_i = MLP(x_i, y_i)`` (then self-attention), mean pool, a Gaussian head.

    ``forward(x [T, P, dx], y [T, P, dy], mask [T, P] | None) -> Normal`` with
    ``batch_shape [T, latent_dim]`` and scale ``0.1 + 0.9 sigmoid(.)`` (Kim et al. 2019).
    """

    def __init__(self, dx: int, dy: int, *, width: int, layers: int, latent_dim: int, activation: str,
                 self_attention: int = 0, heads: int = 1) -> None:
        super().__init__()
        self.embed = _mlp(dx + dy, width, width, layers, activation)
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads) for _ in range(self_attention))
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2 * latent_dim))

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Normal:
        s = self.embed(torch.cat([x, y], -1))  # [T, P, width]
        for block in self.blocks:
            s = block(s, mask)
        mu, raw = self.head(mean_pool(s, mask)).chunk(2, -1)  # [T, latent_dim] each
        return Normal(mu, 0.1 + 0.9 * torch.sigmoid(raw), validate_args=False)


class GaussianDecoder(nn.Module):
    """``p(y_t | x_t, r_t, z) = Normal(mu, min_scale + (1 - min_scale) softplus(raw))``.

    ``forward(features [..., d_in]) -> (mean [..., dy], scale [..., dy])``, the
    features being ``[r_t, z, x_t]`` concatenated.
    """

    def __init__(self, in_features: int, dy: int, *, width: int, layers: int, activation: str,
                 min_scale: float) -> None:
        super().__init__()
        self.net = _mlp(in_features, 2 * dy, width, layers, activation)
        self.min_scale = min_scale

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(features).chunk(2, -1)
        return mean, self.min_scale + (1.0 - self.min_scale) * F.softplus(raw)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CNPConfig(Options):
    """Options of the Conditional Neural Process (defaults: Kim et al. 2019, 1-D regression)."""

    hidden: int = opt(128, "width of every layer (encoders, attention, decoder)", ge=1)
    encoder_layers: int = opt(3, "linear layers of the per-point encoder MLP(x_i, y_i)", ge=1)
    decoder_layers: int = opt(3, "linear layers of the decoder MLP(r_t, z, x_t)", ge=1)
    activation: Activation = opt("relu", "activation of the MLPs")
    min_scale: float = opt(0.01, "lower bound of the decoder's standard deviation (0.1 in Le et al. 2018)", gt=0, lt=1)


@dataclass(frozen=True)
class LNPConfig(CNPConfig):
    """Options of the latent Neural Process."""

    latent_dim: int = opt(128, "dimension of the global latent z", ge=1)
    objective: Literal["elbo", "ml"] = opt(
        "elbo", "training objective: elbo (conditional ELBO, the papers') or ml (NP-ML, Foong et al. 2020: log of a "
                "train_samples-sample estimate of p(y_T | x_T, C) with z ~ q(z | C))")
    train_samples: int = opt(1, "z samples per task in training (the ELBO's reconstruction term; ml: its estimate, "
                                "16 or more)", ge=1)
    eval_samples: int = opt(32, "K: z samples ~ q(z | context) in the predictive mixture (evaluation)", ge=1)
    eval_seed: int = opt(0, "seed of the evaluation-time z samples (stream EVAL_LEARNER)", ge=0)


@dataclass(frozen=True)
class ANPConfig(LNPConfig):
    """Options of the Attentive Neural Process."""

    heads: int = opt(8, "attention heads (must divide hidden)", ge=1)
    self_attention: int = opt(1, "self-attention blocks over the context in each encoder path (0: none)", ge=0)
    query_layers: int = opt(2, "linear layers of the MLP(x) giving cross-attention queries and keys", ge=1)

    def check(self) -> None:
        super().check()
        if self.hidden % self.heads:
            raise ValueError(f"heads must divide hidden = {self.hidden}, got {self.heads}")


# --------------------------------------------------------------------------------------------
# The learners
# --------------------------------------------------------------------------------------------
def _flat(x: Tensor) -> Tensor:
    """``[T, P, *x] -> [T, P, prod(x)]``."""
    return x.reshape(*x.shape[:2], -1)


def _context(support_x: Tensor, support_y: Tensor, support_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Flattened context with padded points zeroed, so that no padded value can reach any sum."""
    sx, sy = _flat(support_x), support_y
    if support_mask is not None:
        sx = torch.where(support_mask[..., None], sx, 0.0)
        sy = torch.where(support_mask[..., None], sy, 0.0)
    return sx, sy


@LEARNERS.register("cnp")
class CNP(Learner):
    """Conditional Neural Process: mean-pooled context encoding, Gaussian decoder (Garnelo et al. 2018a)."""

    Config = CNPConfig
    probabilistic = True

    def __init__(self, spec: TaskSpec, config: CNPConfig | None = None) -> None:
        super().__init__(spec, config if config is not None else type(self).Config())
        if spec.is_classification:
            raise ValueError(f"{type(self).__name__} is a regression model; the task family is a classification one")
        c = self.config
        dx, dy = spec.x_dim, spec.y_dim
        self.encoder = self._build_deterministic(dx, dy)
        z_dim = getattr(c, "latent_dim", 0)  # the latent models' decoder also reads z
        self.decoder = GaussianDecoder(c.hidden + z_dim + dx, dy, width=c.hidden, layers=c.decoder_layers,
                                       activation=c.activation, min_scale=c.min_scale)

    # -- the parts subclasses swap --------------------------------------------------------------
    def _build_deterministic(self, dx: int, dy: int) -> nn.Module:
        c = self.config
        return _mlp(dx + dy, c.hidden, c.hidden, c.encoder_layers, c.activation)

    def deterministic_path(self, sx: Tensor, sy: Tensor, mask: Tensor | None, qx: Tensor) -> Tensor:
        """``r_t [T, Q, hidden]``: here the same ``r = mean_i MLP(x_i, y_i)`` for every target."""
        r = mean_pool(self.encoder(torch.cat([sx, sy], -1)), mask)  # [T, hidden]
        return r[:, None, :].expand(-1, qx.shape[1], -1)

    # -- the contract ---------------------------------------------------------------------------
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        sx, sy = _context(support_x, support_y, support_mask)
        qx = _flat(query_x)
        r = self.deterministic_path(sx, sy, support_mask, qx)
        mean, scale = self.decoder(torch.cat([r, qx], -1))
        return Normal(mean, scale, validate_args=False)  # [T, Q, dy]


class LatentNeuralProcess(CNP):
    """Base of the latent models: deterministic path + global latent z, trained on the conditional ELBO."""

    Config = LNPConfig

    def __init__(self, spec: TaskSpec, config: LNPConfig | None = None) -> None:
        super().__init__(spec, config)
        self.latent = self._build_latent(spec.x_dim, spec.y_dim)

    def _build_latent(self, dx: int, dy: int) -> LatentEncoder:
        c = self.config
        return LatentEncoder(dx, dy, width=c.hidden, layers=c.encoder_layers, latent_dim=c.latent_dim,
                             activation=c.activation)

    def _decode(self, r: Tensor, z: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder per sample: ``r [T, Q, h]``, ``z [T, K, dz]``, ``qx [T, Q, dx]`` -> mean, scale ``[T, K, Q, dy]``."""
        K, Q = z.shape[1], qx.shape[1]
        features = torch.cat([r[:, None].expand(-1, K, -1, -1), z[:, :, None].expand(-1, -1, Q, -1),
                              qx[:, None].expand(-1, K, -1, -1)], -1)
        return self.decoder(features)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """Per-point marginal predictive: an equal-weight mixture over ``eval_samples`` draws ``z_k ~ q(z | C)``."""
        c = self.config
        sx, sy = _context(support_x, support_y, support_mask)
        qx = _flat(query_x)
        prior = self.latent(sx, sy, support_mask)  # q(z | C), [T, dz]
        g = rng.generator(c.eval_seed, rng.Stream.EVAL_LEARNER, device=sx.device)
        eps = torch.randn(c.eval_samples, c.latent_dim, generator=g, device=sx.device, dtype=sx.dtype)
        z = prior.loc[:, None] + prior.scale[:, None] * eps  # [T, K, dz]: the same eps for every task
        mean, scale = self._decode(self.deterministic_path(sx, sy, support_mask, qx), z, qx)  # [T, K, Q, dy]
        mean, scale = mean.permute(0, 2, 3, 1), scale.permute(0, 2, 3, 1)  # [T, Q, dy, K]
        mix = Categorical(logits=torch.zeros_like(mean), validate_args=False)
        return MixtureSameFamily(mix, Normal(mean, scale, validate_args=False), validate_args=False)

    def _posterior_terms(self, episode: Episode, samples: int, generator: torch.Generator, *,
                         from_prior: bool = False) -> tuple[Normal, Normal | None, Tensor, Tensor, Tensor]:
        """What the ELBO and the joint estimate share, with ``z_k ~ q(z | C u T)`` (reparameterised).

        Returns ``q(z | C)``, ``q(z | C u T)`` (``batch_shape [T, dz]``), the samples
        ``z [T, K, dz]``, ``log p(y_t | x_t, r_t, z_k) [T, K, Q]`` (summed over y dims)
        and the target mask ``[T, Q]``. ``from_prior``: ``z_k ~ q(z | C)`` instead, and no
        posterior (None).
        """
        T, Q = episode.n_tasks, episode.n_query
        device = episode.query_x.device
        s_mask = episode.support_mask
        q_mask = episode.query_mask if episode.query_mask is not None else torch.ones(T, Q, dtype=torch.bool,
                                                                                      device=device)
        c_mask = s_mask if s_mask is not None else torch.ones(T, episode.n_support, dtype=torch.bool, device=device)
        sx, sy = _context(episode.support_x, episode.support_y, s_mask)
        qx, qy = _context(episode.query_x, episode.query_y, q_mask)
        prior = self.latent(sx, sy, s_mask)  # q(z | C)
        posterior = None if from_prior else self.latent(torch.cat([sx, qx], 1), torch.cat([sy, qy], 1),
                                                        torch.cat([c_mask, q_mask], 1))
        proposal = prior if posterior is None else posterior
        eps = torch.randn(T, samples, self.config.latent_dim, generator=generator, device=device, dtype=sx.dtype)
        z = proposal.loc[:, None] + proposal.scale[:, None] * eps  # [T, K, dz]
        mean, scale = self._decode(self.deterministic_path(sx, sy, s_mask, qx), z, qx)  # [T, K, Q, dy]
        log_p = Normal(mean, scale, validate_args=False).log_prob(qy[:, None]).sum(-1)  # [T, K, Q]
        return prior, posterior, z, log_p, q_mask

    def meta_loss(self, episode: Episode, *,
                  generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Negative conditional ELBO (module docstring) per real target point of the batch; ``objective =
        ml``: minus the log of the ``train_samples``-sample estimate of ``p(y_T | x_T, C)``, per target."""
        if generator is None:
            raise ValueError(f"{self.registry_name}.meta_loss samples z: pass generator= (the trainer derives "
                             "one from (seed, step))")
        K = self.config.train_samples
        if self.config.objective == "ml":
            _, _, _, log_p, q_mask = self._posterior_terms(episode, K, generator, from_prior=True)
            loss = -_log_mean_exp(_joint_log_p(log_p, q_mask)).sum() / q_mask.sum()
            return loss, {"loss": float(loss.detach())}
        prior, posterior, _, log_p, q_mask = self._posterior_terms(episode, K, generator)
        nll = -torch.where(q_mask, log_p.mean(1), 0.0).sum()  # mean over the z samples, sum over real targets
        kl = kl_divergence(posterior, prior).sum(-1)  # [T]
        n_targets = q_mask.sum()
        loss = (nll + kl.sum()) / n_targets
        return loss, {"loss": float(loss.detach()), "nll": float(nll.detach() / n_targets),
                      "kl": float(kl.detach().mean())}

    @torch.no_grad()
    def joint_log_likelihood(self, episode: Episode, *, samples: int, generator: torch.Generator) -> Tensor:
        """Importance-weighted estimate of the joint ``log p(y_T | x_T, C)`` of each task, ``[T]``.

        ``log (1/K) sum_k p(y_T | x_T, r, z_k) q(z_k | C) / q(z_k | C u T)`` with
        ``z_k ~ q(z | C u T)`` (K = ``samples``; Le et al. 2018): a lower bound in
        expectation that tightens to the joint log-likelihood as K grows. Padded
        targets are left out. Divide by the number of real targets for nats per target.
        """
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        prior, posterior, z, log_p, q_mask = self._posterior_terms(episode, samples, generator)
        log_lik = _joint_log_p(log_p, q_mask)  # [T, K]
        log_w = (Normal(prior.loc[:, None], prior.scale[:, None]).log_prob(z).sum(-1)
                 - Normal(posterior.loc[:, None], posterior.scale[:, None]).log_prob(z).sum(-1))  # [T, K]
        return _log_mean_exp(log_lik + log_w)


def _joint_log_p(log_p: Tensor, q_mask: Tensor) -> Tensor:
    """``log p(y_T | z_k)``: ``log_p [T, K, Q]`` summed over each task's real targets -> ``[T, K]``."""
    return torch.where(q_mask[:, None], log_p, 0.0).sum(-1)


def _log_mean_exp(log_w: Tensor) -> Tensor:
    """``log (1/K) sum_k exp(log_w[:, k])``: ``[T, K]`` -> ``[T]``."""
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


@LEARNERS.register("lnp")
class LNP(LatentNeuralProcess):
    """Latent Neural Process: mean-pooled deterministic path + global latent z, ELBO-trained (Garnelo et al. 2018b)."""

    Config = LNPConfig


@LEARNERS.register("anp")
class ANP(LatentNeuralProcess):
    """Attentive Neural Process: self-attention, multi-head cross-attention and a latent path (Kim et al. 2019)."""

    Config = ANPConfig

    def _build_deterministic(self, dx: int, dy: int) -> nn.Module:
        c = self.config
        return nn.ModuleDict({
            "embed": _mlp(dx + dy, c.hidden, c.hidden, c.encoder_layers, c.activation),  # values r_i
            "blocks": nn.ModuleList(SelfAttentionBlock(c.hidden, c.heads) for _ in range(c.self_attention)),
            "query": _mlp(dx, c.hidden, c.hidden, c.query_layers, c.activation),  # shared for x_t and x_i
            "cross": MultiheadAttention(c.hidden, c.hidden, c.hidden, c.hidden, c.heads),
        })

    def _build_latent(self, dx: int, dy: int) -> LatentEncoder:
        c = self.config
        return LatentEncoder(dx, dy, width=c.hidden, layers=c.encoder_layers, latent_dim=c.latent_dim,
                             activation=c.activation, self_attention=c.self_attention, heads=c.heads)

    def deterministic_path(self, sx: Tensor, sy: Tensor, mask: Tensor | None, qx: Tensor) -> Tensor:
        """``r_t = MHA(query=MLP(x_t), key=MLP(x_i), value=SA(MLP(x_i, y_i)))``, ``[T, Q, hidden]``."""
        e = self.encoder
        r = e["embed"](torch.cat([sx, sy], -1))  # [T, S, hidden]
        for block in e["blocks"]:
            r = block(r, mask)
        return e["cross"](e["query"](qx), e["query"](sx), r, mask)

