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

Steps 1-3 run per gene in a numba kernel (:mod:`scmlm.models.gee_kernel`: cells sorted by donor and design row, a
few passes over the cells per gene); steps 4-5 are p × p algebra vectorised over genes
(:mod:`scmlm.models.gee_sandwich`).

1. Poisson (``binomial``: logistic) GLM with the offset: marginal means ``mu0`` and starting values.
2. ``nb`` only: NB2 dispersion ``alpha`` from the Pearson moment equation
   ``sum (y - mu0)^2 / (mu0 + alpha mu0^2) = n - p`` (the estimator of MASS's ``theta.mm``); ``alpha`` is the
   *marginal* over-dispersion (between-donor variation included), the variance the GEE's working model needs.
3. GEE with exchangeable working correlation, the same alternating updates and moment estimator of ``rho`` as
   statsmodels' ``GEE(..., cov_struct=Exchangeable())`` (tests check coefficients, ``rho`` and the sandwich against
   it). The inverse of ``(1 - rho) I + rho 11'`` is closed-form, so every quantity is a per-donor sum over cells.
4. Covariance: the cluster-robust sandwich with a small-sample correction (``small_sample``), in closed form from
   p × p matrices (:func:`sandwich_from_blocks`). Default ``"avg"``: for a contrast of donor-level columns the
   average of the Kauermann–Carroll (``(I - H_dd)^-1/2 r_d``) and Mancl–DeRouen (``(I - H_dd)^-1 r_d``)
   covariances (Ford & Westgate 2017); for a joint test of donor-level rows Mancl–DeRouen times ``(K - q) / K``
   (Kauermann–Carroll's value when donors carry equal weight); for a contrast within donors Mancl–DeRouen.
   Kauermann–Carroll is unbiased when the working weights are right; with few donors they are not (``rho`` is
   estimated from a handful of donor means), the donors the working model trusts most get too much weight and
   Kauermann–Carroll is too small (21 % of null p < 0.05 with 2 v 2 donors of unequal size). Mancl–DeRouen
   over-corrects by ``K / (K - q)`` when donors carry equal weight (2.7 % with 3 v 3 donors × 2,000 cells). The
   average is within the band in both cases and in the designs below. Also ``"md_scaled"`` (the previous default:
   Mancl–DeRouen times ``(K - q) / K`` for a donor-level contrast), ``"kc"``, ``"md"`` and ``"none"``.
5. Tests (``df_method="design"``, default). A t test of a donor-level contrast uses the Satterthwaite df of the same
   contrast in the donor-level design (one row per donor, equal weights, CR2 sandwich; :func:`design_df`), at most
   ``K - q``: two groups of donors give ``K - 2``; a pairwise contrast of three dose groups of 4 donors rests on 8
   donors' residuals and gets Welch's 6, not ``K - q = 9`` (with 9: 7.0-7.8 % of null p < 0.05). A joint test of
   ``k`` donor-level rows is Hotelling's T² approximation with Zhang's df ``eta`` of the same donor-level design
   (HTZ; 6.75 for the dose design, at most ``K - q``): ``F = W (eta - k + 1) / (eta k)`` on ``(k, eta - k + 1)``
   df, the covariance Mancl–DeRouen times ``(K - q) / K`` -- clubSandwich's CR2 + HTZ Wald test when donors carry
   equal weight. (With the average covariance and ``eta = K - q``, the rule before: 0.051-0.071 of null p < 0.05
   on seven sets of dose nulls, four of them above 0.06; with the average and Zhang's ``eta``: 0.031-0.053.) A t
   test within donors uses the Bell–McCaffrey df of the Kauermann–Carroll-adjusted sandwich under the working model,
   at most ``K - q``: the donors whose cells the working model trusts most dominate the estimate (6 paired donors of
   50-400 cells per sample: median df 3.7-4.6 instead of 5; 0.066 with 5, 0.056 with these). A joint test within
   donors: Hotelling on ``K - q``. ``df_method="clusters"``: ``K - q`` and ``F = W / k`` everywhere;
   ``"satterthwaite"``: Bell–McCaffrey df under the working model (t tests).

Calibration of the default (fraction of null p < 0.05 / p < 0.01, pooled over 2-6 data sets of 800-1,000 genes;
nulls of ``tests/gee_nulls.py``: donor effects with gene-to-gene spread of their variance, NB counts, donors of
50-400 cells unless noted; ``benchmarks/calib_gee.py``):

    2 v 2 donors x 200 cells       0.039 / 0.010      2 v 2 donors, 50-400 cells        0.028 / 0.005 (conservative)
    3 v 3 donors                   0.048 / 0.014      3 v 3 donors x 2,000 cells        0.055 / 0.004
    4 v 4 donors (6 data sets)     0.057 / 0.014      4 v 4 donors x 200 cells          0.044 / 0.010
    dose 3 x 4 donors: F           0.049 / 0.008      t d1-d0 0.055 / 0.010, t d2-d1 0.050 / 0.007
    dose 3 x 4 donors x 200 cells  F 0.045 / 0.008    t d1-d0 0.047 / 0.008, t d2-d1 0.040 / 0.007
    ~ batch + condition, 12 donors 0.059 / 0.012      paired, 4 donors                  0.041 / 0.011
    paired, 6 donors               0.056 / 0.010
    binomial: 3 v 3 0.046 / 0.015; dose t 0.057 / 0.015 and 0.046 / 0.015, dose F 0.059 / 0.018;
    ~ batch + condition 0.040 / 0.010; paired 4 donors 0.036 / 0.006

2 v 2 donors of unequal size stay conservative: the rules measured there are conservative or liberal (0.061-0.191
per data set with Kauermann–Carroll), none in the band on every draw of donor sizes; the t has 2 df and the right
correction depends on how much of each gene's variance lies between donors (``docs/gee_vs_glmm.md``).

On ``scmlm.datasets.simulate`` nulls (``~ condition``, one batch): 6 donors x 60 cells 0.034 (equal sizes), 0.039
(unequal); 10 x 40 0.034; 20 x 300 unequal 0.045.
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
from .gee_kernel import (
    ST_NONFINITE,
    ST_OK,
    ST_RUNAWAY,
    ST_SEPARATION,
    GEEKernelDesign,
    gee_chunk,
    kernel_design,
    kernel_out,
)
from .gee_sandwich import bm_df, design_df, sandwich_from_blocks

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

GEE_SMALL_SAMPLE: tuple[str, ...] = ("avg", "md_scaled", "kc", "md", "none")
"""Small-sample corrections of the cluster-robust sandwich (:func:`sandwich_from_blocks`)."""

GEE_DF_METHODS: tuple[str, ...] = ("design", "clusters", "satterthwaite")
"""Degrees-of-freedom rules of the t and F tests (module docstring, step 5)."""

_ALPHA_MIN, _ALPHA_MAX = 1e-8, 1e4
_STATUS = {
    ST_SEPARATION: "perfect separation",
    ST_NONFINITE: "fit failed: non-finite coefficients",
    ST_RUNAWAY: "diverged: no counts in some level of the design (separation)",
}


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
    small_sample: str = "avg"
    df_method: str = "design"
    md_scales: tuple[float, ...] = ()
    """Per contrast, the factor of the ``"md_scaled"`` sandwich (:func:`md_scale`); empty: 1 for every contrast."""
    maxiter: int = 100
    n_between: int = 0
    """Design columns constant within every cluster (``q``; ``df = n_clusters - q``)."""
    donor_level: tuple[bool, ...] = ()
    """Per contrast: every row involves design columns constant within donors only."""
    design_dfs: tuple[float, ...] = ()
    """Per contrast, the df of ``df_method="design"``: for a one-row donor-level contrast the donor-level design's
    (:func:`~scmlm.models.gee_sandwich.design_df`, at most ``n_clusters - q``), else ``n_clusters - q`` (for a joint
    test the ``eta`` of Hotelling's T² approximation)."""
    kernel: GEEKernelDesign | None = None
    """Cells sorted by cluster and design row for the numba kernel (:mod:`scmlm.models.gee_kernel`)."""


class GEEResult(NamedTuple):
    """Fits of one block of genes (rows in gene order); per contrast (columns) where the tests differ."""

    coef: np.ndarray
    """genes × contrasts: ``L beta`` (natural-log / log-odds scale); NaN for a joint test or an unusable fit"""
    se: np.ndarray
    """genes × contrasts: its corrected sandwich standard error"""
    stat: np.ndarray
    """genes × contrasts: t, or F for a joint test of several rows"""
    df: np.ndarray
    """genes × contrasts: (denominator) degrees of freedom of the test"""
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
    small_sample: str = "avg",
    df_method: str = "design",
) -> GEEData:
    """What every gene of one cell group shares, from the design ``X`` (cells × p), the cluster code of each cell
    (``0 .. n_clusters - 1``) and the rows ``L`` (k × p) of each contrast.

    The df of the tests is ``n_clusters - q`` (:func:`cluster_df`; the caller checks that it is at least 1), or, with
    ``df_method="design"``, for a one-row donor-level contrast the df of the donor-level design (:func:`design_df`);
    each contrast gets its ``"md_scaled"`` factor (:func:`md_scale`).
    """
    if family not in GEE_FAMILIES:
        raise ValueError(f"family={family!r} is not a GEE family; use one of {list(GEE_FAMILIES)}.")
    if small_sample not in GEE_SMALL_SAMPLE:
        raise ValueError(f"small_sample={small_sample!r} is not known; use one of {list(GEE_SMALL_SAMPLE)}.")
    if df_method not in GEE_DF_METHODS:
        raise ValueError(f"df_method={df_method!r} is not known; use one of {list(GEE_DF_METHODS)}.")
    Ls = tuple(np.atleast_2d(np.asarray(L, dtype=float)) for L in Ls)
    X = np.ascontiguousarray(X, dtype=float)
    clusters = np.asarray(clusters).astype(np.int64)
    cdf = cluster_df(X, clusters, n_clusters)
    donor_level = tuple(bool(np.all(L[:, ~cdf.const] == 0.0)) for L in Ls)
    dfs = []
    for L, between in zip(Ls, donor_level, strict=True):
        d = float(cdf.df)
        if df_method == "design" and between and cdf.df >= 1:
            first = np.r_[True, np.diff(np.sort(clusters)) != 0]
            Z = X[np.argsort(clusters, kind="stable")][first][:, cdf.const]
            d = min(design_df(Z, L[:, cdf.const]), d)
        dfs.append(d)
    fam_code = GEE_FAMILIES.index(family)
    return GEEData(
        X=X,
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
        donor_level=donor_level,
        design_dfs=tuple(dfs),
        kernel=kernel_design(X, clusters, n_clusters, offset, fam_code, 100),
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
    Mancl–DeRouen's ``(1 - q/K)^-1`` inflation into Kauermann–Carroll's ``(1 - q/K)^-1/2``.
    """
    L = np.atleast_2d(L)
    if np.all(np.abs(L[:, ~const]) == 0):
        return (n_clusters - int(const.sum())) / n_clusters
    return 1.0


def _correction(data: GEEData, j: int) -> tuple[str, float]:
    """The correction of contrast ``j`` and its scalar factor: the default ``"avg"`` is the average of
    Kauermann–Carroll and Mancl–DeRouen for a one-row donor-level contrast, Mancl–DeRouen times ``(K - q) / K`` for
    a joint test of donor-level rows (Kauermann–Carroll's when donors have equal leverage; with Zhang's df of the
    donor-level design this is the CR2 + HTZ test of clubSandwich) and Mancl–DeRouen for a contrast within donors."""
    if data.small_sample == "avg":
        between = data.donor_level[j] if data.donor_level else True
        if between and data.Ls[j].shape[0] > 1:
            return "md", (data.md_scales[j] if data.md_scales else 1.0)
        return ("avg" if between else "md"), 1.0
    if data.small_sample == "md_scaled":
        return "md", (data.md_scales[j] if data.md_scales else 1.0)
    return data.small_sample, 1.0


def fit_gee(data: GEEData, Y) -> GEEResult:
    """Fit every gene (column) of ``Y`` (cells × genes, CSC sparse or dense); arrays in gene order.

    Each gene is fitted by the numba kernel (:func:`~scmlm.models.gee_kernel.gee_chunk`), which returns the
    per-donor information and scores at the solution; the corrected sandwich and the tests of every contrast of
    ``data.Ls`` follow from them, vectorised over genes.
    """
    C = sp.csc_matrix(Y, dtype=float)
    C.sum_duplicates()
    n_cells, n_genes = C.shape
    k = len(data.Ls)
    out = {c: np.full((n_genes, k), np.nan) for c in ("coef", "se", "stat", "df", "pvalue")}
    out.update({c: np.full(n_genes, np.nan) for c in ("base_mean", "dispersion", "working_corr", "n_iter")})
    out["converged"] = np.zeros((n_genes, k), dtype=bool)
    out["status"] = np.full((n_genes, k), "ok", dtype=object)
    out["base_mean"] = np.asarray(C.sum(axis=0)).ravel() / max(n_cells, 1)
    for j, L in enumerate(data.Ls):  # the df of a contrast, reported for every gene (unusable fits included)
        base = data.design_dfs[j] if data.df_method == "design" and data.design_dfs else data.df
        out["df"][:, j] = max(base - L.shape[0] + 1.0, 1e-3) if _hotelling(data, L) else base
    n_expr = np.asarray((C != 0).sum(axis=0)).ravel()
    few = n_expr < max(data.min_cells, 1)
    out["status"][few] = "too few expressing cells"
    if data.family == "binomial":
        every = ~few & (n_expr == n_cells)
        out["status"][every] = "expressed in every cell"
        few |= every
    todo = np.flatnonzero(~few)
    if todo.size == 0:
        return GEEResult(**out)
    sub = C if todo.size == n_genes else C[:, todo]  # the chunk as given (float64, 64-bit indices): no copies
    K, p = int(data.kernel.sizes.size), data.X.shape[1]
    kout = kernel_out(todo.size, K, p)
    values = sub.data.astype(float, copy=False)
    rows, starts = sub.indices.astype(np.int64, copy=False), sub.indptr.astype(np.int64, copy=False)
    gee_chunk(data.kernel, values, rows, starts, kout)
    out["dispersion"][todo] = kout.alpha if data.family == "nb" else np.nan
    out["working_corr"][todo] = kout.rho
    out["n_iter"][todo] = kout.n_iter
    status = np.array([_STATUS.get(int(s), "ok") for s in kout.status], dtype=object)
    fine = kout.status == ST_OK
    converged = fine & (kout.last_step < 1e-6)
    A = np.swapaxes(kout.A[fine], 0, 1)  # clusters × genes × p × p
    g = np.swapaxes(kout.g[fine], 0, 1)
    covs, oks = {}, np.ones(fine.sum(), dtype=bool)
    for j in range(k):
        corr, _ = _correction(data, j)
        if corr not in covs:
            covs[corr], ok_c, _ = sandwich_from_blocks(A, g, corr)
            oks &= ok_c
    bad = np.flatnonzero(fine)[~oks]
    status[bad] = "singular sandwich: one donor determines a coefficient"
    fine[bad] = False
    converged &= fine
    for j, L in enumerate(data.Ls):
        corr, factor = _correction(data, j)
        cov = np.full((todo.size, p, p), np.nan)
        cov[np.flatnonzero(kout.status == ST_OK)] = factor * covs[corr]
        df = _test_df(data, j, A, g, corr, kout.status == ST_OK, todo.size)
        out["df"][todo, j] = df
        st = out["status"][:, j]
        st[todo[~fine]] = status[~fine]
        st[todo[fine & ~converged]] = "not converged"
        out["converged"][todo, j] = converged
        htz = _hotelling(data, L)
        if htz:  # Hotelling's T^2 approximation: the reported df is the F test's denominator df
            out["df"][todo, j] = np.maximum(df - L.shape[0] + 1.0, 1e-3)
        _tests(out, j, todo, L, beta=kout.beta, cov=cov, df=df, fine=fine, conv=converged, htz=htz)
    return GEEResult(**out)


def _hotelling(data: GEEData, L: np.ndarray) -> bool:
    """Whether a joint test uses Hotelling's T² approximation (``df_method="design"``, several rows)."""
    return data.df_method == "design" and L.shape[0] > 1


def _test_df(data: GEEData, j: int, A, g, corr: str, fitted: np.ndarray, n: int) -> np.ndarray:
    """Per gene the (denominator) df of contrast ``j``: the donor-level design's (``"design"``; a joint test's
    Hotelling ``eta = n_clusters - q``), ``n_clusters - q`` (``"clusters"``) or the Bell–McCaffrey df under the
    working model capped there (``"satterthwaite"``, one-row contrasts; joint tests use ``n_clusters - q``)."""
    L = data.Ls[j]
    df = np.full(n, data.df)
    if data.df_method == "design" and data.design_dfs:
        df[:] = data.design_dfs[j]
        within = data.donor_level and not data.donor_level[j]
        if within and L.shape[0] == 1 and fitted.any():  # Bell–McCaffrey df, CR2 adjustment, working model
            df[fitted] = np.fmin(bm_df(A, L[0], 0.5), data.df)
    elif data.df_method == "satterthwaite" and L.shape[0] == 1 and fitted.any():
        bm = sandwich_from_blocks(A, g, corr if corr != "avg" else "kc", L[0])[2]
        df[fitted] = np.minimum(bm, data.df)
    return df


def _tests(out, j, todo, L, *, beta, cov, df, fine, conv, htz: bool) -> None:
    """t (one row) or F (several rows) for contrast ``j`` into ``out``. A joint test with the ``"design"`` df
    (``htz``) is Hotelling's T² approximation with ``eta = n_clusters - q``: ``F = W (eta - k + 1) / (eta k)`` on
    ``(k, eta - k + 1)`` df; otherwise ``F = W / k`` on ``(k, df)``."""
    k = L.shape[0]
    if k == 1:
        with np.errstate(invalid="ignore"):
            est = beta @ L[0]
            se = np.sqrt(np.maximum(np.einsum("a,gab,b->g", L[0], cov, L[0]), 0.0))
        g = todo[fine]
        out["coef"][g, j], out["se"][g, j] = est[fine], se[fine]
        test = conv & (se > 0)
        t = est[test] / se[test]
        out["stat"][todo[test], j] = t
        out["pvalue"][todo[test], j] = 2.0 * stats.t.sf(np.abs(t), df[test])
        return
    st = out["status"][:, j]
    for i in np.flatnonzero(conv):
        est = L @ beta[i]
        V = L @ cov[i] @ L.T
        try:
            w = float(est @ np.linalg.solve(V, est))
        except np.linalg.LinAlgError:
            st[todo[i]], out["converged"][todo[i], j] = "singular contrast covariance", False
            continue
        if htz:
            df2 = max(df[i] - k + 1.0, 1e-3)
            f = w * df2 / (df[i] * k)
        else:
            df2, f = df[i], w / k
        out["stat"][todo[i], j] = f
        out["pvalue"][todo[i], j] = float(stats.f.sf(f, k, df2))


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
