"""Pseudobulk aggregation: sum raw counts per sample (× group), carrying sample-level covariates."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from .._errors import InputError
from .._validate import category_codes, check_obs_keys, check_unique_names
from ..models import accumulate

_CHUNK_ROWS = 50_000


def pseudobulk(
    adata: ad.AnnData,
    sample_key: str,
    *,
    groups_key: str | None = None,
    layer: str | None = None,
    min_cells: int = 1,
    chunk_size: int = _CHUNK_ROWS,
) -> ad.AnnData:
    """Sum raw counts per sample (and per group, e.g. cell type) into a pseudobulk AnnData.

    Parameters
    ----------
    adata
        Cell-level AnnData with raw integer counts in ``.X`` or ``layer``. May be opened with ``backed="r"``: rows are
        then streamed in chunks, so memory is bounded by the output, not by the input.
    sample_key
        obs column naming the biological sample (usually the donor, or donor × condition).
    groups_key
        Optional obs column (e.g. cell type): one pseudobulk row per sample × group.
    layer
        Layer holding raw counts; ``None`` uses ``.X``.
    min_cells
        Drop sample (× group) rows built from fewer cells; dropped rows are listed in ``uns["pseudobulk"]``.
    chunk_size
        Rows per chunk when streaming a backed file.

    Returns
    -------
    A new AnnData, one row per sample (× group): ``.X`` and ``layers["counts"]`` hold the summed counts (dense
    float64), ``layers["n_expressing"]`` the number of cells with a non-zero count. ``obs`` holds ``sample_key``,
    ``groups_key``, ``n_cells``, ``total_counts`` and every obs column that is constant within each row's cells
    (missing values ignored: a row whose cells are all NaN gets NaN); ``uns["pseudobulk"]`` records the parameters,
    the columns that were not constant (``dropped_columns``, with an example row in ``dropped_reasons``) and the rows
    removed by ``min_cells`` (``dropped_rows``). A DE design that uses a dropped column fails with that reason.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.pig_airway()
    >>> pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type", min_cells=10)
    >>> pb.n_obs, int(pb.obs["n_cells"].sum()) == adata.n_obs  # 7 pigs x 3 cell types, every cell counted once
    (21, True)
    """
    if not isinstance(sample_key, str):
        raise InputError(f"sample_key must be the name of an obs column, got {sample_key!r}.")
    if groups_key == sample_key:
        raise InputError(f"groups_key and sample_key are both {sample_key!r}; give groups_key a different column.")
    if min_cells < 1:
        raise InputError(f"min_cells={min_cells} must be at least 1.")
    check_obs_keys(adata, [sample_key], what="sample_key", grouping=True)
    check_obs_keys(adata, [groups_key], what="groups_key", grouping=True)
    check_unique_names(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes); nothing to aggregate.")

    obs = adata.obs
    s_codes, s_levels = category_codes(obs[sample_key])
    if groups_key is not None:
        g_codes, g_levels = category_codes(obs[groups_key])
        codes = s_codes * len(g_levels) + g_codes
    else:
        g_levels = pd.Index([None])
        codes = s_codes
    n_rows = len(s_levels) * len(g_levels)
    out = np.zeros((n_rows, adata.n_vars), dtype=np.float64)
    nexpr = np.zeros((n_rows, adata.n_vars), dtype=np.int32)

    n_bad = _aggregate_matrix(adata, layer, codes, out, nexpr, chunk_size)
    if n_bad:
        where = "adata.X" if layer is None else f"layer {layer!r}"
        hint = ' Pass layer="counts" (or the layer with raw counts).' if layer is None else ""
        raise InputError(
            f"{where} must hold raw non-negative integer counts, but {n_bad} stored entries are negative or not whole "
            f"numbers; it looks normalised or log-transformed.{hint}"
        )

    n_cells = np.bincount(codes, minlength=n_rows)
    present = np.flatnonzero(n_cells > 0)
    s_idx, g_idx = np.divmod(present, len(g_levels))
    new_obs = pd.DataFrame(
        {sample_key: pd.Categorical.from_codes(s_idx, categories=s_levels)},
    )
    if groups_key is not None:
        new_obs[groups_key] = pd.Categorical.from_codes(g_idx, categories=g_levels)
        names = [f"{s}_{g}" for s, g in zip(s_levels[s_idx], g_levels[g_idx], strict=True)]
    else:
        names = [str(s) for s in s_levels[s_idx]]
    new_obs.index = pd.Index(names)
    new_obs["n_cells"] = n_cells[present]
    new_obs["total_counts"] = out[present].sum(axis=1)

    carried, dropped_cols = _constant_columns(obs, codes, present, exclude={sample_key, groups_key})
    row_names = pd.Index(names)
    for col, values in carried.items():
        new_obs[col] = values

    keep = new_obs["n_cells"].to_numpy() >= min_cells
    dropped_rows = new_obs.index[~keep].tolist()
    if not keep.any():
        raise InputError(
            f"no {sample_key!r}{' × ' + repr(groups_key) if groups_key else ''} row has at least min_cells={min_cells} "
            f"cells (the largest has {int(new_obs['n_cells'].max())}); lower min_cells."
        )
    rows = present[keep]
    pb = ad.AnnData(
        X=out[rows],
        obs=new_obs.loc[keep].copy(),
        var=adata.var.copy(),
    )
    pb.layers["counts"] = pb.X.copy()
    pb.layers["n_expressing"] = nexpr[rows]
    for col in (sample_key, groups_key):
        if col is not None:
            pb.obs[col] = pb.obs[col].cat.remove_unused_categories()
    pb.uns["pseudobulk"] = {
        "sample_key": sample_key,
        "groups_key": groups_key if groups_key is not None else "",
        "layer": layer if layer is not None else "",
        "min_cells": int(min_cells),
        "n_cells_input": int(adata.n_obs),
        "dropped_columns": list(dropped_cols),
        "dropped_reasons": {
            col: f"it varies within {sample_key!r}{' × ' + repr(groups_key) if groups_key else ''} rows "
            f"(e.g. row {row_names[pos]!r} has {vals})"
            for col, (pos, vals) in dropped_cols.items()
        },
        "dropped_rows": dropped_rows,
    }
    return pb


def _aggregate_matrix(adata, layer, codes, out, nexpr, chunk_size) -> int:
    """Sum into ``out`` from memory, or by streaming row chunks when ``adata`` is backed."""
    if adata.isbacked:
        return _aggregate_backed(adata, layer, codes, out, nexpr, chunk_size)
    from .._validate import get_matrix

    return accumulate(get_matrix(adata, layer), codes, out, nexpr)


def _aggregate_backed(adata, layer, codes, out, nexpr, chunk_size) -> int:
    from ..io import iter_row_blocks

    key = "X" if layer is None else f"layers/{layer}"
    n_bad = 0
    with h5py.File(adata.filename, "r") as f:
        if key not in f:
            avail = list(f["layers"].keys()) if "layers" in f else []
            raise InputError(
                f"layer {layer!r} is not in the backed file {str(adata.filename)!r}; available layers: {avail}."
            )
        for start, block in iter_row_blocks(f[key], adata.n_obs, adata.n_vars, max_rows=chunk_size, csc="error"):
            n_bad += accumulate(block, codes[start : start + block.shape[0]], out, nexpr)
    return n_bad


def _constant_columns(obs: pd.DataFrame, codes: np.ndarray, present: np.ndarray, exclude: set) -> tuple[dict, dict]:
    """Columns of ``obs`` constant (ignoring NaN) within every group of ``codes``, with their per-group value.

    Dropped columns map to ``(position in present of a row where they vary, a short list of its values)``.
    """
    carried: dict[str, object] = {}
    dropped: dict[str, tuple[int, list]] = {}
    cols = [c for c in obs.columns if c not in exclude]
    if not cols:
        return carried, dropped
    key = pd.Series(codes, index=obs.index)
    nun = obs[cols].groupby(key.to_numpy(), sort=True, observed=True).nunique(dropna=True)
    first = obs[cols].groupby(key.to_numpy(), sort=True, observed=True).first()
    nun = nun.reindex(present)
    first = first.reindex(present)
    for c in cols:
        varies = nun[c].to_numpy() > 1
        if varies.any():
            pos = int(np.flatnonzero(varies)[0])
            vals = pd.unique(obs[c].to_numpy()[codes == present[pos]])
            dropped[c] = (pos, [str(v) for v in vals[:3]] + (["…"] if len(vals) > 3 else []))
        else:
            values = first[c]
            if isinstance(obs[c].dtype, pd.CategoricalDtype):
                values = pd.Categorical(values, categories=obs[c].cat.categories).remove_unused_categories()
            else:
                values = values.to_numpy()
            carried[c] = values
    return carried, dropped
