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
    """A tool's result table plus the parameters of the run that made it (``params["tool"]`` names the tool).

    The DE tools' tables have the shared schema (:data:`COLUMNS`); ``variance_partition`` gives one row per gene and
    ``random_effects`` one per gene, term and level. Every ``scmlm.tl`` tool returns through :meth:`deliver`.
    """

    table: pd.DataFrame
    params: dict = field(default_factory=dict)

    def to_uns(self, adata, key: str) -> None:
        """Store ``params`` and the table in ``adata.uns[key]`` (params made h5ad-safe)."""
        adata.uns[key] = {"params": _uns_safe(self.params), "results": self.table}

    def deliver(self, adata, key_added: str, *, inplace: bool, copy: bool):
        """Return what a tool returns by the shared convention.

        That is the result (``inplace=False``), the modified copy (``copy=True``), or ``None`` after writing
        ``adata.uns[key_added]``.
        """
        if not inplace and not copy:
            return self
        target = adata.copy() if copy else adata
        self.to_uns(target, key_added)
        return target if copy else None

    def summary(self) -> pd.Series:
        """Count the genes per ``status``."""
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


def fingerprint(obs_names, obs: pd.DataFrame, spec: dict) -> str:
    """A 16-hex-digit hash of the cells (names and obs values) and of the analysis ``spec`` (design, contrast, …)."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(pd.Index(obs_names).astype(str), index=False).to_numpy().tobytes())
    for col in sorted(map(str, obs.columns)):
        h.update(col.encode())
        values = obs[col]
        values = values.astype(str) if not pd.api.types.is_numeric_dtype(values) else values
        h.update(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def merge_shards(tables: Iterable[pd.DataFrame], *, sources: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate shard tables, refusing an incomplete or inconsistent set, and recompute ``padj`` over all genes.

    Every row must carry a ``shard`` column ``"i/n"``; the set must contain each of ``1/n … n/n`` exactly once. Shards
    written by ``scmlm de --shard`` also carry ``analysis_id``, a fingerprint of the cells, design, contrast, family
    and method: shards of different analyses are refused, and so is a gene given by two shards.
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
    ids = {name: _analysis_id(t) for name, t in zip(names, tables, strict=True)}
    if len(set(ids.values())) > 1:
        first_name, first_id = next(iter(ids.items()))
        other = next(name for name, v in ids.items() if v != first_id)
        raise InputError(
            f"shards come from different analyses: {other} has analysis_id {ids[other]!r} but {first_name} has "
            f"{first_id!r} (the fingerprint of data, design, contrast, family and method differs, or one file was "
            "not written by 'scmlm de --shard'). Merge only the shards of one run."
        )
    for col in ("method", "contrast"):
        vals = {
            name: tuple(sorted(t[col].dropna().astype(str).unique()))
            for name, t in zip(names, tables, strict=True)
            if col in t and len(t)
        }
        if len(set(vals.values())) > 1:
            raise InputError(f"shards differ in {col!r}: {vals}; merge only the shards of one analysis.")
    missing = sorted(set(range(1, total + 1)) - set(seen))
    if missing:
        raise InputError(
            f"incomplete shard set: missing shard(s) {', '.join(f'{i}/{total}' for i in missing)} of {total}; "
            "rerun them before merging."
        )
    order = sorted(seen, key=int)
    by_index = dict(zip([parse_shard(t["shard"].iloc[0])[0] for t in tables], tables, strict=True))
    merged = pd.concat([by_index[i] for i in order], ignore_index=True)
    merged = merged.drop(columns=["shard", "analysis_id"], errors="ignore")
    keys = ["gene", "group", "contrast"]
    if set(keys) <= set(merged.columns) and merged.duplicated(keys).any():
        dup = merged.loc[merged.duplicated(keys), keys].iloc[0].tolist()
        raise InputError(f"gene {dup[0]!r} (group {dup[1]!r}, contrast {dup[2]!r}) is in more than one shard.")
    return finalize_table(finish_moderation(merged))


def finish_moderation(table: pd.DataFrame) -> pd.DataFrame:
    """Finish the moderation of the rows with ``moderation == "pending"``, per group and contrast.

    Reads ``coef``, ``tau2``, ``df_resid``, ``unit_scale``, ``base_mean`` and ``converged``; writes ``se``,
    ``stat``, ``df``, ``pvalue``, ``df_prior``, ``var_prior``, ``df_prior_fit`` (the group's maximum-likelihood prior
    df, of which ``df_prior`` is the share each gene may borrow; :func:`scmlm.models.moderate.prior`) and
    ``moderation``. ``padj`` is left to the caller.
    Rows of a joint F test of ``q = df_num`` rows (``glmm_de``) carry the per-gene Wald ``f_raw`` and their
    between-unit variance ``tau2`` (``unit_scale`` 1); the moderated F is ``f_raw · tau2 / τ̃²`` on ``F(q, d + d0)``.
    Genes that cannot be moderated keep their per-gene test and say why in ``moderation``; rows of other genes are
    returned unchanged. Used by ``glmm_de`` on its own table and by :func:`merge_shards` on the merged shards (the
    prior needs every gene of a group).
    """
    from scipy import stats

    from .models import PENDING, moderate

    if "moderation" not in table.columns or not (table["moderation"] == PENDING).any():
        return table
    table = table.copy()
    for col in ("df_prior", "var_prior", "df_prior_fit"):
        if col not in table:
            table[col] = np.nan
    pend = (table["moderation"] == PENDING).to_numpy()
    keys = [table["group"].astype(str).to_numpy(), table["contrast"].astype(str).to_numpy()]
    for _, rows in table.groupby(keys, sort=False).indices.items():
        rows = rows[pend[rows]]
        if not rows.size:
            continue
        sub = table.iloc[rows]
        scale = sub["unit_scale"].to_numpy(dtype=float)
        q = int(np.nanmax(sub["df_num"].to_numpy(dtype=float), initial=1.0)) if "df_num" in sub else 1
        res = moderate(
            sub["coef"].to_numpy(dtype=float),
            sub["tau2"].to_numpy(dtype=float),
            sub["df_resid"].to_numpy(dtype=float),
            sub["base_mean"].to_numpy(dtype=float),
            scale,
            sub["converged"].to_numpy(dtype=bool),
            q=q,
        )
        if q > 1:
            # a joint F test of q rows: F_raw · τ̂² / τ̃² on F(q, d + d0); no single estimate, so no se
            with np.errstate(divide="ignore", invalid="ignore"):
                post = res["se"] ** 2 / scale
                res["stat"] = sub["f_raw"].to_numpy(dtype=float) * sub["tau2"].to_numpy(dtype=float) / post
                res["pvalue"] = stats.f.sf(res["stat"], q, res["df"])
            res["se"] = np.full(len(sub), np.nan)
        done = res["moderation"] == "moderated"  # the others keep their per-gene test and say why
        for col in ("se", "stat", "df", "pvalue", "df_prior", "var_prior", "df_prior_fit"):
            vals = sub[col].to_numpy(dtype=float).copy()
            vals[done] = res[col][done]
            table.iloc[rows, table.columns.get_loc(col)] = vals
        table.iloc[rows, table.columns.get_loc("moderation")] = res["moderation"]
        _moderate_separated(table, rows, sub)
    return table


def _moderate_separated(table: pd.DataFrame, rows: np.ndarray, sub: pd.DataFrame) -> None:
    """Separated genes of one group and contrast: the moderated test of their prior-count fold change.

    With the other genes' prior (:func:`scmlm.models.moderate_separated`), or else their likelihood-ratio test.
    """
    from .models import moderate_separated

    sep = (sub["status"] == "separated").to_numpy() & np.isfinite(sub["coef"].to_numpy(dtype=float))
    if not sep.any() or "p_bound" not in sub:
        return
    s = sub[sep]
    res = moderate_separated(
        s["coef"].to_numpy(dtype=float),
        s["p_bound"].to_numpy(dtype=float),
        s["unit_scale"].to_numpy(dtype=float),
        s["base_mean"].to_numpy(dtype=float),
        sub["tau2"].to_numpy(dtype=float),
        sub["df_resid"].to_numpy(dtype=float),
        sub["base_mean"].to_numpy(dtype=float),
        sub["converged"].to_numpy(dtype=bool),
    )
    done = np.isfinite(res["pvalue"])
    idx = rows[sep]
    for col in ("se", "stat", "df", "pvalue", "df_prior", "var_prior"):
        vals = s[col].to_numpy(dtype=float).copy()
        vals[done] = res[col][done]
        table.iloc[idx, table.columns.get_loc(col)] = vals
    why = np.where(
        done,
        "moderated",  # the status says it is a separated gene's prior-count fold change
        "not moderated: separated, likelihood-ratio test of the gene alone",
    )
    table.iloc[idx, table.columns.get_loc("moderation")] = why


def _analysis_id(t: pd.DataFrame) -> str | None:
    if "analysis_id" not in t.columns:
        return None
    vals = t["analysis_id"].dropna().astype(str).unique()
    return vals[0] if len(vals) == 1 else "|".join(sorted(vals)) or None
