"""The theory behind the lenses, as pure functions checked numerically by the studies.

One module per subject; each function documents the statement it implements, with the paper,
and carries a doctest. The studies in :mod:`metalens.experiments` hold these statements
against measurements on families with an exact oracle.
"""
