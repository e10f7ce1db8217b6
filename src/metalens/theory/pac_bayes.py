"""PAC-Bayes bounds, single-task and meta (learning-to-learn), as pure functions in float64.

Every bound here is for a loss bounded in ``[0, 1]`` (0-1 error, or a clipped loss divided by
its clip) and i.i.d. data: ``m`` examples drawn i.i.d. from a task, and, for the meta-bounds,
``n`` tasks drawn i.i.d. from the task environment, each with its own ``m`` examples.
``emp_risk`` is always a Gibbs risk: the loss of a hypothesis drawn from the posterior,
averaged over the posterior (what a randomised predictor pays). ``kl`` is ``KL(Q || P)`` in
nats between the posterior and a prior fixed before the data were seen.

Single task (with probability at least ``1 - delta`` over the sample, for every posterior Q):

- :func:`mcallester_bound` (square-root form), ``L(Q) <= L^(Q) + sqrt((KL + ln(2 sqrt(m) / delta)) / (2m))``
  (McAllester 1999, 2003, with Maurer's 2004 constant; Pinsker's inequality applied to the next);
- :func:`seeger_bound` (kl form), ``kl(L^(Q) || L(Q)) <= (KL + ln(2 sqrt(m) / delta)) / m``, i.e.
  ``L(Q) <= kl^-1(L^(Q), (KL + ln(2 sqrt(m) / delta)) / m)`` (Seeger 2002; Maurer 2004), with
  :func:`kl_inverse` the upper inverse of the binary kl.

Meta (Baxter's setting: a hyper-prior ``𝒫`` and a hyper-posterior ``𝒬`` over priors ``P``; each
observed task ``i`` gets a posterior ``Q_i`` from the base learner, started from ``P``):

- :func:`pentina_lampert_bound` (Pentina & Lampert 2014, Theorem 2, linear form);
- :func:`amit_meir_bound` (Amit & Meir 2018, Theorem 2, square-root form);
- :func:`meta_kl_bound`, the kl form of the same two-level argument with the within-task step
  taken jointly over all tasks (as Pentina & Lampert do): the bound ``metalens certify`` states.

Each meta-bound's docstring gives the exact inequality and how ``delta`` is split between its
levels. :func:`gaussian_kl` and :func:`gaussian_log_ratio` give the KL terms of diagonal
Gaussians in closed form; :func:`sample_convergence_bound` accounts for estimating a Gibbs risk by
sampling (Langford & Caruana 2001); :func:`soften` is Dziugaite & Roy's (2017) choice of a
posterior's variance on a grid, paid for with a union bound.

Papers: D. McAllester, "Some PAC-Bayesian theorems" (1999) and "Simplified PAC-Bayesian margin
bounds" (2003); M. Seeger, "PAC-Bayesian generalisation error bounds for Gaussian process
classification" (2002); A. Maurer, "A note on the PAC Bayesian theorem" (2004); A. Pentina and
C. Lampert, "A PAC-Bayesian bound for lifelong learning" (ICML 2014); R. Amit and R. Meir,
"Meta-learning by adjusting priors based on extended PAC-Bayes theory" (ICML 2018); G. K.
Dziugaite and D. Roy, "Computing nonvacuous generalization bounds for deep (stochastic) neural
networks with many more parameters than training data" (UAI 2017); J. Langford and R. Caruana,
"(Not) bounding the true error" (NIPS 2001); O. Rivasplata, I. Kuzborskij, C. Szepesvári and
J. Shawe-Taylor, "PAC-Bayes analysis beyond the usual bounds" (NeurIPS 2020); W. Hoeffding,
"On the distribution of the number of successes in independent trials" (1956).

>>> round(mcallester_bound(0.1, 5.0, 100, 0.05), 6)  # 0.1 + sqrt((5 + ln 400) / 200)
0.33443
>>> round(seeger_bound(0.1, 5.0, 100, 0.05), 6)
0.293201
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["binary_kl", "kl_inverse", "mcallester_bound", "seeger_bound", "pentina_lampert_bound",
           "amit_meir_bound", "meta_kl_bound", "MetaBound", "gaussian_kl", "gaussian_log_ratio",
           "sample_convergence_bound", "softening_grid", "soften", "Softened"]

_TOL = 1e-15  # kl_inverse stops when its bracket is this narrow


def _check_risk(name: str, q: float) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a bounded loss), got {q}")
    return q


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def _check_count(name: str, k: int, least: int = 1) -> int:
    if int(k) != k or k < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {k}")
    return int(k)


def _check_kl(name: str, kl: float) -> float:
    kl = float(kl)
    if not kl >= 0.0 or math.isinf(kl):
        raise ValueError(f"{name} must be a finite KL divergence >= 0, got {kl}")
    return kl


def binary_kl(q: float, p: float) -> float:
    """``kl(q || p) = q ln(q / p) + (1 - q) ln((1 - q) / (1 - p))``, the KL between Bernoulli(q) and Bernoulli(p).

    ``0 ln 0 = 0``; ``inf`` where ``p`` is 0 or 1 and ``q`` is not.

    >>> round(binary_kl(0.1, 0.3), 6)  # 0.1 ln(1/3) + 0.9 ln(9/7)
    0.116322
    >>> binary_kl(0.2, 0.2), binary_kl(0.0, 0.5) == math.log(2), binary_kl(0.5, 1.0)
    (0.0, True, inf)
    """
    q, p = _check_risk("q", q), _check_risk("p", p)
    out = 0.0
    for a, b in ((q, p), (1.0 - q, 1.0 - p)):
        if a > 0.0:
            if b <= 0.0:
                return math.inf
            out += a * math.log(a / b)
    return max(out, 0.0)


def kl_inverse(q: float, c: float) -> float:
    """The upper inverse of the binary kl: ``kl^-1(q, c) = sup {p in [q, 1] : kl(q || p) <= c}``.

    ``p -> kl(q || p)`` is convex and increasing on ``[q, 1)`` (from 0 to ``+inf`` when ``q < 1``),
    so the supremum is the root of ``kl(q || p) = c``. It is found by Newton's method started from
    Pinsker's upper bound ``q + sqrt(c / 2)`` (from the right of a convex increasing function Newton
    descends monotonically onto the root), safeguarded by bisection inside the bracket, to
    ``1e-15``. ``c <= 0`` gives ``q``; ``q = 0`` has the closed form ``1 - exp(-c)``.

    >>> kl_inverse(0.0, math.log(2))  # kl(0 || p) = -ln(1 - p)
    0.5
    >>> p = kl_inverse(0.1, 0.2); round(p, 10), abs(binary_kl(0.1, p) - 0.2) < 1e-12
    (0.3783915488, True)
    >>> kl_inverse(0.3, 0.0), kl_inverse(1.0, 5.0)
    (0.3, 1.0)
    """
    q, c = _check_risk("q", q), float(c)
    if math.isnan(c):
        raise ValueError("c must be a number, got nan")
    if c <= 0.0 or q >= 1.0:
        return q
    if q == 0.0:
        return -math.expm1(-c)
    lo, hi = q, 1.0
    p = min(q + math.sqrt(c / 2.0), 1.0 - 1e-16)  # Pinsker: the root lies at or below q + sqrt(c / 2)
    for _ in range(200):
        f = binary_kl(q, p) - c
        if f > 0:
            hi = p
        else:
            lo = p
        if hi - lo <= _TOL or f == 0:
            break
        step = f * p * (1.0 - p) / (p - q)  # f / f'(p), f'(p) = (p - q) / (p (1 - p))
        nxt = p - step
        p = nxt if lo < nxt < hi else 0.5 * (lo + hi)
    return lo if binary_kl(q, hi) > c else hi


def _confidence(m: int, delta: float) -> float:
    """``ln(2 sqrt(m) / delta)``: the confidence term of Maurer's (2004) form."""
    return math.log(2.0 * math.sqrt(m) / delta)


def mcallester_bound(emp_risk: float, kl: float, m: int, delta: float) -> float:
    """McAllester's bound, square-root form: with probability ``>= 1 - delta`` over ``m`` i.i.d. examples,
    for every posterior Q::

        L(Q) <= L^(Q) + sqrt( (KL(Q || P) + ln(2 sqrt(m) / delta)) / (2 m) )

    (McAllester 2003 with Maurer's 2004 constant ``2 sqrt(m)``; it follows from :func:`seeger_bound`
    by Pinsker's inequality ``kl(q || p) >= 2 (p - q)^2``, so it is never tighter). May exceed 1.

    >>> round(mcallester_bound(0.0, 0.0, 1, 0.5), 6)  # sqrt(ln(4) / 2)
    0.832555
    """
    emp_risk, kl = _check_risk("emp_risk", emp_risk), _check_kl("kl", kl)
    m, delta = _check_count("m", m), _check_delta(delta)
    return emp_risk + math.sqrt((kl + _confidence(m, delta)) / (2.0 * m))


def seeger_bound(emp_risk: float, kl: float, m: int, delta: float) -> float:
    """The kl (Seeger / Maurer) bound: with probability ``>= 1 - delta``, for every posterior Q::

        kl(L^(Q) || L(Q)) <= (KL(Q || P) + ln(2 sqrt(m) / delta)) / m,
        i.e.  L(Q) <= kl^-1( L^(Q), (KL(Q || P) + ln(2 sqrt(m) / delta)) / m ).

    (Seeger 2002; Maurer 2004, who showed ``E exp(m kl(L^ || L)) <= 2 sqrt(m)`` for losses in
    ``[0, 1]``.) At most 1.

    >>> round(seeger_bound(0.0, 0.0, 100, 0.05), 6)  # 1 - exp(-ln(400) / 100)
    0.058155
    """
    emp_risk, kl = _check_risk("emp_risk", emp_risk), _check_kl("kl", kl)
    m, delta = _check_count("m", m), _check_delta(delta)
    return kl_inverse(emp_risk, (kl + _confidence(m, delta)) / m)


def _task_terms(kl_tasks: Sequence[float] | Tensor, m: int | Sequence[int]) -> tuple[list[float], list[int]]:
    kls = [float(k) for k in (kl_tasks.tolist() if isinstance(kl_tasks, Tensor) else kl_tasks)]
    if not kls:
        raise ValueError("kl_tasks must hold one KL per observed task, got none")
    for k in kls:
        _check_kl("every KL in kl_tasks", k)
    ms = [int(m)] * len(kls) if isinstance(m, (int, float)) else [int(x) for x in m]
    if len(ms) != len(kls):
        raise ValueError(f"m must be one count or one per task ({len(kls)}), got {len(ms)}")
    for x in ms:
        _check_count("m", x)
    return kls, ms


def _hyper(kl_hyper: float) -> float:
    kl_hyper = float(kl_hyper)
    if not math.isfinite(kl_hyper):
        raise ValueError(f"kl_hyper must be finite, got {kl_hyper}")
    return kl_hyper


def pentina_lampert_bound(emp_risk: float, kl_hyper: float, kl_tasks: Sequence[float] | Tensor,
                          m: int | Sequence[int], delta: float) -> float:
    """Pentina & Lampert's (2014, Theorem 2) meta-bound, linear form.

    With probability ``>= 1 - delta`` over ``n = len(kl_tasks)`` i.i.d. tasks with ``m_i`` i.i.d.
    examples each, for every hyper-posterior 𝒬 and posteriors ``Q_i``::

        er(𝒬) <= er^(𝒬) + (1/sqrt(n) + 1/(n sqrt(m~))) (KL(𝒬 || 𝒫) + ln(2/delta))
                        + (1/(n sqrt(m~))) sum_i E_{P~𝒬} KL(Q_i || P) + 1/(8 sqrt(n)) + 1/(8 sqrt(m~))

    with ``m~`` the harmonic mean of the ``m_i``, ``er^(𝒬)`` the observed tasks' average empirical
    Gibbs risk and ``er(𝒬)`` the expected Gibbs risk on a new task. ``delta`` is split ``delta/2``
    per level: the across-task step is Catoni's linear bound with ``lambda = sqrt(n)`` over the
    ``n`` tasks, the within-task step the same bound with ``lambda = n sqrt(m~)`` over all
    examples of all tasks jointly (Hoeffding's lemma gives the ``1/8`` terms). Rates: the
    across-task term ``~ 1/sqrt(n)``, the within-task term ``~ (mean KL) / sqrt(m)``.

    >>> # 0.1 + (1/10 + 1/1000)(2 + ln 40) + 300/1000 + 1/80 + 1/80
    >>> round(pentina_lampert_bound(0.1, 2.0, [3.0] * 100, 100, 0.05), 6)
    0.999577
    """
    emp_risk, kl_hyper, delta = _check_risk("emp_risk", emp_risk), _hyper(kl_hyper), _check_delta(delta)
    kls, ms = _task_terms(kl_tasks, m)
    n = len(kls)
    mh = n / sum(1.0 / x for x in ms)  # harmonic mean
    a, b = 1.0 / math.sqrt(n), 1.0 / (n * math.sqrt(mh))
    return (emp_risk + (a + b) * (kl_hyper + math.log(2.0 / delta)) + b * sum(kls)
            + 1.0 / (8.0 * math.sqrt(n)) + 1.0 / (8.0 * math.sqrt(mh)))


def amit_meir_bound(emp_risk: float, kl_hyper: float, kl_tasks: Sequence[float] | Tensor,
                    m: int | Sequence[int], delta: float) -> float:
    """Amit & Meir's (2018, Theorem 2) meta-bound, square-root (McAllester) form.

    With probability ``>= 1 - delta`` over ``n = len(kl_tasks)`` i.i.d. tasks with ``m_i >= 2``
    i.i.d. examples each, for every hyper-posterior 𝒬 and posteriors ``Q_i``::

        er(𝒬) <= er^(𝒬) + (1/n) sum_i sqrt( (KL(𝒬 || 𝒫) + E_{P~𝒬} KL(Q_i || P) + ln(2 n m_i / delta))
                                            / (2 (m_i - 1)) )
                        + sqrt( (KL(𝒬 || 𝒫) + ln(2 n / delta)) / (2 (n - 1)) )

    ``delta`` is split as the paper does: ``delta/2`` for the across-task step (McAllester's
    bound over the ``n`` tasks) and ``delta/(2n)`` for each task's within-task step (a union bound
    over the tasks). Note that ``KL(𝒬 || 𝒫)`` also enters every within-task term, at rate
    ``1/sqrt(m)``: it is the price of the per-task union bound (:func:`meta_kl_bound` takes that
    step jointly over all tasks instead, where it is divided by ``n m``).

    >>> # 0.1 + sqrt((2 + 3 + ln(2 * 100 * 100 / 0.05)) / 198) + sqrt((2 + ln(200 / 0.05)) / 198)
    >>> round(amit_meir_bound(0.1, 2.0, [3.0] * 100, 100, 0.05), 6)
    0.62868
    """
    emp_risk, kl_hyper, delta = _check_risk("emp_risk", emp_risk), _hyper(kl_hyper), _check_delta(delta)
    kls, ms = _task_terms(kl_tasks, m)
    n = len(kls)
    if n < 2 or min(ms) < 2:
        raise ValueError(f"the Amit-Meir bound needs n >= 2 tasks of m >= 2 examples, got n = {n}, m >= {min(ms)}")
    within = sum(math.sqrt(max(kl_hyper + k + math.log(2.0 * n * mi / delta), 0.0) / (2.0 * (mi - 1)))
                 for k, mi in zip(kls, ms)) / n
    across = math.sqrt(max(kl_hyper + math.log(2.0 * n / delta), 0.0) / (2.0 * (n - 1)))
    return emp_risk + within + across


@dataclass(frozen=True)
class MetaBound:
    """The terms of :func:`meta_kl_bound`: every number the bound is made of."""

    bound: float  # upper bound on the expected risk on a new task
    emp_risk: float  # er^: the observed tasks' average empirical Gibbs risk
    task_bound: float  # upper bound on the observed tasks' average true Gibbs risk (within-task step)
    task_complexity: float  # c_task = (KL(𝒬||𝒫) + sum_i KL(Q_i||P) + ln(2 sqrt(nm) / delta_task)) / (n m)
    env_complexity: float  # c_env = (KL(𝒬||𝒫) + ln(2 sqrt(n) / delta_env)) / n
    kl_hyper: float
    kl_tasks_mean: float
    n: int
    m: int
    delta_task: float
    delta_env: float


def meta_kl_bound(emp_risk: float, kl_hyper: float, kl_tasks: Sequence[float] | Tensor, m: int, delta: float, *,
                  split: float = 0.5) -> MetaBound:
    """The two-level meta-bound in kl form, with the within-task step taken jointly over all tasks.

    With probability ``>= 1 - delta`` over ``n = len(kl_tasks)`` i.i.d. tasks with ``m`` i.i.d.
    examples each, for every hyper-posterior 𝒬 and posteriors ``Q_i``::

        er(𝒬) <= kl^-1( kl^-1( er^(𝒬), c_task ), c_env )
        c_task = ( KL(𝒬 || 𝒫) + sum_i E_{P~𝒬} KL(Q_i || P) + ln(2 sqrt(n m) / delta_task) ) / (n m)
        c_env  = ( KL(𝒬 || 𝒫) + ln(2 sqrt(n) / delta_env) ) / n

    with ``delta_env = split * delta`` and ``delta_task = (1 - split) * delta`` (``delta/2`` each
    by default). The within-task step is Maurer's kl bound over all ``n m`` examples at once, for
    the posterior ``𝒬(P) prod_i Q_i(h_i | P)`` against the prior ``𝒫(P) prod_i P(h_i)`` (whose
    KL is the numerator above): the examples are independent but not identically distributed,
    and Hoeffding's (1956) comparison of a sum of independent Bernoulli variables with the
    binomial keeps Maurer's ``E exp(N kl) <= 2 sqrt(N)``. It bounds the observed tasks' average
    true Gibbs risk; the across-task step (Maurer's bound over the ``n`` tasks, the loss of a
    prior ``P`` on a task being the true Gibbs risk of the base learner's ``Q(S, P)``) takes that
    to a new task. ``kl^-1`` is increasing in its first argument, so the two steps compose. Rates:
    ``c_env ~ KL(𝒬||𝒫) / n`` (the across-task gap ``~ 1/sqrt(n)``), ``c_task ~ mean KL(Q_i||P) / m``
    (the within-task gap ``~ 1/sqrt(m)``; ``KL(𝒬||𝒫)`` is divided by ``n m`` there).

    ``kl_hyper`` may be the log-density ratio ``ln(d𝒬/d𝒫)`` at a prior drawn from 𝒬 in place of
    ``KL(𝒬 || 𝒫)`` (the disintegrated form of Rivasplata et al. 2020, which bounds the risk of
    that drawn prior), and may then be negative; ``kl_tasks`` are KLs (``>= 0``).

    >>> b = meta_kl_bound(0.1, 2.0, [3.0] * 100, 100, 0.05)
    >>> round(b.task_bound, 6), round(b.bound, 6)
    (0.190784, 0.383424)
    """
    emp_risk, kl_hyper, delta = _check_risk("emp_risk", emp_risk), _hyper(kl_hyper), _check_delta(delta)
    if not 0.0 < split < 1.0:
        raise ValueError(f"split must be in (0, 1), got {split}")
    kls, _ = _task_terms(kl_tasks, m)
    m = _check_count("m", m)
    n = len(kls)
    d_env, d_task = split * delta, (1.0 - split) * delta
    c_task = (kl_hyper + sum(kls) + _confidence(n * m, d_task)) / (n * m)
    c_env = (kl_hyper + _confidence(n, d_env)) / n
    task_bound = kl_inverse(emp_risk, c_task)
    return MetaBound(bound=kl_inverse(task_bound, c_env), emp_risk=emp_risk, task_bound=task_bound,
                     task_complexity=c_task, env_complexity=c_env, kl_hyper=kl_hyper,
                     kl_tasks_mean=sum(kls) / n, n=n, m=m, delta_task=d_task, delta_env=d_env)


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """``KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p))`` in closed form, summed over the last dim::

        KL = 1/2 sum_j [ e^(lq_j - lp_j) + (mu_q_j - mu_p_j)^2 e^(-lp_j) - 1 + lp_j - lq_j ]

    Arguments broadcast (``[..., d]`` -> ``[...]``); computed in float64, differentiable.

    >>> z = torch.zeros(3, dtype=torch.float64)
    >>> gaussian_kl(z + 1, z, z, z).item()  # three unit shifts: 3 / 2
    1.5
    >>> round(gaussian_kl(z, z + math.log(0.25), z, z).item(), 6)  # 3/2 (1/4 - 1 + ln 4)
    0.954442
    """
    mq, lq, mp, lp = (t.to(torch.float64) for t in (mu_q, logvar_q, mu_p, logvar_p))
    return 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 * torch.exp(-lp) - 1.0 + lp - lq).sum(-1)


def gaussian_log_ratio(x: Tensor, mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """``ln q(x) - ln p(x)`` for diagonal Gaussians ``q = N(mu_q, e^logvar_q)``, ``p = N(mu_p, e^logvar_p)``,
    summed over the last dim (float64). Its mean under ``x ~ q`` is :func:`gaussian_kl`; at a single
    draw it is the term of the disintegrated bounds (Rivasplata et al. 2020).

    >>> z = torch.zeros(2, dtype=torch.float64)
    >>> gaussian_log_ratio(z, z, z, z + 1, z).item()  # two coordinates of (0 - 1)^2 / 2
    1.0
    """
    xx, mq, lq, mp, lp = (t.to(torch.float64) for t in (x, mu_q, logvar_q, mu_p, logvar_p))
    log_q = -0.5 * ((xx - mq) ** 2 * torch.exp(-lq) + lq)
    log_p = -0.5 * ((xx - mp) ** 2 * torch.exp(-lp) + lp)
    return (log_q - log_p).sum(-1)


def sample_convergence_bound(mean: float, samples: int, delta: float) -> float:
    """An upper bound on the expectation of a ``[0, 1]`` quantity from the mean of ``samples`` independent draws.

    With probability ``>= 1 - delta``: ``E <= kl^-1(mean, ln(1/delta) / samples)`` (the Chernoff bound
    in kl form, which holds for independent variables in ``[0, 1]`` that need not share a
    distribution: Hoeffding 1963, Theorem 1). Langford & Caruana (2001) and Dziugaite & Roy (2017)
    use it for a Gibbs risk estimated by drawing hypotheses from the posterior.

    >>> round(sample_convergence_bound(0.0, 1000, 0.01), 6)  # 1 - 0.01^(1/1000)
    0.004595
    """
    mean, delta = _check_risk("mean", mean), _check_delta(delta)
    samples = _check_count("samples", samples)
    return kl_inverse(mean, math.log(1.0 / delta) / samples)


def softening_grid(low: float, high: float, size: int) -> tuple[float, ...]:
    """``size`` values spaced geometrically from ``low`` to ``high`` (the candidate standard deviations).

    >>> softening_grid(0.001, 0.1, 3)
    (0.001, 0.01, 0.1)
    """
    size = _check_count("size", size)
    if not 0.0 < low <= high or not math.isfinite(high):
        raise ValueError(f"the grid needs 0 < low <= high, got {low}, {high}")
    if size == 1:
        return (float(low),)
    ratio = math.log(high / low) / (size - 1)
    return tuple(float(f"{low * math.exp(ratio * j):.12g}") for j in range(size))


@dataclass(frozen=True)
class Softened:
    """The result of :func:`soften`: the chosen grid point, its bound, and every grid point's bound."""

    index: int
    value: Any  # the grid point (e.g. a standard deviation)
    bound: float
    bounds: tuple[float, ...]
    delta_each: float  # the confidence each grid point's bound was computed at: delta / |grid|


def soften(bound_at: Callable[[Any, float], float], grid: Sequence[Any], delta: float) -> Softened:
    """Dziugaite & Roy's (2017) softening: choose the posterior's variance on a grid, paying with a union bound.

    ``bound_at(g, delta_g)`` is a bound that holds with probability ``>= 1 - delta_g`` for grid point
    ``g`` (a standard deviation, or a tuple of them). Computing every grid point's bound at
    ``delta / |grid|`` makes all of them hold together with probability ``>= 1 - delta`` (a union
    bound), so the smallest is a bound at confidence ``1 - delta``, however it was chosen.

    >>> s = soften(lambda g, d: seeger_bound(0.1, 1.0 / g, 100, d), (0.5, 1.0, 2.0), 0.05)
    >>> s.value, s.delta_each, round(s.bound, 6) == round(seeger_bound(0.1, 0.5, 100, 0.05 / 3), 6)
    (2.0, 0.016666666666666666, True)
    """
    delta = _check_delta(delta)
    if len(grid) < 1:
        raise ValueError("the softening grid must hold at least one value")
    each = delta / len(grid)
    bounds = tuple(float(bound_at(g, each)) for g in grid)
    best = min(range(len(grid)), key=lambda j: bounds[j])
    return Softened(index=best, value=grid[best], bound=bounds[best], bounds=bounds, delta_each=each)
