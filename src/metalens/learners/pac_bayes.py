"""PAC-Bayes meta-learning by adjusting priors (Amit & Meir 2018): learn a prior by minimising a meta-bound.

The hypotheses are the weights ``w [d]`` of an MLP (:class:`~metalens.nets.MLP`'s layout,
flattened). Three levels of Gaussians:

- the **hyper-prior** ``𝒫 = N(theta_0, kappa_P^2 I)`` over the prior's parameters
  ``theta = (mu, l)`` (means and log-variances): ``theta_0`` is the network's initial weights (from
  the run's seed; kept as the buffer ``hyper_prior_mean``) and ``ln sigma_0^2`` (``prior_std``),
  fixed before any data is seen;
- the **hyper-posterior** ``𝒬 = N(theta_bar, diag kappa^2)``, the learner's parameters:
  ``prior_mean`` and ``prior_logvar`` (``theta_bar``, starting at ``theta_0``) and
  ``hyper_logstd`` (``ln kappa`` per coordinate, starting at ``ln hyper_posterior_std``);
- a **prior** ``P = N(mu, diag e^l)`` drawn from 𝒬, and for each task the **posterior**
  ``Q_i = N(m_i, diag e^v_i)`` that the base learner fits to the task's support set.

**The base learner** ``Q(S, P)`` starts at ``P`` and takes ``inner_steps`` natural-gradient
(Variational Online Newton) steps on Catoni's within-task bound with ``lambda = B m``, ``L^_S(Q) +
KL(Q || P) / (B m)`` up to constants, the Gibbs loss estimated with one reparameterised weight sample
per step (:meth:`PACBayes.adapt`). It is differentiated through, as MAML's inner loop is.

**The outer objective** is a meta-bound of :mod:`metalens.theory.pac_bayes` with the support sets
as the tasks' data (``m`` their size, ``n = bound_tasks``), one prior drawn from 𝒬 per episode
(reparameterised), ``KL(𝒬 || 𝒫)`` in closed form and the batch's mean ``KL(Q_i || P)`` standing for
the mean over the ``n`` tasks:

- ``objective = "joint"`` (default): ``er^ + sqrt(c_task / 2) + sqrt(c_env / 2)``, Pinsker's
  relaxation of :func:`~metalens.theory.pac_bayes.meta_kl_bound` (the bound ``metalens certify``
  states);
- ``objective = "amit-meir"``: :func:`~metalens.theory.pac_bayes.amit_meir_bound`, Amit & Meir's
  Theorem 2.

**Losses** are bounded, as the bounds need: training uses the smooth clip ``tanh(l / B)`` of the
cross-entropy (classification) or of the squared error (regression), in ``[0, 1)`` (``B = clip``);
the bounds of ``metalens certify`` are stated in the 0-1 error or ``min((y^ - y)^2, B) / B``
(:func:`metalens.certify.bounded_losses`).

**Prediction** (:meth:`PACBayes.predict`) is the posterior predictive of one prior drawn from 𝒬:
``P``, the base learner's noise and ``eval_samples`` (K) weight draws ``w_k ~ Q(S, P)`` all come
from a generator derived from ``eval_seed`` (the same draws for every task of a call, so a task's
prediction does not depend on the batch it is in, and ``predict`` is deterministic): a
``Categorical`` with the mean of the K softmax outputs, or for regression an equal-weight mixture
of K Normals ``N(f_{w_k}(x), output_std^2)`` (its mean, the average of the K outputs, is the point
prediction). ``metalens certify`` bounds the Gibbs risk of that very prior and base learner.

>>> import torch
>>> from metalens.episode import TaskSpec
>>> spec = TaskSpec(kind="classification", x_shape=(2,), num_classes=3)
>>> learner = PACBayes(spec, PACBayes.Config(hidden=(8,), eval_samples=4))
>>> sx, sy, qx = torch.randn(2, 6, 2), torch.tensor([[0, 1, 2] * 2] * 2), torch.randn(2, 5, 2)
>>> learner.predict(sx, sy, qx).probs.shape
torch.Size([2, 5, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, MixtureSameFamily, Normal

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.functional import task_mean
from metalens.learners.base import Learner
from metalens.nets import ACTIVATIONS, MLP, Activation
from metalens.registry import LEARNERS
from metalens.theory.pac_bayes import gaussian_kl, gaussian_log_ratio

__all__ = ["PACBayesConfig", "PACBayes", "Prior", "Posterior"]

_LOGVAR_RANGE = (-20.0, 8.0)  # the posteriors' log-variances are kept here (their exp stays finite)


class Prior(NamedTuple):
    """A prior ``P = N(mean, diag e^logvar)`` over the flattened weights (``[d]`` each), drawn from 𝒬, with
    ``log_ratio = ln(d𝒬 / d𝒫)`` at the draw (float64 scalar)."""

    mean: Tensor
    logvar: Tensor
    log_ratio: Tensor


class Posterior(NamedTuple):
    """Per-task posteriors ``Q_i = N(mean, diag e^logvar)``: ``[T, d]`` each."""

    mean: Tensor
    logvar: Tensor


@dataclass(frozen=True)
class PACBayesConfig(Options):
    """Options of the PAC-Bayes meta-learner."""

    hidden: tuple[int, ...] = opt((), "hidden layer widths of the MLP the priors are over (empty: a linear model; "
                                      "every weight the base learner moves costs KL in the bound)", ge=1)
    activation: Activation = opt("relu", "activation of the MLP's hidden layers")
    prior_std: float = opt(1.0, "sigma_0: the hyper-prior's priors have standard deviation sigma_0 (their "
                                "log-variance starts at ln sigma_0^2)", gt=0)
    hyper_prior_std: float = opt(1.0, "kappa_P: standard deviation of the hyper-prior N(theta_0, kappa_P^2 I) over the "
                                      "prior's means and log-variances", gt=0)
    hyper_posterior_std: float = opt(1.0, "initial standard deviation of the hyper-posterior around the prior's "
                                           "parameters (learned per parameter)", gt=0)
    inner_steps: int = opt(5, "base learner: natural-gradient steps on the within-task bound from the prior "
                              "(training and prediction)", ge=0)
    inner_lr: float = opt(0.3, "base learner: rate beta of those steps (1: Newton steps)", gt=0, le=1)
    clip: float = opt(4.0, "B: the training loss is tanh(l / B) in [0, 1) (l the cross-entropy or the squared "
                           "error); metalens certify bounds min(l, B) / B for regression", gt=0)
    objective: Literal["joint", "amit-meir"] = opt(
        "joint", "meta-bound minimised: joint (Pinsker form of the kl meta-bound metalens certify states) or "
                 "amit-meir (Amit & Meir 2018, Theorem 2)")
    bound_tasks: int = opt(1000, "n: number of observed tasks the minimised meta-bound is stated for", ge=2)
    delta: float = opt(0.05, "confidence 1 - delta of the minimised meta-bound", gt=0, lt=1)
    train_samples: int = opt(1, "weight samples per task for the Gibbs loss of the outer objective", ge=1)
    eval_samples: int = opt(16, "K: weight samples in the predictive mixture", ge=1)
    eval_seed: int = opt(0, "seed of the prediction-time draws (prior, base learner noise, weights; stream "
                            "EVAL_LEARNER)", ge=0)
    output_std: float = opt(0.1, "regression: standard deviation of each Normal of the predictive mixture", gt=0)


@LEARNERS.register("pacbayes")
class PACBayes(Learner):
    """PAC-Bayes meta-learning: a hyper-posterior over Gaussian priors, trained on a meta-bound (Amit & Meir 2018)."""

    Config = PACBayesConfig

    def __init__(self, spec: TaskSpec, config: PACBayesConfig | None = None) -> None:
        super().__init__(spec, config if config is not None else PACBayesConfig())
        c = self.config
        net = MLP((spec.x_dim,), self.out_features, c.hidden, c.activation)  # initial weights: the caller's seed
        self.shapes = [tuple(p.shape) for p in net.parameters()]
        self._act = ACTIVATIONS[c.activation]()
        theta_0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])  # [d]
        d = theta_0.numel()
        self.register_buffer("hyper_prior_mean", theta_0.clone())
        self.prior_mean = nn.Parameter(theta_0.clone())
        self.prior_logvar = nn.Parameter(torch.full((d,), 2 * math.log(c.prior_std)))
        self.hyper_logstd = nn.Parameter(torch.full((2 * d,), math.log(c.hyper_posterior_std)))

    @property
    def dim(self) -> int:
        """d: the number of network weights the priors and posteriors are over."""
        return self.prior_mean.numel()

    # -- the hyper level ---------------------------------------------------------------------------
    def _hyper(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Means and log-variances of 𝒬 and of 𝒫 over ``theta = (mu, l)`` ``[2d]``."""
        q_mean = torch.cat([self.prior_mean, self.prior_logvar])
        q_logvar = 2 * self.hyper_logstd
        l_0 = torch.full_like(self.prior_logvar, 2 * math.log(self.config.prior_std))
        p_mean = torch.cat([self.hyper_prior_mean, l_0])
        p_logvar = torch.full_like(q_logvar, 2 * math.log(self.config.hyper_prior_std))
        return q_mean, q_logvar, p_mean, p_logvar

    def kl_hyper(self) -> Tensor:
        """``KL(𝒬 || 𝒫)`` in closed form (float64 scalar, differentiable)."""
        return gaussian_kl(*self._hyper())

    def sample_prior(self, generator: torch.Generator) -> Prior:
        """A prior ``P ~ 𝒬`` (reparameterised: differentiable in the parameters) and ``ln(d𝒬/d𝒫)`` there."""
        q_mean, q_logvar, p_mean, p_logvar = self._hyper()
        eps = torch.randn(q_mean.shape, generator=generator, device=q_mean.device, dtype=q_mean.dtype)
        theta = q_mean + torch.exp(0.5 * q_logvar) * eps
        log_ratio = gaussian_log_ratio(theta, q_mean, q_logvar, p_mean, p_logvar)
        d = self.dim
        return Prior(theta[:d], theta[d:], log_ratio)

    def prediction_prior(self, device: torch.device | str | None = None) -> Prior:
        """The prior :meth:`predict` uses: drawn from 𝒬 with the generator of ``eval_seed`` (no gradient)."""
        device = device if device is not None else self.prior_mean.device
        with torch.no_grad():
            return self.sample_prior(rng.generator(self.config.eval_seed, rng.Stream.EVAL_LEARNER, 0, device=device))

    # -- the network -------------------------------------------------------------------------------
    def outputs(self, w: Tensor, x: Tensor) -> Tensor:
        """The MLP with weights ``w [T, K, d]`` on inputs ``x [T, P, *x]`` -> ``[T, K, P, out]``."""
        z = x.reshape(*x.shape[:2], -1)[:, None]  # [T, 1, P, dx]
        lead, at = w.shape[:-1], 0
        layers = len(self.shapes) // 2
        for i in range(layers):
            (o, n_in), (ob,) = self.shapes[2 * i], self.shapes[2 * i + 1]
            W = w[..., at: at + o * n_in].reshape(*lead, o, n_in)
            b = w[..., at + o * n_in: at + o * n_in + ob]
            at += o * n_in + ob
            z = z @ W.transpose(-1, -2) + b[..., None, :]  # [T, K, P, o]
            if i < layers - 1:
                z = self._act(z)
        return z

    def train_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """The bounded training surrogate ``tanh(l / B)`` per point: ``out [T, K, P, o]``, ``y`` -> ``[T, K, P]``."""
        return torch.tanh(self._raw_losses(out, y) / self.config.clip)

    def _raw_losses(self, out: Tensor, y: Tensor) -> Tensor:
        if self.spec.is_classification:
            logp = torch.log_softmax(out, -1)  # [T, K, P, N]
            return -logp.gather(-1, y[:, None, :, None].expand(*out.shape[:-1], 1)).squeeze(-1)
        return ((out - y[:, None]) ** 2).mean(-1)

    # -- the base learner --------------------------------------------------------------------------
    def inner_noise(self, n_tasks: int, generator: torch.Generator, *, shared: bool = False) -> Tensor:
        """Noise for the base learner's steps ``[T, steps, d]``; ``shared``: the same for every task."""
        steps, d = self.config.inner_steps, self.dim
        dev, dt = self.prior_mean.device, self.prior_mean.dtype
        if shared:
            return torch.randn(steps, d, generator=generator, device=dev, dtype=dt).expand(n_tasks, steps, d)
        return torch.randn(n_tasks, steps, d, generator=generator, device=dev, dtype=dt)

    def adapt(self, prior: Prior, support_x: Tensor, support_y: Tensor, support_mask: Tensor | None, noise: Tensor,
              *, create_graph: bool = False) -> Posterior:
        """The base learner ``Q(S, P)`` on every task: ``inner_steps`` natural-gradient steps on a within-task bound.

        The objective is Catoni's within-task bound in its linear form with ``lambda = B m``,
        ``L^_S(Q) + (KL(Q || P) + ln(1/delta)) / (B m) + B/8`` (``L^_S`` the mean bounded training loss
        ``tanh(l / B)`` on the task's ``m`` real support points, ``B = clip``), i.e.
        ``F(Q) = E_Q[sum_p B tanh(l_p / B)] + KL(Q || P)``, whose minimiser is the Gibbs posterior
        ``P exp(-sum_p B tanh(l_p / B))``: where the losses are well below ``B`` it is the Bayesian
        posterior of the log-likelihood ``-l`` (cross-entropy, or a Gaussian of variance 1/2). Starting
        from ``Q = P`` (precision ``lambda_P = e^-l``), each step draws ``w = m_Q + noise[:, step] /
        sqrt(lambda)``, takes the per-point gradients ``g_p = grad_w B tanh(l_p(w) / B)``, their sum ``g``
        and the empirical Fisher ``h = sum_p g_p^2`` as the curvature, and moves as Variational Online
        Newton does (Khan et al. 2018, "Fast and scalable Bayesian deep learning by weight-perturbation
        in Adam"), with rate ``beta = inner_lr``::

            lambda <- (1 - beta) lambda + beta (lambda_P + h)
            m_Q    <- m_Q - beta (g + lambda_P (m_Q - mu_P)) / lambda

        Tasks are independent, so the gradient of the summed losses gives each task its own.
        ``create_graph``: keep the graph (meta-training differentiates through the steps); otherwise
        the result is detached. Returns the posteriors' means and log-variances ``[T, d]``.
        """
        c = self.config
        T, S, d = support_x.shape[0], support_x.shape[1], self.dim
        beta, B = c.inner_lr, c.clip
        lam_p = torch.exp(-prior.logvar)  # [d]
        mean, lam = prior.mean.expand(T, d), lam_p.expand(T, d)
        x_pp = support_x.reshape(T * S, 1, *support_x.shape[2:])  # one point per row: per-point gradients
        y_pp = support_y.reshape(T * S, 1, *support_y.shape[2:])
        if not create_graph:
            mean, lam = mean.detach(), lam.detach()
        with torch.enable_grad():
            for step in range(c.inner_steps):
                w = mean + noise[:, step] * torch.rsqrt(lam)  # [T, d]
                w_pp = w[:, None, :].expand(T, S, d)
                if not create_graph:
                    w_pp = w_pp.detach().clone().requires_grad_(True)
                per_point = B * self.train_losses(self.outputs(w_pp.reshape(T * S, 1, d), x_pp), y_pp).view(T, S)
                if support_mask is not None:
                    per_point = per_point * support_mask
                g_pp, = torch.autograd.grad(per_point.sum(), w_pp, create_graph=create_graph)  # [T, S, d]
                g, h = g_pp.sum(1), (g_pp ** 2).sum(1)
                lam = (1 - beta) * lam + beta * (lam_p + h)
                mean = mean - beta * (g + lam_p * (mean - prior.mean)) / lam
                if not create_graph:
                    mean, lam = mean.detach(), lam.detach()
        logvar = (-torch.log(lam)).clamp(*_LOGVAR_RANGE)
        return Posterior(mean, logvar)

    def task_kl(self, post: Posterior, prior: Prior) -> Tensor:
        """``KL(Q_i || P)`` per task ``[T]`` (float64)."""
        return gaussian_kl(post.mean, post.logvar, prior.mean, prior.logvar)

    @staticmethod
    def draw(post: Posterior, noise: Tensor) -> Tensor:
        """Weights ``w = m + e^(v/2) noise`` ``[T, K, d]`` from posteriors ``[T, d]`` and ``noise [T or 1, K, d]``."""
        return post.mean[:, None] + torch.exp(0.5 * post.logvar)[:, None] * noise

    # -- the contract ------------------------------------------------------------------------------
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """Posterior predictive of the prior drawn from 𝒬 by ``eval_seed``: a mixture of ``eval_samples`` weights."""
        c = self.config
        T, dev = support_x.shape[0], support_x.device
        prior = self.prediction_prior(dev)
        g = rng.generator(c.eval_seed, rng.Stream.EVAL_LEARNER, 1, device=dev)
        noise = self.inner_noise(T, g, shared=True)
        post = self.adapt(prior, support_x, support_y, support_mask, noise)
        eps = torch.randn(1, c.eval_samples, self.dim, generator=g, device=dev, dtype=post.mean.dtype)
        with torch.no_grad():
            out = self.outputs(self.draw(post, eps), query_x)  # [T, K, Q, o]
        if self.spec.is_classification:
            return Categorical(probs=torch.softmax(out, -1).mean(1))
        mean = out.permute(0, 2, 3, 1)  # [T, Q, dy, K]
        return MixtureSameFamily(Categorical(logits=torch.zeros_like(mean)), Normal(mean, c.output_std))

    def meta_loss(self, episode: Episode, *,
                  generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The meta-bound of ``objective`` on the episode's support sets, for one prior drawn from 𝒬 (see the module
        docstring). Logged: the bound, its Gibbs loss, ``KL(𝒬||𝒫)`` and the mean ``KL(Q_i||P)``."""
        if generator is None:
            raise ValueError(f"{self.registry_name}.meta_loss draws priors and weights: pass generator= (the trainer "
                             "derives one from (seed, step))")
        c = self.config
        sx, sy, mask = episode.support_x, episode.support_y, episode.support_mask
        T = sx.shape[0]
        prior = self.sample_prior(generator)
        post = self.adapt(prior, sx, sy, mask, self.inner_noise(T, generator), create_graph=True)
        eps = torch.randn(T, c.train_samples, self.dim, generator=generator, device=sx.device, dtype=post.mean.dtype)
        losses = self.train_losses(self.outputs(self.draw(post, eps), sx), sy)  # [T, K, S]
        emp = task_mean(losses.mean(1), mask).mean().to(torch.float64)
        kl_tasks = self.task_kl(post, prior)  # [T]
        kl_h = self.kl_hyper()
        m = (mask.sum(-1).to(torch.float64) if mask is not None else torch.full((T,), float(sx.shape[1]),
                                                                               dtype=torch.float64, device=sx.device))
        n, delta = float(c.bound_tasks), c.delta
        if c.objective == "joint":
            M = m.mean()
            c_task = (kl_h + n * kl_tasks.mean() + torch.log(2 * torch.sqrt(n * M) / (delta / 2))) / (n * M)
            c_env = (kl_h + math.log(2 * math.sqrt(n) / (delta / 2))) / n
            bound = emp + torch.sqrt(c_task / 2) + torch.sqrt(c_env / 2)
        else:
            within = torch.sqrt((kl_h + kl_tasks + torch.log(2 * n * m / delta)) / (2 * (m - 1).clamp_min(1))).mean()
            bound = emp + within + torch.sqrt((kl_h + math.log(2 * n / delta)) / (2 * (n - 1)))
        loss = bound.to(sx.dtype)
        return loss, {"loss": float(bound.detach()), "gibbs_loss": float(emp.detach()),
                      "kl_hyper": float(kl_h.detach()), "kl_task": float(kl_tasks.mean().detach())}
