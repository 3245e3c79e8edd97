"""limma-voom on ndarrays: ``voom`` precision weights, a weighted ``lmFit`` and ``eBayes`` (moderated t and F).

For pseudobulk count matrices (genes in rows, samples in columns): ``voom`` (log-CPM with 0.5 prior count, lowess
trend of the quarter-root residual variance against the average log count, precision weights), a weighted ``lmFit``
of every gene at once and ``eBayes`` (limma's ``squeezeVar`` from :mod:`scmlm.models.ebayes`). Coefficients and
standard errors are returned on the natural-log scale (limma works in log2).

The public entry points, which also dispatch to dream when the design has random terms, are
:func:`scmlm.models.voom.voom_limma` and :func:`scmlm.models.voom.voom_limma_multi`; :class:`LimmaResult` is the
result type of both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .ebayes import approx_rule2, lowess, squeeze_var

__all__ = ["LN2", "LimmaResult", "as_contrast", "effective_lib_size", "voom_ebayes", "voom_weights"]

LN2 = float(np.log(2.0))
"""ln 2: limma's log2 estimates times LN2 are on the natural-log scale of the other models."""


@dataclass(frozen=True)
class LimmaResult:
    """Per-gene results of :func:`voom_limma` (one entry per row of ``counts``).

    ``coef`` and ``se`` are on the natural-log scale (limma's log2 values times ln 2); ``s2_post`` and ``ave_expr``
    stay on limma's log2-CPM scale. For a multi-column contrast, ``coef``/``se`` have one column per contrast
    column and ``stat`` is the moderated F statistic. Without random terms ``converged`` is all True; with them it is
    the per-gene status of the mixed-model fit.
    """

    coef: np.ndarray
    se: np.ndarray
    stat: np.ndarray
    df: np.ndarray
    pvalue: np.ndarray
    weights: np.ndarray
    s2_post: np.ndarray
    df_prior: np.ndarray
    ave_expr: np.ndarray
    converged: np.ndarray
    df1: int = 1
    status: np.ndarray | None = None
    """Per-gene status text (mixed-model path only): ``"ok"`` or why a gene failed."""
    var_components: dict[str, np.ndarray] | None = None
    """Random-effect variances per gene (mixed-model path only), log2-CPM scale."""


def effective_lib_size(counts: np.ndarray, lib_size, norm_factors) -> np.ndarray:
    """Library sizes (default: column sums of ``counts``) times the normalisation factors (default: 1)."""
    lib = counts.sum(axis=0).astype(float) if lib_size is None else np.asarray(lib_size, dtype=float)
    if norm_factors is not None:
        lib = lib * np.asarray(norm_factors, dtype=float)
    return lib


def _batched_wls(E: np.ndarray, X: np.ndarray, W: np.ndarray | None):
    """Weighted least squares for every row of ``E`` (genes × samples) with its own weights.

    Returns ``(beta (G×p), XtWX_inv (G×p×p), rss (G,))``.
    """
    if W is None:
        XtX = X.T @ X
        inv = np.linalg.inv(XtX)
        beta = E @ X @ inv
        resid = E - beta @ X.T
        rss = np.sum(resid**2, axis=1)
        return beta, np.broadcast_to(inv, (E.shape[0], *inv.shape)), rss
    XtWX = np.einsum("gn,ni,nj->gij", W, X, X)
    XtWy = np.einsum("gn,ni,gn->gi", W, X, E)
    inv = np.linalg.inv(XtWX)
    beta = np.einsum("gij,gj->gi", inv, XtWy)
    resid = E - beta @ X.T
    rss = np.sum(W * resid**2, axis=1)
    return beta, inv, rss


def voom_weights(
    counts: np.ndarray, X: np.ndarray, lib_size: np.ndarray, span: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """limma's ``voom``: log2-CPM values ``E`` and precision weights (both genes × samples).

    ``lib_size`` are the effective (normalised) library sizes.
    """
    counts = np.asarray(counts, dtype=float)
    n_genes, n = counts.shape
    E = np.log2((counts + 0.5) / (lib_size + 1.0)[None, :] * 1e6)
    p = np.linalg.matrix_rank(X)
    if n - p <= 0 or n_genes < 2:
        return E, np.ones_like(E)
    beta, _, rss = _batched_wls(E, X, None)
    sigma = np.sqrt(rss / (n - p))
    amean = E.mean(axis=1)
    sx = amean + np.mean(np.log2(lib_size + 1.0)) - np.log2(1e6)
    sy = np.sqrt(sigma)
    allzero = counts.sum(axis=1) == 0
    xs, ys = lowess(sx[~allzero], sy[~allzero], f=span, iterations=3)
    fitted = beta @ X.T
    fitted_logcount = np.log2(1e-6 * 2.0**fitted * (lib_size + 1.0)[None, :])
    trend = approx_rule2(xs, ys, fitted_logcount.ravel()).reshape(fitted_logcount.shape)
    return E, 1.0 / trend**4


def as_contrast(L: np.ndarray, p: int) -> np.ndarray:
    """A contrast as a p × m matrix (a length-p vector becomes one column); the row count must match the design."""
    L = np.asarray(L, dtype=float)
    if L.ndim == 1:
        L = L[:, None]
    if L.shape[0] != p:
        raise ValueError(f"contrast has {L.shape[0]} rows but the design has {p} columns")
    return L


def voom_ebayes(
    counts: np.ndarray, X: np.ndarray, Ls: list[np.ndarray], lib_size: np.ndarray, *, span: float = 0.5
) -> list[LimmaResult]:
    """``voom`` → ``lmFit`` → ``eBayes`` for every contrast of ``Ls`` (p × m matrices, see :func:`as_contrast`).

    ``lib_size`` are the effective library sizes (:func:`effective_lib_size`). A one-column contrast gets the
    moderated t, an m-column one the moderated F of its columns (limma's ``eBayes`` ``F`` and ``topTableF``:
    ``classifyTestsF`` of the moderated t statistics with the correlation of the coefficients from the unweighted
    design, ``fit$cov.coefficients``).
    """
    counts = np.asarray(counts, dtype=float)
    X = np.asarray(X, dtype=float)
    n_genes, n = counts.shape
    p = X.shape[1]
    E, W = voom_weights(counts, X, lib_size, span=span)
    beta, inv, rss = _batched_wls(E, X, W)
    df_res = float(n - p)
    s2 = rss / df_res if df_res > 0 else np.full(n_genes, np.nan)
    df_prior, s2_prior, s2_post = squeeze_var(s2, df_res)
    df_total = np.minimum(df_res + df_prior, df_res * n_genes)
    amean = E.mean(axis=1)
    # lmFit's cov.coefficients: from the unweighted design (limma uses it for the correlation of the t statistics)
    cov_unweighted = np.linalg.inv(X.T @ X)
    out = []
    for L in Ls:
        m = L.shape[1]
        est = beta @ L  # G × m
        V = np.einsum("im,gij,jk->gmk", L, inv, L)  # unscaled covariance of the contrasts
        su = np.sqrt(np.diagonal(V, axis1=1, axis2=2))  # G × m
        t = est / su / np.sqrt(s2_post)[:, None]
        if m == 1:
            t = t[:, 0]
            pval = 2 * stats.t.sf(np.abs(t), df_total)
            coef = est[:, 0] * LN2
            se = su[:, 0] * np.sqrt(s2_post) * LN2
            stat = t
            df1 = 1
        else:
            stat, df1 = _classify_tests_f(t, L.T @ cov_unweighted @ L)
            pval = stats.f.sf(stat, df1, df_total)
            coef = est * LN2
            se = su * np.sqrt(s2_post)[:, None] * LN2
        out.append(
            LimmaResult(
                coef=coef,
                se=se,
                stat=stat,
                df=df_total,
                pvalue=pval,
                weights=W,
                s2_post=s2_post,
                df_prior=df_prior,
                ave_expr=amean,
                converged=np.ones(n_genes, dtype=bool),
                df1=df1,
            )
        )
    return out


def _classify_tests_f(t: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, int]:
    """limma's ``classifyTestsF(fstat.only = TRUE)``: F of the moderated t statistics ``t`` (G × m) given the
    covariance of the contrasts ``cov`` (m × m, turned into a correlation); numerator df is its rank."""
    d = np.sqrt(np.diag(cov))
    cor = cov / np.outer(d, d)
    vals, vecs = np.linalg.eigh(cor)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    r = int(np.sum(vals / vals[0] > 1e-8))
    Q = vecs[:, :r] / np.sqrt(vals[:r])[None, :] / np.sqrt(r)
    return np.sum((t @ Q) ** 2, axis=1), r
