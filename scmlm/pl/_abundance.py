"""Plots of differential abundance: per-sample composition bars and per-type effects with their intervals."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from ._utils import finish, get_ax, require_columns, result_table


def _abundance_params(adata, key: str) -> dict | None:
    """``params`` of the abundance result under ``key``, or ``None`` when there is none."""
    uns = getattr(adata, "uns", None)
    if uns is None or key not in uns or not isinstance(uns[key], dict):
        return None
    return dict(uns[key].get("params", {}))


def _contrast_factor(spec) -> str | None:
    """The factor of the first ``factor:test:reference`` contrast in a stored ``contrast`` parameter."""
    if isinstance(spec, dict):
        items = list(spec.values())
    elif isinstance(spec, list | tuple | np.ndarray) and not (
        len(spec) == 3 and all(isinstance(x, str) and ":" not in x for x in spec)
    ):
        items = list(spec)
    else:
        items = [spec]
    for item in items:
        if isinstance(item, str) and item.count(":") == 2:
            return item.split(":")[0]
        if isinstance(item, list | tuple | np.ndarray) and len(item) == 3 and all(isinstance(x, str) for x in item):
            return str(item[0])
    return None


def composition(
    adata,
    *,
    key: str = "abundance_de",
    cell_type_key: str | None = None,
    sample_key: str | None = None,
    condition: str | None = None,
    cell_types: list[str] | None = None,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Per-sample composition: one stacked bar of cell-type proportions per sample, samples grouped by condition.

    Proportions are relative: the bars of a sample sum to one, so a type that expands lowers every other type's
    share even when its number of cells is unchanged.

    Parameters
    ----------
    adata
        Cell-level AnnData (only ``obs`` is read).
    key
        ``uns`` key of a :func:`scmlm.tl.abundance_de` result: its ``cell_type_key`` and ``sample_key``, and the
        factor of its first ``(factor, test, reference)`` contrast as ``condition``, are the defaults.
    cell_type_key, sample_key
        obs columns with each cell's type and sample; needed when there is no result under ``key``.
    condition
        obs column (constant within each sample) by which samples are grouped, in its level order; ``None``
        without a result: samples in their own order.
    cell_types
        Draw these types only (in this order); the others are summed into ``"other"``.
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it to a path (``True``: ``composition.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).
    """
    params = _abundance_params(adata, key)
    if params is None and (cell_type_key is None or sample_key is None):
        present = [k for k, v in getattr(adata, "uns", {}).items() if isinstance(v, dict) and "results" in v]
        raise InputError(
            f"composition: no abundance result under adata.uns[{key!r}] (results present: "
            f"{_fmt_list(present) or 'none'}); run scmlm.tl.abundance_de first, pass key=..., or give cell_type_key= "
            "and sample_key=."
        )
    params = params or {}
    cell_type_key = cell_type_key or params.get("cell_type_key")
    sample_key = sample_key or params.get("sample_key")
    if condition is None and params:
        condition = _contrast_factor(params.get("contrast"))
    obs = adata.obs
    for what, col in (("cell_type_key", cell_type_key), ("sample_key", sample_key), ("condition", condition)):
        if col is not None and col not in obs.columns:
            raise InputError(f"composition: {what}={col!r} is not a column of adata.obs; columns: {list(obs.columns)}.")
    counts = pd.crosstab(obs[sample_key].astype(str), obs[cell_type_key].astype(str))
    counts = counts.loc[counts.sum(axis=1) > 0]
    if cell_types is not None:
        unknown = [t for t in cell_types if t not in counts.columns]
        if unknown:
            raise InputError(f"composition: cell type(s) {_fmt_list(unknown)} not in obs[{cell_type_key!r}].")
        other = counts.drop(columns=list(cell_types)).sum(axis=1)
        counts = counts[list(cell_types)]
        if (other > 0).any():
            counts = counts.assign(other=other)
    props = counts.div(counts.sum(axis=1), axis=0)
    groups = None
    if condition is not None:
        varies = obs.groupby(obs[sample_key].astype(str), observed=True)[condition].nunique(dropna=False) > 1
        if varies.any():
            raise InputError(
                f"composition: condition={condition!r} varies within sample(s) {_fmt_list(list(varies.index[varies]))} "
                f"of obs[{sample_key!r}]; pass a sample-level column as condition= (or condition=None)."
            )
        per_sample = obs.groupby(obs[sample_key].astype(str), observed=True)[condition].agg(
            lambda s: s.astype(str).iloc[0]
        )
        col = obs[condition]
        levels = [
            str(x) for x in (col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col))
        ]
        per_sample = per_sample.reindex(props.index)
        order = sorted(props.index, key=lambda s: (levels.index(per_sample[s]) if per_sample[s] in levels else 1e9, s))
        props = props.loc[order]
        groups = per_sample.loc[order].to_numpy()
    ax = get_ax(ax, figsize=(max(4.5, 0.32 * len(props) + 2.8), 4.0))
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20" if props.shape[1] > 10 else "tab10")
    x = np.arange(len(props))
    bottom = np.zeros(len(props))
    for j, t in enumerate(props.columns):
        color = "0.8" if t == "other" and cell_types is not None else cmap(j % cmap.N)
        ax.bar(x, props[t].to_numpy(), bottom=bottom, width=0.85, color=color, label=str(t), lw=0)
        bottom += props[t].to_numpy()
    ax.set_xticks(x, list(props.index), rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(props) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("proportion of the sample's cells")
    if groups is not None:
        starts = [0] + [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]]
        for s, e in zip(starts, [*starts[1:], len(groups)], strict=True):
            if s > 0:
                ax.axvline(s - 0.5, c="k", lw=1.2)
            ax.text((s + e - 1) / 2, 1.01, str(groups[s]), ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_title(f"composition by {sample_key}" + (f", grouped by {condition}" if groups is not None else ""),
                 fontsize=9, pad=16)  # fmt: skip
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=cell_type_key,
              title_fontsize=7)  # fmt: skip
    return finish(ax, show, save, "composition.png")


def abundance_effects(
    adata,
    key: str = "abundance_de",
    *,
    contrast: str | None = None,
    padj_threshold: float = 0.05,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Per-type change of abundance (log2 fold change) with its 95 % interval, significant types marked.

    The interval is ``coef ± t(df, 0.975) · se`` on the model's scale, shown in log2 units (``glmm``/``logit``: log2
    odds ratio of the type's share; ``clr``: log2 change against the geometric mean of all types).

    Parameters
    ----------
    adata
        AnnData holding a :func:`scmlm.tl.abundance_de` result under ``key``, or its result DataFrame.
    key
        ``uns`` key of the result.
    contrast
        Which contrast to draw; needed when the result holds several.
    padj_threshold
        Types with ``padj`` below it are drawn filled and red.
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it to a path (``True``: ``abundance_effects.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).
    """
    from scipy import stats

    if not isinstance(adata, pd.DataFrame):
        uns = getattr(adata, "uns", {})
        if key not in uns or not isinstance(uns[key], dict) or "results" not in uns[key]:
            present = [k for k, v in uns.items() if isinstance(v, dict) and "results" in v]
            raise InputError(
                f"abundance_effects: no result under adata.uns[{key!r}] (results present: "
                f"{_fmt_list(present) or 'none'}); run scmlm.tl.abundance_de first or pass key=..."
            )
    df = result_table(adata, key, None, contrast)
    require_columns(df, ["gene", "contrast", "coef", "se", "df", "padj"], "abundance_effects")
    contrasts = list(pd.unique(df["contrast"].astype(str)))
    if len(contrasts) > 1:
        raise InputError(f"abundance_effects: the result holds contrasts {_fmt_list(contrasts)}; pass contrast=...")
    coef = df["coef"].to_numpy(dtype=float)
    se = df["se"].to_numpy(dtype=float)
    dof = df["df"].to_numpy(dtype=float)
    ok = np.isfinite(coef) & np.isfinite(se)
    if not ok.any():
        raise InputError(
            f"abundance_effects: no cell type of contrast {_fmt_list(contrasts)} has an effect and a standard error "
            "(a joint F test, or no type tested); see the status column."
        )
    q = np.where(np.isfinite(dof) & (dof > 0), stats.t.ppf(0.975, np.where(dof > 0, dof, 1.0)), stats.norm.ppf(0.975))
    ln2 = np.log(2.0)
    est, lo, hi = coef / ln2, (coef - q * se) / ln2, (coef + q * se) / ln2
    order = [i for i in np.argsort(np.where(ok, est, np.inf), kind="stable") if ok[i]]
    sig = (df["padj"].to_numpy(dtype=float) < padj_threshold) & ok
    ax = get_ax(ax, figsize=(4.8, max(2.5, 0.32 * len(order) + 1.4)))
    y = np.arange(len(order))
    for yy, i in zip(y, order, strict=True):
        color = "tab:red" if sig[i] else "0.35"
        ax.plot([lo[i], hi[i]], [yy, yy], c=color, lw=1.4)
        ax.plot(est[i], yy, "o", ms=6, mfc=color if sig[i] else "white", mec=color)
    ax.axvline(0, c="0.3", lw=0.6, ls="--")
    ax.set_yticks(y, [str(df["gene"].iloc[i]) for i in order], fontsize=8)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_xlabel("log2 fold change of abundance (95 % interval)")
    untested = int((~ok).sum())
    note = f"; {untested} type(s) not tested" if untested else ""
    ax.set_title(f"{contrasts[0]}: filled = padj < {padj_threshold:g}{note}", fontsize=9)
    return finish(ax, show, save, "abundance_effects.png")
