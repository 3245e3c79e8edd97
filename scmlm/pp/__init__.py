"""Preprocessing: pseudobulk aggregation, sample and gene filters, within/between centring."""

from ._center import center_within
from ._filter import filter_genes_by_expr, filter_samples
from ._pseudobulk import pseudobulk

__all__ = ["center_within", "filter_genes_by_expr", "filter_samples", "pseudobulk"]
