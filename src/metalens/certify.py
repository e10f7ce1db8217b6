"""Certificates for trained runs: a PAC-Bayes meta-bound on the risk on a new task, beside the risk measured there.

``metalens certify RUN`` (and :func:`certify`) takes the first ``n`` tasks of the run's
meta-training stream (``family.episode(train.seed, step, train.batch_tasks)`` for steps 0, 1, ...:
tasks the run was trained on, drawn i.i.d. from its family) with their support sets as the ``m``
examples of each task, and states, with probability at least ``1 - delta``, an upper bound on the
expected Gibbs risk on a new task drawn from the same family; it then measures that risk on
``episodes`` fresh held-out tasks (evaluation seed 0: the tasks ``metalens eval`` scores). The loss
is bounded: the 0-1 error for classification, the squared error clipped to ``[0, B]`` and divided by
``B`` for regression.

What is certified, per learner:

- ``pacbayes``: the prior ``P`` its predictions use (drawn from the hyper-posterior 𝒬 with its
  ``eval_seed``) and its base learner ``Q(S, P)``; the hyper-prior 𝒫 is the learner's own (centred on
  its initial weights, fixed before any data);
- ``maml`` and ``protonet``, softened as Dziugaite & Roy (2017) do: the trained weights ``theta^``
  become a Gaussian ``𝒬_sigma = N(theta^, sigma^2 I)`` against the hyper-prior ``𝒫_sigma =
  N(theta_0, sigma^2 I)`` centred on the run's initial weights (rebuilt from its seed). For ``maml``
  a task's posterior is ``N(phi, tau^2 I)`` around the weights its inner loop reaches from the
  drawn initialisation, against the prior ``N(theta, tau^2 I)``; for ``protonet`` it is
  ``N(c, tau^2 I)`` around each class prototype, against ``N(f(0), tau^2 I)`` (``f(0)`` the drawn
  embedding of the zero input). ``(sigma, tau)`` is chosen on the grid :data:`SIGMAS` x :data:`TAUS`,
  every grid point's bound being computed at ``delta / |grid|`` (a union bound): a pilot estimate
  with ``pilot_samples`` draws picks the point, whose certificate is then computed afresh.

The bound (:func:`metalens.theory.pac_bayes.meta_kl_bound`, in the disintegrated form of
Rivasplata et al. 2020 for the drawn prior) holds with probability ``>= 1 - delta`` over the ``n``
tasks, their examples, the drawn prior and the Monte Carlo draws, with ``delta`` split as: ``delta/2``
for the across-task step, ``delta/4`` for the within-task step (joint over the ``n m`` examples) and
``delta/4`` for estimating the empirical Gibbs risk from ``samples`` independent weight draws
(:func:`~metalens.theory.pac_bayes.sample_convergence_bound`)::

    er <= kl^-1( kl^-1( er^+, c_task ), c_env )
    er^+   = kl^-1( er^_MC, ln(4/delta) / N_MC )
    c_task = ( ln(d𝒬/d𝒫)(P) + sum_i KL(Q_i || P) + ln(2 sqrt(n m) / (delta/4)) ) / (n m)
    c_env  = ( ln(d𝒬/d𝒫)(P) + ln(2 sqrt(n) / (delta/2)) ) / n

Amit & Meir's and Pentina & Lampert's forms are reported beside it, computed from the same terms
at confidence ``3 delta / 4`` (with ``er^+`` in place of ``er^``).

Assumptions: tasks i.i.d. from the family, examples i.i.d. within a task, a loss in ``[0, 1]``, and a
network that maps each input on its own (an MLP: batch norm would make one point's prediction depend
on the others'); runs whose tasks carry padded support sets are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from metalens import rng
from metalens.config import ConfigError
from metalens.episode import Episode
from metalens.errors import RunFolderError
from metalens.evaluate import summarize
from metalens.learners.base import Learner
from metalens.nets import MLP
from metalens.run import Run, load_run
from metalens.theory.pac_bayes import (amit_meir_bound, gaussian_log_ratio, meta_kl_bound, pentina_lampert_bound,
                                       sample_convergence_bound, softening_grid)

__all__ = ["Certificate", "certify", "certificates", "CERTIFIABLE", "SIGMAS", "TAUS", "DEFAULT_CLIP",
           "observed_tasks", "bounded_losses", "predictor_risk"]

CERTIFIABLE = ("pacbayes", "maml", "protonet")
SIGMAS = softening_grid(1e-4, 1.0, 9)  # hyper-level softening: standard deviation around the trained weights
TAUS = softening_grid(1e-3, 100.0, 11)  # task-level softening: around the adapted weights / the prototypes
DEFAULT_CLIP = 4.0  # B for regression runs of learners without a clip option (pacbayes uses its own)
_CHUNK = 100  # tasks per batch of Monte Carlo draws
_CERT_SEED = 0x5EC7  # the Monte Carlo draws of a certificate come from generator(_CERT_SEED, purpose, ...)


@dataclass
class Certificate:
    """A meta-bound on the new-task risk of a run, every term stated, beside the risk measured on fresh tasks."""

    run: str
    learner: str
    task: str
    loss: str  # what the bounded loss is
    tasks: int  # n: observed tasks the bound rests on
    examples: int  # m: examples per task (the support sets)
    delta: float
    bound: float  # with probability >= 1 - delta, the expected risk on a new task is at most this
    terms: dict[str, float]  # every number the bound is made of
    measured: dict[str, float]  # the Gibbs risk on `episodes` fresh tasks: mean, ci95
    episodes: int
    predictor: dict[str, float] | None = None  # the learner's own predictions on the same tasks: mean, ci95
    softening: dict[str, Any] | None = None  # the grid and the chosen (sigma, tau), for maml and protonet
    forms: dict[str, float] = field(default_factory=dict)  # Amit & Meir's and Pentina & Lampert's forms

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The certificate as a few lines for people."""
        t = self.terms
        lines = [f"certificate for {self.run} ({self.learner} on {self.task}; loss: {self.loss})",
                 f"  with probability >= {1 - self.delta:g} over n = {self.tasks} tasks of m = {self.examples} "
                 f"examples, the expected risk on a new task is <= {self.bound:.4f}",
                 f"  measured on {self.episodes} fresh tasks: {self.measured['mean']:.4f} ± "
                 f"{self.measured['ci95']:.4f}"
                 " (Gibbs risk: a weight draw per prediction)"]
        if self.predictor is not None:
            lines.append(f"  the learner's own predictions on the same tasks: {self.predictor['mean']:.4f} ± "
                         f"{self.predictor['ci95']:.4f}")
        lines.append("  terms: " + ", ".join(f"{k} = {_num(v)}" for k, v in t.items()))
        if self.forms:
            lines.append("  the same terms in the papers' forms (confidence 3 delta / 4): "
                         + ", ".join(f"{k} {v:.4f}" for k, v in self.forms.items()))
        if self.softening is not None:
            s = self.softening
            lines.append(f"  softening: sigma = {s['sigma']:g}, tau = {s['tau']:g}, chosen on a grid of "
                         f"{s['grid_size']} (each at delta / {s['grid_size']})")
        return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# -- inputs ----------------------------------------------------------------------------------------------


def _check_options(tasks: Sequence[int], delta: float, episodes: int, samples: int, clip: float | None) -> None:
    if not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    for n in tasks:
        if int(n) != n or n < 2:
            raise ConfigError(f"tasks must be an integer >= 2 (the observed tasks the bound rests on), got {n}")
    if int(episodes) != episodes or episodes < 2:
        raise ConfigError(f"episodes must be an integer >= 2 (fresh tasks the risk is measured on), got {episodes}")
    if int(samples) != samples or samples < 1:
        raise ConfigError(f"samples must be an integer >= 1, got {samples}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be a number > 0, got {clip}")


def observed_tasks(run: Run, n: int) -> Episode:
    """The first ``n`` tasks of ``run``'s meta-training stream (``family.episode(seed, step, batch_tasks)``, steps
    0, 1, ...), in the order the trainer drew them."""
    t = run.config.train
    steps = -(-n // t.batch_tasks)
    return Episode.cat([run.family.episode(t.seed, s, t.batch_tasks) for s in range(steps)])[:n]


def bounded_losses(out: Tensor, y: Tensor, *, classification: bool, clip: float) -> Tensor:
    """Per-point losses in ``[0, 1]``: the 0-1 error of ``out [..., P, N]`` against labels ``y [..., P]``, or the
    squared error of ``out [..., P, dy]`` (mean over ``dy``) clipped to ``[0, clip]`` and divided by ``clip``."""
    if classification:
        return (out.argmax(-1) != y).to(torch.float64)
    return ((out - y) ** 2).mean(-1).clamp(max=clip).div(clip).to(torch.float64)


# -- what each learner certifies -----------------------------------------------------------------------------


class _Draw:
    """A prior drawn from the hyper-posterior and the base learner it feeds (one grid point)."""

    log_ratio: float  # ln(d𝒬/d𝒫) at the drawn prior

    def posterior(self, sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        """Each task's posterior (tensors ``[T, ...]``)."""
        raise NotImplementedError

    def kl(self, post: dict[str, Tensor]) -> Tensor:
        """``KL(Q_i || P)`` per task ``[T]`` (float64)."""
        raise NotImplementedError

    def losses(self, post: dict[str, Tensor], x: Tensor, y: Tensor, k: int, g: torch.Generator) -> Tensor:
        """Bounded losses ``[T, k]`` of ``k`` independent weight draws per task, each averaged over the points."""
        raise NotImplementedError


def _take(post: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    return {k: v[sl] for k, v in post.items()}


class _PACBayesDraw(_Draw):
    def __init__(self, learner: Any, clip: float) -> None:
        self.lrn, self.clip = learner, clip
        self.prior = learner.prediction_prior()
        self.log_ratio = float(self.prior.log_ratio)

    def posterior(self, sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        lrn = self.lrn  # the base learner exactly as predict runs it
        g = rng.generator(lrn.config.eval_seed, rng.Stream.EVAL_LEARNER, 1, device=sx.device)
        post = lrn.adapt(self.prior, sx, sy, None, lrn.inner_noise(sx.shape[0], g, shared=True))
        return {"mean": post.mean, "logvar": post.logvar}

    def kl(self, post: dict[str, Tensor]) -> Tensor:
        from metalens.learners.pac_bayes import Posterior

        return self.lrn.task_kl(Posterior(post["mean"], post["logvar"]), self.prior)

    def losses(self, post: dict[str, Tensor], x: Tensor, y: Tensor, k: int, g: torch.Generator) -> Tensor:
        from metalens.learners.pac_bayes import Posterior

        p = Posterior(post["mean"], post["logvar"])
        eps = torch.randn(x.shape[0], k, self.lrn.dim, generator=g, dtype=p.mean.dtype)
        with torch.no_grad():
            out = self.lrn.outputs(self.lrn.draw(p, eps), x)  # [T, k, P, o]
        return bounded_losses(out, y[:, None], classification=self.lrn.spec.is_classification,
                              clip=self.clip).mean(-1)


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.detach().reshape(-1) for v in params.values()]) if params else torch.zeros(0)


def _unflat(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, at = {}, 0
    for k, v in like.items():
        out[k] = vec[..., at: at + v.numel()].reshape(*vec.shape[:-1], *v.shape)
        at += v.numel()
    return out


def _soft_prior(trained: Tensor, initial: Tensor, sigma: float, eps: Tensor) -> tuple[Tensor, float]:
    """A draw ``theta = theta^ + sigma eps`` from ``N(theta^, sigma^2 I)`` and ``ln(d𝒬/d𝒫)`` there against
    ``N(theta_0, sigma^2 I)``."""
    theta = trained + sigma * eps
    lv = torch.full_like(theta, 2 * math.log(sigma))
    return theta, float(gaussian_log_ratio(theta, trained, lv, initial, lv)) if theta.numel() else 0.0


class _MAMLDraw(_Draw):
    def __init__(self, learner: Any, initial: Learner, sigma: float, tau: float, eps: Tensor, clip: float) -> None:
        self.lrn, self.tau, self.clip = learner, tau, clip
        self.names = {k: v.detach() for k, v in learner.theta().items()}
        theta, self.log_ratio = _soft_prior(_flat(self.names), _flat(initial.theta()), sigma, eps)
        self.theta = _unflat(theta, self.names)

    def posterior(self, sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return self.lrn.adapt_tasks(self.theta, sx, sy, None, steps=self.lrn.eval_steps)

    def kl(self, post: dict[str, Tensor]) -> Tensor:
        T = next(iter(post.values())).shape[0]
        d2 = sum(((post[k] - self.theta[k]) ** 2).reshape(T, -1).sum(-1) for k in post)
        return (d2 / (2 * self.tau ** 2)).to(torch.float64)

    def losses(self, post: dict[str, Tensor], x: Tensor, y: Tensor, k: int, g: torch.Generator) -> Tensor:
        T = x.shape[0]
        phi = _flat_batch(post)  # [T, d]
        w = phi[:, None] + self.tau * torch.randn(T, k, phi.shape[-1], generator=g, dtype=phi.dtype)
        params = _unflat(w.reshape(T * k, -1), self.names)
        xs = x[:, None].expand(T, k, *x.shape[1:]).reshape(T * k, *x.shape[1:])
        with torch.no_grad():
            out = self.lrn.apply_tasks(params, xs)  # [T k, P, o]
        out = out.reshape(T, k, *out.shape[1:])
        return bounded_losses(out, y[:, None], classification=self.lrn.spec.is_classification,
                              clip=self.clip).mean(-1)


def _flat_batch(post: dict[str, Tensor]) -> Tensor:
    T = next(iter(post.values())).shape[0]
    return torch.cat([v.reshape(T, -1) for v in post.values()], -1)


class _ProtoNetDraw(_Draw):
    def __init__(self, learner: Any, initial: Learner, sigma: float, tau: float, eps: Tensor, clip: float) -> None:
        self.lrn, self.tau = learner, tau
        self.names = {k: v.detach() for k, v in learner.embed.named_parameters()}
        init = {k: v.detach() for k, v in initial.embed.named_parameters()}
        theta, self.log_ratio = _soft_prior(_flat(self.names), _flat(init), sigma, eps)
        self.params = _unflat(theta, self.names)
        zero = torch.zeros(1, 1, *learner.spec.x_shape)
        self.centre = self.embed(zero)[0, 0]  # [D]: the prior's mean for every prototype

    def embed(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return functional_call(self.lrn.embed, self.params, (x,))

    def posterior(self, sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        return {"prototypes": self.lrn.prototypes(self.embed(sx), sy)}  # [T, N, D]

    def kl(self, post: dict[str, Tensor]) -> Tensor:
        c = post["prototypes"]
        return (((c - self.centre) ** 2).flatten(1).sum(-1) / (2 * self.tau ** 2)).to(torch.float64)

    def losses(self, post: dict[str, Tensor], x: Tensor, y: Tensor, k: int, g: torch.Generator) -> Tensor:
        c = post["prototypes"]  # [T, N, D]
        noisy = c[:, None] + self.tau * torch.randn(c.shape[0], k, *c.shape[1:], generator=g, dtype=c.dtype)
        z = self.embed(x)  # [T, P, D]
        d2 = ((z[:, None, :, None, :] - noisy[:, :, None]) ** 2).sum(-1)  # [T, k, P, N]
        return bounded_losses(-d2, y[:, None], classification=True, clip=1.0).mean(-1)


class _Certifiable:
    """What a run's learner certifies: its grid of softenings and a draw per grid point."""

    def __init__(self, run: Run, clip: float | None) -> None:
        self.run, lrn = run, run.learner
        self._draws: dict[Any, _Draw] = {}
        name = run.config.learner
        if name not in CERTIFIABLE:
            raise RunFolderError(f"{run.path} holds a run of learner {name!r}; metalens certify applies to runs of "
                                 f"{', '.join(CERTIFIABLE)}")
        cfg_clip = getattr(lrn.config, "clip", None)
        self.clip = float(clip if clip is not None else cfg_clip if cfg_clip is not None else DEFAULT_CLIP)
        self.classification = lrn.spec.is_classification
        self.loss = "0-1 error" if self.classification else \
            f"squared error clipped to [0, {self.clip:g}] and divided by {self.clip:g}"
        if name == "pacbayes":
            self.grid: list[tuple[float, float] | None] = [None]
            _, initial = run.config.build()  # the hyper-prior must be fixed before the data: the initial weights
            if not torch.equal(initial.hyper_prior_mean, lrn.hyper_prior_mean.cpu()):
                raise RunFolderError(f"{run.path}: the checkpoint's hyper-prior is not the run's initial weights "
                                     "(from its seed); a bound needs a hyper-prior fixed before the data")
            return
        net = lrn.net if name == "maml" else lrn.embed
        if not isinstance(net, MLP):
            raise RunFolderError(f"{run.path}: certify needs an MLP network (one that maps each input on its own, "
                                 f"with weights to soften); this run's {name} uses {type(net).__name__}")
        if name == "protonet" and not self.classification:
            raise RunFolderError(f"{run.path}: protonet classifies; this run's family is a regression family")
        self.grid = [(s, t) for s in SIGMAS for t in TAUS]
        # the initial weights: the run's learner rebuilt from its seed, before any training
        _, self.initial = run.config.build()
        d = _flat(lrn.theta() if name == "maml" else dict(lrn.embed.named_parameters())).numel()
        self.eps = torch.randn(d, generator=rng.generator(_CERT_SEED, 0), dtype=torch.float32)

    def draw(self, point: tuple[float, float] | None) -> _Draw:
        if point not in self._draws:
            lrn = self.run.learner
            if point is None:
                self._draws[point] = _PACBayesDraw(lrn, self.clip)
            else:
                cls = _MAMLDraw if self.run.config.learner == "maml" else _ProtoNetDraw
                self._draws[point] = cls(lrn, self.initial, point[0], point[1], self.eps, self.clip)
        return self._draws[point]

    def predictor_losses(self, ep: Episode) -> np.ndarray:
        """The learner's own predictions (``predict``) on each task: mean bounded loss ``[T]``."""
        return predictor_risk(self.run.learner.predict, ep, classification=self.classification, clip=self.clip)


def predictor_risk(predict: Callable[..., Any], ep: Episode, *, classification: bool, clip: float) -> np.ndarray:
    """The bounded risk of a ``predict``-like callable (a learner's, a family's oracle) on each task of ``ep``:
    the 0-1 error of the most probable class, or the clipped squared error of the predictive mean ``[T]``."""
    out = []
    with torch.no_grad():
        for lo in range(0, ep.n_tasks, _CHUNK):
            e = ep[lo: lo + _CHUNK]
            dist = predict(e.support_x, e.support_y, e.query_x, support_mask=e.support_mask)
            pred = dist.probs if classification else dist.mean
            out.append(bounded_losses(pred, e.query_y, classification=classification, clip=clip).mean(-1))
    return torch.cat(out).numpy()


# -- the bound ---------------------------------------------------------------------------------------------


def _posteriors(draw: _Draw, ep: Episode) -> dict[str, Tensor]:
    """Each task's posterior (``[T, ...]`` tensors), in chunks of tasks."""
    parts = [draw.posterior(ep.support_x[lo: lo + _CHUNK], ep.support_y[lo: lo + _CHUNK])
             for lo in range(0, ep.n_tasks, _CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _gibbs(draw: _Draw, posts: dict[str, Tensor], x: Tensor, y: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Bounded losses ``[T, k]`` of ``k`` independent draws per task, in chunks of tasks."""
    return torch.cat([draw.losses(_take(posts, slice(lo, lo + _CHUNK)), x[lo: lo + _CHUNK], y[lo: lo + _CHUNK], k, g)
                      for lo in range(0, x.shape[0], _CHUNK)])


def _bound(draw: _Draw, all_posts: dict[str, Tensor], ep: Episode, n: int, delta: float, samples: int,
           g: torch.Generator) -> tuple[float, dict[str, float], dict[str, float]]:
    """The bound for the first ``n`` tasks at confidence ``1 - delta``, its terms, and the papers' forms."""
    k = max(1, -(-samples // n))
    posts = _take(all_posts, slice(0, n))
    L = _gibbs(draw, posts, ep.support_x[:n], ep.support_y[:n], k, g)  # [n, k]
    emp, N = float(L.mean()), n * k
    d_mc, d_levels = delta / 4, 3 * delta / 4
    emp_up = sample_convergence_bound(min(max(emp, 0.0), 1.0), N, d_mc)
    m = ep.n_support
    kls = draw.kl(posts)
    b = meta_kl_bound(emp_up, draw.log_ratio, kls, m, d_levels, split=2 / 3)
    term = {"n": n, "m": m, "delta_env": b.delta_env, "delta_task": b.delta_task, "delta_mc": d_mc,
            "mc_samples": N, "emp_risk": emp, "emp_risk_upper": emp_up, "log_ratio_hyper": draw.log_ratio,
            "kl_tasks_mean": b.kl_tasks_mean, "c_task": b.task_complexity, "task_bound": b.task_bound,
            "c_env": b.env_complexity, "bound": b.bound}
    forms = {"pentina_lampert": pentina_lampert_bound(emp_up, draw.log_ratio, kls, m, d_levels)}
    if m >= 2:
        forms["amit_meir"] = amit_meir_bound(emp_up, draw.log_ratio, kls, m, d_levels)
    return b.bound, term, forms


def _measure(draw: _Draw, ep: Episode, k: int, g: torch.Generator) -> np.ndarray:
    """The Gibbs risk on each fresh task: the mean bounded loss of ``k`` weight draws on its queries ``[T]``."""
    return _gibbs(draw, _posteriors(draw, ep), ep.query_x, ep.query_y, k, g).mean(-1).numpy()


def certificates(run: Run | str | Path, *, tasks: Sequence[int] = (1000,), delta: float = 0.05, episodes: int = 1000,
                 samples: int = 20000, pilot_samples: int = 1000, measure_samples: int = 8, clip: float | None = None,
                 say: Callable[[str], None] | None = None) -> list[Certificate]:
    """One :class:`Certificate` per number of observed tasks in ``tasks`` (the first ``n`` of the run's stream).

    ``samples``: Monte Carlo weight draws for the empirical Gibbs risk (``ceil(samples / n)`` per task);
    ``pilot_samples``: draws per grid point for choosing the softening (maml, protonet);
    ``measure_samples``: draws per fresh task for the measured Gibbs risk; ``clip``: ``B`` of the
    regression loss (default: the learner's ``clip`` option, else :data:`DEFAULT_CLIP`). The
    computations shared by the ``n`` (each task's posterior, the fresh tasks' risks) are done once;
    each certificate has its own Monte Carlo draws.
    """
    tasks = tuple(tasks)
    _check_options(tasks, delta, episodes, samples, clip)
    if not tasks:
        raise ConfigError("tasks must name at least one number of observed tasks")
    if isinstance(run, (str, Path)):
        run = load_run(run)
    run.learner.to("cpu").eval()
    cert = _Certifiable(run, clip)
    observed = observed_tasks(run, max(tasks))
    if observed.support_mask is not None:
        raise RunFolderError(f"{run.path}: the run's tasks have padded support sets (varying m); certify needs the "
                             "same number of examples in every task")
    fresh = run.family.eval_episodes(0, episodes)
    predictor = summarize(cert.predictor_losses(fresh))
    measured_cache: dict[Any, Any] = {}
    posts_cache: dict[Any, dict[str, Tensor]] = {}  # the posteriors depend on sigma only, and serve every n

    def posts(point: tuple[float, float] | None) -> dict[str, Tensor]:
        key = None if point is None else point[0]
        if key not in posts_cache:
            posts_cache[key] = _posteriors(cert.draw(point), observed)
        return posts_cache[key]

    out = []
    for n in tasks:
        gen = rng.generator(_CERT_SEED, 1, n)
        if len(cert.grid) == 1:
            point, soft = cert.grid[0], None
        else:  # choose (sigma, tau) by a pilot estimate of every grid point's bound at delta / |grid|
            pilot = rng.generator(_CERT_SEED, 2, n)
            each = delta / len(cert.grid)
            pilots = [_bound(cert.draw(p), posts(p), observed, n, each, pilot_samples, pilot)[0] for p in cert.grid]
            j = int(np.argmin(pilots))
            point = cert.grid[j]
            soft = {"sigma": point[0], "tau": point[1], "grid_size": len(cert.grid), "delta_each": each,
                    "sigmas": list(SIGMAS), "taus": list(TAUS), "pilot_bounds": [round(b, 6) for b in pilots]}
        draw = cert.draw(point)
        conf = delta if soft is None else delta / len(cert.grid)
        bound, term, forms = _bound(draw, posts(point), observed, n, conf, samples, gen)
        if soft is None and run.config.learner == "pacbayes":
            term["kl_hyper_expected"] = float(run.learner.kl_hyper().detach())
        if point not in measured_cache:
            measured_cache[point] = summarize(_measure(draw, fresh, measure_samples, rng.generator(_CERT_SEED, 3)))
        m = measured_cache[point]
        if say is not None:
            say(f"n = {n}: bound {bound:.4f}, measured {m.mean:.4f} ± {m.ci95:.4f}")
        out.append(Certificate(
            run=str(run.path), learner=run.config.learner, task=run.config.task, loss=cert.loss, tasks=n,
            examples=observed.n_support, delta=float(delta), bound=bound, terms=term,
            measured={"mean": m.mean, "ci95": m.ci95}, episodes=episodes,
            predictor={"mean": predictor.mean, "ci95": predictor.ci95}, softening=soft, forms=forms))
    return out


def certify(run: Run | str | Path, *, tasks: int = 1000, delta: float = 0.05, episodes: int = 1000,
            samples: int = 20000, clip: float | None = None) -> Certificate:
    """The certificate of a run from its first ``tasks`` meta-training tasks (see the module docstring)."""
    return certificates(run, tasks=(tasks,), delta=delta, episodes=episodes, samples=samples, clip=clip)[0]
