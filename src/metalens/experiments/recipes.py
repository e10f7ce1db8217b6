"""Experiment recipes: the settings that studies and the tour train with, kept apart from the algorithms.

A :class:`Recipe` names a task family and the options of the family, the learner and the
trainer. :data:`TOUR` gives each built-in learner its canonical family and a small budget
(``metalens tour``); :data:`FINN_SINUSOID` is the sinusoid network and inner loop of Finn
et al. (2017); :data:`ADAPTATION_STEPS` says which option of a learner counts the adaptation
steps it takes when predicting (studies vary it at evaluation time).

>>> TOUR["maml"].task, TOUR["maml"].learner_options["inner_lr"]
('sinusoid', 0.01)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Recipe", "TOUR", "FINN_SINUSOID", "ADAPTATION_STEPS", "finn_train", "IN_CONTEXT_QUICK_MODEL",
           "in_context_train", "in_context_quick"]


@dataclass(frozen=True)
class Recipe:
    """A family and the options a run uses: ``task_options``, ``learner_options`` and ``train`` (the
    ``train.*`` options: steps, batch_tasks, lr, ...)."""

    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    learner_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# Finn et al. (2017), sinusoid: MLP 1-40-40-1, one inner step of 0.01 in training, 10 at test.
FINN_SINUSOID: dict[str, Any] = {"hidden": [40, 40], "inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 10}


def finn_train(steps: int) -> dict[str, Any]:
    """Finn et al.'s sinusoid protocol (outer Adam, lr 1e-3, 25 tasks a step) on a budget of ``steps``."""
    return {"steps": steps, "batch_tasks": 25, "lr": 1e-3}


# The tour: every learner on its canonical family, each in well under a minute on one CPU thread
# (measured per step on one thread: maml ~4 ms, reptile ~6, imaml ~35 on sinusoid; transformer ~45 and
# lstm ~10 at 32 tasks; cnp / lnp / anp 11.8 / 18.2 / 92.7 ms on gp at 16 tasks).
_GP = {"batch_tasks": 16, "lr": 5e-4}
_CLUSTERS = {"steps": 300, "batch_tasks": 25, "lr": 1e-3}
TOUR: dict[str, Recipe] = {
    "oracle": Recipe("sinusoid"),
    "scratch": Recipe("sinusoid"),
    "pretrain": Recipe("sinusoid", train=finn_train(2000)),
    "maml": Recipe("sinusoid", learner_options=FINN_SINUSOID, train=finn_train(2000)),
    "fomaml": Recipe("sinusoid", learner_options=FINN_SINUSOID, train=finn_train(2000)),
    "metasgd": Recipe("sinusoid", learner_options={**FINN_SINUSOID, "eval_inner_steps": None},
                      train=finn_train(2000)),
    # 3 inner steps in training: with Finn's single step the learned features make 10 head steps of
    # rate 0.01 diverge on a few held-out tasks
    "anil": Recipe("sinusoid", learner_options={**FINN_SINUSOID, "inner_steps": 3}, train=finn_train(2000)),
    "reptile": Recipe("sinusoid", learner_options={**FINN_SINUSOID, "inner_steps": 5}, train=finn_train(1500)),
    # ~35 ms a step: a smaller budget; rare meta-gradient spikes (where H is indefinite) are clipped
    "imaml": Recipe("sinusoid", learner_options={"hidden": [40, 40], "inner_lr": 0.01, "inner_steps": 10,
                                                 "lam": 1.0, "eval_inner_steps": 10},
                    train={**finn_train(300), "grad_clip": 10.0}),
    "cnp": Recipe("gp", train={**_GP, "steps": 1500}),
    "lnp": Recipe("gp", train={**_GP, "steps": 1000}),
    "anp": Recipe("gp", train={**_GP, "steps": 200}),
    # 5-way 1-shot clusters, where the oracle is the exact Bayes classifier
    "protonet": Recipe("clusters", learner_options={"backbone": "mlp"}, train=_CLUSTERS),
    "matching": Recipe("clusters", learner_options={"backbone": "mlp"}, train=_CLUSTERS),
    "transformer": Recipe("sinusoid", train={"steps": 600, "batch_tasks": 32, "lr": 1e-3, "grad_clip": 1.0}),
    "lstm": Recipe("sinusoid", train={"steps": 1500, "batch_tasks": 32, "lr": 1e-3, "grad_clip": 1.0}),
    # Santoro et al.'s memory-augmented learner, small (~65 ms a step at 32 tasks: a Python loop over the points)
    "mann": Recipe("sinusoid", learner_options={"hidden": 64, "slots": 16, "width": 16, "heads": 1},
                   train={"steps": 500, "batch_tasks": 32, "lr": 3e-3, "grad_clip": 1.0}),
    # a linear model on 5-way 1-shot clusters (the Bayes classifier of isotropic clusters is linear)
    "pacbayes": Recipe("clusters", learner_options={"hidden": [], "prior_std": 1.0, "hyper_posterior_std": 1.0,
                                                    "inner_lr": 0.3}, train={**_CLUSTERS, "lr": 1e-2}),
}

# The option of each learner that sets how many adaptation steps its predictions take.
ADAPTATION_STEPS: dict[str, str] = {
    **{name: "eval_inner_steps" for name in ("maml", "fomaml", "metasgd", "anil", "reptile", "imaml")},
    "pretrain": "finetune_steps",
    "scratch": "steps",
}

# The in-context studies (icl-linear, icl-phase-transition, icl-transfer): their runs' trainer options and
# their smoke-test budget (``quick``).
IN_CONTEXT_QUICK_MODEL: dict[str, Any] = {"width": 16, "layers": 1, "heads": 2}


def in_context_train(c: Any) -> dict[str, Any]:
    """The trainer's options of an in-context study's runs, from its options ``steps``, ``batch_tasks``, ``lr``,
    ``grad_clip`` and ``seed`` (logged every 50 steps, checkpointed every 1000)."""
    return {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "grad_clip": c.grad_clip, "seed": c.seed,
            "log_every": 50, "checkpoint_every": 1000}


def in_context_quick(c: Any, **model: Any) -> Any:
    """An in-context study's options for a smoke test: 3 steps of at most 4 tasks, at most 10 scored tasks,
    and the ``model`` options given."""
    return replace(c, steps=min(c.steps, 3), episodes=min(c.episodes, 10), batch_tasks=min(c.batch_tasks, 4),
                   **model)
