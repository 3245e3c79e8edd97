"""Shared plotting helpers in scanpy's conventions (``ax=``, ``show=``, ``save=``; returns the Axes)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .._errors import InputError


def result_table(data, key: str | None = None, group: str | None = None, contrast: str | None = None) -> pd.DataFrame:
    """Accept an AnnData holding a result, or a result DataFrame; filter by group/contrast."""
    if isinstance(data, pd.DataFrame):
        df = data
        if group is not None:
            df = df[df["group"].astype(str) == str(group)]
        if contrast is not None:
            df = df[df["contrast"].astype(str) == str(contrast)]
        return df.reset_index(drop=True)
    from ..get import de_df

    return de_df(data, key, group=group, contrast=contrast)


def require_one_result(df: pd.DataFrame, what: str, group: str | None, contrast: str | None) -> None:
    """Refuse to pool genes of several groups or contrasts into one per-gene plot; list the choices."""
    for col, given in (("group", group), ("contrast", contrast)):
        if given is None and col in df.columns:
            levels = list(dict.fromkeys(df[col].astype(str)))
            if len(levels) > 1:
                raise InputError(
                    f"{what}: the result has {len(levels)} {col}s ({', '.join(repr(v) for v in levels[:20])}"
                    f"{', …' if len(levels) > 20 else ''}); pick one with {col}=, e.g. {col}={levels[0]!r}, or draw "
                    "each in turn (scmlm plot writes one file per group and contrast)."
                )


def get_ax(ax=None, figsize=(4.5, 4.0)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def finish(ax, show: bool | None, save: str | os.PathLike | bool | None, default_name: str):
    """Save (atomically) and/or show the figure of ``ax``; return ``ax`` unless shown."""
    import matplotlib.pyplot as plt

    fig = ax.get_figure()
    if save:
        path = Path(default_name if save is True else save)
        if not path.suffix:
            path = path.with_suffix(".png")
        from ..io import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))
    if show:
        plt.show()
        return None
    return ax


def require_columns(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"{what} needs result columns {missing}; the table has {list(df.columns)}.")
