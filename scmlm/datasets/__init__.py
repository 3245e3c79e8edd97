"""Simulated and bundled real multi-donor datasets.

All loaders return AnnData with raw integer counts in ``.X`` and ``layers["counts"]``. Sources and licences are in
each function's docstring and in ``DATA_LICENSES.md``. Nothing is downloaded at run time.
"""

from ._bundled import glioblastoma, kang2018, kang2018_100genes, pig_airway
from ._simulate import simulate, simulate_composition

__all__ = ["glioblastoma", "kang2018", "kang2018_100genes", "pig_airway", "simulate", "simulate_composition"]
