"""Empirical-Bayes moderated tests of unit-level contrasts of cell-level GLMMs (limma's ``squeezeVar`` on the GLMM).

A contrast that is constant within the levels of a random term (case vs control between donors; treated vs control
between the donor × condition samples of a paired design) is tested against the variation between those units. On
the latent scale, the unit means of gene ``g`` vary with

    τ²_g = σ²_unit,g + (within-unit sampling variance of a unit mean),

and the squared standard error of the contrast is ``SE²_g = c · τ̂²_g`` with ``c = L (X_u' X_u)⁻¹ L'`` from the
unit-level design ``X_u`` (one row per unit; gene-independent). In a balanced Gaussian LMM this is exact:
``SE² = c · MS_between / m`` with ``m`` cells per unit, and ``τ̂²`` is a variance on ``d`` degrees of freedom,
``d`` the contrast's containment df at its level (units minus unit-level coefficients). Each gene alone therefore
tests on ``d`` df (8 with 10 donors). With the unit variance estimated at zero (a boundary fit, part of the
``singular`` genes) ``SE² / c`` is only the sampling part ``τ0²``: in the balanced LMM REML gives
``τ̂² = max(MS_between, MS_within) / m``, a truncated value.

Moderation borrows strength across the genes of one group and contrast, as limma's ``eBayes`` does: ``τ̂²_g`` on
``d`` df are squeezed toward a trend in ``log(base_mean)`` with the robust ``squeezeVar`` (Phipson et al. 2016),
giving prior df ``d0`` and prior variance ``s0²_g``; ``τ̃²_g = (d τ̂²_g + d0 s0²_g) / (d + d0)``; the moderated
``SE = sqrt(c τ̃²_g)``, ``t = coef / SE`` on ``d + d0`` df (at most the pooled df of all genes, as limma caps it).

Design choices and the measurements behind them (``scmlm.datasets.simulate`` nulls, 1,000–1,500 genes; figures are
fractions of p < 0.05; ``tests/test_moderation.py`` and ``benchmarks/bench_moderation.py`` print them):

* ``d`` is the containment df, not the gene's Satterthwaite df. Satterthwaite df fall below 1 for genes whose
  variance is near, not at, zero (2e-11 at worst), and squeezing on ``min(d, Satterthwaite)`` did not cure any
  of the excess below (10-donor ``(1|donor)+(1|batch)`` null: 6.7–7.8 % for every combination tried).
* Boundary fits enter the prior with the untruncated ``τ0² · X²/d`` (:func:`gene_tau2`, :func:`unit_dispersion`),
  a Pearson statistic of the unit scores that is ``MS_between / m`` in the balanced LMM: a variance on ``d`` df, as
  the prior model assumes. Singular fits then borrow from the prior like the others (pooled over six null designs:
  4.8 % of 2,941 singular fits).
* Where the contrast's variance also rests on a coarser random term not balanced over the contrast (donors nested
  in 3 batches with unequal case/control counts, ``(1|donor)+(1|batch)``), moderating the donor-level variance
  gave 7.0–7.9 % on a 10-donor null whatever was squeezed: the conditional standard error ignores the
  uncertainty of a variance estimated from 3 batches (REML SEs condition on the variance parameters), which the
  per-gene t on ``d`` df happened to cover (5.3 %). Such contrasts keep the per-gene test and say so in
  ``moderation``; with ``batch`` as a fixed effect the same null is moderated at 5.7 %. A balanced coarser term
  (the donor of a paired design) cancels from the contrast and does not block moderation.
* Genes are moderated per group (``groups_key``) and per contrast: each has its own prior. A group with fewer than
  :data:`MIN_GENES` usable genes keeps per-gene tests.

Contrasts that vary from cell to cell are not moderated (they are tested on the cell-level residual df, where a
prior adds nothing). Sharded runs store the unmoderated quantities (``coef``, ``se_raw``, ``tau2``,
``df_resid``, ``unit_scale``, ``base_mean``) with ``moderation = "pending"``; :func:`scmlm.results.merge_shards` calls
:func:`moderate_table` over the concatenated shards, which gives the same numbers as an unsharded run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._limma import squeeze_var

MIN_GENES = 10
"""Fewest genes of a group and contrast with a usable unmoderated test for a prior to be estimated."""

PENDING = "pending"
"""``moderation`` value of a gene of a sharded run: finished when the shards are merged."""


def unit_scale(X: np.ndarray, unit_codes: list[np.ndarray], L: np.ndarray) -> tuple[float, int, int]:
    """``(c, n_units, k)`` with ``c = L (X_u' X_u)⁻¹ L'``: ``X_u`` holds one row per unit of the random term with the
    fewest levels within which the contrast is constant, and the fixed columns constant within them (``(1.0, 0)``
    when there is none). In a paired design the donor block is left out of ``X_u``: it changes ``c`` only in
    unbalanced designs, and ``c`` only sets the scale on which ``var_prior`` is reported (not the test)."""
    X = np.asarray(X, dtype=float)
    L = np.asarray(L, dtype=float).ravel()
    used = np.flatnonzero(np.abs(L) > 1e-12)
    best = None
    for k, codes in enumerate(unit_codes):
        _, first = np.unique(codes, return_index=True)
        inv = np.unique(codes, return_inverse=True)[1]
        const = np.array([np.ptp(X[:, j]) == 0 or np.allclose(X[:, j], X[first, j][inv]) for j in range(X.shape[1])])
        if not const[used].all():
            continue
        Xu = X[np.ix_(first, np.flatnonzero(const))]
        Lu = L[const]
        c = float(Lu @ np.linalg.pinv(Xu.T @ Xu) @ Lu)
        if np.isfinite(c) and c > 0 and (best is None or first.size < best[0]):
            best = (first.size, c, k)
    return (1.0, 0, -1) if best is None else (best[1], best[0], best[2])


def coarser_terms(X: np.ndarray, terms, L: np.ndarray) -> list[str]:
    """Random terms other than the contrast's unit term whose levels hold whole units and are not balanced over the
    contrast (e.g. ``batch`` over donors nested in batches with unequal case/control counts; not ``donor`` over the
    two samples of each donor in a paired design, which cancels). The contrast's variance then rests on their
    variance too, estimated from few levels; a prior for the unit term does not moderate that part."""
    terms = tuple(terms)
    X = np.asarray(X, dtype=float)
    L = np.asarray(L, dtype=float).ravel()
    _, _, k = unit_scale(X, [t.codes for t in terms], L)
    if k < 0:
        return []
    unit = np.asarray(terms[k].codes)
    _, first = np.unique(unit, return_index=True)
    Lu = L
    Xu = X[first]
    c0 = float(Lu @ np.linalg.pinv(Xu.T @ Xu) @ Lu)
    out = []
    for j, t in enumerate(terms):
        if j == k:
            continue
        pairs = pd.DataFrame({"u": unit, "t": np.asarray(t.codes)}).drop_duplicates()
        if not (pairs["u"].is_unique and pairs["t"].nunique() < pairs["u"].nunique()):
            continue
        tc = pd.factorize(np.asarray(t.codes)[first])[0]
        Xd = np.hstack([Xu, np.eye(int(tc.max()) + 1)[tc]])
        Ld = np.concatenate([Lu, np.zeros(Xd.shape[1] - Lu.size)])
        c1 = float(Ld @ np.linalg.pinv(Xd.T @ Xd) @ Ld)
        if abs(c1 - c0) > 1e-8 * abs(c0):
            out.append(t.name)
    return out


def gene_tau2(Y, res, se: np.ndarray, X: np.ndarray, terms, offset, family: str, trials, L, df: float) -> np.ndarray:
    """Per-gene between-unit variance ``τ̂²`` of a unit-level contrast from one chunk's fits (``res``).

    ``se² / c`` where the unit's variance is estimated above zero. Where it is at zero (a boundary fit) ``se² / c``
    is only the within-unit sampling part ``τ0²`` (in a balanced LMM, REML gives ``τ̂² = max(MS_between,
    MS_within) / m``): it is multiplied by :func:`unit_dispersion`, which makes it ``MS_between / m`` in that LMM,
    a variance on ``d`` df as the prior assumes. Measured on 10-donor nulls (``(1|donor)+(1|batch)``, 54 %
    singular), squeezing the truncated values estimated ``d0 ≈ 16`` for a distribution the prior does not fit.
    """
    terms = tuple(terms)
    c, _, k = unit_scale(X, [t.codes for t in terms], L)
    tau2 = np.asarray(se, dtype=float) ** 2 / c
    if k < 0:
        return tau2
    names = terms[k].component_names()
    zero = np.asarray(res.converged, dtype=bool) & np.isfinite(tau2)
    for name in names:
        zero &= np.asarray(res.var[name]) <= 0
    if zero.any():
        idx = np.flatnonzero(zero)
        Ysub = Y[:, idx] if Y.shape[0] == X.shape[0] else Y[idx]
        ratio = unit_dispersion(
            Ysub, X, terms, offset, res.beta[idx], res.b[idx], np.asarray(res.phi)[idx], family, trials,
            np.unique(terms[k].codes, return_inverse=True)[1], df,
        )  # fmt: skip
        tau2[idx] = tau2[idx] * ratio
    return tau2


def unit_dispersion(
    Y,
    X: np.ndarray,
    terms,
    offset: np.ndarray | None,
    beta: np.ndarray,
    b: np.ndarray,
    phi: np.ndarray,
    family: str,
    trials: np.ndarray | None,
    unit_codes: np.ndarray,
    df: float,
) -> np.ndarray:
    """Inflation of the contrast's variance over its value with the unit variance at zero, per gene.

    ``1 + (X²/d - 1) r`` where ``X²/d > 1``, else ``X²/d``. ``X² = Σ_u S_u² / I_u`` with
    ``S_u = Σ_{i∈u} (y_i - μ_i) μ'_i / V_i`` the score of a random effect of unit ``u`` at zero and
    ``I_u = Σ_{i∈u} μ'_i² / V_i`` its information, from the fitted means ``μ`` of the gene's model
    (``E X² = d (1 + σ² I)`` for equal units); ``r = (Σ I_u² / Σ I_u) / mean(I_u)`` (1 for equal units), since an
    information-weighted contrast leans on the large units. Unbalanced nulls (20–2,000 cells per donor): boundary
    fits at 9.9 % of p < 0.05 with ``r = 1``, 9.3 % with it (151 genes).
    """
    from ._families import get_family
    from ._random import build_Z

    fam = get_family(family)
    n = X.shape[0]
    Z = build_Z(tuple(terms), n)
    eta = X @ beta.T + (Z @ b.T if b.size else 0.0)
    if offset is not None:
        eta = eta + offset[:, None]
    Yd = np.asarray(Y.toarray() if hasattr(Y, "toarray") else Y, dtype=float)
    if Yd.ndim == 1 or Yd.shape[0] != n:
        Yd = np.atleast_2d(Yd).T  # genes × cells → cells × genes
    m = np.ones(n) if trials is None else np.asarray(trials, dtype=float)
    if fam.link == "logit":
        if trials is None:
            Yd = (Yd > 0).astype(float)
        p = fam.linkinv(eta)
        resid = Yd - m[:, None] * p
        info = m[:, None] * p * (1 - p)
        score = resid
    elif fam.link == "log":
        mu = fam.linkinv(eta)
        var = mu + phi[None, :] * mu**2 if fam.has_dispersion else mu
        score = (Yd - mu) * mu / var
        info = mu**2 / var
    else:
        score = (Yd - eta) / phi[None, :]
        info = np.broadcast_to(1.0 / phi[None, :], eta.shape)
    n_units = int(unit_codes.max()) + 1
    S = np.zeros((n_units, score.shape[1]))
    info_u = np.zeros((n_units, score.shape[1]))
    np.add.at(S, unit_codes, score)
    np.add.at(info_u, unit_codes, info)
    with np.errstate(divide="ignore", invalid="ignore"):
        x2 = np.sum(np.where(info_u > 0, S**2 / info_u, 0.0), axis=0) / df
        present = info_u > 0
        # unequal units: the excess (σ² I_u on average) inflates the variance of the information-weighted contrast by
        # the size-weighted mean information over the plain mean (1 for equal units)
        r = (np.sum(info_u**2, axis=0) / np.sum(info_u, axis=0)) / (np.sum(info_u, axis=0) / present.sum(axis=0))
    return np.where(x2 > 1, 1.0 + (x2 - 1.0) * np.where(np.isfinite(r), r, 1.0), x2)


def moderate(
    coef: np.ndarray,
    tau2: np.ndarray,
    df_resid: np.ndarray,
    base_mean: np.ndarray,
    scale: float,
    usable: np.ndarray,
) -> dict[str, np.ndarray]:
    """Moderated t tests for one group and contrast.

    Parameters
    ----------
    coef, tau2
        Per-gene estimate of the contrast and its between-unit variance (:func:`gene_tau2`).
    df_resid
        Per-gene residual df of ``τ̂²`` (the containment df at the contrast's level).
    base_mean
        Per-gene mean normalised expression (the trend covariate, on the log scale).
    scale
        The unit scale ``c`` (see the module docstring).
    usable
        Genes whose fit can enter the prior (converged, finite ``tau2 > 0`` and ``df_resid >= 1``).

    Returns
    -------
    ``se``, ``stat``, ``df``, ``pvalue``, ``df_prior``, ``var_prior`` (NaN outside ``usable``) and ``moderation``
    (``"moderated"``, or why not).
    """
    coef = np.asarray(coef, dtype=float)
    tau2_all = np.asarray(tau2, dtype=float)
    d = np.asarray(df_resid, dtype=float)
    G = coef.size
    out = {k: np.full(G, np.nan) for k in ("se", "stat", "df", "pvalue", "df_prior", "var_prior")}
    why = np.full(G, "not moderated: the gene's fit has no usable test", dtype=object)
    usable = np.asarray(usable, dtype=bool) & np.isfinite(tau2_all) & (tau2_all > 0) & np.isfinite(d) & (d >= 1)
    idx = np.flatnonzero(usable)
    if idx.size < MIN_GENES:
        why[idx] = f"not moderated: fewer than {MIN_GENES} genes in the group to estimate a prior"
        return {**out, "moderation": why}
    tau2 = tau2_all[idx]
    cov = np.log(np.maximum(np.asarray(base_mean, dtype=float)[idx], 1e-8))
    cov = np.where(np.isfinite(cov), cov, np.nanmin(cov[np.isfinite(cov)]) if np.isfinite(cov).any() else 0.0)
    try:
        d0, s0, post = squeeze_var(tau2, d[idx], covariate=cov, robust=True)
    except (ValueError, np.linalg.LinAlgError) as err:
        why[idx] = f"not moderated: prior not estimable ({err})"
        return {**out, "moderation": why}
    df_total = np.minimum(d[idx] + d0, d[idx].sum())  # limma caps the total df at the pooled residual df
    se_mod = np.sqrt(scale * post)
    stat = coef[idx] / se_mod
    out["se"][idx] = se_mod
    out["stat"][idx] = stat
    out["df"][idx] = df_total
    out["pvalue"][idx] = 2.0 * stats.t.sf(np.abs(stat), df_total)
    out["df_prior"][idx] = d0
    out["var_prior"][idx] = s0
    why[idx] = "moderated"
    return {**out, "moderation": why}


def moderate_table(table: pd.DataFrame) -> pd.DataFrame:
    """Finish the moderation of the rows with ``moderation == "pending"``, per group and contrast.

    Reads ``coef``, ``tau2``, ``df_resid``, ``unit_scale``, ``base_mean`` and ``converged``; writes ``se``,
    ``stat``, ``df``, ``pvalue``, ``df_prior``, ``var_prior`` and ``moderation``. ``padj`` is left to the caller.
    Rows of a joint F test of ``q = df_num`` rows (``glmm_de``) carry the per-gene Wald ``f_raw`` and their
    between-unit variance ``tau2`` (``unit_scale`` 1); the moderated F is ``f_raw · tau2 / τ̃²`` on ``F(q, d + d0)``.
    Genes that cannot be moderated keep their per-gene test and say why in ``moderation``; rows of other genes are
    returned unchanged.
    """
    if "moderation" not in table.columns or not (table["moderation"] == PENDING).any():
        return table
    table = table.copy()
    for col in ("df_prior", "var_prior"):
        if col not in table:
            table[col] = np.nan
    pend = (table["moderation"] == PENDING).to_numpy()
    keys = [table["group"].astype(str).to_numpy(), table["contrast"].astype(str).to_numpy()]
    for _, rows in table.groupby(keys, sort=False).indices.items():
        rows = rows[pend[rows]]
        if not rows.size:
            continue
        sub = table.iloc[rows]
        scale = float(sub["unit_scale"].iloc[0])
        res = moderate(
            sub["coef"].to_numpy(dtype=float),
            sub["tau2"].to_numpy(dtype=float),
            sub["df_resid"].to_numpy(dtype=float),
            sub["base_mean"].to_numpy(dtype=float),
            scale,
            sub["converged"].to_numpy(dtype=bool),
        )
        if "df_num" in sub and np.nanmax(sub["df_num"].to_numpy(dtype=float), initial=1.0) > 1:
            # a joint F test of q rows: F_raw · τ̂² / τ̃² on F(q, d + d0); no single estimate, so no se
            q = float(np.nanmax(sub["df_num"].to_numpy(dtype=float)))
            with np.errstate(divide="ignore", invalid="ignore"):
                post = res["se"] ** 2 / scale
                res["stat"] = sub["f_raw"].to_numpy(dtype=float) * sub["tau2"].to_numpy(dtype=float) / post
                res["pvalue"] = stats.f.sf(res["stat"], q, res["df"])
            res["se"] = np.full(len(sub), np.nan)
        done = res["moderation"] == "moderated"  # the others keep their per-gene test and say why
        for col in ("se", "stat", "df", "pvalue", "df_prior", "var_prior"):
            vals = sub[col].to_numpy(dtype=float).copy()
            vals[done] = res[col][done]
            table.iloc[rows, table.columns.get_loc(col)] = vals
        table.iloc[rows, table.columns.get_loc("moderation")] = res["moderation"]
    return table
