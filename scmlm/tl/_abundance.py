"""Differential abundance of cell types between conditions, tested at the unit of replication (the sample)."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import anndata as ad
import formulaic
import numpy as np
import pandas as pd

from .._errors import DesignError, InputError, _fmt_list
from .._settings import NOTE
from .._validate import category_codes, check_not_empty, check_obs_keys
from .._version import __version__
from ..design import build_design, containment_df, contrast_param, parse_contrasts, parse_formula, within_parent
from ..models import clr_transform, fit_abundance_glmm, fit_abundance_lm, logit_transform
from ..results import DEResult, finalize_table

_METHODS = ("glmm", "clr", "logit")
_REPLICATION = ("auto", "as_written")
log = logging.getLogger(__name__)


def abundance_de(
    adata: ad.AnnData,
    design: str,
    contrast,
    *,
    cell_type_key: str = "cell_type",
    sample_key: str = "sample",
    method: Literal["glmm", "clr", "logit"] = "glmm",
    replication: Literal["auto", "as_written"] = "auto",
    estimation: Literal["REML", "ML"] = "REML",
    min_cells: int = 10,
    pseudocount: float = 0.5,
    key_added: str = "abundance_de",
    inplace: bool = True,
    copy: bool = False,
    n_jobs: int | None = None,
) -> DEResult | ad.AnnData | None:
    """Which cell types change in abundance? One test per cell type, with the sample as the unit of replication.

    The cells of each sample are counted per cell type (``k_ts`` cells of type ``t`` out of the ``N_s`` cells of
    sample ``s``) and the counts are modelled between samples. Cells are not replicates of a condition, samples are:
    two samples differ in composition by more than the binomial sampling of their cells (dissociation, which piece of
    tissue, the donor's own response), and a model that does not carry that variation tests the condition against
    cell counts. That is the trap of a cell-level binomial GLMM with a donor random effect only (MASC) when a donor
    gives several samples: on paired nulls (3–10 donors, 50–3,000 cells per sample) its model (``(1|donor)`` only,
    ML, z test) called 23–33 % of null types at p < 0.05 (``docs/abundance.md``).

    Methods
    -------
    ``"glmm"`` (default): a binomial GLMM per cell type of ``k_ts`` out of ``N_s``, logit link, with the design's
    random terms plus an observation-level ``(1|<sample_key>)`` term for the over-dispersion between samples (added
    unless the design has a term with one level per sample, e.g. ``(1|donor)`` when each donor is one sample; see
    ``replication``). Laplace fit (REML by default), Wald t test: between donors on ``min(containment df,
    Satterthwaite df)`` (the containment df counts the units that replicate the contrast: donors minus 2), within
    donors (paired) on the containment df, donors minus 1 (the best calibrated of the rules measured, see
    :func:`scmlm.models.abundance.fit_abundance_glmm`). Not moderated
    across types: the package's empirical-Bayes prior needs many features (≥ 10), a study has a handful of types,
    and types differ systematically in their over-dispersion (rare and common types), so a shared prior would move
    each type's variance toward the wrong value. ``coef`` is the change of the log odds
    of the type's share of the sample.

    ``"clr"``: centred log-ratios of each sample's type counts (pseudocount ``pseudocount``) with delta-method
    precision weights (crumblr's ``Var(clr_t) ≈ (1 - 2/D)/c_t + Σ_u 1/c_u / D²``), a weighted linear model per type
    and limma's moderated variances across types (``squeezeVar``), or with random terms a precision-weighted mixed
    model per type (dream: Kenward–Roger df below 20 samples). The reference-free check: ``coef`` is the change of
    the type's log abundance relative to the geometric mean of all types, so a change of one type moves the others'
    CLR by ``-coef / D`` each.

    ``"logit"``: the same weighted linear model on the logit of each type's proportion (propeller's transform), with
    delta-method weights ``1 / (1/(k+a) + 1/(N-k+a))``.

    Composition is relative. The proportions of a sample sum to one, so when one type expands every other type's
    proportion falls a little even if its absolute number is unchanged: a per-type test of proportions (``glmm``,
    ``logit``) can call a small, real shift of an unchanged type when another type changes a lot. ``clr`` measures
    each type against the geometric mean of all, which is shifted by ``1/D`` of the change; neither can tell
    which types changed in absolute numbers (that needs an external reference, such as cell counts per volume).
    Read a significant type next to the types with the largest effects.

    Default. On simulated nulls with donor and sample variation of proportions (12 types × 100 datasets, paired and
    between-donor alternating, 3–10 donors per condition, 50–3,000 cells per sample; ``docs/abundance.md``) the
    GLMM called 4.0 % of null types at p < 0.05 (paired 3.0 %, between 5.0 %), ``clr`` 5.8 % and ``logit`` 5.9 %
    (between donors 6.5 % and 6.3 %); with two of 12 types changed by ±0.7 (log abundance) the power was 70.5 %,
    70 % and 70 % (a second run: nulls 3.9 %, 4.6 %, 4.1 %; power 66 %, 65.5 %, 67 %). The GLMM is the default:
    it never exceeded the nominal 5 % in any pool measured while the linear models reached 6.5 % between donors, at
    the same power, and it is the model lme4 fits.

    Parameters
    ----------
    adata
        Cell-level AnnData; only ``obs`` is used.
    design
        Model formula over sample-level ``obs`` columns (constant within each sample), e.g. ``"~ condition"``,
        ``"~ condition + (1|donor)"`` (paired: each donor gives one sample per condition), ``"~ batch + condition"``.
    contrast
        As in :func:`scmlm.tl.pseudobulk_de`: ``(factor, test, reference)``, a coefficient name, a numeric vector, a
        list of them, or a dict ``{name: contrast}``; a dict value listing several rows is one joint F test
        (``coef`` and ``se`` NaN, ``stat`` F).
    cell_type_key
        obs column with the cell type (cluster) of each cell; at least two types.
    sample_key
        obs column naming each sample (one library, e.g. a donor × condition); the unit of replication.
    method
        ``"glmm"``, ``"clr"`` or ``"logit"`` (see above).
    replication
        ``"auto"`` (default): the GLMM gets a ``(1|<sample_key>)`` term unless a design term already has one level
        per sample. ``"as_written"``: fit the random terms as written (for comparisons such as MASC's
        ``(1|donor)`` alone; its p-values then treat the cells of a sample as replicates).
    estimation
        GLMM only: ``"REML"`` (default) or ``"ML"`` (Laplace ML, as lme4's ``glmer``; for comparisons).
    min_cells
        Types with fewer cells over all samples get status ``"too few cells"`` and no test.
    pseudocount
        Added to each count before the ``clr`` and ``logit`` transforms.
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}``.
    inplace, copy
        As in :func:`scmlm.tl.pseudobulk_de`.
    n_jobs
        Accepted for the shared signature of the tools; the fits are small (one per type) and run in this process.

    Returns
    -------
    ``None``, the copy, or the :class:`~scmlm.results.DEResult`. One row per cell type × contrast: ``gene`` (the cell
    type), ``group`` (``"all"``), ``contrast``, ``coef`` (natural log: log odds ratio for ``glmm``/``logit``,
    CLR difference for ``clr``), ``log2fc``, ``se``, ``stat``, ``df``, ``pvalue``, ``padj`` (BH over the types of a
    contrast), ``base_mean`` (mean proportion of the type over samples), ``method`` (``abundance_<method>``),
    ``converged``, ``status``, ``n_cells`` (cells of the type), ``n_samples_present``, ``var_<term>`` (GLMM variance
    components on the logit scale; ``var_residual`` for the linear models) and ``df_prior`` (linear models). Status:
    ``ok``, ``singular`` (a variance component at zero; the test stands), ``too few cells``, ``absent in
    <column>=<level>`` (no cell of the type in any sample of that level: its change is not estimable), ``not
    testable`` (no replication at the contrast's level), ``not converged``, ``separated``, ``failed: …``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate_composition(n_donors=4, n_cell_types=5, seed=0)
    >>> res = scmlm.tl.abundance_de(adata, "~ condition + (1|donor)", ("condition", "case", "ctrl"), inplace=False)
    >>> res.params["design_fitted"]
    '~ condition + (1|donor) + (1|sample)'
    >>> res.table[["gene", "coef", "pvalue", "status"]].shape
    (5, 4)
    """
    check_not_empty(adata, "abundance_de", genes=False)
    if method not in _METHODS:
        raise InputError(f"method={method!r} is not known; use one of {_fmt_list(_METHODS)}.")
    if replication not in _REPLICATION:
        raise InputError(f"replication={replication!r} is not known; use one of {_fmt_list(_REPLICATION)}.")
    if str(estimation).upper() not in ("REML", "ML"):
        raise InputError(f"estimation={estimation!r} is not known; use 'REML' or 'ML'.")
    if pseudocount <= 0:
        raise InputError(f"pseudocount={pseudocount} must be > 0 (the transforms take logs of the counts).")
    if min_cells < 0:
        raise InputError(f"min_cells={min_cells} must be 0 or more (the fewest cells a type needs to be tested).")
    check_obs_keys(adata, [cell_type_key, sample_key], what="key", grouping=True)
    if cell_type_key == sample_key:
        raise InputError(f"cell_type_key and sample_key are both {cell_type_key!r}; they must name different columns.")
    counts, samples, types = _count_table(adata.obs, cell_type_key, sample_key)
    sample_obs = _sample_table(adata.obs, design, sample_key, samples)
    specs = parse_contrasts(contrast)
    formula, added, dropped = _fitted_formula(design, sample_obs, sample_key, method, replication)
    d = build_design(sample_obs, formula, factors=[sample_key])
    cons = d.contrasts(contrast)
    n, rank = d.X.shape[0], int(np.linalg.matrix_rank(d.X))
    if n - rank < 1:
        raise DesignError(
            f"{n} samples for {rank} coefficients of design {formula!r}: no residual df. A test of abundance needs "
            "more samples than coefficients."
        )
    totals = counts.sum(axis=1)
    n_cells = counts.sum(axis=0)
    props = counts / totals[:, None]
    status = _type_status(counts, n_cells, sample_obs, d, min_cells)
    fit = np.flatnonzero(status == "ok")
    Ls = [c.L for c in cons]
    tests = None
    if fit.size:
        if method == "glmm":
            support = [np.abs(np.atleast_2d(L)).sum(axis=0) for L in Ls]
            dfs = [containment_df(d, v) for v in support]
            paired = [within_parent(d, v) for v in support]
            tests = fit_abundance_glmm(
                counts[:, fit].T, totals, d.X, d.terms, Ls, dfs=dfs, paired=paired, method=str(estimation).upper()
            )
        else:
            transform = clr_transform if method == "clr" else logit_transform
            present = n_cells > 0
            if method == "clr":
                present &= ~_clr_structural_zeros(types, status)
            values, weights = transform(counts[:, present].T, pseudocount=pseudocount)
            pos = np.cumsum(present) - 1
            tests = fit_abundance_lm(values[pos[fit]], weights[pos[fit]], d.X, Ls, terms=d.terms)
    tables = []
    for con, k in zip(cons, range(len(cons)), strict=True):
        out = pd.DataFrame(
            {
                "gene": types,
                "group": "all",
                "contrast": con.name,
                "method": f"abundance_{method}",
                "base_mean": props.mean(axis=0),
                "converged": False,
                "status": status.copy(),
                "n_cells": n_cells.astype(int),
                "n_samples_present": (counts > 0).sum(axis=0).astype(int),
            }
        )
        for col in ("coef", "se", "stat", "df", "pvalue"):
            out[col] = np.nan
        if tests is not None:
            t = tests[k]
            for col in ("coef", "se", "stat", "df", "pvalue"):
                out.loc[fit, col] = np.asarray(getattr(t, col), dtype=float)
            out.loc[fit, "converged"] = np.asarray(t.converged, dtype=bool)
            out.loc[fit, "status"] = np.asarray(t.status, dtype=object)
            for name, v in (t.var or {}).items():
                out[f"var_{name}"] = np.nan
                out.loc[fit, f"var_{name}"] = np.asarray(v, dtype=float)
            if method != "glmm":
                out["df_prior"] = np.nan
                out.loc[fit, "df_prior"] = t.df_prior
        tables.append(out)
    table = finalize_table(pd.concat(tables, ignore_index=True))
    params = {
        "tool": "abundance_de",
        "design": design,
        "design_fitted": formula,
        "added_terms": added,
        "dropped_terms": dropped,
        "contrast": contrast_param(contrast),
        "contrasts": [s.name for s in specs],
        "method": method,
        "replication": replication,
        "estimation": str(estimation).upper() if method == "glmm" else "",
        "cell_type_key": cell_type_key,
        "sample_key": sample_key,
        "min_cells": int(min_cells),
        "pseudocount": float(pseudocount),
        "n_samples": int(n),
        "n_cell_types": len(types),
        "scmlm_version": __version__,
    }
    return DEResult(table=table, params=params).deliver(adata, key_added, inplace=inplace, copy=copy)


def _count_table(obs: pd.DataFrame, cell_type_key: str, sample_key: str):
    """Samples × types cell counts, with the sample and type names; errors for unusable inputs."""
    col = obs[sample_key]
    if isinstance(col.dtype, pd.CategoricalDtype):  # every category: an unused one is a sample without cells
        s_codes, samples = col.cat.codes.to_numpy().astype(np.int64), pd.Index(col.cat.categories)
    else:
        s_codes, samples = category_codes(col)
    t_codes, types = category_codes(obs[cell_type_key])
    samples = [str(s) for s in samples]
    types = [str(t) for t in types]
    counts = np.zeros((len(samples), len(types)), dtype=np.int64)
    np.add.at(counts, (s_codes, t_codes), 1)
    empty = [samples[i] for i in np.flatnonzero(counts.sum(axis=1) == 0)]
    if empty:
        raise InputError(
            f"sample(s) {_fmt_list(empty)} of obs[{sample_key!r}] have no cells of any type (unused categories after "
            f"subsetting?); drop them first: adata.obs[{sample_key!r}] = "
            f"adata.obs[{sample_key!r}].cat.remove_unused_categories()."
        )
    present = counts.sum(axis=0) > 0
    if present.sum() < 2:
        raise InputError(
            f"obs[{cell_type_key!r}] has {int(present.sum())} cell type with cells "
            f"({_fmt_list(np.asarray(types)[present])}); differential abundance compares the shares of at least "
            "two types. Pass the cluster or cell-type column as cell_type_key."
        )
    if len(samples) < 3:
        raise InputError(
            f"obs[{sample_key!r}] has {len(samples)} sample(s); abundance is tested between samples, so it needs "
            "replicate samples per condition. Is sample_key the column naming each sample?"
        )
    return counts, samples, types


def _design_variables(design: str) -> list[str]:
    parsed = parse_formula(design)
    names = sorted(formulaic.Formula(parsed.fixed).required_variables)
    for r in parsed.random:
        names.extend(r.group)
        if r.lhs not in ("1", "0", "-1"):
            names.extend(sorted(formulaic.Formula("~ " + r.lhs).required_variables))
    return list(dict.fromkeys(names))


def _sample_table(obs: pd.DataFrame, design: str, sample_key: str, samples: list[str]) -> pd.DataFrame:
    """One row per sample with the design's columns (each must be constant within samples) and the sample key."""
    variables = _design_variables(design)
    missing = [v for v in variables if v not in obs.columns]
    if missing:
        raise DesignError(
            f"design {design!r} uses {_fmt_list(missing)}, not found among the obs columns: {_fmt_list(obs.columns)}."
        )
    key = obs[sample_key].astype(str)
    cols = [v for v in variables if v != sample_key]
    frame = pd.DataFrame({v: obs[v] for v in cols}, index=obs.index)
    frame[sample_key] = key.to_numpy()
    varying = [v for v in cols if (frame.groupby(sample_key, observed=True)[v].nunique(dropna=False) > 1).any()]
    if varying:
        raise DesignError(
            f"design {design!r} uses {_fmt_list(varying)}, which vary within samples of {sample_key!r}; abundance is "
            "tested between samples, so every design column must be a property of the sample (condition, donor, "
            f"batch). Check sample_key, or define the samples by the column too, e.g. adata.obs['sample'] = "
            f"adata.obs[{sample_key!r}].astype(str) + '_' + adata.obs[{varying[0]!r}].astype(str)."
        )
    first = frame.groupby(sample_key, observed=True, sort=False).head(1).set_index(sample_key)
    out = first.loc[samples].copy()
    for v in cols:
        if isinstance(obs[v].dtype, pd.CategoricalDtype):
            out[v] = pd.Categorical(out[v], categories=obs[v].cat.categories).remove_unused_categories()
    out[sample_key] = pd.Categorical(samples, categories=samples)
    out.index = pd.Index(samples, name=None)
    return out


def _same_partition(a, b) -> bool:
    frame = pd.DataFrame({"a": np.asarray(a), "b": np.asarray(b)}).drop_duplicates()
    return bool(frame["a"].is_unique and frame["b"].is_unique)


def _fitted_formula(design, sample_obs, sample_key, method, replication):
    """The formula to fit: with ``(1|sample)`` for the GLMM, without terms that are the residual for the linear models.

    Returns ``(formula, added_terms, dropped_terms)``.
    """
    with warnings.catch_warnings():  # the fitted formula is built again and says the same
        warnings.simplefilter("ignore")
        d = build_design(sample_obs, design)
    per_sample = [t.name for t in d.terms if _same_partition(t.codes, np.arange(len(sample_obs)))]
    if method == "glmm":
        if replication == "as_written" or per_sample:
            return design, [], []
        term = f"(1|{sample_key})"
        log.log(
            NOTE,
            "abundance_de: added %s to %r: samples differ in composition beyond binomial sampling of their cells "
            "(replication='as_written' fits the design as written).",
            term,
            design,
        )
        return f"{design} + {term}", [term], []
    if not per_sample:
        return design, [], []
    # a random term with one level per sample is the residual of a sample-level linear model: not identifiable
    parsed = parse_formula(design)
    keep = [r for r in parsed.random if r.group_name not in per_sample or r.lhs not in ("1",)]
    dropped = [str(r) for r in parsed.random if r not in keep]
    formula = parsed.fixed + "".join(f" + {r}" for r in keep)
    log.log(
        NOTE,
        "abundance_de: %s has one level per sample, the residual of the linear model; fitted %r.",
        dropped,
        formula,
    )
    return formula, [], dropped


def _clr_structural_zeros(types, status: np.ndarray) -> np.ndarray:
    """Types absent from a level of a design factor, left out of the CLR reference (with a warning).

    A type with no cell in one condition would enter every sample's geometric mean at its pseudocount there, and
    shift every other type's log-ratio between the conditions by the same amount: all of them would look changed.
    """
    absent = np.array([str(s).startswith("absent in") for s in status], dtype=bool)
    if absent.any():
        names = ", ".join(f"{types[i]!r} ({status[i]})" for i in np.flatnonzero(absent))
        warnings.warn(
            f"abundance_de(method='clr'): {names} left out of the CLR reference: a type missing from a condition "
            "would shift every other type's centred log-ratio. The CLR effects are relative to the other types.",
            UserWarning,
            stacklevel=3,
        )
    return absent


def _type_status(counts, n_cells, sample_obs, d, min_cells) -> np.ndarray:
    """``ok``, ``too few cells``, ``no cells``, or ``absent in <column>=<level>`` for each type."""
    status = np.full(counts.shape[1], "ok", dtype=object)
    status[n_cells < min_cells] = "too few cells"
    fixed_vars = sorted(formulaic.Formula(d.parsed.fixed).required_variables)
    for v in fixed_vars:
        col = sample_obs[v]
        if not isinstance(col.dtype, pd.CategoricalDtype) and not pd.api.types.is_object_dtype(col):
            continue
        for level in pd.unique(col.astype(str)):
            rows = (col.astype(str) == level).to_numpy()
            absent = (counts[rows].sum(axis=0) == 0) & (status == "ok")
            status[absent] = f"absent in {v}={level}"
    status[n_cells == 0] = "no cells"
    return status
