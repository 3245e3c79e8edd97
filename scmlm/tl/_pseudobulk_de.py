"""Pseudobulk DE: edgeR-style NB quasi-likelihood, limma-voom (dream with random terms), PyDESeq2."""

from __future__ import annotations

import warnings
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import DesignError, InputError, _fmt_list
from .._validate import check_counts, check_not_empty, check_obs_keys, check_unique_names, get_matrix, renamed_arguments
from .._version import __version__
from ..design import build_design, contrast_names, contrast_param, parse_contrasts, parse_formula
from ..design._design import _variables
from ..models import filter_by_expr, nb_ql_multi, tmm_factors, voom_limma_multi
from ..results import DEResult, finalize_table
from ._common import NotTestable, cell_groups, fit_groups, group_status

# rows that look like cells: no aggregation record, at least this many rows, and this many rows in one design cell
_CELL_LEVEL_MIN_ROWS = 50
_CELL_LEVEL_ROWS_PER_CELL = 25

_METHODS = ("nb_ql", "voom", "pydeseq2")


@renamed_arguments(pb="adata")
def pseudobulk_de(
    adata: ad.AnnData,
    design: str,
    contrast,
    *,
    method: Literal["nb_ql", "voom", "pydeseq2"] = "nb_ql",
    groups_key: str | None = None,
    layer: str | None = None,
    filter_genes: bool = True,
    key_added: str = "pseudobulk_de",
    inplace: bool = True,
    copy: bool = False,
    rows_are_samples: bool = False,
) -> DEResult | ad.AnnData | None:
    """Differential expression between samples of a pseudobulk AnnData.

    Parameters
    ----------
    adata
        Pseudobulk AnnData (samples × genes) with summed raw counts, e.g. from :func:`scmlm.pp.pseudobulk`.
    design
        Model formula over ``adata.obs`` columns, e.g. ``"~ batch + condition"``, ``"~ donor + condition"`` (paired),
        ``"~ condition * sex"``. With ``method="voom"`` random terms such as ``"~ condition + (1|donor)"`` fit a
        precision-weighted linear mixed model per gene (variancePartition's dream). Grouping columns (the recorded
        sample key, ``groups_key``, random-term factors) are factors even when they hold integers; another integer
        column that looks like an ID (e.g. ``donor``) enters as a number with a warning: write ``C(donor)``.
    contrast
        ``(factor, test_level, reference_level)``, a coefficient name, or a numeric vector over the design's columns.
        Several contrasts in one call: a list of tuples or names, or a dict ``{name: contrast}`` (numeric vectors need
        a name). A dict value that lists several contrasts (e.g. ``["dose[T.mid]", "dose[T.high]"]``) or is a 2-D
        array of rows is one joint test, "any difference among three doses": ``"nb_ql"`` the QL F test on the
        deviance (``glmQLFTest(fit, coef = 2:3)``), ``"voom"`` limma's moderated F (``topTableF``); ``coef`` and
        ``se`` are then NaN and ``stat`` is F (numerator df: the number of rows). One fit per group serves every
        contrast (dispersions, QL or voom weights and ``eBayes`` prior are shared, as when edgeR or limma test several
        contrasts of one fit); the ``contrast`` column holds the names (a tuple's is ``factor_test_vs_ref``) and BH
        runs per group and contrast. ``"pydeseq2"`` takes tuple contrasts only; dream (``"voom"`` with random
        terms) fits each contrast on its own, as its test is part of the per-gene mixed-model fit.
    method
        ``"nb_ql"``: negative-binomial GLM with TMM normalisation, empirical-Bayes dispersions and quasi-likelihood
        F-tests with robust empirical-Bayes QL dispersions (edgeR's ``glmQLFit(robust=TRUE)`` + ``glmQLFTest``).
        ``"voom"``: voom precision weights + limma moderated t (dream when the design has random terms).
        ``"pydeseq2"``: PyDESeq2's Wald test (``pip install scmlm[deseq2]``).
    groups_key
        obs column (e.g. cell type): each group gets its own fit, gene filter and multiple-testing correction.
    layer
        Layer with the summed counts; ``None`` uses ``.X``.
    filter_genes
        Apply edgeR's ``filterByExpr`` rule per group; removed genes keep a row with ``status="filtered"``.
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}``.
    inplace
        Write into ``adata`` (and return ``None``); ``False`` returns the :class:`~scmlm.results.DEResult` and leaves
        ``adata`` untouched.
    copy
        Write into a copy of ``adata`` and return it.
    rows_are_samples
        The rows are samples even though ``adata`` carries no aggregation record (``uns["pseudobulk"]`` or
        ``obs["n_cells"]`` from :func:`scmlm.pp.pseudobulk`), e.g. bulk RNA-seq with many replicates. Without it, data
        whose rows look like cells (no record and many rows per design cell) are refused: testing cells as samples is
        pseudoreplication.

    Returns
    -------
    ``None``, the copy, or the result (see ``inplace``/``copy``). The table has one row per gene × group × contrast
    with columns ``gene, group, contrast, coef`` (natural log), ``log2fc, se, stat, df, pvalue, padj, base_mean, method,
    converged, status`` and ``dispersion``.

    Examples
    --------
    >>> import scmlm
    >>> pb = scmlm.pp.pseudobulk(scmlm.datasets.pig_airway(), "donor", groups_key="cell_type", min_cells=10)
    >>> scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "CFTRKO", "WT"), groups_key="cell_type")
    >>> scmlm.get.de_df(pb, key="pseudobulk_de").columns[:4].tolist()
    ['gene', 'group', 'contrast', 'coef']
    """
    check_not_empty(adata, "pseudobulk_de")
    if method not in _METHODS:
        raise InputError(f"method={method!r} is not known; use one of {_fmt_list(_METHODS)}.")
    check_unique_names(adata)
    check_obs_keys(adata, [groups_key], what="groups_key", grouping=True)
    check_sample_rows(adata, design, groups_key=groups_key, rows_are_samples=rows_are_samples)
    counts_all = get_matrix(adata, layer)
    counts_all = counts_all.toarray() if hasattr(counts_all, "toarray") else np.asarray(counts_all)
    counts_all = counts_all.astype(float, copy=False)
    check_counts(counts_all, layer)
    # validate formula and contrast on all samples first: clear errors before any fitting
    keys = grouping_keys(adata, groups_key)
    full = build_design(adata.obs, design, check_rank=groups_key is None, factors=keys)
    if full.parsed.has_random and method != "voom":
        raise DesignError(
            f"design {design!r} has random terms; pseudobulk method {method!r} fits fixed effects only. Use "
            "method='voom' (precision-weighted mixed model, as dream) or the cell-level scmlm.tl.glmm_de."
        )
    specs = parse_contrasts(contrast)  # clear errors for a malformed list or dict before any fitting
    if groups_key is None:
        full.contrasts(contrast)
    if method == "pydeseq2":
        bad = [s.name for s in specs if s.joint or not (isinstance(s.spec, tuple) and len(s.spec) == 3)]
        if bad:
            raise InputError(
                f"method='pydeseq2' takes contrasts (factor, test_level, reference_level) only; {_fmt_list(bad)} "
                "are not. Use method='nb_ql' or 'voom' for coefficient names, numeric vectors and joint F tests."
            )
    groups = _drop_empty_samples(adata, counts_all, cell_groups(adata, groups_key), layer)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = fit_groups(
            groups,
            lambda name, rows: _fit_group(
                adata, counts_all, rows, name, design, contrast, method=method, filter_genes=filter_genes,
                factors=keys, notes=notes,
            ),
            lambda name, err: _failed_group(adata, name, contrast, method, group_status(err)),
            groups_key=groups_key,
            tool="pseudobulk_de",
        )  # fmt: skip
    table = finalize_table(pd.concat(tables, ignore_index=True))
    _report_untestable(table, caught, groups_key)
    params = {
        "tool": "pseudobulk_de",
        "design": design,
        "contrast": contrast_param(contrast),
        "contrasts": [s.name for s in specs],
        "method": method,
        "groups_key": groups_key,
        "layer": layer,
        "filter_genes": bool(filter_genes),
        "scmlm_version": __version__,
    }
    if notes:
        params["notes"] = notes
    return DEResult(table=table, params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


def _dropped_columns(pb: ad.AnnData) -> dict[str, str]:
    """Columns that :func:`scmlm.pp.pseudobulk` did not carry, with the reason (when recorded)."""
    rec = pb.uns.get("pseudobulk", {})
    if not isinstance(rec, dict):
        return {}
    reasons = dict(rec.get("dropped_reasons", {}) or {})
    for col in np.atleast_1d(rec.get("dropped_columns", [])):
        reasons.setdefault(str(col), "it is not constant within the aggregated cells")
    return {str(k): str(v) for k, v in reasons.items()}


def check_sample_rows(pb: ad.AnnData, design: str, *, groups_key: str | None, rows_are_samples: bool = False) -> None:
    """Refuse cell-level data and designs on columns that the aggregation dropped, with errors that say what to do.

    A design column missing from a pseudobulk ``obs`` because it varied within the aggregated cells (a condition
    inside each donor) means the aggregation merged its levels; the error names the sample key to aggregate by.
    """
    rec = pb.uns.get("pseudobulk", {})
    sample_key = str(rec.get("sample_key", "")) if isinstance(rec, dict) else ""
    variables = _variables(parse_formula(design), pb.obs.columns)
    dropped = _dropped_columns(pb)
    for v in variables:
        if v not in pb.obs.columns and v in dropped:
            by = f"sample_key {sample_key!r}" if sample_key else "the sample key"
            raise DesignError(
                f"design {design!r} uses {v!r}, which pp.pseudobulk dropped because {dropped[v]}: aggregating by {by} "
                f"merged the levels of {v!r}. Aggregate by a sample key that separates them, e.g. "
                f"adata.obs['sample'] = adata.obs[{sample_key or 'donor'!r}].astype(str) + '_' + "
                f"adata.obs[{v!r}].astype(str); scmlm.pp.pseudobulk(adata, 'sample', ...)."
            )
    if rows_are_samples or "pseudobulk" in pb.uns or "n_cells" in pb.obs.columns:
        return
    if pb.n_obs < _CELL_LEVEL_MIN_ROWS:
        return
    keys = [v for v in variables if v in pb.obs.columns and not pd.api.types.is_numeric_dtype(pb.obs[v])]
    if groups_key is not None:
        keys.append(groups_key)
    if keys:
        sizes = pb.obs.groupby(keys, observed=True).size()
        largest, where = int(sizes.max()), f"one combination of {_fmt_list(keys)} ({sizes.idxmax()!r})"
    else:
        largest, where = pb.n_obs, "the single design cell"
    if largest >= _CELL_LEVEL_ROWS_PER_CELL:
        raise InputError(
            f"pseudobulk_de got {pb.n_obs} rows with no aggregation record (uns['pseudobulk'] or obs['n_cells']) and "
            f"{largest} rows in {where}: the rows look like cells, and testing cells as samples is "
            "pseudoreplication. Aggregate first: pb = scmlm.pp.pseudobulk(adata, sample_key='donor', "
            "groups_key=...) (CLI: --sample-key). If the rows really are samples (bulk data), pass "
            "rows_are_samples=True (CLI: --rows-are-samples)."
        )


def _drop_empty_samples(pb, counts_all, groups, layer) -> list[tuple]:
    """Leave out samples with no counts at all (they carry no information and break normalisation), with a warning."""
    empty = counts_all.sum(axis=1) <= 0
    if not empty.any():
        return groups
    where = "adata.X" if layer is None else f"layer {layer!r}"
    warnings.warn(
        f"pseudobulk_de: {int(empty.sum())} sample(s) have zero counts in every gene of {where} and are left out: "
        f"{_fmt_list(pb.obs_names[empty])}.",
        UserWarning,
        stacklevel=3,
    )
    return [(name, rows[~empty[rows]]) for name, rows in groups]


def _report_untestable(table: pd.DataFrame, caught, groups_key) -> None:
    """One line when no group could be tested (instead of one per group); otherwise pass the warnings on."""
    if groups_key is not None and not (table["status"] == "ok").any():
        counts = table.drop_duplicates(["group"]).groupby("status", sort=False).size()
        why = "; ".join(f"{n} with status {s!r}" for s, n in counts.sort_values(ascending=False).items())
        warnings.warn(
            f"pseudobulk_de: no group of {groups_key!r} was testable ({why}); each group needs samples from both "
            "sides of the contrast, more samples than coefficients and genes passing the filter. Aggregate coarser "
            "groups or use fewer groups.",
            UserWarning,
            stacklevel=3,
        )
        caught = [w for w in caught if not str(w.message).startswith("pseudobulk_de:")]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _failed_group(pb, group, contrast, method, status) -> pd.DataFrame:
    names = contrast_names(contrast)
    return pd.DataFrame(
        {
            "gene": np.tile(pb.var_names.to_numpy(), len(names)),
            "group": group if group is not None else "all",
            "contrast": np.repeat(names, pb.n_vars),
            "method": method,
            "converged": False,
            "status": status,
        }
    )


def grouping_keys(pb: ad.AnnData, groups_key: str | None) -> list[str]:
    """The grouping columns of a pseudobulk: its recorded sample key and ``groups_key`` (factors in any design)."""
    rec = pb.uns.get("pseudobulk", {})
    sample_key = rec.get("sample_key") if isinstance(rec, dict) else None
    keys = [str(k) for k in np.atleast_1d(sample_key if sample_key is not None else [])]
    return [k for k in [*keys, groups_key] if k and k in pb.obs.columns]


def _fit_group(
    pb, counts_all, rows, group, design, contrast, *, method, filter_genes, factors=(), notes=None
) -> pd.DataFrame:
    where = "" if group is None else f" in group {group!r}"
    if rows.size == 0:
        raise NotTestable("no samples", f"every sample{where} has zero counts")
    obs = pb.obs.iloc[rows]
    counts = counts_all[rows].T  # genes × samples
    d = build_design(obs, design, factors=factors, warn=False)
    cons = d.contrasts(contrast)
    n, rank = d.X.shape[0], int(np.linalg.matrix_rank(d.X))
    if n - rank < 1:
        raise NotTestable(
            "no residual df",
            f"{n} samples{where} for {rank} coefficients of design {design!r}; a test needs more samples than "
            "coefficients",
        )
    if filter_genes:
        keep = np.asarray(filter_by_expr(counts, design=d.X), dtype=bool)
    else:
        keep = counts.sum(axis=1) > 0
    outs = []
    for con in cons:
        out = pd.DataFrame(
            {
                "gene": pb.var_names.to_numpy(),
                "group": group if group is not None else "all",
                "contrast": con.name,
                "method": method,
                "converged": False,
                "status": np.where(keep, "ok", "filtered" if filter_genes else "all zero"),
            }
        )
        for col in ("coef", "se", "stat", "df", "pvalue", "base_mean", "dispersion"):
            out[col] = np.nan
        outs.append(out)
    if not keep.any():
        return pd.concat(outs, ignore_index=True)
    y = counts[keep]
    idx = np.flatnonzero(keep)
    empty = y.sum(axis=0) <= 0
    if empty.any():
        raise NotTestable(
            "empty sample",
            f"sample(s) {_fmt_list(obs.index[empty])}{where} have no counts in the genes that pass the filter",
        )
    _note_residual_terms(d, group, notes)
    # edgeR: y[keep, , keep.lib.sizes = FALSE] then calcNormFactors (TMM) on the kept genes
    norm_factors = tmm_factors(y)
    eff_lib = y.sum(axis=0) * norm_factors
    base_mean = (y / (eff_lib / np.exp(np.mean(np.log(eff_lib))))[None, :]).mean(axis=1)
    genes = pb.var_names[keep]
    per_contrast = _group_tests(
        method, y, d, cons, norm_factors, base_mean, obs=obs, design=design, contrast=contrast, genes=genes
    )
    for out, (stats, conv, status, var_components) in zip(outs, per_contrast, strict=True):
        if status is not None:
            out.loc[idx, "status"] = np.asarray(status, dtype=object)
        if var_components:
            for name, v in var_components.items():
                out.loc[idx, f"var_{name}"] = np.asarray(v, dtype=float)
        _fill(out, idx, stats, conv)
    return pd.concat(outs, ignore_index=True)


def _note_residual_terms(d, group, notes) -> None:
    """A random term with one sample per level is the residual under another name: its variance is not estimable."""
    for t in d.terms:
        if np.unique(t.codes).size == t.codes.size:
            where = "" if group is None else f" in group {group!r}"
            msg = (
                f"random term (1|{t.name}){where} has one sample per level, so it cannot be told apart from the "
                f"residual and its variance is not estimable; drop (1|{t.name}) (each sample is then its own "
                f"{t.name}) or use the cell-level scmlm.tl.glmm_de."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            if notes is not None:
                notes.append(msg)


def _group_tests(method: str, y, d, cons, norm_factors, base_mean, *, obs, design, contrast, genes) -> list[tuple]:
    """Every contrast's test of one group's kept genes: ``(stats, converged, status, var_components)`` each.

    One fit serves every contrast (edgeR's dispersions and QL fit, limma's voom weights and prior), as when edgeR or
    limma test several contrasts of one fit.
    """
    Ls = [con.L.T for con in cons]  # p-vectors, or p × q for a joint test
    per_contrast = []
    if method == "nb_ql":
        # one dispersion estimate and QL fit for every contrast; each test adds only its null-model fit
        for r in nb_ql_multi(y, d.X, Ls, norm_factors=norm_factors, robust=True):
            stats = {
                "coef": _scalar_or_nan(r.coef),
                "se": _scalar_or_nan(r.se),
                "stat": r.stat,
                "df": r.df2,
                "pvalue": r.pvalue,
                "base_mean": base_mean,
                "dispersion": r.dispersion,
            }
            per_contrast.append((stats, np.asarray(r.converged, dtype=bool), None, None))
    elif method == "voom":
        kwargs = {"terms": d.terms} if d.terms else {}
        for r in voom_limma_multi(y, d.X, Ls, norm_factors=norm_factors, **kwargs):
            stats = {
                "coef": _scalar_or_nan(r.coef),
                "se": _scalar_or_nan(r.se),
                "stat": r.stat,
                "df": r.df,
                "pvalue": r.pvalue,
                "base_mean": base_mean,
            }
            per_contrast.append((stats, np.asarray(r.converged, dtype=bool), r.status, r.var_components))
    else:
        for stats, conv in _pydeseq2(y, obs, design, parse_contrasts(contrast), genes):
            per_contrast.append((stats, conv, None, None))
    return per_contrast


def _scalar_or_nan(a: np.ndarray) -> np.ndarray:
    """A joint test's per-row estimates have no single value: NaN (``stat`` holds the F statistic)."""
    a = np.asarray(a, dtype=float)
    return a if a.ndim == 1 else np.full(a.shape[0], np.nan)


def _fill(out: pd.DataFrame, idx: np.ndarray, stats: dict, conv: np.ndarray) -> None:
    for col, val in stats.items():
        out.loc[idx, col] = np.asarray(val, dtype=float)
    out.loc[idx, "converged"] = conv
    bad = conv == False  # noqa: E712
    if bad.any():
        st = out.loc[idx, "status"].to_numpy(dtype=object)
        st[bad & (st == "ok")] = "not converged"
        out.loc[idx, "status"] = st
        for col in ("stat", "pvalue"):
            v = out.loc[idx, col].to_numpy(dtype=float)
            v[bad] = np.nan
            out.loc[idx, col] = v
    # a fit that gave no p-value is not "ok": say why (e.g. no residual df left for a gene)
    untested = (out["status"] == "ok").to_numpy() & ~np.isfinite(out["pvalue"].to_numpy(dtype=float))
    if untested.any():
        df = out["df"].to_numpy(dtype=float)
        out.loc[untested, "status"] = np.where(df[untested] > 0, "no p-value", "no residual df")


def _pydeseq2(y, obs, design, specs, genes):
    """PyDESeq2: one ``deseq2()`` fit, then a Wald test (``DeseqStats``) per contrast; ``(stats, converged)`` each."""
    try:
        from pydeseq2.dds import DeseqDataSet
        from pydeseq2.ds import DeseqStats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError("method='pydeseq2' needs PyDESeq2: pip install 'scmlm[deseq2]'.") from err
    meta = obs.copy()
    meta.index = meta.index.astype(str)
    counts = pd.DataFrame(np.round(y.T).astype(int), index=meta.index, columns=[str(g) for g in genes])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=counts, metadata=meta, design=design.replace(" ", ""), quiet=True, n_cpus=1)
        dds.deseq2()
    out = []
    for spec in specs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = DeseqStats(dds, contrast=[str(c) for c in spec.spec], quiet=True, n_cpus=1)
            ds.summary()
        res = ds.results_df
        ln2 = np.log(2.0)
        stats = {
            "coef": res["log2FoldChange"].to_numpy() * ln2,
            "se": res["lfcSE"].to_numpy() * ln2,
            "stat": res["stat"].to_numpy(),
            "df": np.full(len(res), np.inf),
            "pvalue": res["pvalue"].to_numpy(),
            "base_mean": res["baseMean"].to_numpy(),
            "dispersion": np.asarray(dds.var["dispersions"]),
        }
        conv = np.isfinite(stats["pvalue"]) | np.isfinite(stats["coef"])
        out.append((stats, conv))
    return out
