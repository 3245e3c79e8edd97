"""The shared result table of every DE method, multiple-testing correction, and the merge of gene shards."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._errors import InputError

#: Columns every DE table has, in this order; methods may append more (``dispersion``, ``var_<f>``, ``icc_<f>``, …).
COLUMNS = [
    "gene",
    "group",
    "contrast",
    "coef",
    "log2fc",
    "se",
    "stat",
    "df",
    "pvalue",
    "padj",
    "base_mean",
    "method",
    "converged",
    "status",
]
_LN2 = math.log(2.0)


def bh_adjust(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaN entries stay NaN and do not count as tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.minimum(ranked, 1.0)
    out[ok] = adj
    return out


def finalize_table(df: pd.DataFrame) -> pd.DataFrame:
    """Fill ``log2fc`` from ``coef`` (natural log) and ``padj`` (BH within each group and contrast), order columns."""
    df = df.copy()
    for col in COLUMNS:
        if col not in df:
            df[col] = np.nan
    df["log2fc"] = df["coef"].astype(float) / _LN2
    df["padj"] = np.nan
    if len(df):
        keys = [df["group"].astype(str).to_numpy(), df["contrast"].astype(str).to_numpy()]
        for _, idx in df.groupby(keys, sort=False).indices.items():
            df.iloc[idx, df.columns.get_loc("padj")] = bh_adjust(df["pvalue"].to_numpy(dtype=float)[idx])
    df["converged"] = df["converged"].fillna(False).astype(bool)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra].reset_index(drop=True)


@dataclass
class DEResult:
    """A DE table in the shared schema plus the parameters of the run that made it."""

    table: pd.DataFrame
    params: dict = field(default_factory=dict)

    def to_uns(self, adata, key: str) -> None:
        adata.uns[key] = {"params": _uns_safe(self.params), "results": self.table}

    def deliver(self, adata, key_added: str, *, inplace: bool, copy: bool):
        """What a tool returns, by the shared convention: the result (``inplace=False``), the modified copy
        (``copy=True``), or ``None`` after writing ``adata.uns[key_added]``."""
        if not inplace and not copy:
            return self
        target = adata.copy() if copy else adata
        self.to_uns(target, key_added)
        return target if copy else None

    def summary(self) -> pd.Series:
        return self.table["status"].value_counts()


def _uns_safe(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if v is None:
            out[k] = ""
        elif isinstance(v, dict):
            out[k] = _uns_safe(v)
        elif isinstance(v, tuple | list):
            out[k] = [str(x) for x in v]
        elif isinstance(v, np.ndarray):
            out[k] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- shards

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"3/10"`` or ``(3, 10)`` → ``(3, 10)``; shards are numbered 1 … n."""
    if shard is None:
        return None
    if isinstance(shard, str):
        m = _SHARD.match(shard)
        if not m:
            raise InputError(f"shard {shard!r} must look like 'i/n' with 1 <= i <= n, e.g. '3/10'.")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(x) for x in shard)
        except (TypeError, ValueError) as err:
            raise InputError(f"shard {shard!r} must be a pair (i, n) with 1 <= i <= n.") from err
    if n < 1 or not 1 <= i <= n:
        raise InputError(f"shard {i}/{n} is out of range: shards are numbered 1 … n, with n >= 1.")
    return i, n


def shard_indices(n_items: int, shard: tuple[int, int] | None) -> np.ndarray:
    """Indices of the items of shard ``(i, n)``: contiguous, balanced blocks covering ``range(n_items)``."""
    if shard is None:
        return np.arange(n_items)
    i, n = shard
    bounds = np.linspace(0, n_items, n + 1).round().astype(int)
    return np.arange(bounds[i - 1], bounds[i])


def merge_shards(tables: Iterable[pd.DataFrame], *, sources: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate shard tables, refusing an incomplete or inconsistent set, and recompute ``padj`` over all genes.

    Every row must carry a ``shard`` column ``"i/n"``; the set must contain each of ``1/n … n/n`` exactly once.
    """
    tables = list(tables)
    if not tables:
        raise InputError("merge needs at least one shard table.")
    names = list(sources) if sources is not None else [f"table {k + 1}" for k in range(len(tables))]
    seen: dict[int, str] = {}
    total = None
    for name, t in zip(names, tables, strict=True):
        if "shard" not in t.columns:
            raise InputError(f"{name} has no 'shard' column; was it written by 'scmlm de --shard i/n'?")
        vals = t["shard"].dropna().astype(str).unique()
        if len(vals) != 1:
            raise InputError(f"{name} mixes shards {list(vals)}; each file must hold one shard.")
        i, n = parse_shard(vals[0])
        if total is None:
            total = n
        elif n != total:
            raise InputError(f"{name} is shard {i}/{n}, but other files belong to a set of {total} shards.")
        if i in seen:
            raise InputError(f"shard {i}/{n} is given twice: {seen[i]} and {name}.")
        seen[i] = name
    missing = sorted(set(range(1, total + 1)) - set(seen))
    if missing:
        raise InputError(
            f"incomplete shard set: missing shard(s) {', '.join(f'{i}/{total}' for i in missing)} of {total}; "
            "rerun them before merging."
        )
    order = sorted(seen, key=int)
    by_index = dict(zip([parse_shard(t["shard"].iloc[0])[0] for t in tables], tables, strict=True))
    merged = pd.concat([by_index[i] for i in order], ignore_index=True)
    merged = merged.drop(columns=["shard"])
    return finalize_table(_finish_moderation(merged))


def _finish_moderation(table: pd.DataFrame) -> pd.DataFrame:
    """Moderated GLMM tests of a sharded run: the prior is estimated over all genes once the shards are together
    (rows with ``moderation == "pending"``; see :mod:`scmlm.models._moderate`)."""
    from .models._moderate import moderate_table

    return moderate_table(table)
