"""Read results back from AnnData as DataFrames, as ``scanpy.get`` does."""

from __future__ import annotations

import anndata as ad
import pandas as pd

from ._errors import InputError, _fmt_list

__all__ = ["de_df", "result_keys"]


def result_keys(adata: ad.AnnData) -> list[str]:
    """Keys of ``adata.uns`` that hold an scmlm result (a dict with ``params`` and ``results``)."""
    return [k for k, v in adata.uns.items() if isinstance(v, dict) and "results" in v and "params" in v]


def de_df(
    adata: ad.AnnData,
    key: str | None = None,
    *,
    group: str | list[str] | None = None,
    contrast: str | None = None,
    padj_max: float | None = None,
    status: str | None = None,
) -> pd.DataFrame:
    """The DE table stored by ``scmlm.tl.pseudobulk_de``, ``glmm_de`` or ``gee_de``, optionally filtered.

    Parameters
    ----------
    adata
        The AnnData the tool wrote into.
    key
        ``uns`` key of the result (the tool's ``key_added``). ``None`` picks the only one present.
    group
        Keep these groups (e.g. cell types).
    contrast
        Keep this contrast.
    padj_max
        Keep rows with ``padj <= padj_max``.
    status
        Keep rows with this status (e.g. ``"ok"``).

    Returns
    -------
    A copy of the table, sorted as stored (genes in their order within each group).

    Examples
    --------
    >>> import scmlm
    >>> pb = scmlm.pp.pseudobulk(scmlm.datasets.pig_airway(), "donor")
    >>> scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "CFTRKO", "WT"))  # doctest: +SKIP
    >>> scmlm.get.de_df(pb, padj_max=0.1)  # doctest: +SKIP
    """
    keys = result_keys(adata)
    if key is None:
        if len(keys) != 1:
            raise InputError(
                "pass key=...: "
                + (f"adata.uns holds several results: {_fmt_list(keys)}." if keys else "adata.uns holds no result.")
            )
        key = keys[0]
    if key not in adata.uns:
        raise InputError(f"no result under adata.uns[{key!r}]; results present: {_fmt_list(keys) or 'none'}.")
    entry = adata.uns[key]
    if not isinstance(entry, dict) or "results" not in entry:
        raise InputError(f"adata.uns[{key!r}] is not an scmlm result table.")
    df = entry["results"]
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)
    df = df.copy()
    if group is not None:
        groups = [group] if isinstance(group, str) else list(group)
        present = set(df["group"].astype(str))
        unknown = [g for g in groups if g not in present]
        if unknown:
            raise InputError(f"group(s) {_fmt_list(unknown)} not in the result; groups: {_fmt_list(sorted(present))}.")
        df = df[df["group"].astype(str).isin(groups)]
    if contrast is not None:
        present = set(df["contrast"].astype(str))
        if contrast not in present:
            raise InputError(f"contrast {contrast!r} not in the result; contrasts: {_fmt_list(sorted(present))}.")
        df = df[df["contrast"].astype(str) == contrast]
    if padj_max is not None:
        df = df[df["padj"] <= padj_max]
    if status is not None:
        df = df[df["status"] == status]
    return df.reset_index(drop=True)
