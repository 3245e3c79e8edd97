"""What the DE and hierarchy tools share: offsets, gene selection, per-group fitting, latent-scale variances."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import DesignError, InputError, _fmt_list
from .._validate import category_codes, check_counts, check_finite_values, check_obs_keys, get_matrix
from ..engine import GeneColumns
from ..io import BackedCounts


def check_backed_copy(adata: ad.AnnData, copy: bool, tool: str) -> None:
    """Refuse ``copy=True`` for a backed AnnData before any fit (anndata cannot copy it without a file name)."""
    if copy and adata.isbacked:
        raise InputError(
            f"{tool}(..., copy=True) cannot copy an AnnData opened backed; use the default (results written to "
            f"adata.uns), inplace=False (the result table), or adata.to_memory() first."
        )


def cell_matrix(adata: ad.AnnData, layer: str | None, check: str | None):
    """The counts of ``layer`` (``None``: ``X``), checked: ``check="counts"`` (non-negative integers), ``"finite"``.

    An AnnData opened with ``backed="r"`` gives a :class:`~scmlm.io.BackedCounts` (CSR, CSC or dense on disk, read
    once here and then gene block by gene block); the tools treat it as the matrix in memory and get the same fits.
    """
    if adata.isbacked:
        matrix = BackedCounts.from_adata(adata, layer)
        matrix.scan(check, layer)
        return matrix
    matrix = get_matrix(adata, layer)
    if check == "counts":
        check_counts(matrix, layer)
    elif check == "finite":
        check_finite(matrix, layer)
    return matrix


def cell_offset(
    adata: ad.AnnData,
    matrix,
    offset: str | None,
    layer: str | None,
    *,
    samples: str | list[str] | None = None,
    groups_key: str | None = None,
    design: str | None = None,
    contrast=None,
    cluster: str | None = None,
) -> np.ndarray | None:
    """Per-cell offset on the link scale: ``"log_total"`` (log total counts over all genes), ``"tmm"`` (plus the TMM
    factor of the cell's sample, per ``groups_key`` group, see :mod:`scmlm.models.offsets`; the samples are the
    ``samples`` columns, or read from ``design``, ``contrast`` and GEE's ``cluster``), an obs column, or None."""
    if offset is None:
        return None
    if not isinstance(offset, str):
        raise InputError(f"offset must be 'log_total', 'tmm', an obs column name or None, got {offset!r}.")
    if offset in ("log_total", "tmm"):
        totals = np.asarray(matrix.sum(axis=1)).ravel().astype(float)
        zero = np.flatnonzero(totals <= 0)
        if zero.size:
            where = "adata.X" if layer is None else f"layer {layer!r}"
            raise InputError(
                f"{zero.size} cell(s) have zero total counts in {where} (e.g. {_fmt_list(adata.obs_names[zero[:5]])}),"
                f" so offset={offset!r} is undefined; remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
            )
        if offset == "tmm":
            from ..design import resolve_samples, tmm_offset

            samples = resolve_samples(samples, design, contrast, adata.obs, cluster)
            if isinstance(matrix, BackedCounts):
                return _backed_tmm(adata.obs, matrix, np.log(totals), samples, groups_key)
            return tmm_offset(adata.obs, matrix, np.log(totals), samples, groups_key)[0]
        return np.log(totals)
    check_obs_keys(adata, [offset], what="offset")
    col = adata.obs[offset]
    if not pd.api.types.is_numeric_dtype(col):
        raise InputError(
            f"offset column {offset!r} must be numeric (the offset on the link scale, e.g. log size factors), but it "
            f"has dtype {col.dtype}."
        )
    off = col.to_numpy(dtype=float)
    if not np.all(np.isfinite(off)):
        raise InputError(f"offset column {offset!r} holds non-finite values; it is added on the link (log) scale.")
    return off


def _backed_tmm(obs: pd.DataFrame, matrix: BackedCounts, log_total, samples, groups_key) -> np.ndarray:
    """:func:`~scmlm.design.tmm_offset` of an on-disk matrix: the samples × genes sums read gene block by gene block
    (sums of whole counts in float64, so the same numbers as in one pass over the matrix in memory)."""
    from ..design import tmm_offset_from_sums, tmm_units
    from ..engine import segment_group_sums

    codes, units = tmm_units(obs, samples, groups_key)
    sums = segment_group_sums(matrix, codes, len(units))
    return tmm_offset_from_sums(log_total, codes, units, sums)[0]


def gene_indices(adata: ad.AnnData, genes) -> np.ndarray:
    """Positions of ``genes`` (a name, names, or a boolean mask over ``var_names``; ``None``: all genes)."""
    if genes is None:
        return np.arange(adata.n_vars)
    arr = np.asarray([genes] if isinstance(genes, str) else genes)
    if arr.dtype == bool:
        if arr.shape != (adata.n_vars,):
            raise InputError(f"genes mask has length {arr.size}; adata has {adata.n_vars} genes.")
        idx = np.flatnonzero(arr)
    else:
        names = [str(g) for g in np.atleast_1d(arr)]
        pos = adata.var_names.get_indexer(names)
        missing = [g for g, p in zip(names, pos, strict=True) if p < 0]
        if missing:
            raise InputError(f"gene(s) {_fmt_list(missing)} are not in adata.var_names.")
        idx = np.asarray(pos)
    if idx.size == 0:
        raise InputError("the gene selection is empty; pass genes=None for all genes.")
    return idx


def check_finite(matrix, layer) -> None:
    check_finite_values(matrix.data if sp.issparse(matrix) else np.asarray(matrix), layer)


def gene_columns(matrix, gene_idx: np.ndarray):
    """Columns ``gene_idx`` of a cells × genes matrix, in that order, for the per-gene fits.

    A CSR or CSC matrix is not copied: the result is a :class:`~scmlm.engine.GeneColumns` view from which the engine
    builds one chunk's CSC block at a time (a whole-matrix CSC copy of a 400,000-cell atlas cost 1.5 GB and 4 s).
    Dense input (and other sparse formats) is stored as CSC, so that the fitting code sees one layout.
    """
    if isinstance(matrix, BackedCounts):
        return GeneColumns(matrix, np.asarray(gene_idx, dtype=np.int64))
    if sp.issparse(matrix) and matrix.format in ("csr", "csc") and np.unique(gene_idx).size == gene_idx.size:
        return GeneColumns(matrix, np.asarray(gene_idx, dtype=np.int64))
    all_genes = gene_idx.size == matrix.shape[1] and np.array_equal(gene_idx, np.arange(matrix.shape[1]))
    if not sp.issparse(matrix):
        dense = np.asarray(matrix)
        return sp.csc_matrix(dense if all_genes else dense[:, gene_idx])
    sub = matrix if all_genes else matrix[:, gene_idx]
    return sub if sub.format == "csc" else sp.csc_matrix(sub)


def cell_rows(matrix, rows: np.ndarray):
    """Rows ``rows`` (cells of a group) of a :class:`~scmlm.engine.GeneColumns`, CSC or dense matrix, without a copy
    when all rows are used (nor ever for a ``GeneColumns``: it selects)."""
    if rows.size == matrix.shape[0] and np.array_equal(rows, np.arange(matrix.shape[0])):
        return matrix
    if isinstance(matrix, GeneColumns):
        return matrix.take_rows(rows)
    sub = matrix[rows]
    return sp.csc_matrix(sub) if sp.issparse(sub) and sub.format != "csc" else sub


def column_sums(sub) -> np.ndarray:
    """Sum of every column of a cells × genes block (:class:`~scmlm.engine.GeneColumns`, CSC or dense).

    In scipy's sum dtype (float32 for float32 counts), as ``sub.sum(axis=0)`` gives it.
    """
    if isinstance(sub, GeneColumns):
        colsum = sub.column_stats()[1]  # float64 holding the float32 sums exactly
        return colsum.astype(sub.dtype) if np.issubdtype(sub.dtype, np.floating) else colsum
    return np.asarray(sub.sum(axis=0)).ravel()


def scaled_means(sub, size_factor: np.ndarray) -> np.ndarray:
    """Mean over cells of each gene's values divided by the cell's size factor (``base_mean``)."""
    n = max(sub.shape[0], 1)
    if isinstance(sub, GeneColumns):
        return sub.column_stats(1.0 / size_factor)[2] / n
    if sp.issparse(sub):
        # a vector of the matrix's own dtype: a float64 vector would make scipy copy the whole matrix to float64
        return np.asarray(sub.T @ (1.0 / size_factor).astype(sub.dtype)).ravel().astype(float) / n
    return (sub / size_factor[:, None]).mean(axis=0)


def cell_groups(adata: ad.AnnData, groups_key: str | None) -> list[tuple[str | None, np.ndarray]]:
    """``(group name, cell rows)`` for each level of ``groups_key`` (one ``(None, all rows)`` without it)."""
    if groups_key is None:
        return [(None, np.arange(adata.n_obs))]
    codes, levels = category_codes(adata.obs[groups_key])
    return [(str(lev), np.flatnonzero(codes == k)) for k, lev in enumerate(levels)]


class NotTestable(DesignError):
    """A group (or the whole data) that cannot be tested; ``status`` is the short reason written in its rows."""

    def __init__(self, status: str, detail: str = "") -> None:
        super().__init__(f"{status}: {detail}" if detail else status)
        self.status = status


def group_status(err: Exception) -> str:
    """The status of the rows of a group that failed with ``err`` (e.g. ``no residual df``)."""
    if isinstance(err, NotTestable):
        return err.status
    if isinstance(err, DesignError):
        return f"not estimable: {err}"
    return f"failed: {type(err).__name__}: {err}"


def fit_groups(
    groups: list[tuple[str | None, np.ndarray]],
    fit: Callable[[str | None, np.ndarray], pd.DataFrame],
    not_estimable: Callable[[str | None, Exception], pd.DataFrame],
    *,
    groups_key: str | None,
    tool: str,
) -> list[pd.DataFrame]:
    """Fit every group; a group that cannot be fitted keeps rows from ``not_estimable`` and a warning naming it.

    Any error of one group (a design that cannot be estimated, no residual degrees of freedom, a numerical failure
    of the fitting library) is confined to that group's rows; the status says why (:func:`group_status`). Without
    ``groups_key`` the error is raised as is; if no group can be fitted, the first group's error is raised with its
    type (e.g. :class:`~scmlm.EstimabilityError`).
    """
    tables, failed = [], {}
    for name, rows in groups:
        try:
            tables.append(fit(name, rows))
        except (DesignError, ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as err:
            if groups_key is None:
                raise
            failed[name] = err
            tables.append(not_estimable(name, err))
    if groups_key is not None and len(failed) == len(groups):
        first = next(iter(failed.values()))
        if isinstance(first, DesignError):
            raise type(first)(f"the design cannot be fitted in any group of {groups_key!r}; e.g.: {first}") from first
        raise DesignError(f"no group of {groups_key!r} could be fitted; e.g.: {group_status(first)}") from first
    if failed:
        by_status: dict[str, list] = {}
        for name, err in failed.items():
            by_status.setdefault(group_status(err), []).append(name)
        why = "; ".join(f"{_fmt_list(names, limit=5)}: {status}" for status, names in by_status.items())
        warnings.warn(
            f"{tool}: {len(failed)} group(s) of {groups_key!r} could not be tested and keep rows with the reason in "
            f"'status': {why}.",
            UserWarning,
            stacklevel=3,
        )
    return tables


def gene_eligibility(sub, family: str, min_cells_expressing: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which genes of a cells × genes block (CSC or dense) are fitted, the same rule for every cell-level tool.

    A gene with no counts gets status ``"all zero"`` (count families), one with fewer than ``min_cells_expressing``
    cells with a non-zero value ``"too few expressing cells"``; the others ``"ok"`` (to be fitted).

    Returns
    -------
    ``(status, n_expressing, column_sums)``, each of length ``n_genes``.
    """
    if isinstance(sub, GeneColumns):
        n_expr, colsum, _ = sub.column_stats()
    elif sp.issparse(sub):
        n_expr = np.diff(sub.indptr) if sub.nnz == sub.count_nonzero() else np.asarray((sub != 0).sum(axis=0)).ravel()
        colsum = np.asarray(sub.sum(axis=0)).ravel()
    else:
        n_expr = (sub != 0).sum(axis=0)
        colsum = sub.sum(axis=0)
    n_expr = np.asarray(n_expr).ravel()
    colsum = np.asarray(colsum, dtype=float).ravel()
    status = np.full(n_expr.size, "ok", dtype=object)
    zero = (colsum == 0) if family != "gaussian" else np.zeros(n_expr.size, dtype=bool)
    status[(n_expr < min_cells_expressing) & ~zero] = "too few expressing cells"
    status[zero] = "all zero"
    return status, n_expr, colsum


def residual_variance(family: str, phi: np.ndarray, mean_count: np.ndarray) -> np.ndarray:
    """Distribution-specific residual variance on the latent scale (Nakagawa, Johnson & Schielzeth 2017).

    NB2 ``log(1 + 1/λ + φ)``, Poisson ``log(1 + 1/λ)``, binomial (logit) ``π²/3``, Gaussian the residual variance
    ``φ``; ``λ`` is the gene's mean count per cell (lognormal approximation).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.asarray(mean_count, dtype=float)
        if family == "nb":
            return np.log1p(1.0 / lam + phi)
        if family == "poisson":
            return np.log1p(1.0 / lam)
        if family == "binomial":
            return np.full(lam.shape, np.pi**2 / 3)
        return np.asarray(phi, dtype=float)
