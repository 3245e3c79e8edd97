"""The unit of replication of a contrast: the level at which it varies, and the df that level gives.

A contrast of a cell-level mixed model is replicated by the units it varies between. If it is constant within the
levels of a random-effect factor (a case–control condition is constant within donors), the model already tests it
against the variation between those levels. If it varies within every random factor but is constant within samples
(the cells of one donor × condition), the cells of a sample share what happened to that sample (its dissociation and
library, the donor's own response to the treatment) and are not independent replicates of the contrast: the model
needs a term at the sample level, ``(1|sample)`` or a random slope of the contrast over donors. A contrast that varies
within samples (a continuous cell-level covariate, a per-cell genotype with ``sample_key`` given) is seen in every
cell, but its effect can still differ between donors: its average over donors is then a donor-level quantity, and the
model needs a random slope ``(0 + x|donor)`` (a continuous covariate) or a donor × factor term ``(1|donor:genotype)``
(a factor). Only a contrast whose variables do not vary within the levels of any random term is left to the cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import formulaic
import numpy as np
import pandas as pd

from .._errors import DesignError, _fmt_list
from ._design import Design
from ._formula import _NAME

_TOL = 1e-8


@dataclass(frozen=True)
class Replication:
    """Where a contrast is replicated in a given design."""

    level: str
    """``"random"`` (constant within the levels of a random term of the model, or carried by a random slope),
    ``"sample"`` (constant within samples but within no random term: the model lacks a sample-level term),
    ``"slope"`` (varies within samples and within the levels of a random term, whose levels can differ in its
    effect: the model lacks a random slope) or ``"cell"`` (varies within samples, and within no random term)."""
    unit: str
    """The replication unit: the random term's grouping (``"donor"``, ``"sample"``, ``"batch:donor"``), the sample
    unit that lacks a term (``"donor:condition"``, the ``sample_key`` column), the grouping a missing slope is over
    (``"donor"``), or ``"cell"``."""
    n_units: int
    term: str | None = None
    """For ``level="sample"`` or ``"slope"``: the term(s) that put the contrast at its level, e.g.
    ``"(1|donor:condition)"`` or ``"(0 + x|donor)"`` (several joined by `` + ``)."""
    combined_groups: bool = False
    """The unit is the combination of several random grouping factors (e.g. donor labels reused across batches)."""

    def message(self, contrast: str, formula: str) -> str:
        """Why the model as written tests this contrast against cell-to-cell noise (``level="sample"``/``"slope"``)."""
        if self.level == "slope":
            return (
                f"contrast {contrast!r} varies within each of the {self.n_units} {self.unit} levels, whose effects of "
                f"it can differ, but {formula!r} has no term for that: the model as written tests its average over "
                f"{self.unit} levels (a {self.unit}-level quantity) against cell-to-cell noise. A term for the "
                f"{self.unit}-specific effect is needed: {self.term}"
            )
        if self.combined_groups:
            groups = self.unit.split(":")
            return (
                f"contrast {contrast!r} is constant within each {' × '.join(groups)} combination ({self.n_units} of "
                f"them) but varies within every random term of {formula!r}, so the model as written tests it against "
                f"cell-to-cell noise. The unit of replication is the {' × '.join(groups)} combination: if "
                f"{groups[-1]!r} labels are reused across {groups[0]!r} levels, write the nested term "
                f"'(1|{'/'.join(groups)})'"
            )
        return (
            f"contrast {contrast!r} is constant within each of the {self.n_units} samples ({self.unit}) but varies "
            f"within every random term of {formula!r}, so the model as written tests it against cell-to-cell noise "
            f"(pseudoreplication of samples). A sample-level term is needed: {self.term} or a random slope of the "
            "contrast over donors"
        )


def _interaction(data: pd.DataFrame, cols: list[str]) -> np.ndarray:
    if not cols:
        return np.zeros(len(data), dtype=np.int64)
    key = pd.MultiIndex.from_frame(data[cols].astype(str)) if len(cols) > 1 else data[cols[0]].astype(str)
    return np.asarray(pd.factorize(key)[0], dtype=np.int64)


def _constant_within(x: np.ndarray, codes: np.ndarray) -> bool:
    n_levels = int(codes.max()) + 1 if codes.size else 0
    lo = np.full(n_levels, np.inf)
    hi = np.full(n_levels, -np.inf)
    np.minimum.at(lo, codes, x)
    np.maximum.at(hi, codes, x)
    present = np.isfinite(lo)
    return bool(np.all(hi[present] - lo[present] <= _TOL * (1.0 + np.abs(x).max(initial=0.0))))


def _all_constant(X: np.ndarray, used: np.ndarray, codes: np.ndarray) -> bool:
    return all(_constant_within(X[:, j], codes) for j in used)


def _slope_columns(design: Design, term) -> np.ndarray:
    """X columns that are covariates of a random slope over the same grouping factor as ``term``."""
    X = design.X
    out = np.zeros(X.shape[1], dtype=bool)
    for t2 in design.terms:
        if t2.n_levels != term.n_levels or not np.array_equal(t2.codes, term.codes):
            continue
        for c, cname in enumerate(t2.col_names):
            if cname == "(Intercept)":
                continue
            cov = np.asarray(t2.covariates[:, c], dtype=np.float64)
            for j in range(X.shape[1]):
                if np.allclose(X[:, j], cov, rtol=1e-10, atol=1e-12):
                    out[j] = True
    return out


def _group_variables(design: Design) -> list[str]:
    out: list[str] = []
    for r in design.parsed.random:
        for g in r.group:
            if g not in out:
                out.append(g)
    return out


def _contrast_variables(design: Design, used: np.ndarray) -> list[str]:
    """Fixed-effect variables of the terms whose columns the contrast weights."""
    fixed_vars = sorted(formulaic.Formula(design.parsed.fixed).required_variables)
    out: list[str] = []
    for term, idx in design.term_columns.items():
        if not set(idx) & set(used.tolist()) or term in ("1", "Intercept"):
            continue
        need = formulaic.Formula("~ " + term).required_variables
        out.extend(v for v in fixed_vars if v in need and v not in out)
    return out


def replication(design: Design, L: np.ndarray, sample: np.ndarray | pd.Series | None = None) -> Replication:
    """Find the level at which the contrast ``L`` varies in ``design``.

    Parameters
    ----------
    design
        From :func:`~scmlm.design.build_design` on cell-level data.
    L
        Contrast vector over the design's columns.
    sample
        Sample label of every observation (a ``sample_key`` column), or ``None``: samples are then the combinations
        of the random grouping factors with the fixed variables the contrast involves (e.g. donor × condition).

    Returns
    -------
    :class:`Replication`. ``level="random"`` when a random term already carries the contrast (it is constant within
    the term's levels, or it is the covariate of a random slope over them); else ``"sample"`` when the contrast is
    constant within samples (first checked for the combination of all random grouping factors, which catches donor
    labels reused across batches in a crossed ``(1|batch) + (1|donor)``); else ``"cell"``.
    """
    X = design.X
    n = X.shape[0]
    L = np.asarray(L, dtype=float).ravel()
    used = np.flatnonzero(np.abs(L) > 1e-12)
    for t in design.terms:
        codes = np.asarray(t.codes, dtype=np.int64)
        n_present = int(np.unique(codes).size)
        if _all_constant(X, used, codes):
            return Replication(level="random", unit=t.name, n_units=n_present)
        slope = _slope_columns(design, t)
        if slope[used].any() and all(_constant_within(X[:, j], codes) or slope[j] for j in used):
            return Replication(level="random", unit=t.name, n_units=n_present)
    if not design.terms:
        return Replication(level="cell", unit="cell", n_units=n)
    data = design.data
    groups = _group_variables(design)
    if len(groups) > 1:
        codes = _interaction(data, groups)
        n_units = int(codes.max()) + 1
        if _all_constant(X, used, codes) and n_units <= n / 2:
            unit = ":".join(groups)
            return Replication(level="sample", unit=unit, n_units=n_units, term=f"(1|{unit})", combined_groups=True)
    if sample is not None:
        lab = pd.Series(np.asarray(sample).astype(str), index=data.index, name="__sample__")
        frame = pd.concat([data[groups].astype(str), lab], axis=1)
        codes = _interaction(frame, [*groups, "__sample__"])
        own = _interaction(frame, ["__sample__"])
        n_units = int(codes.max()) + 1
        if not _all_constant(X, used, codes) or n_units > n / 2:
            return _unit_effect(design, used)
        name = str(getattr(sample, "name", None) or "sample")
        unit = name if int(own.max()) + 1 == n_units else ":".join([*groups, name])
        return Replication(level="sample", unit=unit, n_units=n_units, term=f"(1|{unit})")
    cvars = _contrast_variables(design, used)
    cat = [v for v in cvars if isinstance(data[v].dtype, pd.CategoricalDtype)]
    num = [v for v in cvars if v not in cat]
    base = _interaction(data, [*groups, *cat])
    for v in num:
        if not _constant_within(data[v].to_numpy(dtype=float), base):
            # a number that varies within donors (a cell-level score; time or dose as numbers, whose samples only
            # sample_key can name: a term over its values would turn it into a factor): a random slope over donors
            return _unit_effect(design, used)
    cols = [*groups, *cat, *num]
    codes = _interaction(data, cols)
    n_units = int(codes.max()) + 1
    if not _all_constant(X, used, codes) or n_units > n / 2:
        return _unit_effect(design, used)
    unit = ":".join(cols)
    bad = [c for c in cols if not _NAME.match(c)]
    if bad:
        raise DesignError(
            f"the contrast is constant within samples ({' × '.join(cols)}) and the model needs a term at that level, "
            f"but obs column(s) {_fmt_list(bad)} cannot be used in a formula; pass sample_key= with an obs column "
            "naming each sample, or add that term yourself."
        )
    return Replication(level="sample", unit=unit, n_units=n_units, term=f"(1|{unit})")


def _unit_groups(design: Design) -> dict[str, np.ndarray]:
    """Grouping of every random intercept that contains no other random term's levels (donors, not their batches)."""
    inter = {}
    for spec, t in zip(design.parsed.random, design.terms, strict=True):
        if spec.lhs.replace(" ", "").split("+")[0] == "1":
            inter.setdefault(t.name, np.asarray(t.codes, dtype=np.int64))
    others = {t.name: np.asarray(t.codes, dtype=np.int64) for t in design.terms}
    return {
        g: c
        for g, c in inter.items()
        if not any(h != g and np.unique(hc).size > np.unique(c).size and _nested_in(hc, c) for h, hc in others.items())
    }


def _unit_effect(design: Design, used: np.ndarray) -> Replication:
    """A contrast that varies within samples: ``"slope"`` when its variables vary within the levels of a random term.

    Each such grouping ``g`` (the finest random intercepts: donors, not the batches holding them) gets, for every
    variable of the contrast that varies within its levels, the uncorrelated random slope ``(0 + x|g)`` (a numeric
    variable that is a column of the design) or the term ``(1|g:f)`` (a factor ``f``): the effect of the variable may
    differ between the levels of ``g``, and its average over them is replicated by those levels, not by cells.
    """
    data = design.data
    n = design.X.shape[0]
    terms, unit, n_units = [], None, 0
    for g, codes in _unit_groups(design).items():
        for v in _contrast_variables(design, used):
            col = data[v]
            if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
                varies = not _constant_within(_interaction(data, [v]).astype(float), codes)
                term = f"(1|{g}:{v})" if _NAME.match(v) else None
            else:
                varies = not _constant_within(col.to_numpy(dtype=float), codes)
                term = f"(0 + {v}|{g})" if v in design.columns and _NAME.match(v) else None
            if varies and term:
                terms.append(term)
                if unit is None:
                    unit, n_units = g, int(np.unique(codes).size)
    if not terms:
        return Replication(level="cell", unit="cell", n_units=n)
    return Replication(level="slope", unit=unit, n_units=n_units, term=" + ".join(dict.fromkeys(terms)))


def _level_rows(codes: np.ndarray) -> np.ndarray:
    """Index of one observation per present level."""
    _, first = np.unique(codes, return_index=True)
    return first


def _nested_in(inner: np.ndarray, outer: np.ndarray) -> bool:
    """Every level of ``inner`` lies within a single level of ``outer``."""
    frame = pd.DataFrame({"i": inner, "o": outer}).drop_duplicates()
    return bool(frame["i"].is_unique)


def containment_df(design: Design, L: np.ndarray) -> float | None:
    """Between-level residual degrees of freedom of the contrast (nlme's containment rule), or ``None``.

    For every random term ``g`` whose levels contain the contrast (it is constant within them, or the covariate of a
    random slope over them): ``df_g = levels(g) - rank(D, C)``, with ``C`` the fixed columns constant within ``g``
    (one row per level) and ``D`` the level indicators of a coarser random term ``h`` when ``g`` is the crossing of
    ``h`` with the contrast's values (one level of ``g`` per level of ``h`` and arm: a paired design). In a paired
    design, ``(1|donor) + (1|donor:condition)`` with 8 donors, the
    condition is estimated within donors: ``df = 16 - rank(8 donor indicators, intercept, condition) = 7``, the
    paired t test's; between donors in a case–control design, ``df = donors - 2`` as before (donors nested in batches
    do not count as paired: several donors share a batch and arm).
    For a random slope the rule is ``levels(g) - rank(slope columns)``. The df is the minimum over such terms; it is
    returned as computed (it can be below 1: no replication at that level). ``None`` when no random term contains
    the contrast (a cell-level contrast).
    """
    X = design.X
    L = np.asarray(L, dtype=float).ravel()
    used = np.flatnonzero(np.abs(L) > 1e-12)
    pattern = _pattern(X, used)
    best = None
    for t in design.terms:
        codes = np.asarray(t.codes, dtype=np.int64)
        rows = _level_rows(codes)
        n_present = rows.size
        const = np.array([_constant_within(X[:, j], codes) for j in range(X.shape[1])], dtype=bool)
        slope = _slope_columns(design, t)
        if used.size and np.all(const[used]):
            blocks = [X[np.ix_(rows, np.flatnonzero(const))]]
            for h in design.terms:
                hc = np.asarray(h.codes, dtype=np.int64)
                if h is t or np.unique(hc).size >= n_present or _all_constant(X, used, hc):
                    continue
                if _nested_in(codes, hc) and _same_partition(codes, _cross(hc, pattern)):
                    hl = pd.factorize(hc[rows])[0]
                    blocks.append(np.eye(int(hl.max()) + 1)[hl])
            dfg = n_present - np.linalg.matrix_rank(np.hstack(blocks))
        elif used.size and np.all(const[used] | slope[used]):
            S = X[:, slope]
            dfg = n_present - (np.linalg.matrix_rank(np.unique(S, axis=0)) if S.size else 0)
        else:
            continue
        best = dfg if best is None else min(best, dfg)
    return None if best is None else float(best)


def within_parent(design: Design, L: np.ndarray) -> bool:
    """Whether the contrast is a within-unit (paired) contrast carried by a sample-level term.

    True when a random slope carries the contrast (it varies within the slope's groups), or when the random term
    whose levels contain the contrast has exactly one level per level of a coarser random term and value of the
    contrast, e.g. ``(1|donor:condition)`` or ``(1|sample)`` under ``(1|donor)`` in a paired design: each donor is
    seen under every condition. A case–control contrast whose donors are nested in batches is not: several donors
    share a batch and condition.
    """
    X = design.X
    L = np.asarray(L, dtype=float).ravel()
    used = np.flatnonzero(np.abs(L) > 1e-12)
    if not used.size:
        return False
    pattern = _pattern(X, used)
    for t in design.terms:
        codes = np.asarray(t.codes, dtype=np.int64)
        if _all_constant(X, used, codes):
            for h in design.terms:
                hc = np.asarray(h.codes, dtype=np.int64)
                if h is t or _all_constant(X, used, hc) or not _nested_in(codes, hc):
                    continue
                if _same_partition(codes, _cross(hc, pattern)):
                    return True
        else:
            slope = _slope_columns(design, t)
            if slope[used].any() and all(_constant_within(X[:, j], codes) or slope[j] for j in used):
                return True
    return False


def _pattern(X: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Code of each observation's values of the contrast's columns (numbered in order of first appearance)."""
    if not used.size:
        return np.zeros(X.shape[0], dtype=np.int64)
    codes = np.asarray(pd.factorize(np.round(X[:, used[0]], 10))[0], dtype=np.int64)
    for j in used[1:]:
        codes = _cross(codes, np.asarray(pd.factorize(np.round(X[:, j], 10))[0], dtype=np.int64))
    return codes


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Code of each observation's pair ``(a, b)`` of codes, numbered in order of first appearance.

    The same codes as factorising the pairs, through one integer key (a MultiIndex of 400k cells took 0.1-0.2 s a call).
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.size and (a.min() < 0 or b.min() < 0):
        return np.asarray(pd.factorize(pd.MultiIndex.from_arrays([a, b]))[0])
    key = a * (int(b.max(initial=0)) + 1) + b
    return np.asarray(pd.factorize(key)[0], dtype=np.int64)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    frame = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return bool(frame["a"].is_unique and frame["b"].is_unique)
