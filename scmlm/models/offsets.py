"""Composition-robust cell offsets on ndarrays: each cell's log library size plus the TMM factor of its sample.

Why: with the ``log_total`` offset a gene's expected count is proportional to the cell's total count. When a few genes
take a large share of the library in one condition (interferon-stimulated genes in IFN-β-stimulated monocytes), every
other gene's share falls, and the cell-level model reports them all as down-regulated. edgeR corrects this on the
pseudobulk with TMM normalisation factors; the ``tmm`` offset carries the same factors to the cells.

The identity that makes the two agree: for sample ``s`` with cells ``i ∈ s``, edgeR's effective library size is
``N_s f_s`` with ``N_s = Σ_i total_i`` (the pseudobulk column sum over all genes) and ``f_s`` the TMM factor
(``calcNormFactors(DGEList(pseudobulk))``). The cell offset ``log(total_i) + log(f_s)`` gives the cell-level mean
``μ_gi = total_i f_s exp(x_s'β)`` (random effects at zero), whose sum over the sample's cells is
``N_s f_s exp(x_s'β)``: the pseudobulk NB GLM's mean with edgeR's offset ``log(N_s f_s)``. So the fixed effects of the
cell-level model and of edgeR's model refer to the same normalised scale.

Samples are integer codes here; which obs columns identify them, and the table of factors, are
:mod:`scmlm.design`'s (``tmm_units``, ``tmm_offset``, ``streamed_tmm``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .aggregate import accumulate
from .edger import tmm_factors

__all__ = ["StreamedSums", "TMMFactors", "sample_sums", "tmm_cell_offset", "tmm_sample_factors"]


def sample_sums(matrix, codes: np.ndarray, n_samples: int) -> np.ndarray:
    """Samples × genes sums of a cells × genes matrix (sparse or dense) over the cells of each sample.

    The aggregation kernel of :func:`scmlm.pp.pseudobulk` (one pass over the stored counts, same specialisations).
    """
    out = np.zeros((n_samples, matrix.shape[1]), dtype=np.float64)
    nexpr = np.zeros((n_samples, matrix.shape[1]), dtype=np.int32)
    accumulate(matrix, np.asarray(codes, dtype=np.int64), out, nexpr, check=False)
    return out


class TMMFactors(NamedTuple):
    """Per sample: the library size (pseudobulk column sum over all genes) and edgeR's TMM normalisation factor."""

    lib_size: np.ndarray
    norm_factor: np.ndarray
    """NaN or not positive where undefined (a sample without counts); 1 for a sample alone in its group."""


def tmm_sample_factors(sums: np.ndarray, groups: np.ndarray) -> TMMFactors:
    """TMM factors among the samples of each group, from the samples × genes pseudobulk ``sums``.

    ``groups`` holds an integer group code per sample (e.g. the cell type, as :func:`scmlm.tl.pseudobulk_de`
    normalises per group); the factors are edgeR's ``calcNormFactors(method = "TMM")`` among the samples of a group
    (geometric mean 1 within it), in the order the groups first appear.
    """
    factors = np.ones(sums.shape[0])
    lib = sums.sum(axis=1)
    groups = np.asarray(groups)
    _, first = np.unique(groups, return_index=True)
    for g in groups[np.sort(first)]:
        idx = np.flatnonzero(groups == g)
        if idx.size > 1:
            factors[idx] = tmm_factors(sums[idx].T, lib_size=lib[idx])
    return TMMFactors(lib_size=lib, norm_factor=factors)


def tmm_cell_offset(log_total: np.ndarray, codes: np.ndarray, norm_factor: np.ndarray) -> np.ndarray:
    """Per-cell offset ``log(total_i) + log(f_s)``: the log total count plus the log TMM factor of the cell's sample."""
    return np.asarray(log_total, dtype=float) + np.log(norm_factor)[codes]


class StreamedSums:
    """Samples × genes sums of a matrix seen in row blocks (a backed h5ad streamed once).

    :meth:`add` accumulates the rows of each block into :attr:`sums`; at the end they equal :func:`sample_sums` on the
    whole matrix.
    """

    def __init__(self, codes: np.ndarray, n_samples: int, n_vars: int):
        self.codes = np.asarray(codes, dtype=np.int64)
        self.sums = np.zeros((n_samples, n_vars))

    def add(self, start: int, block) -> None:
        """Add the rows ``start, start + 1, …`` of the cells × genes matrix (sparse or dense)."""
        codes = self.codes[start : start + block.shape[0]]
        self.sums += sample_sums(block, codes, self.sums.shape[0])
