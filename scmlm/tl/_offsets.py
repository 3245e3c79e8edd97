"""Composition-robust cell offsets: each cell's log library size plus the TMM factor of its sample.

Why: with ``offset="log_total"`` a gene's expected count is proportional to the cell's total count. When a few genes
take a large share of the library in one condition (interferon-stimulated genes in IFN-β-stimulated monocytes), every
other gene's share falls, and the cell-level model reports them all as down-regulated. edgeR corrects this on the
pseudobulk with TMM normalisation factors; ``offset="tmm"`` carries the same factors to the cells.

The identity that makes the two agree: for sample ``s`` with cells ``i ∈ s``, edgeR's effective library size is
``N_s f_s`` with ``N_s = Σ_i total_i`` (the pseudobulk column sum over all genes) and ``f_s`` the TMM factor
(``calcNormFactors(DGEList(pseudobulk))``). The cell offset ``log(total_i) + log(f_s)`` gives the cell-level mean
``μ_gi = total_i f_s exp(x_s'β)`` (random effects at zero), whose sum over the sample's cells is
``N_s f_s exp(x_s'β)``: the pseudobulk NB GLM's mean with edgeR's offset ``log(N_s f_s)``. So the fixed effects of the
cell-level model and of edgeR's model refer to the same normalised scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from .._validate import category_codes, check_obs_keys


def design_samples(
    design: str, contrast=None, obs: pd.DataFrame | None = None, cluster: str | None = None
) -> list[str]:
    """obs columns whose combination identifies a sample, read from the design when no ``sample_key`` is given.

    ``cluster`` (GEE's cluster column) and the grouping factors of the random terms (e.g. ``donor``; ``batch`` and
    ``donor`` for ``(1|batch/donor)``), crossed with, for a contrast ``(factor, test, reference)``, its factor (for
    several contrasts, the union of their factors); for
    any other contrast (a coefficient name, a vector, none), with the design's categorical fixed variables (given
    ``obs`` to tell them from numeric ones). With ``"~ condition + (1|donor)"`` and ``("condition", "stim", "ctrl")``
    a sample is a donor × condition combination, the unit paired pseudobulk sums. An empty list when the design names
    no such column.
    """
    import formulaic

    from ..design._formula import parse_formula

    parsed = parse_formula(design)
    cols: list[str] = [] if cluster is None else [cluster]
    for term in parsed.random:
        cols.extend(term.group)
    # several contrasts: the union of their factors
    factors, other = [], contrast is None
    if contrast is not None:
        from ..design._design import parse_contrasts

        for spec in parse_contrasts(contrast):
            triple = isinstance(spec.spec, tuple) and len(spec.spec) == 3 and isinstance(spec.spec[0], str)
            if triple and (obs is None or spec.spec[0] in obs.columns):
                factors.append(spec.spec[0])
            else:
                other = True
    cols.extend(factors)
    if other and obs is not None:
        fixed = sorted(formulaic.Formula(parsed.fixed).required_variables)
        cols.extend(v for v in fixed if v in obs.columns and not pd.api.types.is_numeric_dtype(obs[v]))
    return list(dict.fromkeys(cols))


def resolve_samples(
    sample_key: str | Sequence[str] | None,
    design: str | None,
    contrast=None,
    obs: pd.DataFrame | None = None,
    cluster: str | None = None,
) -> list[str]:
    """``sample_key`` as a list of obs columns, or the design's samples (:func:`design_samples`) when it is None."""
    if sample_key is None:
        cols = [] if design is None else design_samples(design, contrast, obs, cluster)
        if not cols:
            raise InputError(
                "offset='tmm' needs the samples"
                + (f", and design {design!r} names none (no random term, no contrast factor)" if design else "")
                + ": pass sample_key='sample' (an obs column) or a list of obs columns whose combination identifies "
                "a sample, e.g. ['donor', 'condition']."
            )
        if obs is not None:
            missing = [c for c in cols if c not in obs.columns]
            if missing:
                raise InputError(
                    f"design {design!r} uses {_fmt_list(missing)}, not among the columns of adata.obs: "
                    f"{_fmt_list(obs.columns)}."
                )
        return cols
    cols = [sample_key] if isinstance(sample_key, str) else list(sample_key)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise InputError(f"sample_key must be an obs column name or a list of them, got {sample_key!r}.")
    return cols


def sample_labels(obs: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer code of each cell's sample (the combination of ``columns``) and the sample labels (``a:b``)."""
    per_col = [category_codes(obs[col]) for col in columns]
    stacked = np.column_stack([c for c, _ in per_col])
    used, inverse = np.unique(stacked, axis=0, return_inverse=True)
    labels = [":".join(str(per_col[k][1][v]) for k, v in enumerate(row)) for row in used]
    return inverse.reshape(-1).astype(np.int64), labels


def pseudobulk_sums(matrix, codes: np.ndarray, n_units: int) -> np.ndarray:
    """Units × genes sums of a cells × genes matrix (sparse or dense) over the cells of each unit.

    The aggregation kernel of :func:`scmlm.pp.pseudobulk` (one pass over the stored counts, same specialisations).
    """
    from ..pp._aggregate import accumulate

    out = np.zeros((n_units, matrix.shape[1]), dtype=np.float64)
    nexpr = np.zeros((n_units, matrix.shape[1]), dtype=np.int32)
    accumulate(matrix, np.asarray(codes, dtype=np.int64), out, nexpr, check=False)
    return out


def tmm_units(obs: pd.DataFrame, samples: str | Sequence[str], groups_key: str | None = None):
    """The group × sample unit of each cell: integer codes and the table of units (``group``, ``sample``).

    TMM factors are computed among the samples of each group (``groups_key``), as :func:`scmlm.tl.pseudobulk_de`
    normalises per group; with ``groups_key=None`` every cell is in group ``"all"``.
    """
    cols = resolve_samples(samples, None)
    check_obs_keys(obs, cols, what="sample_key")
    check_obs_keys(obs, [groups_key], what="groups_key")
    if groups_key is None:
        keys = cols
        gname = np.full(len(obs), "all", dtype=object)
    else:
        keys = [groups_key, *cols]
        gname = obs[groups_key].astype(str).to_numpy(dtype=object)
    codes, labels = sample_labels(obs, keys)
    first = np.zeros(len(labels), dtype=np.int64)
    first[codes[::-1]] = np.arange(codes.size)[::-1]  # a cell of each unit
    sample = [":".join(str(obs[c].iloc[i]) for c in cols) for i in first]
    units = pd.DataFrame({"group": gname[first], "sample": sample})
    units["n_cells"] = np.bincount(codes, minlength=len(labels))
    return codes, units


def tmm_offset_from_sums(
    log_total: np.ndarray, codes: np.ndarray, units: pd.DataFrame, sums: np.ndarray
) -> tuple[np.ndarray, pd.DataFrame]:
    """Offsets ``log(total_i) + log(f_s)`` from the units × genes pseudobulk ``sums`` of :func:`tmm_units`' units.

    The sums may be accumulated block by block (the workflow streams a backed h5ad once); the factors are edgeR's
    ``calcNormFactors`` among the samples of each group.
    """
    from ..models._edger import tmm_factors

    factors = np.ones(len(units))
    lib = sums.sum(axis=1)
    for name, idx in units.groupby("group", sort=False).indices.items():
        if idx.size > 1:
            factors[idx] = tmm_factors(sums[idx].T, lib_size=lib[idx])
        bad = idx[~(np.isfinite(factors[idx]) & (factors[idx] > 0))]
        if bad.size:
            raise InputError(
                f"TMM factors are undefined for sample(s) {_fmt_list(units['sample'].iloc[bad])}"
                + (f" in group {name!r}" if name != "all" else "")
                + "; remove samples without counts or use offset='log_total'."
            )
    table = units.assign(lib_size=lib, norm_factor=factors, eff_lib_size=lib * factors)
    return np.asarray(log_total, dtype=float) + np.log(factors)[codes], table


def tmm_offset(
    adata: ad.AnnData,
    matrix,
    log_total: np.ndarray,
    samples: str | Sequence[str] | None,
    groups_key: str | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-cell offset ``log(total_i) + log(f_s)`` with ``f_s`` the TMM factor of cell i's sample.

    Parameters
    ----------
    adata
        Cell-level AnnData (its obs hold the sample and group columns).
    matrix
        Cells × genes counts of the layer, all genes (the same genes as the totals).
    log_total
        Log total count of each cell over all genes of the layer.
    samples
        obs column(s) whose combination identifies a sample.
    groups_key
        obs column (e.g. cell type): factors are computed among the samples of each group, on the group's
        pseudobulk, as :func:`scmlm.tl.pseudobulk_de` does per group.

    Returns
    -------
    The offset (natural log, one value per cell) and a table with one row per group × sample: ``group, sample,
    n_cells, lib_size`` (pseudobulk column sum over all genes), ``norm_factor`` (edgeR's ``calcNormFactors(method =
    "TMM")`` on the pseudobulk of all genes; geometric mean 1 within a group) and ``eff_lib_size``
    (``lib_size * norm_factor``, which equals the sum of ``exp(offset)`` over the sample's cells).
    """
    codes, units = tmm_units(adata.obs, samples, groups_key)
    sums = pseudobulk_sums(matrix, codes, len(units))
    return tmm_offset_from_sums(log_total, codes, units, sums)


class StreamedTMM:
    """TMM offsets from a matrix seen in row blocks (a backed h5ad streamed once).

    Accumulates the units × genes pseudobulk of :func:`tmm_units`' units over the blocks given to :meth:`add`;
    :meth:`offset` then gives what :func:`tmm_offset` gives on the whole matrix.
    """

    def __init__(self, obs: pd.DataFrame, samples: str | Sequence[str], groups_key: str | None, n_vars: int):
        self.codes, self.units = tmm_units(obs, samples, groups_key)
        self.sums = np.zeros((len(self.units), n_vars))

    def add(self, start: int, block) -> None:
        """Add the rows ``start, start + 1, …`` of the cells × genes matrix (sparse or dense)."""
        codes = self.codes[start : start + block.shape[0]]
        self.sums += pseudobulk_sums(block, codes, len(self.units))

    def offset(self, log_total: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
        """The per-cell offset and the factor table, as :func:`tmm_offset`."""
        return tmm_offset_from_sums(log_total, self.codes, self.units, self.sums)


def streamed_tmm(obs: pd.DataFrame, spec: dict, n_vars: int) -> StreamedTMM:
    """A :class:`StreamedTMM` for one analysis ``spec``: ``design``, ``contrast``, ``sample_key``, ``groups_key``.

    The samples are resolved as ``glmm_de(..., offset="tmm")`` resolves them, so that an offset streamed here (the
    workflow's gene shards, ``scmlm hierarchy``) equals the one ``glmm_de`` computes on the whole matrix.
    """
    contrast = spec.get("contrast")
    if isinstance(contrast, list) and len(contrast) == 3 and not any(":" in str(c) for c in contrast):
        contrast = tuple(contrast)  # a (factor, test, reference) stored as a list; a list of "f:t:r" stays a list
    samples = resolve_samples(spec.get("sample_key"), spec["design"], contrast, obs)
    return StreamedTMM(obs, samples, spec.get("groups_key"), n_vars)
