"""Plots in scanpy's conventions: ``ax=``, ``show=``, ``save=``; each returns its Axes.

:mod:`scmlm.pl.files` names plot files and writes a result table's plots in one call (``scmlm plot``).
"""

from ._abundance import abundance_effects, composition
from ._de import ma, pvalue_hist, qq, volcano
from ._hier import icc, shrinkage, variance_partition

__all__ = [
    "abundance_effects",
    "composition",
    "icc",
    "ma",
    "pvalue_hist",
    "qq",
    "shrinkage",
    "variance_partition",
    "volcano",
]
