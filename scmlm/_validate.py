"""Input checks shared by the public functions. Every error names the key, column, layer or value and the fix."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._errors import InputError, _fmt_list


def check_obs_keys(
    adata: ad.AnnData | pd.DataFrame, keys: Sequence[str | None], *, what: str = "obs key", grouping: bool = False
) -> None:
    """Every non-None key must be an obs column without missing values (``adata``: an AnnData or its obs).

    ``grouping``: the keys name groups of cells (samples, donors, cell types), so a column of non-integer numbers (a
    continuous covariate such as ``size_factor``: about one cell per group) is refused.
    """
    obs = adata if isinstance(adata, pd.DataFrame) else adata.obs
    for key in keys:
        if key is None:
            continue
        if key not in obs.columns:
            raise InputError(
                f"{what} {key!r} is not a column of adata.obs; available columns: {_fmt_list(obs.columns)}."
            )
        col = obs[key]
        n_na = int(col.isna().sum())
        if n_na:
            raise InputError(
                f"obs column {key!r} has {n_na} missing value(s) (NaN) in {len(obs)} cells; fill them or subset "
                f"the cells first, e.g. adata = adata[adata.obs[{key!r}].notna()].copy()."
            )
        if grouping and pd.api.types.is_float_dtype(col) and not np.all(np.mod(col.to_numpy(), 1) == 0):
            raise InputError(
                f"{what} {key!r} holds non-integer numbers ({col.nunique()} distinct values in {len(obs)} cells), a "
                "continuous covariate, not groups of cells; pass a column of sample, donor or cell-type labels."
            )


def check_unique_names(adata: ad.AnnData) -> None:
    for axis, names in (("obs", adata.obs_names), ("var", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()
            raise InputError(
                f"{axis}_names are not unique ({len(dup)} duplicated, e.g. {_fmt_list(dup[:5])}); call "
                f"adata.{axis}_names_make_unique() first."
            )


def get_matrix(adata: ad.AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for an unknown layer."""
    if layer is None:
        if adata.X is None:
            raise InputError("adata.X is empty; pass layer=... naming the layer that holds the counts.")
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers; available layers: {_fmt_list(adata.layers.keys())}.")
    return adata.layers[layer]


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"layer {layer!r}"


def check_counts_values(values: np.ndarray, layer: str | None, *, block: int = 1 << 22) -> None:
    """Raise if ``values`` (the stored entries of a count matrix) hold negative or non-integer numbers.

    Checked in blocks so that an atlas-sized matrix needs no full-size temporaries.
    """
    values = np.asarray(values).ravel()
    if values.size == 0:
        return
    hint = ' Pass layer="counts" (or the layer with raw counts).' if layer is None else ""
    n_bad, first = 0, None
    for start in range(0, values.size, block):
        v = values[start : start + block]
        if np.issubdtype(v.dtype, np.integer):
            bad = v < 0
        else:
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(v) | (v < 0) | (v != np.floor(v))
        nb = int(np.count_nonzero(bad))
        if nb and first is None:
            first = v[np.flatnonzero(bad)[0]]
        n_bad += nb
    if n_bad:
        raise InputError(
            f"{_where(layer)} must hold raw non-negative integer counts, but it contains the value {first!r} "
            f"({n_bad} such entries); it looks normalised or log-transformed.{hint}"
        )


def check_finite_values(values: np.ndarray, layer: str | None) -> None:
    """Raise if ``values`` (stored entries of a matrix fitted with the Gaussian family) hold NaN or inf."""
    if not np.all(np.isfinite(values)):
        where = _where(layer)
        raise InputError(f"{where} has non-finite values (NaN or inf); the Gaussian family needs finite values.")


def check_counts(matrix, layer: str | None) -> None:
    """Check an in-memory matrix (dense or sparse) for non-negative integer counts."""
    if sp.issparse(matrix):
        check_counts_values(matrix.data, layer)
    else:
        check_counts_values(np.asarray(matrix), layer)


def category_codes(col: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and the levels actually present, in category order (or sorted order)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.cat.remove_unused_categories()
        return col.cat.codes.to_numpy().astype(np.int64), pd.Index(col.cat.categories)
    cat = pd.Categorical(col)
    return cat.codes.astype(np.int64), pd.Index(cat.categories)


def renamed_arguments(**renamed: str):
    """Decorator: a keyword argument given under a former name fails with a message naming the current one.

    ``@renamed_arguments(method="estimation")`` turns ``glmm_de(..., method="ML")`` into ``InputError: glmm_de's
    method= is now estimation=; call glmm_de(..., estimation='ML')`` instead of Python's bare "unexpected keyword".
    The signature seen by ``inspect`` stays the function's own.
    """
    import functools

    def wrap(func):
        @functools.wraps(func)
        def inner(*args, **kwargs):
            old = [name for name in renamed if name in kwargs]
            if old:
                shown = {n: repr(kwargs[n]) if len(repr(kwargs[n])) <= 40 else "..." for n in old}
                hints = "; ".join(
                    f"{name}= is now {renamed[name]}= (call {func.__name__}(..., {renamed[name]}={shown[name]}))"
                    for name in old
                )
                raise InputError(f"{func.__name__}: {hints}.")
            return func(*args, **kwargs)

        return inner

    return wrap


def check_not_empty(adata, tool: str, genes: bool = True, cells: bool = False) -> None:
    """Refuse an AnnData with no cells (or samples) or, where the tool fits genes, no genes.

    Said before a design is built on nothing. A cell-level tool (``cells=True``) given a pseudobulk of
    ``pp.pseudobulk`` warns that it fits rows as cells.
    """
    shape = getattr(adata, "shape", None)
    if shape is None or len(shape) != 2:
        return  # not an AnnData: the tool's own type check says so
    n_obs, n_vars = shape
    if n_obs == 0 or (genes and n_vars == 0):
        what = "observations (cells or samples)" if n_obs == 0 else "genes"
        raise InputError(
            f"{tool}: adata has no {what} (shape {n_obs} × {n_vars}); check the subsetting or filtering that made it."
        )
    if cells and "pseudobulk" in getattr(adata, "uns", {}):
        warnings.warn(
            f"{tool}: adata is a pseudobulk (uns['pseudobulk'] from pp.pseudobulk: {n_obs} samples), but {tool} fits "
            "cells (min_cells_expressing counts rows, the unit of replication is found among cells); for samples use "
            "scmlm.tl.pseudobulk_de, or pass the cell-level AnnData.",
            UserWarning,
            stacklevel=3,
        )
