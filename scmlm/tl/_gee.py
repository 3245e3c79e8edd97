"""Population-average differential expression: a GEE per gene with donors as clusters (statsmodels).

Model, for gene ``g`` and cell ``i`` of donor (cluster) ``d``::

    E[y_i] = mu_i,   link(mu_i) = x_i' beta + offset_i          (marginal mean: no random effect in it)
    Var[y_i] = V(mu_i)                                           NB2: mu + alpha mu^2; Poisson: mu; binomial: p(1-p)
    corr(y_i, y_j) = rho  for two cells of the same donor        (exchangeable working correlation)

``beta`` is the *population-average* effect: how the mean over all donors changes with ``x``. For the log link with a
normal donor intercept it equals the cluster-specific (GLMM) slope; for the logit link it is attenuated towards zero
(see ``docs/gee_vs_glmm.md``).

Steps per gene (all shared work, design, offsets, cluster codes and the df, is done once per cell group):

1. Poisson GLM (independence working model) with the offset: marginal means ``mu0`` and starting values.
2. ``nb`` only: NB2 dispersion ``alpha`` from the Pearson moment equation
   ``sum (y - mu0)^2 / (mu0 + alpha mu0^2) = n - p`` (the estimator of MASS's ``theta.mm``), solved by bisection on
   ``log alpha``; ``alpha`` is the *marginal* over-dispersion (between-donor variation included), the variance the
   GEE's working model needs.
3. ``statsmodels`` GEE with ``Exchangeable()`` working correlation and ``families.NegativeBinomial(alpha)``,
   ``Poisson()`` or ``Binomial()`` (on ``y > 0``).
4. Covariance: the cluster-robust sandwich with a small-sample correction (``small_sample=``): Kauermann–Carroll
   (default), Mancl–DeRouen (statsmodels' ``cov_type="bias_reduced"``) or none, computed in closed form from p × p
   matrices (:func:`sandwich_cov`), O(p^3) per donor instead of statsmodels' (cells × cells) solve per donor.
   On null simulations with 10 donors (60 cells each, ~1,900 tested genes; between-donor condition, df = 8) the
   fraction of p < 0.05 was 0.047 (KC), 0.028 (MD, conservative), 0.064 (none) for NB; with the condition within
   donors (df = 9): 0.050, 0.040, 0.059. Hence KC as the default.
5. Tests: ``t = L'beta / se`` against a t distribution, or for several contrast rows ``F = W / k`` against
   ``F(k, df)``, with ``df = n_donors - (number of design columns constant within every donor)``. The sandwich is an
   average of ``n_donors`` cluster scores, so its precision is set by the donors, not the cells; coefficients of
   donor-level covariates (and the intercept) use up donor degrees of freedom as in the GLMM's containment rule.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .._errors import DesignError, InputError, _fmt_list
from .._settings import settings
from .._validate import category_codes, check_counts, check_obs_keys, check_unique_names, get_matrix
from .._version import __version__
from ..design import build_design, contrast_label
from ..engine import gene_chunks, run_chunks
from ..results import DEResult, finalize_table
from ._common import cell_groups, cell_offset, fit_groups, gene_indices

_FAMILIES = ("nb", "poisson", "binomial")
_SMALL_SAMPLE = ("kc", "md", "none")
_ALPHA_MIN, _ALPHA_MAX = 1e-8, 1e4
_BETA_MAX = 30.0  # |coefficient| on the link scale beyond which a fit has run off to infinity (exp(30) ~ 1e13)
_STAT_COLS = ("coef", "se", "stat", "df", "pvalue", "base_mean", "dispersion", "working_corr", "n_iter")


def gee_de(
    adata: ad.AnnData,
    design: str,
    contrast,
    *,
    groups: str = "donor",
    family: Literal["nb", "poisson", "binomial"] = "nb",
    layer: str | None = None,
    offset: str | None = "log_total",
    groups_key: str | None = None,
    genes: Sequence[str] | None = None,
    min_cells_expressing: int = 10,
    small_sample: Literal["kc", "md", "none"] = "kc",
    n_jobs: int | None = None,
    key_added: str = "gee_de",
    inplace: bool = True,
    copy: bool = False,
) -> DEResult | ad.AnnData | None:
    """Population-average differential expression with a GEE per gene, donors as clusters.

    Each gene gets a marginal GLM fitted by generalized estimating equations (statsmodels) with an exchangeable
    working correlation within ``groups`` (the donor), bias-reduced sandwich standard errors (Mancl–DeRouen) and
    t / F tests with donor-based degrees of freedom. The effect is *population-average*: how the mean over all
    donors changes. With the log link (``"nb"``, ``"poisson"``) it estimates the same slope as a GLMM; with
    ``"binomial"`` the log odds ratio is smaller in magnitude than the GLMM's cluster-specific one
    (``docs/gee_vs_glmm.md``).

    Parameters
    ----------
    adata
        Cells × genes AnnData with raw counts in ``.X`` or ``layer``.
    design
        Fixed-effect formula over ``adata.obs``, e.g. ``"~ condition"`` or ``"~ batch + condition"``. No random terms:
        the cluster is given by ``groups``.
    contrast
        ``(factor, test_level, reference_level)``, a coefficient name or a numeric vector over the design's columns
        (a t test); or a list of such specifications / a 2-D array of rows (a joint Wald F test; ``coef`` and ``se``
        are then NaN and ``stat`` is F).
    groups
        obs column defining the clusters (donors). Cells of a cluster are correlated; clusters are independent.
    family
        ``"nb"``: negative binomial (NB2, log link), dispersion ``alpha`` per gene from the Pearson moment equation
        (reported as ``dispersion``). ``"poisson"``: Poisson, log link. ``"binomial"``: detection ``y > 0``, logit link.
    layer
        Layer with raw counts; ``None`` uses ``.X``.
    offset
        ``"log_total"``: log of each cell's total counts over all genes of the layer; the name of a numeric obs column
        holding the offset on the link scale (e.g. log size factors); or ``None``. With ``"binomial"`` an offset acts
        on the logit scale, which approximates a library-size adjustment only for rarely detected genes; consider
        ``offset=None`` and a covariate such as ``log_total`` in the design instead.
    groups_key
        obs column (e.g. cell type): each group gets its own fit, df and multiple-testing correction.
    genes
        Fit only these genes (var names); the table has rows for these genes only.
    min_cells_expressing
        Genes with fewer cells with ``y > 0`` (within a group) keep a row with ``status="too few expressing cells"``.
    small_sample
        Small-sample correction of the cluster-robust sandwich: ``"kc"`` (Kauermann–Carroll, the default), ``"md"``
        (Mancl–DeRouen; equals statsmodels' ``cov_type="bias_reduced"``) or ``"none"`` (Liang–Zeger). See Notes.
    n_jobs
        Worker processes over gene chunks (``None``: ``scmlm.settings.n_jobs``); results do not depend on it.
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}``.
    inplace
        Write into ``adata`` and return ``None``; ``False`` returns the :class:`~scmlm.results.DEResult` instead.
    copy
        Write into a copy of ``adata`` and return it.

    Returns
    -------
    ``None``, the copy, or the result (see ``inplace``/``copy``). One row per gene × group: ``gene, group, contrast,
    coef`` (natural-log / log-odds scale), ``log2fc, se, stat, df, pvalue, padj, base_mean`` (mean count per cell),
    ``method="gee", converged, status``, plus ``dispersion`` (NB2 alpha; NaN for other families), ``working_corr``
    (estimated exchangeable correlation) and ``n_iter``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=8, n_cells=60, n_genes=300, seed=1)
    >>> genes = adata.var_names[:20]
    >>> res = scmlm.tl.gee_de(adata, "~ condition", ("condition", "case", "ctrl"), genes=genes, inplace=False)
    >>> res.table[["gene", "coef", "se", "df", "pvalue"]].shape
    (20, 5)
    >>> float(res.table["df"].iloc[0])  # 8 donors - intercept - condition (both constant within donors)
    6.0
    """
    if family not in _FAMILIES:
        raise InputError(f"family={family!r} is not known; use one of {_fmt_list(_FAMILIES)}.")
    if not isinstance(groups, str):
        raise InputError(f"groups must name one obs column (the donor), got {groups!r}.")
    if small_sample not in _SMALL_SAMPLE:
        raise InputError(f"small_sample={small_sample!r} is not known; use one of {_fmt_list(_SMALL_SAMPLE)}.")
    if int(min_cells_expressing) < 0:
        raise InputError(f"min_cells_expressing={min_cells_expressing} must be >= 0.")
    check_unique_names(adata)
    check_obs_keys(adata, [groups], what="groups")
    check_obs_keys(adata, [groups_key], what="groups_key")
    matrix = get_matrix(adata, layer)
    check_counts(matrix, layer)
    off_all = cell_offset(
        adata, matrix, offset, layer, groups_key=groups_key, design=design, contrast=contrast, cluster=groups
    )
    gene_idx = gene_indices(adata, genes)

    full = build_design(adata.obs, design, check_rank=groups_key is None)
    if full.parsed.has_random:
        terms = " + ".join(str(r) for r in full.parsed.random)
        raise DesignError(
            f"design {design!r} has random term(s) {terms}; GEE takes the cluster from groups= (now {groups!r}) and "
            f"fits fixed effects only. Write design={full.parsed.fixed!r}, groups='donor', or use scmlm.tl.glmm_de "
            "for cluster-specific effects."
        )
    if groups_key is None:
        _contrast_matrix(full, contrast)  # clear errors before any fitting

    def fit(name, rows):
        return _fit_group(
            adata, matrix, off_all, rows, gene_idx, name, design, contrast, groups=groups, family=family,
            min_cells=int(min_cells_expressing), small_sample=small_sample, n_jobs=n_jobs,
        )  # fmt: skip

    def not_estimable(name, err):
        return _failed_rows(adata.var_names[gene_idx], name, _label(contrast), f"not estimable: {err}")

    tables = fit_groups(cell_groups(adata, groups_key), fit, not_estimable, groups_key=groups_key, tool="gee_de")
    table = finalize_table(pd.concat(tables, ignore_index=True))
    params = {
        "tool": "gee_de",
        "design": design,
        "contrast": _contrast_param(contrast),
        "groups": groups,
        "family": family,
        "layer": layer,
        "offset": offset,
        "groups_key": groups_key,
        "genes": None if genes is None else [str(g) for g in adata.var_names[gene_idx]],
        "min_cells_expressing": int(min_cells_expressing),
        "working_correlation": "exchangeable",
        "small_sample": small_sample,
        "df_rule": "n_clusters - n_coefficients_constant_within_clusters",
        "scmlm_version": __version__,
    }
    return DEResult(table=table, params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


# ---------------------------------------------------------------- validation and shared work


def _is_multi(contrast) -> bool:
    if isinstance(contrast, np.ndarray):
        return contrast.ndim == 2
    return (
        isinstance(contrast, list | tuple)
        and len(contrast) > 0
        and all(isinstance(c, list | tuple | np.ndarray) for c in contrast)
    )


def _label(contrast) -> str:
    if _is_multi(contrast):
        return (
            "F(" + ", ".join(contrast_label(c) if not isinstance(c, np.ndarray) else "custom" for c in contrast) + ")"
        )
    return contrast_label(contrast)


def _contrast_param(contrast):
    if isinstance(contrast, str):
        return contrast
    if _is_multi(contrast):
        return [str(list(np.atleast_1d(c))) if isinstance(c, np.ndarray) else str(c) for c in contrast]
    return [str(c) for c in np.atleast_1d(np.asarray(contrast, dtype=object))]


def _contrast_matrix(d, contrast) -> tuple[str, np.ndarray]:
    """``(name, L)`` with ``L`` of shape (k, p): one row for a t test, several for an F test."""
    if not _is_multi(contrast):
        c = d.contrast(contrast)
        return c.name, c.L[None, :]
    rows = [d.contrast(c if not isinstance(c, np.ndarray) else np.asarray(c, dtype=float)) for c in contrast]
    L = np.vstack([r.L for r in rows])
    if np.linalg.matrix_rank(L) < L.shape[0]:
        raise DesignError(
            f"the {L.shape[0]} contrast rows {_fmt_list(r.name for r in rows)} are linearly dependent; drop redundant "
            "rows for the F test."
        )
    return "F(" + ", ".join(r.name for r in rows) + ")", L


def _donor_df(X: np.ndarray, clusters: np.ndarray, n_clusters: int) -> tuple[int, int]:
    """``(df, n_between)``: clusters minus the number of design columns constant within every cluster."""
    const = np.ones(X.shape[1], dtype=bool)
    for c in range(n_clusters):
        Xc = X[clusters == c]
        if Xc.shape[0] > 1:
            const &= np.ptp(Xc, axis=0) <= 1e-12 * (1.0 + np.abs(Xc).max(axis=0))
    n_between = int(const.sum())
    return n_clusters - n_between, n_between


def _failed_rows(genes, group, contrast: str, status: str) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "gene": np.asarray(genes, dtype=object),
            "group": group if group is not None else "all",
            "contrast": contrast,
            "method": "gee",
            "converged": False,
            "status": status,
        }
    )
    for col in _STAT_COLS:
        out[col] = np.nan
    return out


def _fit_group(
    adata, matrix, off_all, rows, gene_idx, group, design, contrast, *, groups, family, min_cells, small_sample, n_jobs
) -> pd.DataFrame:
    obs = adata.obs.iloc[rows]
    d = build_design(obs, design)
    name, L = _contrast_matrix(d, contrast)
    clusters, levels = category_codes(obs[groups])
    n_clusters = len(levels)
    df, n_between = _donor_df(d.X, clusters, n_clusters)
    if n_clusters < 2 or df < 1:
        raise DesignError(
            f"{n_clusters} cluster(s) of {groups!r} and {n_between} design column(s) constant within clusters leave "
            f"{df} donor degrees of freedom; GEE needs more {groups!r} levels than donor-level coefficients."
        )
    sub = matrix[rows] if len(rows) != matrix.shape[0] else matrix
    sub = sub[:, gene_idx] if len(gene_idx) != matrix.shape[1] else sub
    if sp.issparse(sub):
        sub = sp.csc_matrix(sub)
    data = GEEData(
        X=np.ascontiguousarray(d.X, dtype=float),
        offset=None if off_all is None else off_all[rows],
        clusters=clusters,
        L=L,
        df=float(df),
        family=family,
        min_cells=min_cells,
        small_sample=small_sample,
        ftest=_is_multi(contrast),
    )
    chunks = gene_chunks(len(gene_idx), settings.chunk_size)
    parts = run_chunks(functools.partial(fit_chunk, data), sub, chunks, n_jobs=n_jobs, desc=f"GEE {group or ''}")
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = pd.DataFrame(
        {
            "gene": adata.var_names[gene_idx].to_numpy(dtype=object),
            "group": group if group is not None else "all",
            "contrast": name,
            "method": "gee",
            "converged": res.pop("converged"),
            "status": res.pop("status"),
        }
    )
    for col in _STAT_COLS:
        out[col] = res[col]
    return out


# ---------------------------------------------------------------- per-gene kernel (ndarrays only)


@dataclass(frozen=True)
class GEEData:
    """What every gene of one cell group shares: design, offsets, cluster codes, contrast rows, df, family."""

    X: np.ndarray
    offset: np.ndarray | None
    clusters: np.ndarray
    L: np.ndarray
    df: float
    family: str
    min_cells: int
    small_sample: str = "kc"
    ftest: bool = False
    maxiter: int = 100


def fit_chunk(data: GEEData, Y) -> dict[str, np.ndarray]:
    """Fit every gene (column) of ``Y`` (cells × genes, CSC sparse or dense); arrays in gene order."""
    n_genes = Y.shape[1]
    out = {c: np.full(n_genes, np.nan) for c in _STAT_COLS}
    out["converged"] = np.zeros(n_genes, dtype=bool)
    out["status"] = np.empty(n_genes, dtype=object)
    for j in range(n_genes):
        y = Y[:, j].toarray().ravel() if sp.issparse(Y) else np.asarray(Y[:, j], dtype=float).ravel()
        r = fit_gene(y.astype(float), data)
        for k, v in r.items():
            out[k][j] = v
    return out


def fit_gene(y: np.ndarray, data: GEEData) -> dict:
    """One gene: GLM start, NB dispersion, GEE fit, corrected sandwich covariance, t / F test. Never raises."""
    n_expr = int(np.count_nonzero(y))
    res = {"base_mean": float(y.mean()), "df": data.df, "converged": False, "status": "ok"}
    if n_expr < max(data.min_cells, 1):
        res["status"] = "too few expressing cells"
        return res
    if data.family == "binomial":
        y = (y > 0).astype(float)
        if n_expr == y.size:
            res["status"] = "expressed in every cell"
            return res
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = _gee_fit(y, data)
    except Exception as err:  # noqa: BLE001 - one gene must never end the run
        res["status"] = f"fit failed: {type(err).__name__}: {err}"[:200]
        return res
    res.update({k: v for k, v in fit.items() if k in ("dispersion", "working_corr", "n_iter")})
    names = {type(w.message).__name__ for w in caught}
    beta, cov = fit["beta"], fit["cov"]
    if "PerfectSeparationWarning" in names:
        res["status"] = "perfect separation"
        return res
    if beta is None or not np.all(np.isfinite(beta)):
        res["status"] = "fit failed: non-finite coefficients"
        return res
    if np.max(np.abs(beta)) > _BETA_MAX:
        res["status"] = "diverged: no counts in some level of the design (separation)"
        return res
    converged = bool(fit["converged"]) and "ConvergenceWarning" not in names
    res["converged"] = converged
    if cov is None:
        res["status"] = "singular sandwich: one donor determines a coefficient"
        res["converged"] = False
        return res
    L = data.L
    est = L @ beta
    V = L @ cov @ L.T
    if not data.ftest:
        se = math.sqrt(max(float(V[0, 0]), 0.0))
        res["coef"], res["se"] = float(est[0]), se
        if converged and se > 0:
            t = float(est[0]) / se
            res["stat"], res["pvalue"] = t, float(2.0 * stats.t.sf(abs(t), data.df))
    elif converged:
        try:
            w = float(est @ np.linalg.solve(V, est))
            k = L.shape[0]
            res["stat"], res["pvalue"] = w / k, float(stats.f.sf(w / k, k, data.df))
        except np.linalg.LinAlgError:
            res["status"], res["converged"] = "singular contrast covariance", False
            return res
    if not converged:
        res["status"] = "not converged"
    return res


def _family(name: str, alpha: float | None = None):
    import statsmodels.api as sm

    if name == "nb":
        return sm.families.NegativeBinomial(alpha=alpha)
    if name == "poisson":
        return sm.families.Poisson()
    return sm.families.Binomial()


def _gee_fit(y: np.ndarray, data: GEEData) -> dict:
    import statsmodels.api as sm

    X, off = data.X, data.offset
    start_family = _family("binomial") if data.family == "binomial" else _family("poisson")
    glm = sm.GLM(y, X, family=start_family, offset=off).fit()
    start = np.asarray(glm.params, dtype=float)
    alpha = None
    if data.family == "nb":
        alpha = nb_alpha_moment(y, np.asarray(glm.fittedvalues, dtype=float), X.shape[1])
    model = sm.GEE(
        y,
        X,
        groups=data.clusters,
        offset=off,
        family=_family(data.family, alpha),
        cov_struct=sm.cov_struct.Exchangeable(),
    )
    fit = model.fit(maxiter=data.maxiter, start_params=start)
    beta = np.asarray(fit.params, dtype=float)
    return {
        "beta": beta,
        "cov": sandwich_cov(model, data.small_sample),
        "converged": bool(getattr(fit, "converged", True)) or _settled(fit.fit_history),
        "dispersion": np.nan if alpha is None else alpha,
        "working_corr": float(model.cov_struct.dep_params),
        "n_iter": float(len(fit.fit_history["params"])),
    }


def _settled(history: dict, tol: float = 1e-5) -> bool:
    """The alternating updates of ``beta`` and ``rho`` have settled, though statsmodels' score criterion is not met.

    statsmodels stops when the norm of the score is below 1e-6. The score is a sum over cells, so for a highly
    expressed gene in many cells that asks for far more precision in ``beta`` than needed, which the alternating
    ``beta`` / ``rho`` updates approach only linearly (ratio ``r`` per iteration). With the last steps shrinking, the
    remaining distance to the solution is about ``step * r / (1 - r)``; below ``tol`` (on the link scale, in every
    coefficient and in ``rho``) the fit counts as converged.
    """
    params, dep = history.get("params", []), history.get("dep_params", [])
    if len(params) < 3 or len(dep) < 3:
        return False
    P = np.asarray(params[-3:], dtype=float)
    R = np.asarray(dep[-3:], dtype=float)[:, None]
    for Z in (P, R):
        steps = np.abs(np.diff(Z, axis=0)).max(axis=1)
        if not np.all(np.isfinite(steps)):
            return False
        if steps[1] == 0.0:
            continue
        r = steps[1] / steps[0] if steps[0] > 0 else 1.0
        if r >= 0.99 or steps[1] * r / (1.0 - r) > tol:
            return False
    return True


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


def sandwich_cov(model, small_sample: str = "kc") -> np.ndarray | None:
    """Cluster-robust sandwich covariance of a fitted statsmodels GEE, with a small-sample correction.

    ``small_sample``: ``"kc"`` (Kauermann & Carroll 2001), ``"md"`` (Mancl & DeRouen 2001) or ``"none"`` (the plain
    Liang–Zeger sandwich, statsmodels' ``cov_robust``). The corrections replace each cluster's residuals ``r_d`` by
    ``(I - H_dd)^-1/2 r_d`` (KC) or ``(I - H_dd)^-1 r_d`` (MD), with the cluster leverage
    ``H_dd = D_d B^-1 D_d' V_d^-1`` and ``B = sum_d D_d' V_d^-1 D_d``. Both are computed in closed form from p × p
    matrices: with ``A_d = D_d' V_d^-1 D_d``, the score ``g_d = D_d' V_d^-1 r_d`` and
    ``M_d = I - B^-1/2 A_d B^-1/2 = Q diag(1 - lam) Q'``, the corrected score is
    ``u_d = B^1/2 Q diag((1 - lam)^-c) Q' B^-1/2 g_d`` (``c = 1/2`` KC, ``1`` MD; for MD this is ``B (B - A_d)^-1 g_d``)
    and ``cov = B^-1 (sum_d u_d u_d') B^-1``: O(p^3) per donor instead of an (n_d × n_d) solve. ``"md"`` equals
    ``model.fit(cov_type="bias_reduced").cov_robust_bc`` (unweighted GEE). Returns ``None`` if a cluster has leverage
    1 in some direction (``lam >= 1``: that donor alone determines a coefficient).
    """
    power = {"kc": 0.5, "md": 1.0, "none": 0.0}[small_sample]
    cs = model.cov_struct
    varfunc = model.family.variance
    parts = []
    for i in range(model.num_group):
        expval, lpr = model.cached_means[i]
        dmat = model.mean_deriv(model.exog_li[i], lpr)
        sdev = np.sqrt(varfunc(expval))
        vinv_d, vinv_r = cs.covariance_matrix_solve(expval, i, sdev, (dmat, model.endog_li[i] - expval))
        parts.append((dmat.T @ vinv_d, dmat.T @ vinv_r))
    B = sum(a for a, _ in parts)
    B = 0.5 * (B + B.T)
    wb, Ub = np.linalg.eigh(B)
    if wb.min() <= 1e-12 * max(wb.max(), 1e-300):
        return None
    b_half = (Ub * np.sqrt(wb)) @ Ub.T
    b_mhalf = (Ub / np.sqrt(wb)) @ Ub.T
    p = B.shape[0]
    meat = np.zeros((p, p))
    for A, g in parts:
        if power == 0.0:
            u = g
        else:
            M = np.eye(p) - b_mhalf @ (0.5 * (A + A.T)) @ b_mhalf
            lam_c, Q = np.linalg.eigh(0.5 * (M + M.T))  # eigenvalues 1 - lam of M
            if lam_c.min() <= 1e-10:
                return None
            u = b_half @ (Q @ ((lam_c**-power) * (Q.T @ (b_mhalf @ g))))
        meat += np.outer(u, u)
    Binv = (Ub / wb) @ Ub.T
    return Binv @ meat @ Binv  # the scale parameter cancels: B^-1 s (sum u u' / s^2) B^-1 s
