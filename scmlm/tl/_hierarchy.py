"""How much variation lives at each level: variance partition, ICC, and partial pooling (BLUPs vs unpooled)."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import DesignError, InputError, _fmt_list
from .._validate import check_not_empty, check_obs_keys, check_unique_names
from .._version import __version__
from ..design import FittedDesign, build_design, resolve_offset, stored_formula
from ..engine import parallel_chunks, run_chunks
from ..models import FAMILY_NAMES, STATUS, build_Z, fit_glmm, fit_unpooled, prepare_glmm, term_slices
from ..results import DEResult
from ._common import (
    cell_groups,
    cell_matrix,
    cell_offset,
    cell_rows,
    check_backed_copy,
    column_sums,
    gene_columns,
    gene_eligibility,
    gene_indices,
    residual_variance,
)


def _term_variance(term, theta: np.ndarray) -> np.ndarray:
    """Average variance a term adds to a cell's linear predictor, ``mean_i v_i' Σ v_i = tr(Σ M)`` with
    ``M = mean_i v_i v_i'`` (Johnson 2014, random slopes), for every gene (rows of ``theta``) at once."""
    V = np.asarray(term.covariates, dtype=float)
    M = V.T @ V / V.shape[0]  # shared by all genes: computed once per term, not per gene
    return np.array([np.trace(term.cov_from_theta(th) @ M) for th in theta])


def _prepare(adata, design, family, layer, offset, groups_key, genes, samples=None):
    if family not in FAMILY_NAMES:
        raise InputError(f"family={family!r} is not known; use one of {_fmt_list(FAMILY_NAMES)}.")
    check_unique_names(adata)
    check_obs_keys(adata, [groups_key], what="groups_key", grouping=True)
    matrix = cell_matrix(adata, layer, "finite" if family == "gaussian" else "counts")  # backed: read once here
    offset = resolve_offset(offset, family, design=design, obs=adata.obs, sample_key=samples)
    off = cell_offset(adata, matrix, offset, layer, samples=samples, groups_key=groups_key, design=design)
    gene_idx = gene_indices(adata, genes)
    matrix = gene_columns(matrix, gene_idx)  # only the selected genes, in gene_idx order
    return matrix, off, gene_idx, cell_groups(adata, groups_key)


def _fit_chunk(Y, *, gdesign, estimation):
    return fit_glmm(Y, gdesign, method=estimation, min_nonzero=1)


def _fit_genes(matrix, rows, gene_idx, d, off, family, estimation, n_jobs, min_cells_expressing):
    """Fit the GLMM of design ``d`` on cells ``rows`` for the eligible genes of ``gene_idx`` (glmm_de's rule).

    Returns (cells × genes block, results per chunk, chunks as positions in ``gene_idx``, status of every gene:
    ``"ok"`` when fitted, otherwise why not).
    """
    import functools

    sub = cell_rows(matrix, rows)  # matrix holds the selected genes
    eligible, _, _ = gene_eligibility(sub, family, min_cells_expressing)
    fit = np.flatnonzero(eligible == "ok")
    gdesign = prepare_glmm(d.X, d.terms, None if off is None else off[rows], family=family)
    entries = None if getattr(sub, "nnz_per_gene", None) is None else sub.nnz_per_gene[fit]  # bounds chunk memory
    chunks = [fit[c] for c in parallel_chunks(fit.size, n_jobs, entries)] if fit.size else []
    fit_chunk = functools.partial(_fit_chunk, gdesign=gdesign, estimation=estimation)
    # threads: the kernel releases the GIL; each thread cuts its chunk out of the shared counts
    results = run_chunks(fit_chunk, sub, chunks, n_jobs=n_jobs, backend="threads") if chunks else []
    return sub, results, chunks, eligible


def variance_partition(
    adata: ad.AnnData,
    design: str | FittedDesign,
    *,
    family: str = "nb",
    layer: str | None = None,
    offset: str | None = "auto",
    groups_key: str | None = None,
    genes=None,
    min_cells_expressing: int = 10,
    n_jobs: int | None = None,
    key_added: str = "variance_partition",
    inplace: bool = True,
    copy: bool = False,
) -> DEResult | ad.AnnData | None:
    """Fraction of each gene's variance at each level of the hierarchy, and the ICC of each grouping factor.

    The design is written dream-style, e.g. ``"~ (1|donor) + (1|batch) + condition"``; categorical variables can
    also enter as random terms (``"~ (1|donor) + (1|batch) + (1|condition)"``), as variancePartition recommends, so
    that each gets its own fraction. Each gene gets a GLMM fitted by REML (see :func:`scmlm.tl.glmm_de`); the
    variances are decomposed on the latent (link) scale:

    - each random term ``k``: ``σ²_k`` (for random slopes, the average variance the term adds to a cell,
      ``mean_i v_i' Σ_k v_i``);
    - ``fixed``: the variance across cells of the fixed-effect linear predictor ``X β`` (intercept excluded);
    - ``residual``: the distribution-specific variance of Nakagawa, Johnson & Schielzeth (2017): NB2
      ``log(1 + 1/λ + φ)``, Poisson ``log(1 + 1/λ)``, binomial (logit) ``π²/3``, Gaussian the residual variance,
      with ``λ`` the gene's mean count per cell.

    Fractions are these variances over their sum, so each gene's fractions add up to one.
    ``icc_<k> = σ²_k / (Σ_j σ²_j + residual)``: the correlation of two cells' latent values that share level ``k``
    (fixed effects excluded).

    Parameters
    ----------
    adata
        Cell-level AnnData with raw counts (count families) or normalised values (Gaussian).
    design
        Formula with random terms (at least one), e.g. ``"~ (1|donor) + (1|batch) + condition"``, or the
        :class:`~scmlm.design.FittedDesign` of a ``glmm_de`` analysis (:func:`scmlm.design.fitted_design`), whose
        fitted formula (with the sample-level terms ``replication="auto"`` adds) then gets a component per level.
    family, layer, offset, groups_key, genes, min_cells_expressing, n_jobs
        As in :func:`scmlm.tl.glmm_de` (``offset="auto"``: TMM factors of the samples the design names, for NB and
        Poisson; ``"log_total"`` otherwise); genes are fitted by the same rule (``"all zero"`` and ``"too few expressing
        cells"`` are not fitted and keep NaN values).
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}``.
    inplace, copy
        As in :func:`scmlm.tl.pseudobulk_de`: write into ``adata`` (returns ``None``) or a copy (returned);
        ``inplace=False`` returns the :class:`~scmlm.results.DEResult`.

    Returns
    -------
    ``None``, the copy, or the result, whose ``table`` is a DataFrame with one row per gene (× group): one column
    per random term, ``fixed`` and ``residual`` (fractions summing to 1), ``icc_<term>``, the latent variances
    ``var_<term>``, ``var_fixed``, ``var_residual``, and ``group``, ``converged``, ``status``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=8, n_cells=50, n_genes=100, seed=2)
    >>> vp = scmlm.tl.variance_partition(adata, "~ (1|donor) + (1|batch) + condition", inplace=False).table
    >>> fitted = vp[vp["converged"]]
    >>> bool(((fitted[["donor", "batch", "fixed", "residual"]].sum(axis=1) - 1).abs() < 1e-9).all())
    True
    """
    check_not_empty(adata, "variance_partition", cells=True)
    check_backed_copy(adata, copy, "variance_partition")
    if isinstance(design, FittedDesign):
        design = design.formula
    offset = resolve_offset(offset, family, design=design, obs=adata.obs)
    matrix, off, gene_idx, groups = _prepare(adata, design, family, layer, offset, groups_key, genes)
    full = build_design(adata.obs, design, check_rank=groups_key is None)
    if not full.parsed.has_random:
        raise DesignError(
            f"design {design!r} has no random terms; variance_partition needs at least one, e.g. '(1|donor)'."
        )
    frames = []
    for group, rows in groups:
        d = build_design(adata.obs.iloc[rows], design)
        fits = _fit_genes(matrix, rows, gene_idx, d, off, family, "REML", n_jobs, min_cells_expressing)
        df = _partition(d, fits, family, rows.size, adata.var_names[gene_idx].astype(str))
        if group is not None:
            df.insert(0, "group", group)
        frames.append(df)
    params = {
        "tool": "variance_partition",
        "design": design,
        "family": family,
        "layer": layer,
        "offset": offset,
        "groups_key": groups_key,
        "min_cells_expressing": int(min_cells_expressing),
        "scmlm_version": __version__,
    }
    return DEResult(table=pd.concat(frames), params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


def _partition(d, fits, family: str, n_cells: int, gene_names) -> pd.DataFrame:
    """Variance fractions, ICCs and latent variances of one group's fits (one row per gene)."""
    sub, results, chunks, status = fits
    names = [t.name if t.k == 1 else f"{t.name}({'+'.join(t.col_names)})" for t in d.terms]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    colsum = column_sums(sub)
    mean_count = colsum / n_cells
    G = len(gene_names)
    var = {n: np.full(G, np.nan) for n in names}
    var_fixed = np.full(G, np.nan)
    phi = np.full(G, np.nan)
    conv = np.zeros(G, dtype=bool)
    fixed_cols = [j for j, c in enumerate(d.columns) if c != "(Intercept)"]
    Xf = d.X[:, fixed_cols]
    slices = term_slices(d.terms)
    for idx, res in zip(chunks, results, strict=True):
        theta = np.asarray(res.theta)
        for t, n, (_, ts) in zip(d.terms, names, slices, strict=True):
            var[n][idx] = _term_variance(t, theta[:, ts])
        var_fixed[idx] = (res.beta[:, fixed_cols] @ Xf.T).var(axis=1) if fixed_cols else 0.0
        phi[idx] = res.phi
        status[idx] = [STATUS.get(int(s), str(s)) if not isinstance(s, str) else s for s in res.status]
        conv[idx] = res.converged
    resid = residual_variance(family, phi, mean_count)
    total = sum(np.nan_to_num(v) for v in var.values()) + var_fixed + resid
    df = pd.DataFrame(index=gene_names)
    for n in names:
        df[n] = var[n] / total
    df["fixed"] = var_fixed / total
    df["residual"] = resid / total
    random_total = sum(np.nan_to_num(v) for v in var.values()) + resid
    for n in names:
        df[f"icc_{n}"] = var[n] / random_total
    for n in names:
        df[f"var_{n}"] = var[n]
    df["var_fixed"] = var_fixed
    df["var_residual"] = resid
    df["converged"] = conv
    df["status"] = status
    value_cols = [c for c in df.columns if c not in ("converged", "status")]
    df.loc[~conv, value_cols] = np.nan
    return df


def random_effects(
    adata: ad.AnnData,
    *,
    key: str = "glmm_de",
    genes=None,
    n_jobs: int | None = None,
    key_added: str = "random_effects",
    inplace: bool = True,
    copy: bool = False,
) -> DEResult | ad.AnnData | None:
    """Conditional modes (BLUPs) of each donor's (and batch's) effect beside the unpooled per-level estimates.

    Refits the model stored by :func:`scmlm.tl.glmm_de` under ``adata.uns[key]`` for the selected genes and returns,
    for every random intercept level, the partially pooled estimate (BLUP, with its conditional SD) and the
    unpooled estimate: the maximum-likelihood effect of that level alone, with the fixed effects and the other random
    effects held at their fitted values (no shrinkage), with its SE from the Fisher information. Levels with few
    cells or counts have noisy unpooled estimates and are shrunk most toward the mean (0): partial pooling.

    Parameters
    ----------
    adata
        The AnnData ``glmm_de`` wrote into.
    key
        Key of the ``glmm_de`` result in ``adata.uns``.
    genes
        Gene names (required: refitting every gene would repeat ``glmm_de``).
    n_jobs
        Threads fitting gene chunks in parallel (``None``: ``scmlm.settings.n_jobs``).
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}`` (what :func:`scmlm.pl.shrinkage` reads).
    inplace, copy
        As in :func:`scmlm.tl.pseudobulk_de`: store the table in ``adata.uns[key_added]`` (returns ``None``) or in a
        copy (returned); ``inplace=False`` returns the :class:`~scmlm.results.DEResult`.

    Returns
    -------
    ``None``, the copy, or the result, whose ``table`` is a long DataFrame with columns
    ``gene, group, term, level, blup, blup_se, unpooled, unpooled_se, n_cells``
    (natural-log / link scale; random slopes have ``term`` ``"<factor>:<covariate>"`` and no unpooled estimate).
    """
    check_not_empty(adata, "random_effects", cells=True)
    params = _glmm_params(adata, key)
    if genes is None:
        raise InputError("pass genes=[...] (names): random_effects refits the model for those genes.")
    family = params["family"]
    layer = params.get("layer") or None
    offset = params.get("offset") or None
    groups_key = params.get("groups_key") or None
    # "method" in results stored before the argument was named estimation
    estimation = params.get("estimation", params.get("method", "REML"))
    # the model glmm_de fitted: with replication="auto" it may hold an added sample-level term (per group if the
    # groups differ)
    fitted = params.get("design_fitted")
    design = params["design"] if isinstance(fitted, Mapping) else stored_formula(params, "all")
    genes = [genes] if isinstance(genes, str) else list(genes)
    # the offset glmm_de used: TMM factors over the same samples
    samples = params.get("offset_samples") if offset == "tmm" else None
    samples = list(samples) if samples is not None and not isinstance(samples, str) else samples
    matrix, off, gene_idx, groups = _prepare(adata, design, family, layer, offset, groups_key, genes, samples)
    min_expr = int(params.get("min_cells_expressing", 10))
    frames = []
    for group, rows in groups:
        name = "all" if group is None else group
        d = build_design(adata.obs.iloc[rows], stored_formula(params, name) if isinstance(fitted, Mapping) else design)
        sub, results, chunks, _ = _fit_genes(matrix, rows, gene_idx, d, off, family, estimation, n_jobs, min_expr)
        Z = build_Z(d.terms, rows.size)
        Ysub = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
        for idx, res in zip(chunks, results, strict=True):
            for j, g in enumerate(idx):
                if res.converged[j]:
                    gene = str(adata.var_names[gene_idx[g]])
                    eta = (0.0 if off is None else off[rows]) + d.X @ res.beta[j] + Z @ res.b[j]
                    frames += _gene_levels(d, res, j, Ysub[:, g], eta, family, gene=gene, group=name)
    cols = ["gene", "group", "term", "level", "blup", "blup_se", "unpooled", "unpooled_se", "n_cells"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    params = {**params, "tool": "random_effects", "source_key": key, "genes": genes}
    return DEResult(table=table, params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


def _glmm_params(adata: ad.AnnData, key: str) -> dict:
    """The ``params`` of the ``glmm_de`` result under ``adata.uns[key]``."""
    if key not in adata.uns or "params" not in adata.uns[key]:
        raise InputError(f"adata.uns[{key!r}] holds no glmm_de result; run scmlm.tl.glmm_de(..., key_added={key!r}).")
    params = dict(adata.uns[key]["params"])
    if params.get("tool") != "glmm_de":
        raise InputError(f"adata.uns[{key!r}] was written by {params.get('tool')!r}, not glmm_de.")
    return params


def _gene_levels(d, res, j: int, y, eta_all, family: str, *, gene: str, group: str) -> list[pd.DataFrame]:
    """Per random term of one gene's fit: each level's BLUP beside its unpooled estimate."""
    b = res.b[j]
    out = []
    for t, (zs, _) in zip(d.terms, term_slices(d.terms), strict=True):
        bt = b[zs].reshape(t.n_levels, t.k)
        st = res.b_se[j][zs].reshape(t.n_levels, t.k)
        n_cells = np.bincount(t.codes, minlength=t.n_levels)
        for c, cname in enumerate(t.col_names):
            term_name = t.name if cname == "(Intercept)" else f"{t.name}:{cname}"
            if cname == "(Intercept)":
                eta_minus = eta_all - bt[t.codes, c]
                u, u_se = fit_unpooled(y, eta_minus, t.codes, t.n_levels, family, res.phi[j])
            else:
                u = u_se = np.full(t.n_levels, np.nan)
            out.append(
                pd.DataFrame(
                    {
                        "gene": gene,
                        "group": group,
                        "term": term_name,
                        "level": list(t.level_names) or [str(i) for i in range(t.n_levels)],
                        "blup": bt[:, c],
                        "blup_se": st[:, c],
                        "unpooled": u,
                        "unpooled_se": u_se,
                        "n_cells": n_cells,
                    }
                )
            )
    return out
