"""File names and batch files of plots: what the command line and the report write and find again.

:func:`save_result_plots` writes one PNG per plot kind, group and contrast of a result table (``scmlm plot``, the
workflow's ``plot`` rule); :func:`file_labels` names the files, and the report matches its figures by those names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ._de import ma, pvalue_hist, qq, volcano

__all__ = ["file_labels", "save_result_plots", "slug"]

_SYMBOLS = {"/": "-", "+": "plus", "&": "and", "%": "pct", "*": "x", "<": "lt", ">": "gt", "=": "eq", " ": "_"}


def slug(label: str) -> str:
    """A file-name part for one label: characters unsafe in file names become words or dashes (``T/NK`` → ``T-NK``)."""
    out = []
    for ch in str(label):
        if ch.isalnum() or ch in "-_.":
            out.append(ch)
        else:
            out.append(_SYMBOLS.get(ch, "_"))
    text = "".join(out).strip(".") or "_"
    return text


def file_labels(labels) -> dict[str, str]:
    """A readable file-name part for every label, unique among ``labels``.

    Characters unsafe in file names become words or dashes (``"T/NK"`` → ``T-NK``, ``"T+NK"`` → ``TplusNK``); labels
    that would still share a name get a short hash of the original label appended, so no file overwrites another.
    """
    import hashlib

    labels = [str(x) for x in dict.fromkeys(str(x) for x in labels)]
    slugs = {lab: slug(lab) for lab in labels}
    count: dict[str, int] = {}
    for s in slugs.values():
        count[s.lower()] = count.get(s.lower(), 0) + 1
    out = {}
    for lab, s in slugs.items():
        if count[s.lower()] > 1:
            s = f"{s}-{hashlib.sha1(lab.encode()).hexdigest()[:6]}"
        out[lab] = s
    return out


def save_result_plots(table: pd.DataFrame, outdir: str | os.PathLike, *, kinds=("volcano", "pvalue_hist")) -> list:
    """Write one PNG per plot kind, group and contrast of a result table into ``outdir``; return the paths.

    A joint F test (no fold change) gets only the p-value plots (``pvalue_hist``, ``qq``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    funcs = {"volcano": volcano, "ma": ma, "pvalue_hist": pvalue_hist, "qq": qq}
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    combos = list(table[["group", "contrast"]].astype(str).drop_duplicates().itertuples(index=False))
    names = file_labels(f"{group}__{contrast}" for group, contrast in combos)
    for group, contrast in combos:
        safe = names[f"{group}__{contrast}"]
        rows = (table["group"].astype(str) == group) & (table["contrast"].astype(str) == contrast)
        # a joint F test has no fold change: no volcano or MA plot, only the p-value plots
        joint = (
            "log2fc" in table
            and not table.loc[rows, "log2fc"].notna().any()
            and table.loc[rows, "pvalue"].notna().any()
        )
        for kind in kinds:
            if joint and kind in ("volcano", "ma"):
                continue
            path = outdir / f"{kind}__{safe}.png"
            ax = funcs[kind](table, group=group, contrast=contrast, show=False, save=path)
            plt.close(ax.get_figure())
            paths.append(path)
    return paths
