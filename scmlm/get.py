"""Read results back from AnnData as DataFrames, as ``scanpy.get`` does."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ._errors import InputError, _fmt_list

__all__ = ["de_df", "de_matrix", "rank_genes", "result_keys"]


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
    >>> scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "CFTRKO", "WT"))
    >>> res = scmlm.get.de_df(pb)
    >>> list(res.columns[:4]), len(scmlm.get.de_df(pb, padj_max=0.1))  # 7 pigs, all cell types summed: no call
    (['gene', 'group', 'contrast', 'coef'], 0)
    """
    df = _result_table(adata, key).copy()
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


def _result_table(adata: ad.AnnData, key: str | None) -> pd.DataFrame:
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
    return df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)


_DERIVED = ("signed_stat", "signed_logp")
#: methods whose ``stat`` is an F statistic (unsigned): edgeR's quasi-likelihood F test
_F_METHODS = ("nb_ql",)


def _one_contrast(df: pd.DataFrame, contrast: str | None) -> pd.DataFrame:
    present = list(dict.fromkeys(df["contrast"].astype(str)))
    if contrast is None:
        if len(present) != 1:
            raise InputError(f"the result holds several contrasts: pass contrast= one of {_fmt_list(present)}.")
        return df
    if contrast not in present:
        raise InputError(f"contrast {contrast!r} not in the result; contrasts: {_fmt_list(present)}.")
    return df[df["contrast"].astype(str) == contrast]


def _score(df: pd.DataFrame, by: str) -> pd.Series:
    """A numeric result column, ``"signed_stat"`` or ``"signed_logp"`` (see :func:`de_matrix`)."""
    if by == "signed_stat":
        stat = df["stat"].to_numpy(dtype=float)
        is_f = df["method"].astype(str).isin(_F_METHODS).to_numpy()
        with np.errstate(invalid="ignore"):
            root = np.sign(df["log2fc"].to_numpy(dtype=float)) * np.sqrt(stat)
        return pd.Series(np.where(is_f, root, stat), index=df.index)
    if by == "signed_logp":
        with np.errstate(divide="ignore"):
            p = df["pvalue"].to_numpy(dtype=float)
            return pd.Series(np.sign(df["log2fc"].to_numpy(dtype=float)) * -np.log10(p), index=df.index)
    if by not in df.columns:
        numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool]
        raise InputError(f"{by!r} is not a column of the result; use one of {_fmt_list(numeric + list(_DERIVED))}.")
    col = df[by]
    if not pd.api.types.is_numeric_dtype(col) or col.dtype == bool:
        raise InputError(f"result column {by!r} is not numeric (dtype {col.dtype}); pick e.g. 'stat' or 'log2fc'.")
    return col.astype(float)


def de_matrix(
    adata: ad.AnnData,
    key: str | None = None,
    *,
    values: str = "signed_stat",
    contrast: str | None = None,
    groups: list[str] | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """One result column as a genes × groups matrix, for one contrast: the hand-off to enrichment tools.

    The matrix of a signed statistic per cell type is what decoupler's ``ulm``/``mlm`` score against a gene-set
    network: decoupler takes observations × features, so pass the transpose, one row per group, without NaN:
    ``decoupler.mt.ulm(data=mat.T.fillna(0), net=net)`` (decoupler ≥ 2; ``decoupler.run_ulm(mat=…)`` before).
    For a ranked list of one group (fgsea, GSEA preranked) see :func:`rank_genes`.

    Parameters
    ----------
    adata
        The AnnData the tool wrote into.
    key
        ``uns`` key of the result; ``None`` picks the only one present.
    values
        ``"signed_stat"`` (default): the test statistic with the sign of the fold change, i.e. ``stat`` (t or z) for
        every method except ``nb_ql``, whose ``stat`` is edgeR's quasi-likelihood F (unsigned), turned into
        ``sign(log2fc) * sqrt(F)`` (for a one-coefficient contrast the signed root of F is on the t scale).
        ``"signed_logp"``: ``sign(log2fc) * -log10(pvalue)``. Or any numeric result column as stored (``"stat"``,
        ``"log2fc"``, ``"coef"``, ``"pvalue"``, ``"padj"``, ``"base_mean"``, ``"var_donor"``, …).
    contrast
        The contrast (the result's ``contrast`` column); ``None`` when the result holds only one.
    groups
        Groups to keep, in this column order; ``None``: all, in the order stored.
    key_added
        Also store the matrix in ``adata.varm[key_added]`` (rows in ``adata.var_names`` order, NaN for genes the
        result lacks), as scanpy keeps per-gene matrices. Needs the result's genes to be ``adata``'s var_names.

    Returns
    -------
    DataFrame with index ``gene`` (in the result's order) and one column per group. Genes that were not tested in a
    group (filtered, too few cells, failed fits) hold NaN: drop or fill them as the next tool needs
    (``mat.dropna()`` or ``mat.fillna(0)`` for a statistic).

    Examples
    --------
    >>> import scmlm
    >>> kang = scmlm.datasets.kang2018()
    >>> pb = scmlm.pp.pseudobulk(kang, "sample_id", groups_key="cell_type")
    >>> scmlm.tl.pseudobulk_de(pb, "~ donor + condition", ("condition", "stim", "ctrl"), groups_key="cell_type")
    >>> mat = scmlm.get.de_matrix(pb, values="signed_stat", key_added="de_stat")
    >>> mat.shape, mat.columns[:2].tolist()
    ((1267, 5), ['B cells', 'CD14+ Monocytes'])
    >>> bool(mat.loc["ISG15"].gt(5).all())  # interferon-stimulated: strongly up in every cell type
    True
    >>> pb.varm["de_stat"].shape
    (1267, 5)
    >>> obs_by_features = mat.T.fillna(0)  # what decoupler.mt.ulm(data=..., net=...) takes: groups × genes
    >>> obs_by_features.shape
    (5, 1267)
    """
    df = _one_contrast(_result_table(adata, key), contrast)
    score = _score(df, values)
    group = df["group"].astype(str)
    present = list(dict.fromkeys(group))
    if groups is not None:
        groups = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        unknown = [g for g in groups if g not in present]
        if unknown:
            raise InputError(f"group(s) {_fmt_list(unknown)} not in the result; groups: {_fmt_list(present)}.")
        present = groups
    long = pd.DataFrame({"gene": df["gene"].astype(str).to_numpy(), "group": group.to_numpy(), "v": score.to_numpy()})
    dup = long.duplicated(["gene", "group"])
    if dup.any():
        first = long[dup].iloc[0]
        raise InputError(
            f"the result has several rows for gene {first['gene']!r} in group {first['group']!r} and contrast "
            f"{df['contrast'].iloc[0]!r}; a merged or concatenated table? Pass a result with one row per gene, group "
            "and contrast."
        )
    genes = pd.Index(dict.fromkeys(long["gene"]), name="gene")
    mat = long.pivot(index="gene", columns="group", values="v").reindex(index=genes, columns=present)
    mat.columns = pd.Index([str(c) for c in mat.columns], name="group")
    if key_added is not None:
        missing = genes.difference(adata.var_names)
        if len(missing):
            raise InputError(
                f"{len(missing)} gene(s) of the result are not in adata.var_names (e.g. {_fmt_list(missing[:5])}), "
                "so the matrix cannot be stored in adata.varm; call without key_added= and reindex it yourself."
            )
        stored = mat.reindex(adata.var_names)
        stored.index = adata.var_names
        adata.varm[key_added] = stored
    return mat


def rank_genes(
    adata: ad.AnnData,
    key: str | None = None,
    *,
    group: str | None = None,
    contrast: str | None = None,
    by: str = "signed_stat",
    dropna: bool = True,
) -> pd.Series:
    """Genes of one group and contrast ranked by a statistic, highest first: the input of preranked GSEA / fgsea.

    Parameters
    ----------
    adata
        The AnnData the tool wrote into.
    key
        ``uns`` key of the result; ``None`` picks the only one present.
    group
        The group (e.g. cell type); ``None`` when the result holds only one.
    contrast
        The contrast; ``None`` when the result holds only one.
    by
        ``"signed_stat"`` (default), ``"signed_logp"`` or a numeric result column, as ``values`` of
        :func:`de_matrix`. Rank by a signed score: ``stat`` of ``nb_ql`` is an F statistic, which ranks strongly
        down-regulated genes with the up-regulated ones.
    dropna
        Leave out genes without a value (not tested, failed): preranked GSEA needs a finite score per gene.

    Returns
    -------
    Series indexed by gene, named ``by``, sorted from the highest score (most up) to the lowest (most down).
    In R: ``fgsea(pathways, stats = setNames(s$values, s$index))`` after writing it with ``s.to_csv()``; in Python,
    e.g. ``gseapy.prerank(rnk=s.reset_index(), ...)``.

    Examples
    --------
    >>> import scmlm
    >>> kang = scmlm.datasets.kang2018()
    >>> pb = scmlm.pp.pseudobulk(kang, "sample_id", groups_key="cell_type")
    >>> scmlm.tl.pseudobulk_de(pb, "~ donor + condition", ("condition", "stim", "ctrl"), groups_key="cell_type")
    >>> ranked = scmlm.get.rank_genes(pb, group="CD14+ Monocytes")
    >>> bool(ranked.is_monotonic_decreasing), ranked.name, ranked.size
    (True, 'signed_stat', 1223)
    >>> ranked.index[[0, -1]].tolist()  # most up, most down
    ['APOBEC3A_ENSG00000128383', 'IL1B']
    """
    df = _one_contrast(_result_table(adata, key), contrast)
    present = list(dict.fromkeys(df["group"].astype(str)))
    if group is None:
        if len(present) != 1:
            raise InputError(f"the result holds several groups: pass group= one of {_fmt_list(present)}.")
        group = present[0]
    elif group not in present:
        raise InputError(f"group {group!r} not in the result; groups: {_fmt_list(present)}.")
    df = df[df["group"].astype(str) == group]
    s = pd.Series(_score(df, by).to_numpy(), index=pd.Index(df["gene"].astype(str).to_numpy(), name="gene"), name=by)
    if dropna:
        s = s[np.isfinite(s.to_numpy())]
    return s.sort_values(ascending=False, kind="stable")
