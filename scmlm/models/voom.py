"""The public limma-voom entry points: :func:`voom_limma` and :func:`voom_limma_multi`.

Without random terms they run limma's ``voom`` → ``lmFit`` → ``eBayes`` (:mod:`scmlm.models.limma`); with random
``terms`` they follow variancePartition's ``dream`` (:mod:`scmlm.models.dream`): voom weights from mixed-model fits,
then a per-gene precision-weighted linear mixed model (REML) with Kenward–Roger degrees of freedom below 20 samples
and Satterthwaite from 20 on (``dream``'s ``ddf = "adaptive"``), and no empirical-Bayes moderation (``dream``'s
default). Both return :class:`~scmlm.models.limma.LimmaResult`. This module sits above both so that neither imports
the other's entry point.
"""

from __future__ import annotations

import numpy as np

from .dream import dream
from .limma import LimmaResult, as_contrast, effective_lib_size, voom_ebayes

__all__ = ["voom_limma", "voom_limma_multi"]


def voom_limma(
    counts: np.ndarray,
    X: np.ndarray,
    L: np.ndarray,
    *,
    lib_size: np.ndarray | None = None,
    norm_factors: np.ndarray | None = None,
    terms: tuple | None = None,
    span: float = 0.5,
) -> LimmaResult:
    """limma-voom (``voom`` → ``lmFit`` → ``eBayes``) or, with random ``terms``, dream.

    Parameters
    ----------
    counts
        Genes × samples counts (already filtered, e.g. with ``filter_by_expr``).
    X
        Samples × p fixed-effect design (full column rank).
    L
        Contrast: a length-p vector or a p × m matrix.
    lib_size, norm_factors
        Library sizes (default: column sums) and normalisation factors (default: 1, e.g. from ``tmm_factors``);
        voom uses their product.
    terms
        Random-effect terms (:class:`scmlm.models.RandomTerm`). With terms, each gene gets a
        precision-weighted LMM (REML) with the voom weights, as variancePartition's ``dream``; the voom trend is
        then re-estimated from the mixed-model fits and the weights recomputed once (``voomWithDreamWeights``).
        Tests use Kenward–Roger df below 20 samples and Satterthwaite df from 20 on, without empirical-Bayes
        moderation.
    span
        lowess span of the voom trend.

    Returns
    -------
    LimmaResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.poisson(50, size=(100, 6))
    >>> X = np.column_stack([np.ones(6), [0, 0, 0, 1, 1, 1]])
    >>> res = voom_limma(y, X, np.array([0.0, 1.0]))
    """
    return voom_limma_multi(counts, X, [L], lib_size=lib_size, norm_factors=norm_factors, terms=terms, span=span)[0]


def voom_limma_multi(
    counts: np.ndarray,
    X: np.ndarray,
    Ls: list[np.ndarray],
    *,
    lib_size: np.ndarray | None = None,
    norm_factors: np.ndarray | None = None,
    terms: tuple | None = None,
    span: float = 0.5,
) -> list[LimmaResult]:
    """:func:`voom_limma` for several contrasts: one ``voom`` + ``lmFit`` + ``eBayes`` serves all of them.

    Each item of ``Ls`` is a length-p vector (moderated t) or a p × m matrix (moderated F of its m columns, as limma's
    ``eBayes`` ``F`` and ``topTableF``: ``classifyTestsF`` of the moderated t statistics with the correlation of the
    coefficients from the unweighted design, ``fit$cov.coefficients``). With random ``terms`` (dream) the test is
    part of each gene's mixed-model fit (:mod:`scmlm.models.dream`), so each contrast runs
    :func:`~scmlm.models.dream.dream` on its own.
    """
    counts = np.asarray(counts, dtype=float)
    X = np.asarray(X, dtype=float)
    Ls = [as_contrast(L, X.shape[1]) for L in Ls]
    lib = effective_lib_size(counts, lib_size, norm_factors)
    if terms:
        return [dream(counts, X, L, terms, lib, span=span) for L in Ls]
    return voom_ebayes(counts, X, Ls, lib, span=span)
