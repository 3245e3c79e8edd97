"""Plots of the hierarchy: variance partition (violins or per-gene bars), ICC distributions, shrinkage of BLUPs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from ._utils import finish, get_ax, require_columns

#: Columns of a variance-partition table that are never variance components.
_NOT_COMPONENTS = {"gene", "group", "converged", "status", "n_iter", "n_cells", "n_obs", "n_samples", "method", "df"}
_RESIDUAL_COLOR = "0.72"


# ---------------------------------------------------------------- table access


def _uns_table(data, key: str, what: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data.copy()
    uns = getattr(data, "uns", None)
    if uns is None:
        raise InputError(f"{what} takes an AnnData holding a result or a DataFrame, got {type(data).__name__}.")
    if key not in uns or not isinstance(uns[key], dict) or "results" not in uns[key]:
        present = [k for k, v in uns.items() if isinstance(v, dict) and "results" in v]
        raise InputError(
            f"{what}: no result under adata.uns[{key!r}]; results present: {_fmt_list(present) or 'none'}. "
            f"Pass key=... or the DataFrame."
        )
    df = uns[key]["results"]
    return (df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)).copy()


def _with_gene_column(df: pd.DataFrame) -> pd.DataFrame:
    if "gene" not in df.columns:
        df = df.copy()
        df.insert(0, "gene", df.index.astype(str))
    return df.reset_index(drop=True)


def _select_groups(df: pd.DataFrame, groups: str | Sequence[str] | None) -> tuple[pd.DataFrame, list[str] | None]:
    """Filter by ``groups``; return the table and the group names drawn (``None`` when there is no group column)."""
    if "group" not in df.columns:
        if groups is not None:
            raise InputError(f"groups={groups!r} given, but the table has no 'group' column (it was fitted once).")
        return df, None
    present = list(pd.unique(df["group"].astype(str)))
    if groups is None:
        return df, present
    wanted = [groups] if isinstance(groups, str) else [str(g) for g in groups]
    unknown = [g for g in wanted if g not in present]
    if unknown:
        raise InputError(f"group(s) {_fmt_list(unknown)} are not in the table; groups: {_fmt_list(present)}.")
    return df[df["group"].astype(str).isin(wanted)].reset_index(drop=True), wanted


def _components(df: pd.DataFrame, components: Sequence[str] | None) -> list[str]:
    """Variance-component columns: given, or every numeric column except ICCs, SDs, variances and metadata."""
    if components is not None:
        comps = [str(c) for c in components]
        require_columns(df, comps, "variance_partition")
        return comps
    require_columns(df, ["residual"], "variance_partition")
    comps = [
        c
        for c in df.columns
        if c not in _NOT_COMPONENTS
        and not str(c).startswith(("icc_", "sd_", "var_"))
        and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
    ]
    total = df[comps].to_numpy(dtype=float).sum(axis=1)
    total = total[np.isfinite(total)]
    if total.size and np.median(np.abs(total - 1.0)) > 0.01:
        raise InputError(
            f"the variance fractions {_fmt_list(comps)} do not sum to 1 per gene (median sum {np.median(total):.3g}); "
            "pass components=[...] naming the fraction columns (fixed, residual and one per random term)."
        )
    return comps


def _order(df: pd.DataFrame, comps: list[str], sort: bool) -> list[str]:
    """Order columns as variancePartition's ``sortCols``: decreasing median fraction, residual last."""
    rest = [c for c in comps if c != "residual"]
    if sort:
        med = {c: np.nanmedian(df[c].to_numpy(dtype=float)) if df[c].notna().any() else -np.inf for c in rest}
        rest = sorted(rest, key=lambda c: -med[c])
    return rest + (["residual"] if "residual" in comps else [])


def _colors(names: list[str]) -> dict[str, object]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10"]
    out, k = {}, 0
    for n in names:
        if n == "residual":
            out[n] = _RESIDUAL_COLOR
        else:
            out[n] = cmap(k % 10)
            k += 1
    return out


# ---------------------------------------------------------------- drawing helpers


def _violin(ax, values: np.ndarray, x: float, width: float, color, *, lo: float, hi: float) -> None:
    """One violin (Gaussian KDE cut at the data range) with an inner box: IQR bar and white median dot."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return
    half = width / 2
    if v.size >= 2 and np.ptp(v) > 1e-9 * max(1.0, np.abs(v).max()):
        from scipy.stats import gaussian_kde

        grid = np.linspace(max(lo, v.min()), min(hi, v.max()), 200)
        dens = gaussian_kde(v)(grid)
        dens = dens / dens.max() * half
        ax.fill_betweenx(grid, x - dens, x + dens, color=color, alpha=0.85, lw=0.6, edgecolor="0.25")
    else:  # a point mass: no density to draw
        ax.hlines(v[0], x - half, x + half, color=color, lw=2.0)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    ax.vlines(x, q1, q3, color="0.15", lw=max(2.0, 12 * width / 2))
    ax.scatter([x], [med], s=14, c="white", edgecolors="0.15", linewidths=0.6, zorder=3)


def _violin_panel(ax, df: pd.DataFrame, cols: list[str], labels: list[str], groups, *, scale: float, lo, hi):
    """Violins of ``cols`` at x = 0, 1, …; with several groups, side by side within each column, coloured by group."""
    import matplotlib as mpl
    from matplotlib.patches import Patch

    several = groups is not None and len(groups) > 1
    if several:
        cmap = mpl.colormaps["tab10"]
        gcol = {g: cmap(i % 10) for i, g in enumerate(groups)}
        width = 0.8 / len(groups)
        for k, c in enumerate(cols):
            for i, g in enumerate(groups):
                vals = df.loc[df["group"].astype(str) == g, c].to_numpy(dtype=float) * scale
                x = k - 0.4 + width * (i + 0.5)
                _violin(ax, vals, x, width * 0.9, gcol[g], lo=lo, hi=hi)
        ax.legend(
            handles=[Patch(color=gcol[g], label=g) for g in groups], frameon=False, fontsize=7, title="group"
        ).get_title().set_fontsize(7)
    else:
        colors = _colors(cols)
        for k, c in enumerate(cols):
            _violin(ax, df[c].to_numpy(dtype=float) * scale, k, 0.8, colors[c], lo=lo, hi=hi)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(labels, rotation=30 if max(len(s) for s in labels) > 6 else 0, ha="right")
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.set_axisbelow(True)


def _title(groups, what: str, n: int) -> str:
    if groups is not None and len(groups) == 1:
        return f"{what} · {groups[0]} ({n} genes)"
    return f"{what} ({n} genes)"


# ---------------------------------------------------------------- public plots


def variance_partition(
    vp,
    *,
    key: str = "variance_partition",
    groups: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    components: Sequence[str] | None = None,
    sort: bool = True,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Variance explained per component: violins over genes, or stacked bars for chosen genes.

    As variancePartition's ``plotVarPart`` (violins, components ordered by decreasing median fraction, residual last)
    and, with ``genes=``, ``plotPercentBars`` (one stacked bar per gene).

    Parameters
    ----------
    vp
        AnnData with ``adata.uns[key]["results"]`` (from ``scmlm.tl.variance_partition``), or that DataFrame: one row
        per gene (index or ``gene`` column; a ``group`` column when fitted per cell type) with one fraction column per
        variance component (e.g. ``donor``, ``batch``), ``fixed`` and ``residual``, summing to 1 per gene, and
        ``icc_<factor>`` columns (ignored here).
    key
        ``uns`` key when ``vp`` is an AnnData.
    groups
        Group(s) to draw; default all. Several groups are drawn side by side within each component.
    genes
        Draw stacked percentage bars for these genes (in this order) instead of violins.
    components
        Fraction columns to draw; default every numeric column except ``icc_*``, ``sd_*``, ``var_*`` and metadata.
    sort
        Order components by decreasing median fraction (residual always last); ``False`` keeps the table's order.
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it (``True``: ``variance_partition.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).

    Examples
    --------
    >>> import pandas as pd
    >>> import scmlm
    >>> fractions = {"donor": [0.3, 0.1, 0.5], "batch": [0.1, 0.0, 0.05], "fixed": [0.1, 0.2, 0.05]}
    >>> vp = pd.DataFrame({**fractions, "residual": [0.5, 0.7, 0.4]}, index=["g1", "g2", "g3"])
    >>> ax = scmlm.pl.variance_partition(vp, show=False)
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['donor', 'fixed', 'batch', 'residual']
    """
    df = _with_gene_column(_uns_table(vp, key, "variance_partition"))
    df, grp = _select_groups(df, groups)
    comps = _components(df, components)
    cols = _order(df, comps, sort)
    if genes is not None:
        return _percent_bars(df, cols, genes, grp, ax=ax, show=show, save=save)
    ax = get_ax(ax, figsize=(max(3.5, 0.75 * len(cols) * (1 + 0.5 * (len(grp or []) > 1)) + 1.2), 3.8))
    _violin_panel(ax, df, cols, cols, grp, scale=100.0, lo=0.0, hi=100.0)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("variance explained (%)")
    ax.set_title(_title(grp, "variance partition", df["gene"].nunique()), fontsize=9)
    return finish(ax, show, save, "variance_partition.png")


def _percent_bars(df, cols, genes, grp, *, ax, show, save):
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    present = set(df["gene"].astype(str))
    unknown = [g for g in genes if g not in present]
    if unknown:
        raise InputError(f"gene(s) {_fmt_list(unknown)} are not in the variance-partition table.")
    several = grp is not None and len(grp) > 1
    rows = []
    for g in genes:
        sub = df[df["gene"].astype(str) == g]
        for _, r in sub.iterrows():
            rows.append((f"{g} · {r['group']}" if several else g, r))
    ax = get_ax(ax, figsize=(6.0, max(2.0, 0.32 * len(rows) + 1.3)))
    colors = _colors(cols)
    y = np.arange(len(rows))[::-1]
    left = np.zeros(len(rows))
    for c in cols:
        w = np.array([float(r[c]) if np.isfinite(float(r[c])) else 0.0 for _, r in rows]) * 100
        ax.barh(y, w, left=left, color=colors[c], edgecolor="white", lw=0.5, height=0.75, label=c)
        left += w
    ax.set_yticks(y)
    ax.set_yticklabels([lab for lab, _ in rows], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("variance explained (%)")
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = "variance partition" + (f" · {grp[0]}" if grp is not None and len(grp) == 1 else "")
    ax.set_title(title, fontsize=9)
    return finish(ax, show, save, "variance_partition.png")


def icc(
    vp,
    *,
    key: str = "variance_partition",
    groups: str | Sequence[str] | None = None,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Distribution over genes of the intraclass correlation of each grouping factor (``icc_<factor>`` columns).

    The ICC of a factor, as the fitting tool reports it, is the share of variance that cells of the same level (e.g.
    donor) have in common: how far cells of one donor are from being independent replicates.

    Parameters
    ----------
    vp
        AnnData with ``adata.uns[key]["results"]`` or the variance-partition DataFrame (see
        :func:`variance_partition`); needs at least one ``icc_<factor>`` column.
    key
        ``uns`` key when ``vp`` is an AnnData.
    groups
        Group(s) to draw; default all, side by side.
    ax, show, save
        As in scanpy (``save=True``: ``icc.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).

    Examples
    --------
    >>> import pandas as pd
    >>> import scmlm
    >>> vp = pd.DataFrame({"icc_donor": [0.2, 0.05, 0.4], "icc_batch": [0.01, 0.0, 0.1]}, index=["g1", "g2", "g3"])
    >>> ax = scmlm.pl.icc(vp, show=False)
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['donor', 'batch']
    """
    df = _with_gene_column(_uns_table(vp, key, "icc"))
    cols = [c for c in df.columns if str(c).startswith("icc_")]
    if not cols:
        raise InputError(f"icc needs columns icc_<factor> (e.g. 'icc_donor'); the table has {list(df.columns)}.")
    df, grp = _select_groups(df, groups)
    labels = [c[len("icc_") :] for c in cols]
    ax = get_ax(ax, figsize=(max(3.0, 0.9 * len(cols) * (1 + 0.5 * (len(grp or []) > 1)) + 1.2), 3.6))
    _violin_panel(ax, df, cols, labels, grp, scale=1.0, lo=0.0, hi=1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("intraclass correlation")
    ax.set_title(_title(grp, "ICC", df["gene"].nunique()), fontsize=9)
    return finish(ax, show, save, "icc.png")


_RE_COLUMNS = ["gene", "term", "level", "blup", "blup_se", "unpooled", "unpooled_se", "n_cells"]


def shrinkage(
    re,
    gene: str,
    *,
    term: str = "donor",
    group: str | None = None,
    key: str = "random_effects",
    center: float = 0.0,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Partial pooling of one gene's random effects: each level's unpooled estimate, its BLUP and the arrow between.

    For each level of ``term`` (e.g. each donor) the unpooled estimate (open circle, ± SE) sits above its BLUP /
    conditional mode (filled circle, ± SE), joined by an arrow; marker area grows with the level's number of cells.
    Levels with few cells and noisy unpooled estimates are pulled furthest towards ``center``.

    Parameters
    ----------
    re
        The long DataFrame of ``scmlm.tl.random_effects`` (or an AnnData holding it under ``key``) with columns
        ``gene, group, term, level, blup, blup_se, unpooled, unpooled_se, n_cells``.
    gene
        Gene to draw.
    term
        Random-effect term (``term`` column), e.g. ``"donor"``.
    group
        Group (cell type) to draw when the table holds several.
    key
        ``uns`` key when ``re`` is an AnnData.
    center
        Where the pooled estimates shrink to, drawn as a line: random effects are deviations from the fixed part, so
        ``0``; pass another value for estimates on an absolute scale.
    ax, show, save
        As in scanpy (``save=True``: ``shrinkage.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).

    Examples
    --------
    >>> import pandas as pd
    >>> import scmlm
    >>> re = pd.DataFrame(
    ...     {
    ...         "gene": "g1",
    ...         "term": "donor",
    ...         "level": ["d1", "d2", "d3"],
    ...         "blup": [0.3, -0.1, -0.2],
    ...         "blup_se": [0.1, 0.15, 0.1],
    ...         "unpooled": [0.5, -0.4, -0.25],
    ...         "unpooled_se": [0.2, 0.4, 0.15],
    ...         "n_cells": [80, 10, 120],
    ...     }
    ... )
    >>> ax = scmlm.pl.shrinkage(re, "g1", show=False)
    >>> len(ax.get_yticks())
    3
    """
    df = _uns_table(re, key, "shrinkage")
    require_columns(df, _RE_COLUMNS, "shrinkage")
    genes_present = pd.unique(df["gene"].astype(str))
    sub = df[df["gene"].astype(str) == str(gene)]
    if sub.empty:
        raise InputError(f"gene {gene!r} is not in the random-effects table; e.g. {_fmt_list(genes_present[:10])}.")
    terms = list(pd.unique(sub["term"].astype(str)))
    sub = sub[sub["term"].astype(str) == str(term)]
    if sub.empty:
        raise InputError(f"term {term!r} is not among the random-effect terms of {gene!r}: {_fmt_list(terms)}.")
    if "group" in sub.columns:
        present = list(pd.unique(sub["group"].astype(str)))
        if group is not None:
            if str(group) not in present:
                raise InputError(f"group {group!r} is not in the table for {gene!r}; groups: {_fmt_list(present)}.")
            sub = sub[sub["group"].astype(str) == str(group)]
        elif len(present) > 1:
            raise InputError(
                f"the table holds several groups for {gene!r}; pass group=... (one of {_fmt_list(present)})."
            )
        else:
            group = present[0] if present[0] not in ("all", "nan", "None") else None
    elif group is not None:
        raise InputError(f"group={group!r} given, but the table has no 'group' column.")

    unp = sub["unpooled"].to_numpy(dtype=float)
    order = np.lexsort((sub["blup"].to_numpy(dtype=float), np.where(np.isfinite(unp), unp, np.inf)))
    sub = sub.iloc[order].reset_index(drop=True)
    n = len(sub)
    y = np.arange(n, dtype=float)
    blup = sub["blup"].to_numpy(dtype=float)
    blup_se = sub["blup_se"].to_numpy(dtype=float)
    unp = sub["unpooled"].to_numpy(dtype=float)
    unp_se = sub["unpooled_se"].to_numpy(dtype=float)
    cells = sub["n_cells"].to_numpy(dtype=float)
    cmax = np.nanmax(cells) if np.any(np.isfinite(cells) & (cells > 0)) else 1.0

    def area(c):
        return 12 + 160 * np.sqrt(np.clip(np.nan_to_num(c), 0, None) / cmax)

    ax = get_ax(ax, figsize=(5.2, max(2.6, 0.3 * n + 1.4)))
    dy = 0.17
    color = "tab:blue"
    ax.axvline(center, color="0.35", lw=1.0, ls="--", zorder=0, label="population mean")
    ax.errorbar(unp, y + dy, xerr=unp_se, fmt="none", ecolor="0.6", elinewidth=0.9, capsize=0, zorder=1)
    ax.errorbar(blup, y - dy, xerr=blup_se, fmt="none", ecolor=color, elinewidth=0.9, capsize=0, zorder=1)
    for i in range(n):
        if np.isfinite(unp[i]) and np.isfinite(blup[i]) and abs(unp[i] - blup[i]) > 1e-12:
            ax.annotate(
                "",
                xy=(blup[i], y[i] - dy),
                xytext=(unp[i], y[i] + dy),
                arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 0.8, "shrinkA": 3, "shrinkB": 3},
                zorder=2,
            )
    ax.scatter(unp, y + dy, s=area(cells), facecolors="white", edgecolors="0.35", lw=1.0, zorder=3, label="unpooled")
    ax.scatter(blup, y - dy, s=area(cells), c=color, edgecolors="white", lw=0.5, zorder=4, label="BLUP (pooled)")
    ax.set_yticks(y)
    ax.set_yticklabels(sub["level"].astype(str), fontsize=8 if n <= 30 else 6)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"{term} effect (link scale) ± SE")
    ax.set_ylabel(term)
    ax.grid(axis="x", color="0.92", lw=0.6)
    ax.set_axisbelow(True)
    # marker-size key: the smallest, median and largest level
    from matplotlib.lines import Line2D

    finite = np.sort(cells[np.isfinite(cells)])
    handles = [
        Line2D([], [], color="0.35", ls="--", lw=1.0),
        Line2D([], [], marker="o", ls="none", mfc="white", mec="0.35", ms=7),
        Line2D([], [], marker="o", ls="none", mfc=color, mec="white", ms=7),
    ]
    labels = ["population mean", "unpooled", "BLUP (pooled)"]
    if finite.size:
        for c in np.unique(finite[[0, finite.size // 2, -1]]):
            handles.append(ax.scatter([], [], s=area(c), c="0.6", edgecolors="none"))
            labels.append(f"{int(c)} cells")
    ax.legend(handles, labels, frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = f"{gene} · {term}" + (f" · {group}" if group is not None else "")
    ax.set_title(f"{title}: shrinkage of {n} levels", fontsize=9)
    return finish(ax, show, save, "shrinkage.png")
