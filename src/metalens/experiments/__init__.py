"""Experiments: the tour and the studies of the literature, on one spine (:mod:`metalens.experiments.spine`).

Importing this package registers the built-in studies in :data:`metalens.registry.STUDIES`.
"""

import importlib as _importlib
import pkgutil as _pkgutil

# transitional: every study module here and in metalens.studies registers itself
for _m in _pkgutil.iter_modules(__path__):
    if _m.name not in ("spine", "recipes"):
        _importlib.import_module(f"{__name__}.{_m.name}")
from metalens import studies  # noqa: F401,E402
