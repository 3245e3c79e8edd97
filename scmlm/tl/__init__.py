"""Tools: differential expression, variance partitioning, random effects."""

from ._pseudobulk_de import pseudobulk_de

__all__ = ["pseudobulk_de"]
