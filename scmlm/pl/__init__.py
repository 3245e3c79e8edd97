"""Plots in scanpy's conventions: ``ax=``, ``show=``, ``save=``; each returns its Axes."""

from ._de import ma, pvalue_hist, qq, volcano

__all__ = ["ma", "pvalue_hist", "qq", "volcano"]
