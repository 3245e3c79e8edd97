"""Plots of DE results: volcano, MA, p-value histogram, QQ."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ._labels import place_labels
from ._utils import finish, get_ax, require_columns, require_one_result, result_table


def volcano(
    data,
    key: str | None = None,
    *,
    group: str | None = None,
    contrast: str | None = None,
    padj_threshold: float = 0.05,
    n_labels: int = 10,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Volcano plot: log2 fold change against −log10 p-value, significant genes (``padj``) highlighted.

    Parameters
    ----------
    data
        AnnData holding a DE result under ``key``, or a result DataFrame.
    key, group, contrast
        Which result, group and contrast to draw (see :func:`scmlm.get.de_df`).
    padj_threshold
        Genes with ``padj`` below it are coloured and the top ``n_labels`` labelled; labels never overlap (each
        takes the nearest free place, with a leader line when moved away; one with no free place is left out).
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it to a path (``True``: ``volcano.png``).

    Returns
    -------
    The Axes (when ``show`` is not true).
    """
    df = result_table(data, key, group, contrast)
    require_columns(df, ["log2fc", "pvalue", "padj", "gene"], "volcano")
    require_one_result(df, "volcano", group, contrast)
    df = df[np.isfinite(df["pvalue"].astype(float)) & np.isfinite(df["log2fc"].astype(float))]
    ax = get_ax(ax)
    sig = (df["padj"] < padj_threshold).to_numpy()
    y = -np.log10(np.clip(df["pvalue"].to_numpy(dtype=float), 1e-300, 1))
    x = df["log2fc"].to_numpy(dtype=float)
    ax.scatter(x[~sig], y[~sig], s=6, c="0.65", lw=0, rasterized=True, label="not significant")
    ax.scatter(x[sig], y[sig], s=8, c="tab:red", lw=0, rasterized=True, label=f"padj < {padj_threshold:g}")
    ax.axvline(0, c="0.3", lw=0.6)
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel("−log10 p-value")
    ax.set_title(_title(df, "volcano"), fontsize=9)
    # below the axes: inside, it would hide the labels of the most significant genes, which sit at the top
    ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if n_labels and sig.any():
        top = np.argsort(-y * sig, kind="stable")[: min(n_labels, int(sig.sum()))]
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # headroom: the most significant genes' labels sit above them
        place_labels(ax, x[top], y[top], df["gene"].iloc[top].astype(str), fontsize=7)
    return finish(ax, show, save, "volcano.png")


def ma(
    data,
    key: str | None = None,
    *,
    group: str | None = None,
    contrast: str | None = None,
    padj_threshold: float = 0.05,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """MA plot: log2 fold change against mean expression (``base_mean``, log scale)."""
    df = result_table(data, key, group, contrast)
    require_columns(df, ["log2fc", "base_mean", "padj"], "ma")
    require_one_result(df, "ma", group, contrast)
    df = df[np.isfinite(df["log2fc"].astype(float)) & (df["base_mean"].astype(float) > 0)]
    ax = get_ax(ax)
    sig = (df["padj"] < padj_threshold).to_numpy()
    x = df["base_mean"].to_numpy(dtype=float)
    y = df["log2fc"].to_numpy(dtype=float)
    ax.scatter(x[~sig], y[~sig], s=6, c="0.65", lw=0, rasterized=True)
    ax.scatter(x[sig], y[sig], s=8, c="tab:red", lw=0, rasterized=True, label=f"padj < {padj_threshold:g}")
    ax.set_xscale("log")
    ax.axhline(0, c="0.3", lw=0.6)
    ax.set_xlabel("mean expression (base_mean)")
    ax.set_ylabel("log2 fold change")
    ax.set_title(_title(df, "MA"), fontsize=9)
    return finish(ax, show, save, "ma.png")


def pvalue_hist(
    data,
    key: str | None = None,
    *,
    group: str | None = None,
    contrast: str | None = None,
    bins: int = 20,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """Histogram of p-values; under the null it is flat (the dashed line), DE genes pile up near 0."""
    df = result_table(data, key, group, contrast)
    require_columns(df, ["pvalue"], "pvalue_hist")
    p = df["pvalue"].to_numpy(dtype=float)
    p = p[np.isfinite(p)]
    ax = get_ax(ax)
    ax.hist(p, bins=bins, range=(0, 1), color="tab:blue", alpha=0.8)
    if p.size:
        ax.axhline(p.size / bins, ls="--", c="0.3", lw=0.8, label="uniform")
    ax.set_xlabel("p-value")
    ax.set_ylabel("genes")
    ax.set_title(_title(df, f"p-values ({p.size} tests)"), fontsize=9)
    return finish(ax, show, save, "pvalue_hist.png")


def qq(
    data,
    key: str | None = None,
    *,
    group: str | None = None,
    contrast: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
):
    """QQ plot of −log10 p-values against the uniform distribution, with a 95 % pointwise band."""
    from scipy import stats

    df = result_table(data, key, group, contrast)
    require_columns(df, ["pvalue"], "qq")
    p = np.sort(df["pvalue"].to_numpy(dtype=float))
    p = p[np.isfinite(p)]
    ax = get_ax(ax)
    n = p.size
    if n:
        k = np.arange(1, n + 1)
        expected = -np.log10(k / (n + 1))
        lo = -np.log10(stats.beta.ppf(0.975, k, n - k + 1))
        hi = -np.log10(stats.beta.ppf(0.025, k, n - k + 1))
        ax.fill_between(expected, lo, hi, color="0.85", label="95 % band")
        ax.scatter(expected, -np.log10(np.clip(p, 1e-300, 1)), s=6, c="tab:blue", lw=0, rasterized=True)
        m = expected.max()
        ax.plot([0, m], [0, m], c="0.3", lw=0.8)
    ax.set_xlabel("expected −log10 p")
    ax.set_ylabel("observed −log10 p")
    ax.set_title(_title(df, "QQ"), fontsize=9)
    return finish(ax, show, save, "qq.png")


def _title(df: pd.DataFrame, what: str) -> str:
    parts = [what]
    for col in ("group", "contrast"):
        if col in df and df[col].nunique() == 1:
            parts.append(str(df[col].iloc[0]))
    return " · ".join(parts)
