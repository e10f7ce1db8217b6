"""Experiments: the tour and the studies of the literature, on one spine (:mod:`metalens.experiments.spine`).

Importing this package registers the built-in studies in :data:`metalens.registry.STUDIES`, in this order.
"""

from metalens.experiments import tour  # noqa: F401  (registration)
from metalens.experiments import sinusoid, omniglot, neural_processes  # noqa: F401
from metalens.experiments import icl_linear, icl_phase_transition, icl_transfer  # noqa: F401
from metalens.experiments import maml_map, first_order_bias, reptile_objective, meta_gradient_variance  # noqa: F401
from metalens.experiments import convergence, notebook_figures, inner_loop_stability  # noqa: F401
from metalens.experiments import pac_bayes  # noqa: F401
from metalens.experiments import tabular  # noqa: F401
from metalens.experiments import ood_extrapolation, icl_state_size, icl_plateaus  # noqa: F401
from metalens.experiments import omniglot_within  # noqa: F401
