"""Tools: differential expression (pseudobulk, cell-level GLMM, GEE), variance partitioning, random effects."""

from ._abundance import abundance_de
from ._gee import gee_de
from ._glmm_de import glmm_de
from ._hierarchy import random_effects, variance_partition
from ._pseudobulk_de import pseudobulk_de

__all__ = ["abundance_de", "gee_de", "glmm_de", "pseudobulk_de", "random_effects", "variance_partition"]
