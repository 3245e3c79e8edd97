"""edgeR's quasi-likelihood test: ``estimateDisp`` → ``glmQLFit(robust = TRUE)`` → ``glmQLFTest``.

* ``glmQLFit(robust = TRUE)``: NB GLM with the **trended** dispersion (the edgeR 3.x default), residual df reduced
  for zero fitted values, QL dispersion ``deviance / df`` squeezed robustly towards a trend in AveLogCPM (limma's
  ``squeezeVar``). Reported coefficients are edgeR's: shrunk with ``prior.count = 0.125`` (``predFC``); deviances
  come from the unshrunk fit.
* ``glmQLFTest``: ``F = (deviance(null) - deviance(full)) / (rank(L) * s2.post)`` on ``rank(L)`` and
  ``df.prior + df.residual`` degrees of freedom (capped at the pooled residual df), with edgeR's Poisson bound (a
  chi-square Poisson LRT p-value floors the F p-value where the QL variance falls below the Poisson one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..ebayes import squeeze_var
from .dispersion import _residual_df, estimate_disp
from .glm import _add_prior_count, _deviance, _pair_products, _xtwx, fit_nb_glm

__all__ = ["QLResult", "nb_ql", "nb_ql_multi"]


@dataclass(frozen=True)
class QLResult:
    """Per-gene results of :func:`nb_ql` (one entry per row of ``counts``; scalars where noted).

    ``coef`` is the contrast estimate ``L'β`` on the natural-log scale (edgeR's shrunk coefficients,
    ``prior.count = 0.125``); with a multi-column contrast it has one column per contrast column. ``se`` is the
    quasi-likelihood Wald standard error ``sqrt(s2_post · L'(X'WX)⁻¹L)`` of the unshrunk estimate for a
    one-column contrast (edgeR reports none), NaN otherwise. ``stat`` is the QL F statistic on ``df1``, ``df2``.
    ``base_mean`` is the mean of the counts scaled by size factors ``eff_lib / geomean(eff_lib)``.
    """

    coef: np.ndarray
    se: np.ndarray
    stat: np.ndarray
    df1: np.ndarray
    df2: np.ndarray
    pvalue: np.ndarray
    dispersion: np.ndarray
    trended_dispersion: np.ndarray
    common_dispersion: float
    s2_post: np.ndarray
    df_prior: np.ndarray
    ave_log_cpm: np.ndarray
    base_mean: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray


def _null_design(X: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Design of the null model ``L'β = 0`` (edgeR's ``glmLRT`` reparametrisation), ``rank(L)``, and the basis
    ``Q0`` of ``{β: L'β = 0}`` (null coefficients ``γ`` give ``β = Q0 γ``)."""
    Q, _ = np.linalg.qr(L, mode="complete")
    r = int(np.linalg.matrix_rank(L))
    return X @ Q[:, r:], r, Q[:, r:]


def nb_ql(
    counts: np.ndarray,
    X: np.ndarray,
    L: np.ndarray,
    *,
    lib_size: np.ndarray | None = None,
    norm_factors: np.ndarray | None = None,
    robust: bool = True,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
    prior_count: float = 0.125,
    poisson_bound: bool = True,
) -> QLResult:
    """edgeR quasi-likelihood DE: ``estimateDisp`` → ``glmQLFit(robust)`` → ``glmQLFTest``.

    Parameters
    ----------
    counts
        Genes × samples counts (filter first, e.g. with :func:`filter_by_expr`; edgeR's reference results then
        recompute ``lib_size`` as the column sums of the kept genes).
    X
        Samples × p design matrix of full column rank.
    L
        Contrast: a length-p vector (e.g. a unit vector selecting one coefficient) or a p × m matrix.
    lib_size, norm_factors
        Library sizes (default: column sums) and normalisation factors (default 1, e.g. :func:`tmm_factors`).
    robust, winsor_tail_p
        Robust empirical-Bayes squeeze of the QL dispersions (``glmQLFit(robust = TRUE)``).
    prior_count
        Prior count of the reported (shrunk) coefficients, as ``glmFit``'s default.
    poisson_bound
        Apply edgeR's Poisson bound to the p-values.

    Returns
    -------
    QLResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.negative_binomial(5, 5 / 55, size=(300, 8))
    >>> X = np.column_stack([np.ones(8), np.repeat([0.0, 1.0], 4)])
    >>> res = nb_ql(y, X, np.array([0.0, 1.0]))
    >>> res.pvalue.shape
    (300,)
    """
    return nb_ql_multi(
        counts, X, [L], lib_size=lib_size, norm_factors=norm_factors, robust=robust, winsor_tail_p=winsor_tail_p,
        prior_count=prior_count, poisson_bound=poisson_bound,
    )[0]  # fmt: skip


def nb_ql_multi(
    counts: np.ndarray,
    X: np.ndarray,
    Ls: list[np.ndarray],
    *,
    lib_size: np.ndarray | None = None,
    norm_factors: np.ndarray | None = None,
    robust: bool = True,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
    prior_count: float = 0.125,
    poisson_bound: bool = True,
) -> list[QLResult]:
    """:func:`nb_ql` for several contrasts: one ``estimateDisp`` and ``glmQLFit`` serve every ``glmQLFTest``.

    Each item of ``Ls`` is a length-p vector or a p × m matrix (an F test on the QL deviance with ``m`` numerator
    df, as ``glmQLFTest(fit, coef = 2:3)`` or ``contrast = <matrix>``). Only the null-model fit of each test is
    contrast-specific. Other arguments as :func:`nb_ql`.
    """
    Y = np.asarray(counts, dtype=float)
    X = np.asarray(X, dtype=float)
    G, n = Y.shape
    p = X.shape[1]
    Lms = []
    for L in Ls:
        L = np.asarray(L, dtype=float)
        Lm = L[:, None] if L.ndim == 1 else L
        if Lm.shape[0] != p:
            raise ValueError(f"contrast has {Lm.shape[0]} rows but the design has {p} columns")
        Lms.append(Lm)
    lib = Y.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=float)
    if norm_factors is not None:
        lib = lib * np.asarray(norm_factors, dtype=float)
    offset = np.log(lib)

    disp = estimate_disp(Y, X, lib)
    trended = disp.trended
    alc = disp.ave_log_cpm

    fit = disp.trended_fit if disp.trended_fit is not None else fit_nb_glm(Y, X, offset, trended)
    Yp, offp = _add_prior_count(Y, lib, prior_count)
    shrunk = fit_nb_glm(Yp, X, offp, trended, deviance=False).coef
    zf = (fit.mu < 1e-4) & (Y < 1e-4)
    df_res = _residual_df(zf, X)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = fit.deviance / df_res
    s2[df_res == 0] = 0
    s2 = np.maximum(s2, 0)
    df_prior, _, s2_post = squeeze_var(s2, df_res, covariate=alc, robust=robust, winsor_tail_p=winsor_tail_p)

    # The null fits start from the full fit projected on the null space (fewer iterations than edgeR's null start)
    # except for genes with a zero-fitted zero (a group without counts, its coefficient heading to -inf): there the
    # projection puts every mean near zero, the first Levenberg step overshoots to huge means (the NB likelihood falls
    # only linearly in the coefficient there, so the step is accepted) and the way back takes ~1 iteration per unit,
    # exhausting maxit ("not converged" for the strongest on/off genes). Those genes take edgeR's own (null) start.
    warm_ok = ~zf.any(axis=1)
    results = []
    for Lm in Lms:
        X0, r, Q0 = _null_design(X, Lm)
        start0 = fit.coef @ Q0
        start0[~warm_ok] = np.nan  # not finite: edgeR's null start
        fit0 = fit_nb_glm(Y, X0, offset, trended, start=start0, deviance=False)
        lr = 2 * (fit.loglik - fit0.loglik)
        # genes where edgeR's deviance leaves the NB form (dispersion < 1e-4, or mu * dispersion > 1e6): its difference
        # (any(mu * t > 1e6) is max(mu) * t > 1e6: t > 0 and rounding is monotone; fmax skips NaN as any() does)
        mu_max = np.fmax(np.fmax.reduce(fit.mu, axis=1), np.fmax.reduce(fit0.mu, axis=1))
        special_rows = (trended < 1e-4) | (mu_max * trended > 1e6)
        if special_rows.any():
            sr = special_rows
            lr[sr] = _deviance(Y[sr], fit0.mu[sr], trended[sr, None]) - _deviance(Y[sr], fit.mu[sr], trended[sr, None])
        df1 = float(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            F = lr / df1 / s2_post
        df2 = np.minimum(df_prior + df_res, G * (n - p))
        pval = stats.f.sf(F, df1, df2)
        if poisson_bound:
            below = (np.fmin.reduce(fit.mu, axis=1) * trended + 1) * s2_post < 1  # as above, with the minimum
            if below.any():
                b = np.flatnonzero(below)
                pf_ = fit_nb_glm(Y[b], X, offset, 0.0, start=fit.coef[b])
                pf0 = fit_nb_glm(Y[b], X0, offset, 0.0)
                pois_p = stats.chi2.sf(pf0.deviance - pf_.deviance, df1)
                pval[b] = np.maximum(pval[b], pois_p)

        est = shrunk @ Lm
        if Lm.shape[1] == 1:
            coef = est[:, 0]
            if fit.xtwx is not None:
                xtwx = fit.xtwx
            else:
                wt = fit.mu / (1 + trended[:, None] * fit.mu)
                xtwx = _xtwx(wt, _pair_products(X), p)
            with np.errstate(invalid="ignore"):
                try:
                    v = np.einsum(
                        "i,gi->g",
                        Lm[:, 0],
                        np.linalg.solve(xtwx, np.broadcast_to(Lm[:, 0], (G, p))[:, :, None])[:, :, 0],
                    )
                except np.linalg.LinAlgError:
                    v = np.full(G, np.nan)
                se = np.sqrt(v * s2_post)
        else:
            coef = est
            se = np.full(est.shape, np.nan)

        size = lib / np.exp(np.mean(np.log(lib)))
        base_mean = np.mean(Y / size[None, :], axis=1)
        converged = ~fit.failed & ~fit0.failed & np.isfinite(pval)
        results.append(
            QLResult(
                coef=coef,
                se=se,
                stat=F,
                df1=np.full(G, df1),
                df2=df2,
                pvalue=pval,
                dispersion=disp.tagwise,
                trended_dispersion=trended,
                common_dispersion=disp.common,
                s2_post=s2_post,
                df_prior=df_prior,
                ave_log_cpm=alc,
                base_mean=base_mean,
                converged=converged,
                n_iter=fit.n_iter,
            )
        )
    return results
