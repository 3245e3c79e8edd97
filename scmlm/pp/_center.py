"""Split a covariate into its between-group mean and within-group deviation."""

from __future__ import annotations

import anndata as ad
import pandas as pd

from .._errors import InputError
from .._validate import check_obs_keys


def center_within(adata: ad.AnnData, key: str, *, by: str = "donor", copy: bool = False) -> ad.AnnData | None:
    """Add ``<key>_between`` (the mean of ``key`` in each ``by`` group) and ``<key>_within`` (the deviation from it).

    With both in a design, e.g. ``"~ x_within + x_between + (1|donor)"``, the within-donor and between-donor effects
    of ``x`` are estimated separately instead of being mixed into one slope (the ecological fallacy).

    Parameters
    ----------
    adata
        AnnData whose obs holds the numeric column ``key`` and the grouping column ``by``.
    key
        Numeric obs column (a boolean or two-level column is used as 0/1).
    by
        Grouping obs column, usually the donor.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` (or the copy), with obs columns ``<key>_between`` and ``<key>_within`` added.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_genes=10, n_cells=20, design="within")
    >>> adata.obs["treated"] = (adata.obs["condition"] == "case").astype(float)
    >>> scmlm.pp.center_within(adata, "treated", by="donor")
    >>> float(adata.obs["treated_within"].groupby(adata.obs["donor"], observed=True).mean().abs().max()) < 1e-12
    True
    """
    check_obs_keys(adata, [key, by])
    if copy:
        adata = adata.copy()
    col = adata.obs[key]
    if pd.api.types.is_bool_dtype(col):
        x = col.astype(float).to_numpy()
    elif pd.api.types.is_numeric_dtype(col):
        x = col.to_numpy(dtype=float)
    else:
        raise InputError(
            f"obs column {key!r} is not numeric (dtype {col.dtype}); encode it as numbers first, e.g. "
            f"adata.obs[{key!r} + '_num'] = (adata.obs[{key!r}] == 'case').astype(float)."
        )
    means = pd.Series(x).groupby(adata.obs[by].to_numpy(), observed=True).transform("mean").to_numpy()
    adata.obs[f"{key}_between"] = means
    adata.obs[f"{key}_within"] = x - means
    return adata if copy else None


__all__ = ["center_within"]
