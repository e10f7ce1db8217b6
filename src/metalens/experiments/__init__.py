"""Experiments: the tour and the studies of the literature, on one spine (see :mod:`metalens.experiments.spine`)."""
