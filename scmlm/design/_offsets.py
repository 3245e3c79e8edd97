"""Which cells form a sample, which offset ``"auto"`` means, and the TMM offset's samples and factor table.

The TMM numerics (per-sample sums, factors, per-cell offsets) are :mod:`scmlm.models.offsets`; this module reads the
samples from obs columns or from the design and keeps the labels. The rule for ``offset="auto"`` is
:func:`resolve_offset`, the one place it is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import formulaic
import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from .._validate import category_codes, check_obs_keys
from ..models import FAMILIES, StreamedSums, sample_sums, tmm_cell_offset, tmm_sample_factors
from ._design import parse_contrasts
from ._formula import parse_formula


def design_samples(
    design: str, contrast=None, obs: pd.DataFrame | None = None, cluster: str | None = None
) -> list[str]:
    """Obs columns whose combination identifies a sample, read from the design when no ``sample_key`` is given.

    ``cluster`` (GEE's cluster column) and the grouping factors of the random terms (e.g. ``donor``; ``batch`` and
    ``donor`` for ``(1|batch/donor)``), crossed with, for a contrast ``(factor, test, reference)``, its factor (for
    several contrasts, the union of their factors); for
    any other contrast (a coefficient name, a vector, none), with the design's categorical fixed variables (given
    ``obs`` to tell them from numeric ones). With ``"~ condition + (1|donor)"`` and ``("condition", "stim", "ctrl")``
    a sample is a donor × condition combination, the unit paired pseudobulk sums. An empty list when the design names
    no such column.
    """
    parsed = parse_formula(design)
    cols: list[str] = [] if cluster is None else [cluster]
    for term in parsed.random:
        cols.extend(term.group)
    # several contrasts: the union of their factors
    factors, other = [], contrast is None
    if contrast is not None:
        for spec in parse_contrasts(contrast):
            triple = isinstance(spec.spec, tuple) and len(spec.spec) == 3 and isinstance(spec.spec[0], str)
            if triple and (obs is None or spec.spec[0] in obs.columns):
                factors.append(spec.spec[0])
            else:
                other = True
    cols.extend(factors)
    if other and obs is not None:
        fixed = sorted(formulaic.Formula(parsed.fixed).required_variables)
        cols.extend(v for v in fixed if v in obs.columns and not pd.api.types.is_numeric_dtype(obs[v]))
    return list(dict.fromkeys(cols))


def resolve_offset(
    offset: str | None,
    family: str,
    *,
    design: str | None = None,
    contrast=None,
    obs: pd.DataFrame | None = None,
    sample_key: str | Sequence[str] | None = None,
) -> str | None:
    """The offset ``offset="auto"`` stands for; any other value is returned as it is.

    ``"auto"`` is ``"tmm"`` (log total count plus the TMM factor of the cell's sample) for the log-link count
    families (``nb``, ``poisson``) when the samples are known: ``sample_key`` is given, or the design names them
    (:func:`design_samples` of ``design``, ``contrast`` and, when given, ``obs``; with ``obs=None`` only the random
    terms and the contrast factors count). Otherwise ``"log_total"``: binomial and Gaussian responses, or no
    samples to compute factors over.

    Returns
    -------
    ``"tmm"``, ``"log_total"``, an obs column name or ``None`` (no offset).

    Examples
    --------
    >>> resolve_offset("auto", "nb", design="~ condition + (1|donor)")
    'tmm'
    >>> resolve_offset("auto", "nb", design="~ condition")
    'log_total'
    >>> resolve_offset("auto", "binomial", sample_key="sample")
    'log_total'
    """
    if offset != "auto":
        return offset
    fam = FAMILIES.get(family)
    if fam is None or fam.link != "log":
        return "log_total"
    known = sample_key is not None or (design is not None and bool(design_samples(design, contrast, obs)))
    return "tmm" if known else "log_total"


def resolve_samples(
    sample_key: str | Sequence[str] | None,
    design: str | None,
    contrast=None,
    obs: pd.DataFrame | None = None,
    cluster: str | None = None,
) -> list[str]:
    """``sample_key`` as a list of obs columns, or the design's samples (:func:`design_samples`) when it is None."""
    if sample_key is None:
        cols = [] if design is None else design_samples(design, contrast, obs, cluster)
        if not cols:
            raise InputError(
                "offset='tmm' needs the samples"
                + (f", and design {design!r} names none (no random term, no contrast factor)" if design else "")
                + ": pass sample_key='sample' (an obs column) or a list of obs columns whose combination identifies "
                "a sample, e.g. ['donor', 'condition']."
            )
        if obs is not None:
            missing = [c for c in cols if c not in obs.columns]
            if missing:
                raise InputError(
                    f"design {design!r} uses {_fmt_list(missing)}, not among the columns of adata.obs: "
                    f"{_fmt_list(obs.columns)}."
                )
        return cols
    cols = [sample_key] if isinstance(sample_key, str) else list(sample_key)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise InputError(f"sample_key must be an obs column name or a list of them, got {sample_key!r}.")
    return cols


def sample_labels(obs: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer code of each cell's sample (the combination of ``columns``) and the sample labels (``a:b``)."""
    per_col = [category_codes(obs[col]) for col in columns]
    stacked = np.column_stack([c for c, _ in per_col]).astype(np.int64)
    radix = stacked.max(axis=0, initial=0) + 1
    if stacked.size and stacked.min() >= 0 and float(np.prod(radix.astype(float))) < 2.0**62:
        # one mixed-radix key per row: its sorted unique values are the rows in lexicographic order, as the unique
        # rows of the stacked codes (np.unique over rows sorted 400k cells in 0.4 s)
        key = np.zeros(stacked.shape[0], dtype=np.int64)
        for k in range(stacked.shape[1]):
            key = key * int(radix[k]) + stacked[:, k]
        uniq, inverse = np.unique(key, return_inverse=True)
        used = np.empty((uniq.size, stacked.shape[1]), dtype=np.int64)
        rest = uniq.copy()
        for k in range(stacked.shape[1] - 1, -1, -1):
            used[:, k] = rest % int(radix[k])
            rest //= int(radix[k])
    else:
        used, inverse = np.unique(stacked, axis=0, return_inverse=True)
    labels = [":".join(str(per_col[k][1][v]) for k, v in enumerate(row)) for row in used]
    return inverse.reshape(-1).astype(np.int64), labels


def tmm_units(obs: pd.DataFrame, samples: str | Sequence[str], groups_key: str | None = None):
    """The group × sample unit of each cell: integer codes and the table of units (``group``, ``sample``).

    TMM factors are computed among the samples of each group (``groups_key``), as :func:`scmlm.tl.pseudobulk_de`
    normalises per group; with ``groups_key=None`` every cell is in group ``"all"``.
    """
    cols = resolve_samples(samples, None)
    check_obs_keys(obs, cols, what="sample_key", grouping=True)
    check_obs_keys(obs, [groups_key], what="groups_key", grouping=True)
    if groups_key is None:
        keys = cols
        gname = np.full(len(obs), "all", dtype=object)
    else:
        keys = [groups_key, *cols]
        gname = obs[groups_key].astype(str).to_numpy(dtype=object)
    codes, labels = sample_labels(obs, keys)
    first = np.zeros(len(labels), dtype=np.int64)
    first[codes[::-1]] = np.arange(codes.size)[::-1]  # a cell of each unit
    sample = [":".join(str(obs[c].iloc[i]) for c in cols) for i in first]
    units = pd.DataFrame({"group": gname[first], "sample": sample})
    units["n_cells"] = np.bincount(codes, minlength=len(labels))
    return codes, units


def tmm_offset_from_sums(
    log_total: np.ndarray, codes: np.ndarray, units: pd.DataFrame, sums: np.ndarray
) -> tuple[np.ndarray, pd.DataFrame]:
    """Offsets ``log(total_i) + log(f_s)`` from the units × genes pseudobulk ``sums`` of :func:`tmm_units`' units.

    The sums may be accumulated block by block (the workflow streams a backed h5ad once); the factors are edgeR's
    ``calcNormFactors`` among the samples of each group.
    """
    group_codes = pd.factorize(units["group"])[0]
    tmm = tmm_sample_factors(sums, group_codes)
    factors = tmm.norm_factor
    for name, idx in units.groupby("group", sort=False).indices.items():
        bad = idx[~(np.isfinite(factors[idx]) & (factors[idx] > 0))]
        if bad.size:
            raise InputError(
                f"TMM factors are undefined for sample(s) {_fmt_list(units['sample'].iloc[bad])}"
                + (f" in group {name!r}" if name != "all" else "")
                + "; remove samples without counts or use offset='log_total'."
            )
    lib = tmm.lib_size
    table = units.assign(lib_size=lib, norm_factor=factors, eff_lib_size=lib * factors)
    return tmm_cell_offset(log_total, codes, factors), table


def tmm_offset(
    obs: pd.DataFrame,
    matrix,
    log_total: np.ndarray,
    samples: str | Sequence[str] | None,
    groups_key: str | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-cell offset ``log(total_i) + log(f_s)`` with ``f_s`` the TMM factor of cell i's sample.

    Parameters
    ----------
    obs
        The cells' annotations (the sample and group columns), one row per row of ``matrix``.
    matrix
        Cells × genes counts of the layer, all genes (the same genes as the totals).
    log_total
        Log total count of each cell over all genes of the layer.
    samples
        obs column(s) whose combination identifies a sample.
    groups_key
        obs column (e.g. cell type): factors are computed among the samples of each group, on the group's
        pseudobulk, as :func:`scmlm.tl.pseudobulk_de` does per group.

    Returns
    -------
    The offset (natural log, one value per cell) and a table with one row per group × sample: ``group, sample,
    n_cells, lib_size`` (pseudobulk column sum over all genes), ``norm_factor`` (edgeR's ``calcNormFactors(method =
    "TMM")`` on the pseudobulk of all genes; geometric mean 1 within a group) and ``eff_lib_size``
    (``lib_size * norm_factor``, which equals the sum of ``exp(offset)`` over the sample's cells).
    """
    codes, units = tmm_units(obs, samples, groups_key)
    sums = sample_sums(matrix, codes, len(units))
    return tmm_offset_from_sums(log_total, codes, units, sums)


class StreamedTMM:
    """TMM offsets from a matrix seen in row blocks (a backed h5ad streamed once).

    Accumulates the units × genes pseudobulk of :func:`tmm_units`' units over the blocks given to :meth:`add`;
    :meth:`offset` then gives what :func:`tmm_offset` gives on the whole matrix.
    """

    def __init__(self, obs: pd.DataFrame, samples: str | Sequence[str], groups_key: str | None, n_vars: int):
        self.codes, self.units = tmm_units(obs, samples, groups_key)
        self._sums = StreamedSums(self.codes, len(self.units), n_vars)

    @property
    def sums(self) -> np.ndarray:
        """Units × genes sums of the rows added so far."""
        return self._sums.sums

    def add(self, start: int, block) -> None:
        """Add the rows ``start, start + 1, …`` of the cells × genes matrix (sparse or dense)."""
        self._sums.add(start, block)

    def offset(self, log_total: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
        """The per-cell offset and the factor table, as :func:`tmm_offset`."""
        return tmm_offset_from_sums(log_total, self.codes, self.units, self.sums)


def streamed_tmm(obs: pd.DataFrame, spec: dict, n_vars: int) -> StreamedTMM:
    """A :class:`StreamedTMM` for one analysis ``spec``: ``design``, ``contrast``, ``sample_key``, ``groups_key``.

    The samples are resolved as ``glmm_de(..., offset="tmm")`` resolves them, so that an offset streamed here (the
    workflow's gene shards, ``scmlm hierarchy``) equals the one ``glmm_de`` computes on the whole matrix.
    """
    contrast = spec.get("contrast")
    if isinstance(contrast, list) and len(contrast) == 3 and not any(":" in str(c) for c in contrast):
        contrast = tuple(contrast)  # a (factor, test, reference) stored as a list; a list of "f:t:r" stays a list
    samples = resolve_samples(spec.get("sample_key"), spec["design"], contrast, obs)
    return StreamedTMM(obs, samples, spec.get("groups_key"), n_vars)
