"""Sample and gene filters for pseudobulk data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from .._validate import check_counts, check_obs_keys, get_matrix


def filter_samples(
    pb: ad.AnnData,
    *,
    min_cells: int = 10,
    min_counts: float = 0,
    inplace: bool = True,
) -> ad.AnnData | np.ndarray | None:
    """Drop pseudobulk rows made from too few cells or with too few counts.

    Parameters
    ----------
    pb
        Output of :func:`scmlm.pp.pseudobulk` (needs obs ``n_cells`` and ``total_counts``).
    min_cells
        Minimum number of aggregated cells.
    min_counts
        Minimum library size (sum of counts over genes).
    inplace
        Subset ``pb`` in place (returns ``None``); otherwise return the boolean mask of rows kept.
    """
    for col in ("n_cells", "total_counts"):
        if col not in pb.obs:
            raise InputError(f"pb.obs has no {col!r} column; filter_samples expects the output of scmlm.pp.pseudobulk.")
    keep = (pb.obs["n_cells"].to_numpy() >= min_cells) & (pb.obs["total_counts"].to_numpy() >= min_counts)
    if not keep.any():
        raise InputError(
            f"filter_samples(min_cells={min_cells}, min_counts={min_counts}) would remove all {pb.n_obs} rows "
            f"(largest n_cells {int(pb.obs['n_cells'].max())}, largest total_counts {pb.obs['total_counts'].max():g})."
        )
    if not inplace:
        return keep
    pb._inplace_subset_obs(keep)
    return None


def filter_genes_by_expr(
    pb: ad.AnnData,
    design_or_group: str | None = None,
    *,
    layer: str | None = None,
    min_count: float = 10,
    min_total_count: float = 15,
    large_n: int = 10,
    min_prop: float = 0.7,
    inplace: bool = True,
) -> np.ndarray | None:
    """Keep genes with enough counts in enough samples: edgeR's ``filterByExpr`` rule.

    A gene is kept when its CPM is at least ``min_count / median(library size) * 1e6`` in at least ``n`` samples, where
    ``n`` is the smallest group size (from ``design_or_group``), relaxed for large groups by ``large_n``/``min_prop``,
    and its total count is at least ``min_total_count``.

    Parameters
    ----------
    pb
        Pseudobulk AnnData (samples × genes) with raw counts.
    design_or_group
        An obs column giving the groups (e.g. ``"condition"``), or a design formula (e.g. ``"~ batch + condition"``)
        whose hat values give the minimum group size, as edgeR does. ``None``: all samples form one group.
    layer
        Layer with the summed counts (``None``: ``.X``).
    inplace
        Subset ``pb`` to the kept genes (returns ``None``); otherwise return the boolean mask.
    """
    from ..models import filter_by_expr

    counts = np.asarray(get_matrix(pb, layer), dtype=float)
    check_counts(counts, layer)
    kwargs = {"min_count": min_count, "min_total_count": min_total_count, "large_n": large_n, "min_prop": min_prop}
    if design_or_group is None:
        keep = filter_by_expr(counts.T, **kwargs)
    elif isinstance(design_or_group, str) and "~" in design_or_group:
        from ..design import build_design

        design = build_design(pb.obs, design_or_group)
        keep = filter_by_expr(counts.T, design=design.X, **kwargs)
    elif isinstance(design_or_group, str):
        check_obs_keys(pb, [design_or_group], what="group column")
        keep = filter_by_expr(counts.T, group=pd.Categorical(pb.obs[design_or_group]).codes, **kwargs)
    else:
        raise InputError(
            f"design_or_group must be an obs column name or a formula, got {design_or_group!r}; obs columns: "
            f"{_fmt_list(pb.obs.columns)}."
        )
    keep = np.asarray(keep, dtype=bool)
    if not inplace:
        return keep
    pb._inplace_subset_var(keep)
    return None
