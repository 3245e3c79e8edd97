"""Tests and degrees of freedom of GLMM fits: Wald t / F, Satterthwaite, containment df, likelihood ratio."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy import stats

from .._families import BINOMIAL, Family, get_family
from .._random import RandomTerm
from ..moderate import MIN_GENES, prior
from .design import prepare_glmm
from .fit import GLMMResult, boundary_patterns, fit_glmm
from .status import ST_SEPARATED, STATUS

PRIOR_COUNT = 0.5
"""Pseudo-count per fixed-design pattern of the fold change reported for a separated gene (see
:func:`separated_lrt`), spread over the patterns in proportion to their size so that it adds no effect of its own."""


@dataclass(frozen=True)
class ContrastResult:
    """Test of ``L' beta = 0`` per gene."""

    coef: np.ndarray
    se: np.ndarray
    stat: np.ndarray
    df: np.ndarray
    pvalue: np.ndarray
    bound: np.ndarray | None = None
    """Separated genes (:func:`separated_lrt`): the exact lower bound on the p-value (:func:`separation_bound`)."""


def glmm_contrast(result: GLMMResult, L: np.ndarray, df: float | np.ndarray | None = None) -> ContrastResult:
    """Wald test of ``L' beta = 0`` for every gene.

    Parameters
    ----------
    result
        From :func:`fit_glmm` (use ``method="REML"`` for calibrated tests with few donors).
    L
        Length-``p`` contrast vector.
    df
        Denominator degrees of freedom, a number or one per gene; ``None`` or ``inf`` gives a z test, otherwise a t
        test. Recommended for REML fits: ``np.minimum(contrast_df(X, terms, L), satterthwaite_df(result, L))``
        (on simulated 10-donor case-control nulls the containment df alone gives 4-6.3 % of p < 0.05, the minimum
        4-5.9 %; the z test 9-15 %).

    Returns
    -------
    ``coef = L' beta``, ``se``, ``stat = coef / se``, ``df`` and the two-sided ``pvalue``; NaN for genes that failed.
    """
    L = np.asarray(L, dtype=np.float64).ravel()
    if L.size != result.beta.shape[1]:
        raise ValueError(f"contrast has {L.size} entries; the model has {result.beta.shape[1]} coefficients.")
    coef = result.beta @ L
    with np.errstate(invalid="ignore"):
        var = np.einsum("i,gij,j->g", L, result.cov_beta, L)
        se = np.sqrt(np.where(var >= 0, var, np.nan))
        stat = coef / se
    G = coef.size
    dfa = np.full(G, np.inf) if df is None else np.broadcast_to(np.asarray(df, dtype=np.float64), (G,)).copy()
    pvalue = np.full(G, np.nan)
    ok = np.isfinite(stat)
    zmask = ok & ~np.isfinite(dfa)
    tmask = ok & np.isfinite(dfa)
    pvalue[zmask] = 2.0 * stats.norm.sf(np.abs(stat[zmask]))
    pvalue[tmask] = 2.0 * stats.t.sf(np.abs(stat[tmask]), dfa[tmask])
    return ContrastResult(coef=coef, se=se, stat=stat, df=dfa, pvalue=pvalue)


def satterthwaite_df(result: GLMMResult, L: np.ndarray) -> np.ndarray:
    """Satterthwaite degrees of freedom of ``L' beta`` for every gene.

    ``df = 2 V^2 / (g' A g)`` with ``V = L' cov(beta) L``, ``g`` its derivative in the variance parameters
    ``psi = (theta, [log phi])`` and ``A`` the inverse negative Hessian of the criterion in ``psi`` (lmerTest's
    method, with the REML criterion of a ``method="REML"`` fit). Parameters estimated at zero are treated as known.
    Derivatives are forward differences from the last Newton iteration of the fit.

    Parameters
    ----------
    result
        From :func:`fit_glmm`.
    L
        Length-``p`` contrast vector.

    Returns
    -------
    ``(G,)`` degrees of freedom (``inf`` when the variance parameters do not affect the contrast; NaN for failed
    genes).
    """
    L = np.asarray(L, dtype=np.float64).ravel()
    G = result.beta.shape[0]
    out = np.full(G, np.nan)
    if result.hess_psi is None or result.dcov_beta is None:
        return out
    V = np.einsum("i,gij,j->g", L, result.cov_beta, L)
    grad = np.einsum("i,gkij,j->gk", L, result.dcov_beta, L)
    for g in range(G):
        keep = ~result.psi_at_zero[g]
        H = -result.hess_psi[g][np.ix_(keep, keep)]
        gv = grad[g, keep]
        if not (np.isfinite(V[g]) and np.all(np.isfinite(H)) and np.all(np.isfinite(gv))):
            continue
        if gv.size == 0:
            out[g] = np.inf
            continue
        lam, U = np.linalg.eigh(0.5 * (H + H.T))
        pos = lam > 1e-10 * max(lam.max(initial=0.0), 1e-300)
        c = U[:, pos].T @ gv
        var_v = float(np.sum(c**2 / lam[pos]))
        out[g] = 2.0 * V[g] ** 2 / var_v if var_v > 0 else np.inf
    return out


def glmm_wald_f(result: GLMMResult, L: np.ndarray, df: float | np.ndarray | None = None) -> ContrastResult:
    """Joint Wald test of ``L beta = 0`` (``L``: q x p, rows linearly independent) for every gene.

    ``F = (L b)' (L cov(b) L')^{-1} (L b) / q`` on ``F(q, df)``; ``df`` ``None`` or ``inf`` gives the Wald
    chi-square on ``q`` df (as ``F * q``). ``coef`` and ``se`` are NaN (there is no single estimate), ``stat`` is F.
    With one row this is the square of :func:`glmm_contrast`'s t and the same p-value.
    """
    L = np.atleast_2d(np.asarray(L, dtype=np.float64))
    q, p = L.shape
    if p != result.beta.shape[1]:
        raise ValueError(f"contrast has {p} columns; the model has {result.beta.shape[1]} coefficients.")
    G = result.beta.shape[0]
    est = result.beta @ L.T  # G x q
    M = np.einsum("ai,gij,bj->gab", L, result.cov_beta, L)
    stat = np.full(G, np.nan)
    ok = np.all(np.isfinite(est), axis=1) & np.all(np.isfinite(M), axis=(1, 2))
    for g in np.flatnonzero(ok):
        try:
            c = np.linalg.cholesky(0.5 * (M[g] + M[g].T))
        except np.linalg.LinAlgError:
            continue
        z = np.linalg.solve(c, est[g])
        stat[g] = float(z @ z) / q
    dfa = np.full(G, np.inf) if df is None else np.broadcast_to(np.asarray(df, dtype=np.float64), (G,)).copy()
    pvalue = np.full(G, np.nan)
    fin = np.isfinite(stat)
    zmask = fin & ~np.isfinite(dfa)
    fmask = fin & np.isfinite(dfa)
    pvalue[zmask] = stats.chi2.sf(stat[zmask] * q, q)
    pvalue[fmask] = stats.f.sf(stat[fmask], q, dfa[fmask])
    nan = np.full(G, np.nan)
    return ContrastResult(coef=nan, se=nan.copy(), stat=stat, df=dfa, pvalue=pvalue)


def satterthwaite_df_f(result: GLMMResult, L: np.ndarray) -> np.ndarray:
    """Denominator df of the joint Wald F of ``L beta`` (q x p), lmerTest's method for several contrasts.

    Per gene, ``L cov(beta) L' = P diag(lam) P'``; each direction ``P' L`` gets its Satterthwaite df ``nu_i`` as in
    :func:`satterthwaite_df`, and ``E = sum nu_i / (nu_i - 2)`` gives ``df = 2 E / (E - q)``; equal ``nu_i`` give
    their value and any ``nu_i <= 2`` gives 2 (lmerTest's ``get_Fstat_ddf``). One row: :func:`satterthwaite_df`.
    """
    L = np.atleast_2d(np.asarray(L, dtype=np.float64))
    q = L.shape[0]
    if q == 1:
        return satterthwaite_df(result, L[0])
    G = result.beta.shape[0]
    out = np.full(G, np.nan)
    if result.hess_psi is None or result.dcov_beta is None:
        return out
    M = np.einsum("ai,gij,bj->gab", L, result.cov_beta, L)
    for g in range(G):
        if not np.all(np.isfinite(M[g])):
            continue
        lam, P = np.linalg.eigh(0.5 * (M[g] + M[g].T))
        rows = P.T @ L
        keep = ~result.psi_at_zero[g]
        H = -result.hess_psi[g][np.ix_(keep, keep)]
        if not np.all(np.isfinite(H)):
            continue
        nu = np.full(q, np.inf)
        if keep.any():
            hl, U = np.linalg.eigh(0.5 * (H + H.T))
            pos = hl > 1e-10 * max(hl.max(initial=0.0), 1e-300)
            for i in range(q):
                gv = np.einsum("i,kij,j->k", rows[i], result.dcov_beta[g], rows[i])[keep]
                if not np.all(np.isfinite(gv)):
                    nu[i] = np.nan
                    continue
                c = U[:, pos].T @ gv
                var_v = float(np.sum(c**2 / hl[pos]))
                nu[i] = 2.0 * lam[i] ** 2 / var_v if var_v > 0 else np.inf
        if np.any(np.isnan(nu)):
            continue
        if np.all(np.isinf(nu)):
            out[g] = np.inf
            continue
        if np.all(np.abs(np.diff(nu)) < 1e-8 * np.abs(nu[:-1])):
            out[g] = float(np.mean(nu))
        elif np.any(nu <= 2):
            out[g] = 2.0
        else:
            E = float(np.sum(np.where(np.isinf(nu), 1.0, nu / (nu - 2))))
            out[g] = 2.0 * E / (E - q)
    return out


def _constant_within(x: np.ndarray, codes: np.ndarray, n_levels: int, tol: float) -> bool:
    lo = np.full(n_levels, np.inf)
    hi = np.full(n_levels, -np.inf)
    np.minimum.at(lo, codes, x)
    np.maximum.at(hi, codes, x)
    present = np.isfinite(lo)
    return bool(np.all(hi[present] - lo[present] <= tol * (1.0 + np.abs(x).max())))


def _rank(A: np.ndarray) -> int:
    if A.size == 0:
        return 0
    A = np.unique(A, axis=0)
    return int(np.linalg.matrix_rank(A))


def contrast_df(X: np.ndarray, terms: tuple[RandomTerm, ...] | list[RandomTerm], L: np.ndarray) -> float:
    """Denominator degrees of freedom of a Wald t test of ``L' beta`` (between-level residual df, as nlme).

    A contrast of donor-level coefficients (e.g. case vs control across donors) is estimated from donor-level
    variation: its standard error depends on the estimated donor variance, which carries about
    ``n_donors - (number of donor-level coefficients)`` degrees of freedom, not ``n_cells``. With 10 donors the Wald z
    test gives ~15 % of p < 0.05 on null genes and a t test with 8 df on the REML fit ~4.5 %. The rule:

    * for each random term's grouping factor ``g`` such that every column of ``X`` used by the contrast is constant
      within the levels of ``g``: ``df_g = n_levels(g) - rank(columns of X constant within g)``; a contrast column
      that is the covariate of a random slope at ``g`` also counts as contained in ``g``; then
      ``df_g = n_levels(g) - rank(those slope columns)``;
    * ``df = min_g df_g`` over the grouping factors that contain the contrast;
    * otherwise (a within-level contrast, e.g. condition varying within donor without a random slope) the residual
      degrees of freedom ``n - rank([X, Z])``, which is large, so within-donor contrasts keep the power of the z test.

    The result does not depend on the gene; compute it once per design and contrast. Satterthwaite's approximation
    would adapt to the gene's variance components but needs the derivative of the contrast variance in ``theta``
    for every gene; the containment rule is what the calibration tests use.

    Parameters
    ----------
    X
        ``n x p`` fixed design.
    terms
        Random-effect terms.
    L
        Length-``p`` contrast vector.

    Returns
    -------
    Degrees of freedom (at least 1).
    """
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    L = np.asarray(L, dtype=np.float64).ravel()
    if L.size != p:
        raise ValueError(f"contrast has {L.size} entries; X has {p} columns.")
    used = np.flatnonzero(np.abs(L) > 1e-12)
    best = np.inf
    for t in terms:
        codes = np.asarray(t.codes, dtype=np.int64)
        nl = int(t.n_levels)
        n_present = int(np.unique(codes).size)
        const = np.array([_constant_within(X[:, j], codes, nl, 1e-8) for j in range(p)], dtype=bool)
        # X columns that are covariates of a random slope over the same grouping factor
        slope = np.zeros(p, dtype=bool)
        for t2 in terms:
            if t2.n_levels != nl or not np.array_equal(np.asarray(t2.codes), codes):
                continue
            for c, cname in enumerate(t2.col_names):
                if cname == "(Intercept)":
                    continue
                cov = np.asarray(t2.covariates[:, c], dtype=np.float64)
                for j in range(p):
                    if np.allclose(X[:, j], cov, rtol=1e-10, atol=1e-12):
                        slope[j] = True
        if used.size and np.all(const[used]):
            dfg = n_present - _rank(X[:, const])
        elif used.size and np.all(const[used] | slope[used]):
            dfg = n_present - _rank(X[:, slope])
        else:
            continue
        best = min(best, dfg)
    if not np.isfinite(best):
        Zcols = [X]
        for t in terms:
            Zd = np.zeros((n, t.q))
            cols = np.asarray(t.codes, dtype=np.int64)[:, None] * t.k + np.arange(t.k)[None, :]
            np.put_along_axis(Zd, cols, np.asarray(t.covariates, dtype=np.float64), axis=1)
            Zcols.append(Zd)
        best = n - _rank(np.hstack(Zcols))
    return float(max(best, 1))


def glmm_lrt(
    Y,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...] | list[RandomTerm],
    L: np.ndarray,
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
    df: float | None = None,
    full: GLMMResult | None = None,
    min_nonzero: int = 3,
    n_units: int | None = None,
) -> ContrastResult:
    """Likelihood-ratio test of ``L' beta = 0`` (Laplace ML fits of the full and the constrained model).

    The constrained model uses ``X N`` with ``N`` an orthonormal basis of the null space of ``L'``. The statistic is
    ``LR = 2 (loglik_full - loglik_reduced)``; the p-value is chi-square(1) when ``df`` is ``None``. With ``df`` (the
    contrast's residual df at its level) and ``n_units`` (the number of units it is replicated by, e.g. donors) the
    LR is turned into the F statistic it is a function of in a normal linear model of the ``n_units`` unit means,
    ``F = df (exp(LR / n_units) - 1)``, referred to ``F(1, df)``; without ``n_units``, ``F = LR``. Referring LR
    itself to F(1, df) is far too conservative with few units (LR grows only like ``n log(1 + t²/df)``), and
    chi-square(1) anticonservative (ML variances are biased down). ``coef``/``se`` are the Wald values of the full
    ML fit; ``stat`` is the signed root of the LR statistic.

    Parameters
    ----------
    Y
        As for :func:`fit_glmm`.
    X, terms, offset, family, trials
        As for :func:`prepare_glmm`.
    L
        Length-``p`` contrast vector.
    df
        Denominator df, or ``None`` for the chi-square reference.
    n_units
        Number of units replicating the contrast (see above); ``None`` for a cell-level contrast.
    full
        An ML fit of the full model of the same genes, if already available.
    min_nonzero
        As for :func:`fit_glmm`.
    """
    X = np.asarray(X, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64).ravel()
    if full is None:
        full = fit_glmm(
            Y, prepare_glmm(X, terms, offset, family=family, trials=trials), method="ML", min_nonzero=min_nonzero
        )
    elif full.method != "ML":
        raise ValueError("the likelihood-ratio test needs an ML fit of the full model (method='ML').")
    _, s, vt = np.linalg.svd(L[None, :])
    N = vt[1:].T
    red = fit_glmm(
        Y, prepare_glmm(X @ N, terms, offset, family=family, trials=trials), method="ML", min_nonzero=min_nonzero
    )
    wald = glmm_contrast(full, L)
    with np.errstate(invalid="ignore"):
        lr = np.maximum(2.0 * (full.loglik - red.loglik), 0.0)
        ok = full.converged & red.converged & np.isfinite(lr)
        lr = np.where(ok, lr, np.nan)
        stat = np.sign(wald.coef) * np.sqrt(lr)
    G = lr.size
    pvalue = np.full(G, np.nan)
    if df is None or not np.isfinite(df):
        pvalue[ok] = stats.chi2.sf(lr[ok], 1)
        dfa = np.full(G, np.inf)
    else:
        fstat = lr[ok] if not n_units else float(df) * np.expm1(lr[ok] / float(n_units))
        pvalue[ok] = stats.f.sf(fstat, 1, df)
        dfa = np.full(G, float(df))
    out = ContrastResult(coef=wald.coef, se=wald.se, stat=stat, df=dfa, pvalue=pvalue)
    sep = np.flatnonzero((full.status == STATUS[ST_SEPARATED]) | (red.status == STATUS[ST_SEPARATED]))
    if sep.size:
        con = separated_lrt(Y, X, terms, L, offset, family=family, trials=trials, df=df, n_units=n_units, genes=sep)
        for name in ("coef", "se", "stat", "df", "pvalue"):
            getattr(out, name)[sep] = getattr(con, name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# separation: a likelihood-ratio test at the supremum and a prior-count fold change


def _gene_subset(Y, genes: np.ndarray | None):
    """The responses of ``genes`` in :func:`fit_glmm`'s layouts (dense genes x cells, sparse cells x genes)."""
    if sp.issparse(Y):
        Y = sp.csc_matrix(Y)
        return Y if genes is None else Y[:, genes]
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y[None, :] if Y.ndim == 1 else Y
    return Y if genes is None else Y[genes]


def _cells_by_genes(Y) -> np.ndarray:
    """Dense ``(n, G)`` copy of a gene subset (small: the separated genes of a chunk)."""
    return Y.toarray() if sp.issparse(Y) else np.asarray(Y).T


def _subset_terms(terms, keep: np.ndarray) -> tuple[RandomTerm, ...]:
    """The random terms on the cells ``keep``, levels without cells dropped and the others renumbered."""
    out = []
    for t in terms:
        uniq, inv = np.unique(np.asarray(t.codes)[keep], return_inverse=True)
        names = tuple(t.level_names[u] for u in uniq) if len(t.level_names) == t.n_levels else ()
        out.append(
            replace(
                t,
                codes=np.asarray(inv, dtype=np.int64).ravel(),
                n_levels=int(uniq.size),
                covariates=np.asarray(t.covariates)[keep],
                level_names=names,
            )
        )
    return tuple(out)


def sup_loglik(
    Y,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...] | list[RandomTerm],
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
) -> np.ndarray:
    """Supremum over all parameters of the Laplace ML log-likelihood of each gene, finite under separation.

    The cells of the patterns :func:`~scmlm.models.glmm.fit.boundary_patterns` finds are driven to a probability of
    one (no counts at mean 0; binomial all successes at probability 1): each contributes a factor at most 1 that
    tends to 1 along the separating direction, uniformly in the random effects. The supremum is therefore the
    maximum of the same model fitted to the other cells, with the fixed design reduced to what those cells identify
    and the random-effect levels without cells dropped. Genes without such patterns get their ordinary ML fit (a
    near-separated fit included). NaN where a fit does not converge.
    """
    return _sup_fit(Y, X, terms, offset, family, trials)[0]


def _sup_fit(Y, X, terms, offset, family, trials) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sup_loglik`, with the ``(G, F)`` boundary patterns and the pattern of each cell."""
    X = np.asarray(X, dtype=np.float64)
    design = prepare_glmm(X, terms, offset, family=family, trials=trials)
    Xf, row, on = boundary_patterns(Y, design)
    ll = np.full(on.shape[0], np.nan)
    groups: dict[bytes, list[int]] = {}
    for g in range(on.shape[0]):
        groups.setdefault(on[g].tobytes(), []).append(g)
    for genes in groups.values():
        idx = np.asarray(genes)
        drop = on[idx[0]]
        Yg = _gene_subset(Y, idx)
        if not drop.any():
            res = fit_glmm(Yg, design, method="ML", min_nonzero=1, check_separation=False)
            ll[idx] = np.where(res.converged, res.loglik, np.nan)
            continue
        keep = ~drop[row]
        if not keep.any():  # every cell at the boundary: the likelihood tends to 1
            ll[idx] = 0.0
            continue
        _, sv, vt = np.linalg.svd(Xf[~drop], full_matrices=False)
        B = vt[: int(np.sum(sv > 1e-10 * sv[0]))].T
        sub = prepare_glmm(
            X[keep] @ B,
            _subset_terms(terms, keep),
            None if offset is None else np.asarray(offset)[keep],
            family=family,
            trials=None if trials is None else np.asarray(trials)[keep],
        )
        Ys = Yg[keep] if sp.issparse(Yg) else Yg[:, keep]
        res = fit_glmm(Ys, sub, method="ML", min_nonzero=1, check_separation=False)
        ll[idx] = np.where(res.converged, res.loglik, np.nan)
    return ll, on, row


def separation_bound(
    Y, on: np.ndarray, row: np.ndarray, offset=None, family="nb", trials=None, units: np.ndarray | None = None
) -> np.ndarray:
    """Per gene, the probability that every count avoids the boundary cells when counts fall on cells in proportion
    to their exposure (binomial: successes, or for all-success patterns failures, in proportion to trials), doubled
    for the two directions: ``min(1, 2 (1 - w_B)^T)``. It is the exact conditional p-value of a gene without
    overdispersion (two groups of equal size: the binomial test, ``2 * 0.5^T``); 0 without boundary patterns."""
    fam = get_family(family)
    Yc = _cells_by_genes(Y)
    n = Yc.shape[0]
    binomial = fam.code == BINOMIAL
    if binomial:
        size = np.ones(n) if trials is None else np.asarray(trials, dtype=np.float64)
        Yc = (Yc > 0).astype(np.float64) if trials is None else Yc
    else:
        size = np.ones(n) if offset is None else np.exp(np.asarray(offset, dtype=np.float64))
    F = on.shape[1]
    A = sp.csr_matrix((np.ones(n), (row, np.arange(n))), shape=(F, n))
    S, Sz = np.asarray(A @ Yc), A @ size  # (F, G) successes per pattern, (F,) size
    total = Sz.sum()
    out = np.zeros(on.shape[0])
    for g in range(on.shape[0]):
        zero = on[g] & (S[:, g] == 0)
        full = on[g] & ~zero  # binomial: every trial a success
        probs = [0.0]
        if zero.any():
            probs.append((1.0 - Sz[zero].sum() / total) ** S[:, g].sum())
        if full.any():
            probs.append((1.0 - Sz[full].sum() / total) ** (total - S[:, g].sum()))
        out[g] = min(1.0, 2.0 * max(probs))
    if units is not None:
        out = np.fmax(out, _unit_bound(Yc, on, row, units))
    return out


def _unit_bound(Yc: np.ndarray, on: np.ndarray, row: np.ndarray, units: np.ndarray) -> np.ndarray:
    """``min(1, 2 C(n - n_B, m) / C(n, m))`` per gene: ``n`` units, ``n_B`` of them wholly in boundary patterns,
    ``m`` with counts (see :func:`separation_bound`)."""
    from scipy.special import comb

    codes = np.unique(np.asarray(units), return_inverse=True)[1].ravel()
    n = int(codes.max()) + 1
    out = np.zeros(on.shape[0])
    for g in range(on.shape[0]):
        cell_on = on[g][row]
        if not cell_on.any():
            continue
        off_units = np.zeros(n, dtype=bool)
        off_units[codes[~cell_on]] = True  # units with a cell off the boundary
        n_b = n - int(off_units.sum())
        m = int(np.unique(codes[Yc[:, g] > 0]).size)
        out[g] = min(1.0, 2.0 * comb(n - n_b, m, exact=False) / comb(n, m, exact=False))
    return out


def prior_count_coef(
    Y,
    X: np.ndarray,
    L: np.ndarray,
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
) -> np.ndarray:
    """``L' beta`` of the fixed-effect GLM of each gene's pattern sums with :data:`PRIOR_COUNT` added per pattern.

    Cells are summed per distinct row of ``X`` (count families: counts and ``sum exp(offset)``; binomial: successes
    and trials). Each pattern gets ``a_r = PRIOR_COUNT * size_r / mean(size)`` pseudo-counts (binomial: ``a_r``
    successes out of ``2 a_r`` trials), which pulls a fold change toward zero only where a pattern has little data and
    makes every estimate finite, as edgeR's ``prior.count`` does for its log fold changes; then the Poisson (count
    families) or logistic GLM of the sums is fitted by Newton's method. Random effects are ignored: this is the
    reported fold change of a separated gene, whose maximum-likelihood estimate is infinite, not a test.
    """
    fam = get_family(family)
    X = np.asarray(X, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64).ravel()
    Yc = _cells_by_genes(Y)
    n = X.shape[0]
    Xf, inv = np.unique(X, axis=0, return_inverse=True)
    A = sp.csr_matrix((np.ones(n), (np.asarray(inv).ravel(), np.arange(n))), shape=(Xf.shape[0], n))
    binomial = fam.code == BINOMIAL
    if binomial:
        if trials is None:
            Yc, size = (Yc > 0).astype(np.float64), A @ np.ones(n)
        else:
            size = A @ np.asarray(trials, dtype=np.float64)
    else:
        size = A @ (np.ones(n) if offset is None else np.exp(np.asarray(offset, dtype=np.float64)))
    a = PRIOR_COUNT * size / size.mean()
    S = np.asarray(A @ Yc) + a[:, None]
    T = size + 2.0 * a
    coef = np.full(Yc.shape[1], np.nan)
    for g in range(Yc.shape[1]):
        s = S[:, g]
        target = np.log(s / (T - s)) if binomial else np.log(s / size)
        beta = np.linalg.lstsq(Xf, target, rcond=None)[0]
        for _ in range(50):
            eta = Xf @ beta
            if binomial:
                prob = 1.0 / (1.0 + np.exp(-eta))
                mu, w = T * prob, T * prob * (1.0 - prob)
            else:
                mu = w = size * np.exp(eta)
            step = np.linalg.solve(Xf.T @ (w[:, None] * Xf), Xf.T @ (s - mu))
            beta = beta + step
            if np.max(np.abs(step)) < 1e-10:
                break
        coef[g] = beta @ L
    return coef


def separated_lrt(
    Y,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...] | list[RandomTerm],
    L: np.ndarray,
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
    df: float | None = None,
    n_units: int | None = None,
    genes: np.ndarray | None = None,
    units: np.ndarray | None = None,
) -> ContrastResult:
    """Likelihood-ratio test of ``L beta = 0`` for genes without a finite maximum-likelihood estimate (separation).

    A gene with no counts in one condition has ``beta -> -inf`` for that condition, and its Wald test is void (the
    SE grows with the estimate, the Hauck-Donner effect). The likelihood itself stays bounded: ``LR = 2 (sup
    loglik_full - sup loglik_reduced)`` with both suprema from :func:`sup_loglik` (the reduced model ``X N``,
    ``N`` a basis of the null space of ``L``, is usually not separated, and is handled the same way when it is), the
    test edgeR's and glmmTMB's likelihood-ratio tests give such genes. It is referred as :func:`glmm_lrt` refers
    its statistic, so it respects the unit of replication: with ``df`` (the contrast's df at its level) and
    ``n_units`` (the units replicating it) ``F = (df / q) (exp(LR / n_units) - 1)`` on ``F(q, df)``; with ``df``
    only, ``F = LR / q``; with neither, chi-square(q). ``q`` is the number of rows of ``L``.

    ``coef`` is the fold change of :func:`prior_count_coef` (finite; NaN for a joint test), ``se`` NaN, ``stat``
    the signed root of LR (a joint test: the F statistic), ``df`` the reference df.

    Parameters
    ----------
    Y, X, terms, offset, family, trials
        As for :func:`glmm_lrt`.
    L
        Length-``p`` contrast vector or ``q x p`` matrix of linearly independent rows.
    df, n_units
        As for :func:`glmm_lrt`.
    genes
        Indices of the genes of ``Y`` to test (e.g. those :func:`fit_glmm` reports ``"separated"``); ``None``: all.
    units
        The unit of each cell of a contrast between units to which the conditions are assigned (donors of a
        case-control design), for the unit-level bound of :func:`separation_bound`; ``None`` for other contrasts.

    Returns
    -------
    A :class:`ContrastResult` over ``genes``.
    """
    X = np.asarray(X, dtype=np.float64)
    L2 = np.atleast_2d(np.asarray(L, dtype=np.float64))
    q, p = L2.shape
    Yg = _gene_subset(Y, None if genes is None else np.asarray(genes, dtype=np.int64))
    G = Yg.shape[1] if sp.issparse(Yg) else Yg.shape[0]
    nan = np.full(G, np.nan)
    if q == 1:
        coef = prior_count_coef(Yg, X, L2[0], offset, family=family, trials=trials)
    else:
        coef = nan.copy()
    dfa = np.full(G, np.inf if df is None or not np.isfinite(df) else float(df))
    if p <= q:  # no reduced model with fixed effects
        return ContrastResult(coef=coef, se=nan.copy(), stat=nan.copy(), df=dfa, pvalue=nan.copy(), bound=nan.copy())
    _, _, vt = np.linalg.svd(L2)
    N = vt[q:].T
    full, on, row = _sup_fit(Yg, X, terms, offset, family, trials)
    red = sup_loglik(Yg, X @ N, terms, offset, family=family, trials=trials)
    with np.errstate(invalid="ignore"):
        lr = np.maximum(2.0 * (full - red), 0.0)
    ok = np.isfinite(lr)
    pvalue = nan.copy()
    if not np.isfinite(dfa[0]):
        fstat = lr / q
        pvalue[ok] = stats.chi2.sf(lr[ok], q)
    else:
        fstat = lr / q if not n_units else dfa[0] / q * np.expm1(lr / float(n_units))
        pvalue[ok] = stats.f.sf(fstat[ok], q, dfa[0])
    # few counts: the chi-square / F reference of LR fails (3 counts all in one of two equal groups give LR = 4.2,
    # p = 0.04, where the exact test gives 0.25); the exact bound of a gene without overdispersion guards that
    # regime, and LR, whose random effects carry overdispersion, the other: the larger p-value is valid in both
    bound = separation_bound(Yg, on, row, offset, family, trials, units)
    pvalue = np.maximum(pvalue, bound)  # NaN stays NaN (no df at the contrast's level)
    stat = np.sign(coef) * np.sqrt(lr) if q == 1 else np.where(ok, fstat, np.nan)
    return ContrastResult(coef=coef, se=nan.copy(), stat=stat, df=dfa, pvalue=pvalue, bound=bound)


def moderate_separated(
    coef: np.ndarray,
    bound: np.ndarray,
    scale: np.ndarray,
    base_mean: np.ndarray,
    tau2: np.ndarray,
    df_resid: np.ndarray,
    ref_base_mean: np.ndarray,
    usable: np.ndarray,
) -> dict[str, np.ndarray]:
    """Moderated tests of separated genes of one group and contrast, from the prior of the other genes.

    A separated gene has no finite estimate and no between-unit variance ``τ̂²`` of its own (the boundary units'
    sampling variance is infinite), so its test borrows the whole variance from the prior of the other genes, as a
    limma gene with zero residual df does: ``τ̃² = s0²(base_mean)`` (the trend of :func:`scmlm.models.moderate`'s prior
    at the gene's ``base_mean``) and ``t = coef / sqrt(c τ̃²)`` on the smallest prior df a moderated gene borrows (at
    most the pooled residual df), with
    ``coef`` the prior-count fold change of :func:`prior_count_coef` (pulled toward zero where counts are few). The
    p-value is at least ``bound`` (:func:`separation_bound`: the exact conditional p-value of a gene without
    overdispersion, which guards genes with a handful of counts).

    ``tau2``, ``df_resid``, ``ref_base_mean`` and ``usable`` are those of the genes :func:`~scmlm.models.moderate`
    moderated in the same group and contrast (the prior is re-evaluated with the separated genes added at zero df,
    which leaves it unchanged). Returns ``se``, ``stat``, ``df``, ``pvalue``, ``df_prior``, ``var_prior`` (NaN when
    no prior can be estimated).
    """
    coef = np.asarray(coef, dtype=float)
    S = coef.size
    out = {k: np.full(S, np.nan) for k in ("se", "stat", "df", "pvalue", "df_prior", "var_prior")}
    tau2 = np.asarray(tau2, dtype=float)
    d = np.asarray(df_resid, dtype=float)
    ok = np.asarray(usable, dtype=bool) & np.isfinite(tau2) & (tau2 > 0) & np.isfinite(d) & (d >= 1)
    if int(ok.sum()) < MIN_GENES or S == 0:
        return out
    cov = np.log(np.maximum(np.concatenate([np.asarray(ref_base_mean, dtype=float)[ok], base_mean]), 1e-8))
    cov = np.where(np.isfinite(cov), cov, np.nanmin(cov[np.isfinite(cov)]) if np.isfinite(cov).any() else 0.0)
    cov_ref, cov_sep = cov[: int(ok.sum())], cov[int(ok.sum()) :]
    try:
        d0_ref, s0_ref, _, _ = prior(tau2[ok], d[ok], cov_ref)
    except (ValueError, np.linalg.LinAlgError):
        return out
    # The prior's trend at the separated genes' base means; they borrow the df of the least informed moderated gene
    # (the guarded df at the smallest residual df), as a gene with no df of its own.
    order = np.argsort(cov_ref)
    s0 = np.exp(np.interp(cov_sep, cov_ref[order], np.log(s0_ref[order])))
    d0 = np.full(S, float(np.min(d0_ref)))
    df = np.minimum(d0, d[ok].sum())
    se = np.sqrt(np.asarray(scale, dtype=float) * s0)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = coef / se
        pvalue = np.fmax(2.0 * stats.t.sf(np.abs(stat), df), np.asarray(bound, dtype=float))
    out.update(se=se, stat=stat, df=df, pvalue=pvalue, df_prior=d0, var_prior=s0)
    return out
