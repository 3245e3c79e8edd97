"""Population-average differential expression on ndarrays: a GEE per gene with donors as clusters.

:func:`fit_gee` fits every gene of a cells × genes block given a :class:`GEEData` (built by :func:`prepare_gee`) and
returns a :class:`GEEResult`; the AnnData tool around it is :func:`scmlm.tl.gee_de`.

Model, for gene ``g`` and cell ``i`` of donor (cluster) ``d``::

    E[y_i] = mu_i,   link(mu_i) = x_i' beta + offset_i          (marginal mean: no random effect in it)
    Var[y_i] = V(mu_i)                                           NB2: mu + alpha mu^2; Poisson: mu; binomial: p(1-p)
    corr(y_i, y_j) = rho  for two cells of the same donor        (exchangeable working correlation)

``beta`` is the *population-average* effect: how the mean over all donors changes with ``x``. For the log link with a
normal donor intercept it equals the cluster-specific (GLMM) slope; for the logit link it is attenuated towards zero
(see ``docs/gee_vs_glmm.md``).

Steps (all genes of a chunk at once, vectorised over genes; design, offsets, cluster codes and the df rule are shared):

1. Poisson (``binomial``: logistic) GLM with the offset by IRLS: marginal means ``mu0`` and starting values.
2. ``nb`` only: NB2 dispersion ``alpha`` from the Pearson moment equation
   ``sum (y - mu0)^2 / (mu0 + alpha mu0^2) = n - p`` (the estimator of MASS's ``theta.mm``), solved by bisection on
   ``log alpha``; ``alpha`` is the *marginal* over-dispersion (between-donor variation included), the variance the
   GEE's working model needs.
3. GEE with exchangeable working correlation, the same alternating updates and moment estimator of ``rho`` as
   statsmodels' ``GEE(..., cov_struct=Exchangeable())`` (tests check coefficients, ``rho`` and the sandwich against
   it). The inverse of ``(1 - rho) I + rho 11'`` is closed-form, so every quantity is a per-donor sum over cells.
4. Covariance: the cluster-robust sandwich with a small-sample correction (``small_sample``), in closed form from
   p × p matrices (:func:`sandwich_from_blocks`). Default ``"md_scaled"``: Mancl–DeRouen (each donor's residuals
   ``(I - H_dd)^-1 r_d``; statsmodels' ``cov_type="bias_reduced"``), times ``(K - q) / K`` when the contrast involves
   donor-level columns only (``K`` donors, ``q`` design columns constant within every donor; :func:`md_scale`).
   Mancl–DeRouen is the leave-one-donor-out (jackknife) variance in linearised form and, like the jackknife without
   its factor, too large; ``(K - q) / K`` is the factor that makes it equal Kauermann–Carroll
   (``(I - H_dd)^-1/2 r_d``, unbiased under the working model) when every donor carries the same weight. Where a few
   donors carry most of the weight (unequal cell numbers, few counts), their residuals hide most of their own
   variation; the full ``(1 - h)^-1`` inflation restores it, the square root of Kauermann–Carroll does not. A
   contrast within donors keeps plain Mancl–DeRouen: its spread between donors (donor-specific responses) is not in
   the exchangeable working model, whose weights are then unequal where the information is not. Also ``"kc"``,
   ``"md"`` and ``"none"``.
5. Tests: ``t = L'beta / se`` against ``t(K - q)`` (``df_method="clusters"``, default), or against t with the
   Bell–McCaffrey degrees of freedom of the corrected variance (``df_method="satterthwaite"``: Satterthwaite under
   the working model, as R's clubSandwich for CR2), capped at ``K - q``. A joint test of several contrast rows:
   ``F = W / k`` against ``F(k, K - q)``. Several contrasts in one call share each gene's fit; each contrast gets its
   own ``md_scaled`` factor.

Calibration (NB, ``~ condition``; null simulations from ``scmlm.datasets.simulate(null=True, n_batches=1)``, so that
donors are independent clusters; fraction of p < 0.05 over 1,300-2,000 tested genes unless noted; "unequal": each
donor keeps a random 20-100 % of its cells, one entry per seed because the fraction depends on the sizes drawn).
Default / Kauermann–Carroll with the Bell–McCaffrey df / Kauermann–Carroll with t(K - q) / Mancl–DeRouen with
t(K - q). Condition a donor trait (the default is scaled Mancl–DeRouen):

    6 donors x 60 cells        equal    0.049 / 0.043 / 0.050 / 0.027
                               unequal  0.045 / 0.032 / 0.092 / 0.020;  0.057 / 0.063 / 0.129 / 0.040;
                                        0.060 / 0.041 / 0.092 / 0.033
    6 donors x 300 cells       equal    0.046 / 0.042 / 0.046 / 0.019
                               unequal  0.047 / 0.040 / 0.059 / 0.028;  0.051 / 0.041 / 0.061 / 0.033;
                                        0.056 / 0.081 / 0.117 / 0.035;  0.069 / 0.057 / 0.091 / 0.039
    6 donors x 2,000 cells     equal    0.053 / 0.048 / 0.055 / 0.022 (600 genes)
                               unequal  0.052 / 0.043 / 0.052 / 0.018 (600 genes)
    10 donors x 60 cells       equal    0.049 / 0.044 / 0.049 / 0.027
    10 donors x 300 cells      equal    0.062 / 0.060 / 0.063 / 0.045;  0.056 / 0.055 / 0.055 / 0.037
                               unequal  0.059 / 0.056 / 0.063 / 0.038
    20 donors x 60 cells       equal    0.058 / 0.058 / 0.058 / 0.049;  0.052 / 0.052 / 0.052 / 0.041
    20 donors x 300 cells      unequal  0.049 / 0.049 / 0.050 / 0.040 (1,000 genes)
    20 donors x 2,000 cells    equal    0.050 / 0.050 / 0.050 / 0.045 (400 genes)

Over all unequal 6-donor sets drawn (11 with 60 cells, 7 with 300 cells per donor; 1,100-2,000 genes each), 60 / 300
cells: default 0.045-0.065 (mean 0.055) / 0.047-0.069 (mean 0.055); Kauermann–Carroll with the Bell–McCaffrey df
0.016-0.154 / 0.036-0.081; with t(K - q) 0.057-0.201 / 0.059-0.117; Mancl–DeRouen 0.019-0.040 / 0.026-0.039.

Condition within donors (two samples per donor, donor-specific responses with sd 0.25; the default is plain
Mancl–DeRouen): 6 x 60 cells 0.032 / 0.047 / 0.047 / 0.032 (another gene set: default 0.043, Kauermann–Carroll 0.060);
6 x 300: 0.038 / 0.055 / 0.055 / 0.038; 8 x 60 (2 batches): 0.052 / 0.067 / 0.067 / 0.052; 20 x 60:
0.057 / 0.063 / 0.063 / 0.057 (another gene set: 0.045, 0.049).

Kauermann–Carroll with t(K - q) is liberal with 6 unequal donors (up to 0.129), Mancl–DeRouen conservative on a
donor trait with 6 (0.018-0.040); the Bell–McCaffrey df repairs some unequal sets but not all (0.081) and is
conservative on others (0.032); with the default correction it is conservative (0.013-0.032 on unequal sets), so
the default df is the donor count. Fay–Graubard (bound 0.75) with its df or with t(K - q) gave 0.027-0.120 on the
6-donor sets, no correction 0.062-0.216. With simulate's default 3 batches each batch holds case and control
donors, the batch effect cancels from the contrast but not from the donor residuals, and every correction is
conservative (6 x 60 equal: 0.033 / 0.027 / 0.034 / 0.018): the test of ``~ condition`` then ignores a blocking
factor, which costs power, not validity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy import stats

from ._families import FAMILIES

__all__ = [
    "GEE_DF_METHODS",
    "GEE_FAMILIES",
    "GEE_SMALL_SAMPLE",
    "ClusterDF",
    "GEEData",
    "GEEResult",
    "cluster_df",
    "fit_gee",
    "md_scale",
    "nb_alpha_moment",
    "prepare_gee",
    "sandwich_from_blocks",
]

GEE_FAMILIES: tuple[str, ...] = tuple(FAMILIES)[:3]
"""Families the GEE fits: the first three of the GLMM families (``nb``, ``poisson``, ``binomial``); no Gaussian."""

GEE_SMALL_SAMPLE: tuple[str, ...] = ("md_scaled", "kc", "md", "none")
"""Small-sample corrections of the cluster-robust sandwich (:func:`sandwich_from_blocks`)."""

GEE_DF_METHODS: tuple[str, ...] = ("satterthwaite", "clusters")
"""Degrees-of-freedom rules of the t tests (module docstring, step 5)."""

_ALPHA_MIN, _ALPHA_MAX = 1e-8, 1e4
_BLOCK_ELEMENTS = 2_000_000  # cells × genes per vectorised block (~16 MB per dense array)
_BETA_MAX = 30.0  # |coefficient| on the link scale beyond which a fit has run off to infinity (exp(30) ~ 1e13)


@dataclass(frozen=True)
class GEEData:
    """What every gene of one cell group shares: design, offsets, cluster codes, contrast rows, df, family."""

    X: np.ndarray
    offset: np.ndarray | None
    clusters: np.ndarray
    Ls: tuple[np.ndarray, ...]
    """Per contrast its rows (k × p): one row for a t test, several for a joint F test."""
    df: float
    family: str
    min_cells: int
    small_sample: str = "md_scaled"
    df_method: str = "clusters"
    md_scales: tuple[float, ...] = ()
    """Per contrast, the factor of the ``"md_scaled"`` sandwich (:func:`md_scale`); empty: 1 for every contrast."""
    maxiter: int = 100
    n_between: int = 0
    """Design columns constant within every cluster (``q``; ``df = n_clusters - q``)."""


class GEEResult(NamedTuple):
    """Fits of one block of genes (rows in gene order); per contrast (columns) where the tests differ."""

    coef: np.ndarray
    """genes × contrasts: ``L beta`` (natural-log / log-odds scale); NaN for a joint test or an unusable fit"""
    se: np.ndarray
    """genes × contrasts: its corrected sandwich standard error"""
    stat: np.ndarray
    """genes × contrasts: t, or F for a joint test of several rows"""
    df: np.ndarray
    """genes × contrasts: denominator degrees of freedom of the test"""
    pvalue: np.ndarray
    """genes × contrasts"""
    base_mean: np.ndarray
    """genes: mean count per cell"""
    dispersion: np.ndarray
    """genes: NB2 ``alpha`` (NaN for other families)"""
    working_corr: np.ndarray
    """genes: the exchangeable working correlation ``rho``"""
    n_iter: np.ndarray
    """genes: GEE iterations"""
    converged: np.ndarray
    """genes × contrasts (bool)"""
    status: np.ndarray
    """genes × contrasts (object): ``"ok"`` or why the gene has no test"""


def prepare_gee(
    X: np.ndarray,
    clusters: np.ndarray,
    n_clusters: int,
    Ls: Sequence[np.ndarray],
    *,
    offset: np.ndarray | None = None,
    family: str = "nb",
    min_cells: int = 0,
    small_sample: str = "md_scaled",
    df_method: str = "clusters",
) -> GEEData:
    """What every gene of one cell group shares, from the design ``X`` (cells × p), the cluster code of each cell
    (``0 .. n_clusters - 1``) and the rows ``L`` (k × p) of each contrast.

    The df of the tests is ``n_clusters - q`` (:func:`cluster_df`; the caller checks that it is at least 1), and each
    contrast gets its ``"md_scaled"`` factor (:func:`md_scale`).
    """
    if family not in GEE_FAMILIES:
        raise ValueError(f"family={family!r} is not a GEE family; use one of {list(GEE_FAMILIES)}.")
    if small_sample not in GEE_SMALL_SAMPLE:
        raise ValueError(f"small_sample={small_sample!r} is not known; use one of {list(GEE_SMALL_SAMPLE)}.")
    if df_method not in GEE_DF_METHODS:
        raise ValueError(f"df_method={df_method!r} is not known; use one of {list(GEE_DF_METHODS)}.")
    Ls = tuple(np.atleast_2d(L) for L in Ls)
    cdf = cluster_df(X, clusters, n_clusters)
    return GEEData(
        X=np.ascontiguousarray(X, dtype=float),
        offset=offset,
        clusters=clusters,
        Ls=Ls,
        df=float(cdf.df),
        md_scales=tuple(md_scale(L, cdf.const, n_clusters) for L in Ls),
        family=family,
        min_cells=min_cells,
        small_sample=small_sample,
        df_method=df_method,
        n_between=cdf.n_between,
    )


class ClusterDF(NamedTuple):
    """Degrees of freedom of the GEE's tests: clusters minus the design columns constant within every cluster."""

    df: int
    n_between: int
    """design columns constant within every cluster (``q``)"""
    const: np.ndarray
    """mask of those columns"""


def cluster_df(X: np.ndarray, clusters: np.ndarray, n_clusters: int) -> ClusterDF:
    """``n_clusters - q``, ``q`` and the mask of the ``q`` design columns constant within every cluster."""
    const = np.ones(X.shape[1], dtype=bool)
    for c in range(n_clusters):
        Xc = X[clusters == c]
        if Xc.shape[0] > 1:
            const &= np.ptp(Xc, axis=0) <= 1e-12 * (1.0 + np.abs(Xc).max(axis=0))
    n_between = int(const.sum())
    return ClusterDF(df=n_clusters - n_between, n_between=n_between, const=const)


def md_scale(L: np.ndarray, const: np.ndarray, n_clusters: int) -> float:
    """Factor of the ``"md_scaled"`` sandwich: ``(K - q) / K`` (``K`` clusters, ``q`` design columns constant within
    every cluster) when every contrast row involves donor-level columns only, else 1 (plain Mancl–DeRouen).

    For a donor-level contrast with donors of equal weight every donor has leverage ``q / K``, and the factor turns
    Mancl–DeRouen's ``(1 - q/K)^-1`` inflation into Kauermann–Carroll's ``(1 - q/K)^-1/2`` (unbiased there, and the
    t(K - q) test is then the exact two-sample t test on donor means). A contrast within donors (e.g. paired samples)
    is estimated from within-donor differences whose spread between donors (donor-specific responses) the
    exchangeable working model does not describe: its weights are unequal where the information is not, and the full
    Mancl–DeRouen correction is what kept such nulls calibrated (module docstring).
    """
    L = np.atleast_2d(L)
    if np.all(np.abs(L[:, ~const]) == 0.0):
        return (n_clusters - int(const.sum())) / n_clusters
    return 1.0


def fit_gee(data: GEEData, Y) -> GEEResult:
    """Fit every gene (column) of ``Y`` (cells × genes, CSC sparse or dense); arrays in gene order.

    All genes of the chunk iterate together (:func:`gee_fit_batch`); genes leave the iteration as they converge.
    One fit per gene serves every contrast of ``data.Ls``.
    """
    Yd = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    Yd = np.asarray(Yd, dtype=float)
    n_genes = Yd.shape[1]
    k = len(data.Ls)
    # per contrast (columns): what the tests give; the fit's own quantities stay one per gene
    out = {c: np.full((n_genes, k), np.nan) for c in ("coef", "se", "stat", "df", "pvalue")}
    out.update({c: np.full(n_genes, np.nan) for c in ("base_mean", "dispersion", "working_corr", "n_iter")})
    out["converged"] = np.zeros((n_genes, k), dtype=bool)
    out["status"] = np.full((n_genes, k), "ok", dtype=object)
    out["base_mean"] = Yd.mean(axis=0)
    out["df"][:] = data.df
    n_expr = np.count_nonzero(Yd, axis=0)
    few = n_expr < max(data.min_cells, 1)
    out["status"][few] = "too few expressing cells"
    if data.family == "binomial":
        Yd = (Yd > 0).astype(float)
        every = ~few & (n_expr == Yd.shape[0])
        out["status"][every] = "expressed in every cell"
        few |= every
    todo = np.flatnonzero(~few)
    if todo.size == 0:
        return GEEResult(**out)
    # genes fitted together in sub-blocks of about _BLOCK_ELEMENTS cells × genes (bounded memory for many cells;
    # the fits are per gene, so the blocking does not change any result); one fit serves every contrast
    step = max(1, _BLOCK_ELEMENTS // max(Yd.shape[0], 1))
    parts = [gee_fit_batch(Yd[:, todo[i : i + step]], data) for i in range(0, todo.size, step)]
    fit = {key: np.concatenate([pt[key] for pt in parts]) for key in parts[0]}
    for key in ("dispersion", "working_corr", "n_iter", "df"):
        out[key][todo] = fit[key]
    status = fit["status"]
    converged = fit["converged"]
    beta, cov = fit["beta"], fit["cov"]
    fine = status == "ok"
    conv = fine & converged
    for j, L in enumerate(data.Ls):
        scale = data.md_scales[j] if data.small_sample == "md_scaled" and data.md_scales else 1.0
        st = out["status"][:, j]
        st[todo[~fine]] = status[~fine]
        out["converged"][todo, j] = conv
        st[todo[fine & ~converged]] = "not converged"
        if L.shape[0] == 1:
            with np.errstate(invalid="ignore"):
                est = beta @ L[0]
                se = np.sqrt(np.maximum(scale * np.einsum("a,gab,b->g", L[0], cov, L[0]), 0.0))
            g = todo[fine]
            out["coef"][g, j], out["se"][g, j] = est[fine], se[fine]
            test = conv & (se > 0)
            t = est[test] / se[test]
            out["stat"][todo[test], j] = t
            out["pvalue"][todo[test], j] = 2.0 * stats.t.sf(np.abs(t), out["df"][todo[test], j])
            continue
        q = L.shape[0]
        for i in np.flatnonzero(conv):
            est = L @ beta[i]
            V = scale * (L @ cov[i] @ L.T)
            try:
                w = float(est @ np.linalg.solve(V, est))
            except np.linalg.LinAlgError:
                st[todo[i]], out["converged"][todo[i], j] = "singular contrast covariance", False
                continue
            out["stat"][todo[i], j] = w / q
            out["pvalue"][todo[i], j] = float(stats.f.sf(w / q, q, data.df))
    return GEEResult(**out)


class _Clusters:
    """Cells sorted by cluster once, so per-cluster sums are one ``np.add.reduceat`` over contiguous rows."""

    def __init__(self, codes: np.ndarray):
        self.order = np.argsort(codes, kind="stable")
        sorted_codes = codes[self.order]
        self.starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        self.sizes = np.diff(np.r_[self.starts, codes.size]).astype(float)

    def sums(self, A: np.ndarray) -> np.ndarray:
        """Per-cluster sums of the rows of ``A`` (cells in sorted order × genes): clusters × genes."""
        return np.add.reduceat(A, self.starts, axis=0)


def _mean_funcs(family: str, eta: np.ndarray, alpha: np.ndarray | None):
    """``mu``, ``dmu/deta`` and the variance function of a family at ``eta`` (cells × genes)."""
    if family == "binomial":
        mu = 1.0 / (1.0 + np.exp(-np.clip(eta, -700, 700)))
        dmu = mu * (1.0 - mu)
        return mu, dmu, dmu
    mu = np.exp(np.minimum(eta, 700.0))
    var = mu if alpha is None else mu + alpha[None, :] * mu * mu
    return mu, mu, var


def _glm_start(Y, X, off, family: str, maxiter: int = 50):
    """IRLS of the independence GLM (Poisson or logistic, canonical link), all genes at once: ``(beta, mu)``.

    Started as statsmodels' GLM (``mu = (y + mean(y)) / 2``); stops when no coefficient moves by more than 1e-10.
    Genes whose coefficients run off (separation) are left where ``maxiter`` puts them; the GEE flags them.
    """
    n, p = X.shape
    G = Y.shape[1]
    XX = np.einsum("na,nb->nab", X, X).reshape(n, p * p)
    mu = (Y + Y.mean(axis=0)[None, :]) / 2.0
    if family == "binomial":
        mu = np.clip(mu, 1e-3, 1 - 1e-3)
        eta = np.log(mu / (1.0 - mu))
    else:
        eta = np.log(np.maximum(mu, 1e-8))
    beta = np.zeros((G, p))
    # compact working copies of the genes still moving; written back when the set shrinks (column copies of
    # cells × genes arrays are the main cost, so they are made only when a quarter of the genes has settled)
    active = np.arange(G)
    Ya, mua, etaa, ba = Y, mu, eta, beta.copy()
    for it in range(maxiter):
        dmu = mua * (1.0 - mua) if family == "binomial" else mua
        z = etaa - off[:, None] + (Ya - mua) / np.maximum(dmu, 1e-300)
        w = dmu  # canonical link: dmu^2 / V(mu) = dmu
        XtWX = (w.T @ XX).reshape(-1, p, p)
        XtWz = (w * z).T @ X
        try:
            new = np.linalg.solve(XtWX, XtWz[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            new = np.stack([np.linalg.lstsq(A, b, rcond=None)[0] for A, b in zip(XtWX, XtWz, strict=True)])
        step = np.max(np.abs(new - ba), axis=1) if it > 0 else np.full(active.size, 1.0)
        ba = new
        etaa = X @ new.T + off[:, None]
        mua = _mean_funcs(family, etaa, None)[0]
        moving = ~((step < 1e-10) | ~np.isfinite(step) | (np.max(np.abs(new), axis=1) > 2 * _BETA_MAX))
        done = ~moving.any() or it == maxiter - 1
        if done or moving.sum() < 0.75 * moving.size:
            beta[active] = ba
            mu[:, active] = mua
            if done:
                break
            active, Ya, mua, etaa, ba = active[moving], Ya[:, moving], mua[:, moving], etaa[:, moving], ba[moving]
    return beta, mu


def nb_alpha_moment_batch(Y: np.ndarray, Mu: np.ndarray, n_coef: int) -> np.ndarray:
    """:func:`nb_alpha_moment` for every column of ``Y`` / ``Mu`` (cells × genes) at once, the same bisection."""
    Mu = np.maximum(Mu, 1e-12)
    R2 = (Y - Mu) ** 2
    target = max(Y.shape[0] - n_coef, 1)
    M2 = Mu * Mu

    def excess(log_a: np.ndarray) -> np.ndarray:
        return np.sum(R2 / (Mu + np.exp(log_a)[None, :] * M2), axis=0) - target

    G = Y.shape[1]
    lo = np.full(G, math.log(_ALPHA_MIN))
    hi = np.full(G, math.log(_ALPHA_MAX))
    at_lo = excess(lo) <= 0
    at_hi = ~at_lo & (excess(hi) >= 0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        up = excess(mid) > 0
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
        if np.all(hi - lo < 1e-6):
            break
    out = np.exp(0.5 * (lo + hi))
    out[at_lo] = _ALPHA_MIN
    out[at_hi] = _ALPHA_MAX
    return out


def _cluster_terms(Yc, Xc, offc, beta, alpha, family, cl: _Clusters):
    """Per-cluster sums at ``beta`` (all genes): standardized derivative products, scores and Pearson sums."""
    p = Xc.shape[1]
    eta = Xc @ beta.T + offc[:, None]
    mu, dmu, var = _mean_funcs(family, eta, alpha)
    sd = np.sqrt(np.maximum(var, 1e-300))
    dt = dmu / sd  # D_i / sqrt(V_i) = x_i * dt_i
    rt = (Yc - mu) / sd  # Pearson residuals
    K, G = cl.starts.size, beta.shape[0]
    Sww = np.empty((K, G, p, p))
    Sd = np.empty((K, G, p))
    Sdr = np.empty((K, G, p))
    dt2 = dt * dt
    dtr = dt * rt

    def times(x, A):  # x[:, None] * A, skipped for a column of ones (the intercept)
        return A if np.all(x == 1.0) else x[:, None] * A

    for a in range(p):
        Sd[:, :, a] = cl.sums(times(Xc[:, a], dt))
        Sdr[:, :, a] = cl.sums(times(Xc[:, a], dtr))
        for b in range(a + 1):
            Sww[:, :, a, b] = cl.sums(times(Xc[:, a] * Xc[:, b], dt2))
            Sww[:, :, b, a] = Sww[:, :, a, b]
    T = cl.sums(rt)
    ssr = cl.sums(rt * rt)
    return Sww, Sd, Sdr, T, ssr


def _exchangeable_rho(T, ssr, sizes, n: int, p: int) -> np.ndarray:
    """statsmodels' ``Exchangeable.update``: moment estimate of the working correlation from Pearson residuals."""
    scale = ssr.sum(axis=0) / (n - p)
    pairs = float(np.sum(sizes * (sizes - 1) / 2))
    if pairs - p <= 0:
        return np.zeros(T.shape[1])
    return np.sum((T * T - ssr) / 2, axis=0) / scale / (pairs - p)


def _blocks(Sww, Sd, Sdr, T, rho, sizes):
    """Cluster information ``A_d = D_d' V_d^-1 D_d`` and scores ``g_d = D_d' V_d^-1 r_d`` (scale omitted: it cancels)
    under the exchangeable working correlation, from cluster sums (closed-form inverse of ``(1-rho) I + rho 11'``)."""
    f = 1.0 / (1.0 - rho)  # genes
    c = rho[None, :] / (1.0 - rho[None, :] + sizes[:, None] * rho[None, :])  # clusters × genes
    A = f[None, :, None, None] * (Sww - c[:, :, None, None] * Sd[:, :, :, None] * Sd[:, :, None, :])
    g = f[None, :, None] * (Sdr - c[:, :, None] * Sd * T[:, :, None])
    return A, g


def sandwich_from_blocks(
    A: np.ndarray, g: np.ndarray, small_sample: str, c: np.ndarray | None = None, md_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster-robust sandwich covariances (genes × p × p) from cluster information ``A`` (clusters × genes × p × p)
    and scores ``g`` (clusters × genes × p), with a small-sample correction; a flag per gene for a valid result; and,
    for a contrast vector ``c``, the Bell–McCaffrey (Satterthwaite) degrees of freedom of ``c'beta`` (else NaN).

    ``"kc"`` (Kauermann & Carroll 2001), ``"md"`` (Mancl & DeRouen 2001), ``"md_scaled"`` (``"md"`` times
    ``md_scale``, see :func:`md_scale`) or ``"none"`` (Liang–Zeger). The corrections replace each cluster's
    residuals ``r_d`` by ``(I - H_dd)^-1/2 r_d`` (KC) or ``(I - H_dd)^-1 r_d`` (MD), with the cluster leverage
    ``H_dd = D_d B^-1 D_d' V_d^-1`` and ``B = sum_d A_d``. In closed form from p × p matrices: with
    ``M_d = I - B^-1/2 A_d B^-1/2 = Q diag(1 - lam) Q'``, the corrected score is
    ``u_d = B^1/2 Q diag((1 - lam)^-c) Q' B^-1/2 g_d`` (``c = 1/2`` KC, ``1`` MD) and
    ``cov = B^-1 (sum_d u_d u_d') B^-1``. A gene is invalid if ``B`` is singular or a cluster has leverage 1 in some
    direction (``lam >= 1``: that donor alone determines a coefficient).

    Degrees of freedom (Bell & McCaffrey 2002; Pustejovsky & Tipton 2018, as R's clubSandwich): the estimated
    variance of ``c'beta`` is ``sum_d (a_d' r_d)^2`` with ``a_d = V_d^-1 D_d w_d``,
    ``w_d = B^-1/2 Q diag((1 - lam)^-c) Q' B^-1/2 c``. Under the working model the residuals have covariance
    ``V - D B^-1 D'``, so the quadratic form's Satterthwaite df is ``tr(Om)^2 / tr(Om^2)`` with the clusters ×
    clusters matrix ``Om = diag(w_d' A_d w_d) - U' B^-1 U``, ``U = [A_d w_d]``: p × p algebra again. With equal
    leverage in every donor it equals ``clusters - donor-level coefficients``; donors of unequal weight lower it.
    """
    K, G, p, _ = A.shape
    power = {"kc": 0.5, "md": 1.0, "md_scaled": 1.0, "none": 0.0}[small_sample]
    B = A.sum(axis=0)
    B = 0.5 * (B + np.swapaxes(B, 1, 2))
    wb, Ub = np.linalg.eigh(B)
    ok = wb.min(axis=1) > 1e-12 * np.maximum(wb.max(axis=1), 1e-300)
    wb = np.where(ok[:, None], wb, 1.0)
    UbT = np.swapaxes(Ub, 1, 2)
    b_half = (Ub * np.sqrt(wb)[:, None, :]) @ UbT
    b_mhalf = (Ub / np.sqrt(wb)[:, None, :]) @ UbT
    Binv = (Ub / wb[:, None, :]) @ UbT
    Asym = 0.5 * (A + np.swapaxes(A, 2, 3))
    Msym = np.eye(p)[None, None] - b_mhalf[None] @ Asym @ b_mhalf[None]
    lam_c, Q = np.linalg.eigh(0.5 * (Msym + np.swapaxes(Msym, 2, 3)))
    if power > 0:
        good = lam_c.min(axis=2) > 1e-10  # clusters × genes
        ok &= good.all(axis=0)
        lam_c = np.where(good[:, :, None], lam_c, 1.0)
    scale = lam_c**-power

    def corrected(v):  # B^-1/2-side map: Q diag(scale) Q' B^-1/2 v  (v: clusters × genes × p, or genes × p)
        h = np.einsum("gab,...gb->...ga", b_mhalf, v)
        h = np.einsum("kgba,...gb->kga", Q, h) if v.ndim == 2 else np.einsum("kgba,kgb->kga", Q, h)
        return np.einsum("kgab,kgb->kga", Q, scale * h)

    u = np.einsum("gab,kgb->kga", b_half, corrected(g)) if power > 0 else g
    meat = np.einsum("kga,kgb->gab", u, u)
    cov = Binv @ meat @ Binv
    if small_sample == "md_scaled":
        cov *= md_scale
    df = np.full(G, np.nan)
    if c is not None:
        cg = np.broadcast_to(np.asarray(c, dtype=float), (G, p))
        w = np.einsum("gab,kgb->kga", b_mhalf, corrected(cg))
        U = np.einsum("kgab,kgb->kga", Asym, w)
        s = np.einsum("kga,kga->gk", w, U)
        Om = -np.einsum("kga,gab,jgb->gkj", U, Binv, U)
        idx = np.arange(K)
        Om[:, idx, idx] += s
        tr = np.trace(Om, axis1=1, axis2=2)
        tr2 = np.einsum("gkj,gjk->g", Om, Om)
        with np.errstate(divide="ignore", invalid="ignore"):
            df = np.where(tr2 > 0, tr * tr / tr2, np.nan)
    return cov, ok, df


def gee_fit_batch(Y: np.ndarray, data: GEEData) -> dict[str, np.ndarray]:
    """GEE (exchangeable working correlation) for every column of ``Y`` (cells × genes) at once.

    The alternating updates are statsmodels' ``GEE.fit``: a Fisher-scoring step for ``beta`` at the current working
    correlation ``rho``, and ``rho`` from statsmodels' moment estimator at the current ``beta``. Genes leave the
    iteration when no coefficient moves by more than 1e-9 and ``rho`` by no more than 1e-9; a gene counts as
    converged when its last steps are below 1e-6 (far below any standard error). The covariance is the corrected
    sandwich at the solution (:func:`sandwich_from_blocks`).
    """
    X, fam = data.X, data.family
    n, p = X.shape
    G = Y.shape[1]
    off = np.zeros(n) if data.offset is None else np.asarray(data.offset, dtype=float)
    start_family = "binomial" if fam == "binomial" else "poisson"
    beta0, mu0 = _glm_start(Y, X, off, start_family)
    alpha = nb_alpha_moment_batch(Y, mu0, p) if fam == "nb" else None
    cl = _Clusters(np.asarray(data.clusters))
    Xc, offc, Yc = X[cl.order], off[cl.order], Y[cl.order]
    sizes = cl.sizes
    n_max = float(sizes.max())
    rho_lo = -1.0 / (n_max - 1.0) * 0.999 if n_max > 1 else -0.999

    beta = beta0.copy()
    rho = np.zeros(G)
    n_iter = np.zeros(G)
    last_step = np.full(G, np.inf)
    status = np.full(G, "ok", dtype=object)
    if fam == "binomial":
        perfect = np.all(np.isclose(mu0, Y, rtol=1e-5, atol=1e-8), axis=0)
        status[perfect] = "perfect separation"
    active = np.flatnonzero(status == "ok")
    for it in range(data.maxiter):
        if active.size == 0:
            break
        a_alpha = None if alpha is None else alpha[active]
        Sww, Sd, Sdr, T, ssr = _cluster_terms(Yc[:, active], Xc, offc, beta[active], a_alpha, fam, cl)
        rho_new = np.clip(_exchangeable_rho(T, ssr, sizes, n, p), rho_lo, 0.999)
        A, g = _blocks(Sww, Sd, Sdr, T, rho_new, sizes)
        B = A.sum(axis=0)
        score = g.sum(axis=0)
        try:
            upd = np.linalg.solve(B, score[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            upd = np.stack([np.linalg.lstsq(b, s_, rcond=None)[0] for b, s_ in zip(B, score, strict=True)])
        step = np.maximum(np.max(np.abs(upd), axis=1), np.abs(rho_new - rho[active]))
        beta[active] += upd
        rho[active] = rho_new
        n_iter[active] = it + 1
        last_step[active] = step
        bad = ~np.all(np.isfinite(beta[active]), axis=1)
        status[active[bad]] = "fit failed: non-finite coefficients"
        runaway = ~bad & (np.max(np.abs(beta[active]), axis=1) > _BETA_MAX)
        status[active[runaway]] = "diverged: no counts in some level of the design (separation)"
        done = bad | runaway | (step < 1e-9)
        active = active[~done]
    converged = (last_step < 1e-6) & (status == "ok")

    cov = np.full((G, p, p), np.nan)
    df = np.full((G, len(data.Ls)), data.df)
    fine = np.flatnonzero(status == "ok")
    if fine.size:
        a_alpha = None if alpha is None else alpha[fine]
        Sww, Sd, Sdr, T, ssr = _cluster_terms(Yc[:, fine], Xc, offc, beta[fine], a_alpha, fam, cl)
        A, g = _blocks(Sww, Sd, Sdr, T, rho[fine], sizes)
        c_vecs = [L[0] if (data.df_method == "satterthwaite" and L.shape[0] == 1) else None for L in data.Ls]
        # the Bell-McCaffrey df does not change with a scalar factor: md_scaled's factor is applied per contrast
        c, ok, dfs = sandwich_from_blocks(A, g, data.small_sample, c_vecs[0], md_scale=1.0)
        cov[fine] = c
        for j, c_vec in enumerate(c_vecs):
            if c_vec is None:
                continue
            if j > 0:  # each t test has its own df (the covariance is the same)
                dfs = sandwich_from_blocks(A, g, data.small_sample, c_vec)[2]
            df[fine, j] = np.minimum(dfs, data.df)
        status[fine[~ok]] = "singular sandwich: one donor determines a coefficient"
    return {
        "beta": beta,
        "cov": cov,
        "converged": converged,
        "status": status,
        "dispersion": np.full(G, np.nan) if alpha is None else alpha,
        "working_corr": rho,
        "n_iter": n_iter,
        "df": df,
    }


def nb_alpha_moment(y: np.ndarray, mu: np.ndarray, n_coef: int) -> float:
    """NB2 dispersion ``alpha`` solving ``sum (y - mu)^2 / (mu + alpha mu^2) = n - p`` (MASS ``theta.mm``).

    The left side decreases in ``alpha``; if it is already below ``n - p`` at ``alpha = 0`` (no over-dispersion
    relative to Poisson) the lower bound ``1e-8`` is returned. Solved by bisection on ``log alpha`` in
    ``[1e-8, 1e4]``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.negative_binomial(2.0, 2.0 / (2.0 + 5.0), 20000).astype(float)  # mean 5, alpha 0.5
    >>> round(nb_alpha_moment(y, np.full(y.size, y.mean()), 1), 1)
    0.5
    """
    mu = np.maximum(mu, 1e-12)
    r2 = (y - mu) ** 2
    target = max(y.size - n_coef, 1)

    def excess(log_a: float) -> float:
        return float(np.sum(r2 / (mu + math.exp(log_a) * mu * mu))) - target

    lo, hi = math.log(_ALPHA_MIN), math.log(_ALPHA_MAX)
    if excess(lo) <= 0:
        return _ALPHA_MIN
    if excess(hi) >= 0:
        return _ALPHA_MAX
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return math.exp(0.5 * (lo + hi))
