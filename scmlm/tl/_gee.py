"""Population-average differential expression: a GEE per gene with donors as clusters (the AnnData tool).

The model, its fitting steps, the small-sample corrections and their null calibration are described with the
kernel, :mod:`scmlm.models.gee`; here the obs columns become the design, the cluster codes and the offsets, and the
fits become the DE table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import DesignError, InputError, _fmt_list
from .._validate import (
    category_codes,
    check_not_empty,
    check_obs_keys,
    check_unique_names,
    renamed_arguments,
)
from .._version import __version__
from ..design import build_design, contrast_names, contrast_param
from ..engine import parallel_chunks, resolve_n_jobs, run_chunks
from ..models import GEE_DF_METHODS, GEE_FAMILIES, GEE_SMALL_SAMPLE, GEEResult, fit_gee, prepare_gee
from ..results import DEResult, finalize_table
from ._common import (
    cell_groups,
    cell_matrix,
    cell_offset,
    cell_rows,
    check_backed_copy,
    fit_groups,
    gene_columns,
    gene_indices,
)

_STAT_COLS = ("coef", "se", "stat", "df", "pvalue", "base_mean", "dispersion", "working_corr", "n_iter")


@renamed_arguments(groups="cluster_key")
def gee_de(
    adata: ad.AnnData,
    design: str,
    contrast,
    *,
    cluster_key: str = "donor",
    family: str = "nb",
    layer: str | None = None,
    offset: str | None = "log_total",
    groups_key: str | None = None,
    genes: Sequence[str] | None = None,
    min_cells_expressing: int = 10,
    small_sample: Literal["avg", "md_scaled", "kc", "md", "none"] = "avg",
    df: Literal["design", "clusters", "satterthwaite"] = "design",
    n_jobs: int | None = None,
    key_added: str = "gee_de",
    inplace: bool = True,
    copy: bool = False,
) -> DEResult | ad.AnnData | None:
    """Population-average differential expression with a GEE per gene, donors as clusters.

    Each gene gets a marginal GLM fitted by generalized estimating equations with an exchangeable working
    correlation within ``cluster_key`` (the donor), cluster-robust sandwich standard errors with a small-sample
    correction (for a donor-level contrast the average of the Kauermann–Carroll and Mancl–DeRouen sandwiches, for a
    contrast within donors Mancl–DeRouen) and t / F tests whose degrees of freedom come from the donors: for a
    donor-level contrast those of the donor-level design (Satterthwaite; Hotelling's T² with Zhang's df for a joint
    test), else ``n_donors - q`` (``q``: design columns constant within every donor). The
    effect is *population-average*: how the mean over all donors changes. With the log link (``"nb"``,
    ``"poisson"``) it estimates the same slope as a GLMM; with
    ``"binomial"`` the log odds ratio is smaller in magnitude than the GLMM's cluster-specific one
    (``docs/gee_vs_glmm.md``).

    Parameters
    ----------
    adata
        Cells × genes AnnData with raw counts in ``.X`` or ``layer``.
    design
        Fixed-effect formula over ``adata.obs``, e.g. ``"~ condition"`` or ``"~ batch + condition"``. No random terms:
        the cluster is given by ``cluster_key``.
    contrast
        ``(factor, test_level, reference_level)``, a coefficient name or a numeric vector over the design's columns
        (a t test). Several contrasts in one call: a list of tuples or names, or a dict ``{name: contrast}``
        (numeric vectors need a name); one GEE fit per gene serves all of them, each with its own df. A dict value
        that lists several contrasts or is a 2-D array of rows is a joint Wald F test (``coef`` and ``se`` are then
        NaN and ``stat`` is F).
    cluster_key
        obs column defining the clusters (donors). Cells of a cluster are correlated; clusters are independent.
    family
        ``"nb"``: negative binomial (NB2, log link), dispersion ``alpha`` per gene from the Pearson moment equation
        (reported as ``dispersion``). ``"poisson"``: Poisson, log link. ``"binomial"``: detection ``y > 0``, logit link.
        (``scmlm.models.GEE_FAMILIES``: the GLMM families without ``"gaussian"``).
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
        Small-sample correction of the cluster-robust sandwich: ``"avg"`` (default: for a donor-level contrast the
        average of the Kauermann–Carroll and Mancl–DeRouen covariances, Ford & Westgate 2017; for a joint test of
        donor-level rows Mancl–DeRouen times ``(n_donors - q) / n_donors``; for a contrast within donors
        Mancl–DeRouen), ``"md_scaled"`` (the default before: Mancl–DeRouen times ``(n_donors - q) /
        n_donors`` for a donor-level contrast; liberal with three or more donor-level columns), ``"kc"``
        (Kauermann–Carroll; liberal with few donors of unequal size), ``"md"`` (Mancl–DeRouen, statsmodels'
        ``cov_type="bias_reduced"``; conservative with few donors) or ``"none"`` (Liang–Zeger; liberal with few
        donors). Null calibration per setting is in ``docs/gee_vs_glmm.md`` and the docstring of
        :mod:`scmlm.models.gee`.
    df
        Degrees of freedom of the tests. ``"design"`` (default): for a donor-level contrast those of the same
        contrast in the donor-level design (one row per donor, equal weights, CR2 sandwich: Satterthwaite for a t
        test, Hotelling's T² with Zhang's df for a joint F test; e.g. 6, not 9, for a pairwise contrast of three
        dose groups of 4 donors), at most ``n_donors - q``; for a t test within donors the Bell–McCaffrey df under
        the working model (Kauermann–Carroll adjustment), at most ``n_donors - q``; a joint test within donors
        ``n_donors - q``.
        ``"clusters"``: ``n_donors - q`` for every test (F tests ``F(k, n_donors - q)``). ``"satterthwaite"``:
        Bell–McCaffrey under the working model, per gene, at most ``n_donors - q`` (t tests; F tests use
        ``n_donors - q``).
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
    ``None``, the copy, or the result (see ``inplace``/``copy``). One row per gene × group × contrast: ``gene,
    group, contrast, coef`` (natural-log / log-odds scale), ``log2fc, se, stat, df, pvalue, padj, base_mean`` (mean
    count per cell), ``method="gee", converged, status``, plus ``dispersion`` (NB2 alpha; NaN for other families),
    ``working_corr`` (estimated exchangeable correlation) and ``n_iter``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=8, n_cells=60, n_genes=300, seed=1)
    >>> genes = adata.var_names[:20]
    >>> res = scmlm.tl.gee_de(adata, "~ condition", ("condition", "case", "ctrl"), genes=genes, inplace=False)
    >>> res.table[["gene", "coef", "se", "df", "pvalue"]].shape
    (20, 5)
    >>> bool((res.table["df"] == 6).all())  # 8 donors - intercept - condition (two groups of 4 donors)
    True
    """
    check_not_empty(adata, "gee_de", cells=True)
    check_backed_copy(adata, copy, "gee_de")
    if family not in GEE_FAMILIES:
        raise InputError(f"family={family!r} is not known; use one of {_fmt_list(GEE_FAMILIES)}.")
    if not isinstance(cluster_key, str):
        raise InputError(f"cluster_key must name one obs column (the donor), got {cluster_key!r}.")
    if small_sample not in GEE_SMALL_SAMPLE:
        raise InputError(f"small_sample={small_sample!r} is not known; use one of {_fmt_list(GEE_SMALL_SAMPLE)}.")
    if df not in GEE_DF_METHODS:
        raise InputError(f"df={df!r} is not known; use one of {_fmt_list(GEE_DF_METHODS)}.")
    if int(min_cells_expressing) < 0:
        raise InputError(f"min_cells_expressing={min_cells_expressing} must be >= 0.")
    resolve_n_jobs(n_jobs)  # a clear error for n_jobs="two" before any work
    check_unique_names(adata)
    check_obs_keys(adata, [cluster_key], what="cluster_key", grouping=True)
    check_obs_keys(adata, [groups_key], what="groups_key", grouping=True)
    matrix = cell_matrix(adata, layer, "counts")  # backed="r": read once here, then gene block by gene block
    off_all = cell_offset(
        adata, matrix, offset, layer, groups_key=groups_key, design=design, contrast=contrast, cluster=cluster_key
    )
    gene_idx = gene_indices(adata, genes)

    full = build_design(adata.obs, design, check_rank=groups_key is None, factors=[cluster_key, groups_key])
    if full.parsed.has_random:
        terms = " + ".join(str(r) for r in full.parsed.random)
        raise DesignError(
            f"design {design!r} has random term(s) {terms}; GEE takes the cluster from cluster_key= (now "
            f"{cluster_key!r}) and fits fixed effects only. Write design={full.parsed.fixed!r}, cluster_key='donor', "
            "or use scmlm.tl.glmm_de for cluster-specific effects."
        )
    names = contrast_names(contrast)  # clear errors for a malformed list or dict before any fitting
    if groups_key is None:
        _contrast_matrices(full, contrast)

    def fit(name, rows):
        return _fit_group(
            adata, matrix, off_all, rows, gene_idx, name, design, contrast, cluster_key=cluster_key, family=family,
            min_cells=int(min_cells_expressing), small_sample=small_sample, df_method=df, n_jobs=n_jobs,
        )  # fmt: skip

    def not_estimable(name, err):
        return pd.concat(
            [_failed_rows(adata.var_names[gene_idx], name, c, f"not estimable: {err}") for c in names],
            ignore_index=True,
        )

    tables = fit_groups(cell_groups(adata, groups_key), fit, not_estimable, groups_key=groups_key, tool="gee_de")
    table = finalize_table(pd.concat(tables, ignore_index=True))
    params = {
        "tool": "gee_de",
        "design": design,
        "contrast": contrast_param(contrast),
        "contrasts": names,
        "cluster_key": cluster_key,
        "family": family,
        "layer": layer,
        "offset": offset,
        "groups_key": groups_key,
        "genes": None if genes is None else [str(g) for g in adata.var_names[gene_idx]],
        "min_cells_expressing": int(min_cells_expressing),
        "working_correlation": "exchangeable",
        "small_sample": small_sample,
        "df": df,
        "df_rule": {
            "design": "one-row donor-level contrasts: Satterthwaite df of the donor-level design (at most "
            "n_clusters - q); other t tests: n_clusters - q; joint tests: Hotelling T2 with eta = n_clusters - q",
            "clusters": "n_clusters - n_coefficients_constant_within_clusters",
            "satterthwaite": "Bell-McCaffrey, at most n_clusters - n_coefficients_constant_within_clusters",
        }[df],
        "scmlm_version": __version__,
    }
    return DEResult(table=table, params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


# ---------------------------------------------------------------- validation and shared work


def _contrast_matrices(d, contrast) -> list[tuple[str, np.ndarray]]:
    """``(name, L)`` per contrast, ``L`` of shape (k, p): one row for a t test, several for a joint F test."""
    return [(c.name, np.atleast_2d(c.L)) for c in d.contrasts(contrast)]


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
    adata,
    matrix,
    off_all,
    rows,
    gene_idx,
    group,
    design,
    contrast,
    *,
    cluster_key,
    family,
    min_cells,
    small_sample,
    df_method,
    n_jobs,
) -> pd.DataFrame:
    obs = adata.obs.iloc[rows]
    d = build_design(obs, design, factors=[cluster_key], warn=False)
    cons = _contrast_matrices(d, contrast)
    clusters, levels = category_codes(obs[cluster_key])
    n_clusters = len(levels)
    data = prepare_gee(
        d.X, clusters, n_clusters, [L for _, L in cons], offset=None if off_all is None else off_all[rows],
        family=family, min_cells=min_cells, small_sample=small_sample, df_method=df_method,
    )  # fmt: skip
    if n_clusters < 2 or data.df < 1:
        raise DesignError(
            f"{n_clusters} cluster(s) of {cluster_key!r} and {data.n_between} design column(s) constant within "
            f"clusters leave {int(data.df)} donor degrees of freedom; GEE needs more {cluster_key!r} levels than "
            "donor-level coefficients."
        )
    # a view of the selected genes and the group's cells: each chunk's CSC block is cut when it is fitted
    sub = cell_rows(gene_columns(matrix, gene_idx), rows)
    # threads: the numba kernel (nearly all the time) releases the GIL; each thread cuts its chunk from the counts
    entries = None if getattr(sub, "nnz_per_gene", None) is None else sub.nnz_per_gene
    chunks = parallel_chunks(len(gene_idx), n_jobs, entries)
    fit = functools.partial(fit_gee, data)
    parts = run_chunks(fit, sub, chunks, n_jobs=n_jobs, desc=f"GEE {group or ''}", backend="threads")
    res = GEEResult._make(np.concatenate([getattr(p, f) for p in parts]) for f in GEEResult._fields)
    outs = []
    for j, (name, _) in enumerate(cons):
        out = pd.DataFrame(
            {
                "gene": adata.var_names[gene_idx].to_numpy(dtype=object),
                "group": group if group is not None else "all",
                "contrast": name,
                "method": "gee",
                "converged": res.converged[:, j],
                "status": res.status[:, j],
            }
        )
        for col in _STAT_COLS:
            val = getattr(res, col)
            out[col] = val[:, j] if val.ndim == 2 else val
        outs.append(out)
    return pd.concat(outs, ignore_index=True)
