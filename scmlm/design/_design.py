"""Build the fixed-effect matrix, random-effect terms and contrasts from a formula and a sample/cell table."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import formulaic
import numpy as np
import pandas as pd

from .._errors import DesignError, EstimabilityError, _fmt_list
from ..models._random import RandomTerm
from ._formula import ParsedFormula, parse_formula


@dataclass(frozen=True)
class Contrast:
    """A linear combination ``L'β`` of the fixed effects, with a display name."""

    name: str
    L: np.ndarray
    """Length-p vector (a single contrast)."""


@dataclass
class Design:
    """Everything about a model that does not depend on the gene."""

    formula: str
    parsed: ParsedFormula
    X: np.ndarray
    columns: list[str]
    term_columns: dict[str, list[int]]
    terms: tuple[RandomTerm, ...]
    model_spec: object = field(repr=False)
    data: pd.DataFrame = field(repr=False)

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_coef(self) -> int:
        return self.X.shape[1]

    def contrast(self, spec) -> Contrast:
        return make_contrast(self, spec)


def _variables(parsed: ParsedFormula) -> list[str]:
    names: list[str] = []
    try:
        names.extend(sorted(formulaic.Formula(parsed.fixed).required_variables))
    except Exception as err:
        raise DesignError(f"cannot parse the fixed part {parsed.fixed!r} of design {parsed.formula!r}: {err}") from err
    for r in parsed.random:
        names.extend(r.group)
        if r.lhs not in ("1", "0", "-1"):
            try:
                names.extend(sorted(formulaic.Formula("~ " + r.lhs).required_variables))
            except Exception as err:
                raise DesignError(f"cannot parse random term {r} of design {parsed.formula!r}: {err}") from err
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _prepare_data(data: pd.DataFrame, variables: Sequence[str], formula: str) -> pd.DataFrame:
    missing = [v for v in variables if v not in data.columns]
    if missing:
        raise DesignError(
            f"design {formula!r} uses {_fmt_list(missing)}, not found among the columns: {_fmt_list(data.columns)}."
        )
    out = pd.DataFrame(index=data.index)
    for v in variables:
        col = data[v]
        n_na = int(col.isna().sum())
        if n_na:
            raise DesignError(
                f"column {v!r} used in design {formula!r} has {n_na} missing value(s); fill them or drop those rows."
            )
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.cat.remove_unused_categories()
        elif col.dtype == object or pd.api.types.is_string_dtype(col) or pd.api.types.is_bool_dtype(col):
            col = pd.Categorical(col.astype(str))
            col = pd.Series(col, index=data.index)
        out[v] = col
    return out


def build_design(data: pd.DataFrame, formula: str, *, check_rank: bool = True) -> Design:
    """Parse ``formula`` and evaluate it on ``data`` (one row per observation: sample or cell).

    Raises
    ------
    DesignError
        Unknown column (lists the valid ones), a factor with a single level, bad syntax.
    EstimabilityError
        Rank-deficient fixed effects (names the aliased columns and what they are confounded with), or more
        coefficients than observations.
    """
    parsed = parse_formula(formula)
    variables = _variables(parsed)
    df = _prepare_data(data, variables, formula)
    fixed_vars = sorted(formulaic.Formula(parsed.fixed).required_variables)
    for v in fixed_vars:
        col = df[v]
        if isinstance(col.dtype, pd.CategoricalDtype) and len(col.cat.categories) < 2:
            raise DesignError(
                f"factor {v!r} in design {formula!r} has a single level ({_fmt_list(col.cat.categories)}) in these "
                f"{len(df)} observations; a factor needs at least two levels. Remove it from the design."
            )
    try:
        mm = formulaic.model_matrix(parsed.fixed, df, na_action="raise")
    except Exception as err:
        raise DesignError(f"cannot build the model matrix of {parsed.fixed!r}: {err}") from err
    X = np.asarray(mm, dtype=float)
    columns = [_rename(c) for c in mm.model_spec.column_names]
    term_columns = {str(t): list(range(sl.start, sl.stop)) for t, sl in mm.model_spec.term_slices.items()}
    terms = tuple(_random_term(df, r, formula) for r in parsed.random)
    comp = [c for t in terms for c in t.component_names()]
    dup = sorted({c for c in comp if comp.count(c) > 1})
    if dup:
        raise DesignError(f"design {formula!r} repeats the random component(s) {_fmt_list(dup)}; list each once.")
    design = Design(
        formula=formula,
        parsed=parsed,
        X=X,
        columns=columns,
        term_columns=term_columns,
        terms=terms,
        model_spec=mm.model_spec,
        data=df,
    )
    if check_rank:
        check_estimable(design)
    return design


def _rename(col: str) -> str:
    return "(Intercept)" if col == "Intercept" else col


def _random_term(df: pd.DataFrame, spec, formula: str) -> RandomTerm:
    keys = [df[g].astype(str) for g in spec.group]
    label = keys[0] if len(keys) == 1 else keys[0].str.cat(keys[1:], sep=":")
    cat = pd.Categorical(label)
    n_levels = len(cat.categories)
    if n_levels < 2:
        raise DesignError(
            f"random term {spec} in design {formula!r}: {spec.group_name!r} has a single level "
            f"({_fmt_list(cat.categories)}); its variance cannot be estimated. Drop the term."
        )
    if n_levels == 2:
        warnings.warn(
            f"random term {spec}: {spec.group_name!r} has only 2 levels; its variance is poorly determined "
            "(consider a fixed effect instead).",
            UserWarning,
            stacklevel=3,
        )
    if spec.lhs == "1":
        cov = np.ones((len(df), 1))
        names = ("(Intercept)",)
    else:
        try:
            mm = formulaic.model_matrix("~ " + spec.lhs, df)
        except Exception as err:
            raise DesignError(f"cannot evaluate random term {spec}: {err}") from err
        cov = np.asarray(mm, dtype=float)
        names = tuple(_rename(c) for c in mm.model_spec.column_names)
        if cov.shape[1] == 0:
            raise DesignError(f"random term {spec} has no columns; write (1|{spec.group_name}) for an intercept.")
    return RandomTerm(
        name=spec.group_name,
        codes=cat.codes.astype(np.int64),
        n_levels=n_levels,
        covariates=cov,
        col_names=names,
        correlated=spec.correlated,
        level_names=tuple(str(c) for c in cat.categories),
    )


def check_estimable(design: Design) -> None:
    """Raise :class:`EstimabilityError` if the fixed effects cannot all be estimated."""
    X, cols = design.X, design.columns
    n, p = X.shape
    if p > n:
        raise EstimabilityError(
            f"design {design.formula!r} has {p} coefficients but only {n} observations; simplify the design."
        )
    aliased = _aliased_columns(X)
    if not aliased:
        return
    lines = []
    for j, partners in aliased.items():
        term = _term_of(design, j)
        with_cols = ", ".join(repr(cols[k]) for k in partners) if partners else "a column of zeros"
        lines.append(f"{cols[j]!r} (term {term!r}) is a linear combination of {with_cols}")
    hint = _confounding_hint(design, aliased)
    raise EstimabilityError(
        f"design {design.formula!r} is rank-deficient (not estimable): " + "; ".join(lines) + "." + hint
    )


def _aliased_columns(X: np.ndarray, tol: float = 1e-8) -> dict[int, list[int]]:
    """Columns that are linear combinations of the columns before them, with the columns they depend on."""
    out: dict[int, list[int]] = {}
    kept: list[int] = []
    scale = np.linalg.norm(X, axis=0)
    scale[scale == 0] = 1.0
    Xs = X / scale
    for j in range(X.shape[1]):
        if not kept:
            if np.linalg.norm(Xs[:, j]) < tol:
                out[j] = []
            else:
                kept.append(j)
            continue
        A = Xs[:, kept]
        coef, *_ = np.linalg.lstsq(A, Xs[:, j], rcond=None)
        resid = Xs[:, j] - A @ coef
        if np.linalg.norm(resid) < 1e-7 * max(1.0, np.linalg.norm(Xs[:, j])):
            out[j] = [kept[i] for i in np.flatnonzero(np.abs(coef) > 1e-8)]
        else:
            kept.append(j)
    return out


def _term_of(design: Design, j: int) -> str:
    for t, idx in design.term_columns.items():
        if j in idx:
            return t
    return "?"


def _confounding_hint(design: Design, aliased: dict[int, list[int]]) -> str:
    terms = {_term_of(design, j) for j in aliased} | {_term_of(design, k) for ps in aliased.values() for k in ps}
    factors = sorted(t for t in terms if t in design.data.columns)
    hints = []
    for i, a in enumerate(factors):
        for b in factors[i + 1 :]:
            ct = pd.crosstab(design.data[a], design.data[b]) > 0
            a_within_b = bool((ct.sum(axis=0) == 1).all())  # each level of b has one level of a
            b_within_a = bool((ct.sum(axis=1) == 1).all())
            if a_within_b and b_within_a:
                hints.append(
                    f" {a!r} and {b!r} are confounded: each level of one occurs with exactly one level of the other, "
                    "so their effects cannot be separated; keep only one of them."
                )
            elif a_within_b or b_within_a:
                trait, grouping = (a, b) if a_within_b else (b, a)
                hints.append(
                    f" {trait!r} is constant within each level of {grouping!r} (a {grouping}-level variable), so the "
                    f"fixed factor {grouping!r} absorbs its effect. Model {grouping!r} as a random effect "
                    f"'(1|{grouping})' (cell-level GLMM) or drop it from the fixed effects."
                )
    return "".join(hints) if hints else " Remove or merge the aliased terms."


def contrast_label(spec) -> str:
    """Display name of a contrast specification, the same whether or not a design was built."""
    if isinstance(spec, str) and spec.count(":") == 2:
        spec = tuple(spec.split(":"))
    if isinstance(spec, list | tuple) and len(spec) == 3 and all(isinstance(s, str) for s in spec):
        return f"{spec[0]}_{spec[1]}_vs_{spec[2]}"
    if isinstance(spec, str):
        return spec
    return "custom"


def make_contrast(design: Design, spec) -> Contrast:
    """Turn a contrast specification into a vector ``L`` over the design's columns.

    ``spec`` is ``(factor, test_level, ref_level)``, a coefficient name (formulaic's ``condition[T.case]`` or R's
    ``conditioncase``), or a numeric vector of length p. For designs with interactions, a factor contrast is evaluated
    with the other variables at their reference level (categorical) or 0 (numeric), as R's coefficients are.
    """
    cols = design.columns
    p = len(cols)
    if isinstance(spec, str):
        if ":" in spec and spec.count(":") == 2 and spec not in cols:
            spec = tuple(spec.split(":"))
        else:
            j = _find_column(cols, spec)
            L = np.zeros(p)
            L[j] = 1.0
            return Contrast(name=cols[j], L=L)
    if isinstance(spec, list | tuple) and len(spec) == 3 and all(isinstance(s, str) for s in spec):
        return _factor_contrast(design, *spec)
    arr = np.asarray(spec, dtype=float)
    if arr.ndim != 1 or arr.shape[0] != p:
        raise DesignError(
            f"numeric contrast has shape {arr.shape}, but the design has {p} coefficients: {_fmt_list(cols)}."
        )
    _check_contrast_estimable(design, arr)
    return Contrast(name="custom", L=arr)


def _find_column(cols: list[str], name: str) -> int:
    if name in cols:
        return cols.index(name)
    simple = {c.replace("[T.", "").replace("]", ""): i for i, c in enumerate(cols)}
    if name in simple:
        return simple[name]
    raise DesignError(f"coefficient {name!r} is not in the design; the coefficients are: {_fmt_list(cols)}.")


def _factor_contrast(design: Design, factor: str, test: str, ref: str) -> Contrast:
    df = design.data
    fixed_vars = sorted(formulaic.Formula(design.parsed.fixed).required_variables)
    if factor not in df.columns or factor not in fixed_vars:
        raise DesignError(
            f"contrast factor {factor!r} is not a fixed effect of design {design.formula!r}; fixed variables: "
            f"{_fmt_list(fixed_vars)}."
        )
    col = df[factor]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        raise DesignError(
            f"contrast ({factor!r}, {test!r}, {ref!r}) needs a categorical {factor!r}, but it is numeric; "
            f"use the coefficient name {factor!r} instead."
        )
    levels = [str(c) for c in col.cat.categories]
    for lev in (test, ref):
        if lev not in levels:
            raise DesignError(f"level {lev!r} of {factor!r} is not in the data; its levels are: {_fmt_list(levels)}.")
    if test == ref:
        raise DesignError(f"contrast compares level {test!r} of {factor!r} with itself; give two different levels.")
    base = {}
    for v in fixed_vars:
        c = df[v]
        base[v] = c.cat.categories[0] if isinstance(c.dtype, pd.CategoricalDtype) else 0.0
    rows = []
    for lev in (test, ref):
        row = dict(base)
        row[factor] = lev
        rows.append(row)
    new = pd.DataFrame(rows)
    for v in fixed_vars:
        c = df[v]
        if isinstance(c.dtype, pd.CategoricalDtype):
            new[v] = pd.Categorical(new[v].astype(str), categories=[str(x) for x in c.cat.categories])
    mm = np.asarray(design.model_spec.get_model_matrix(new), dtype=float)
    L = mm[0] - mm[1]
    _check_contrast_estimable(design, L)
    return Contrast(name=contrast_label((factor, test, ref)), L=L)


def _check_contrast_estimable(design: Design, L: np.ndarray) -> None:
    if not np.any(L):
        raise EstimabilityError(f"the contrast is zero for every coefficient of {design.formula!r}; nothing to test.")
    X = design.X
    # L is estimable iff it lies in the row space of X
    coef, *_ = np.linalg.lstsq(X.T, L, rcond=None)
    resid = L - X.T @ coef
    if np.linalg.norm(resid) > 1e-6 * max(1.0, np.linalg.norm(L)):
        raise EstimabilityError(
            f"the contrast is not estimable from design {design.formula!r} on these data (it is not a combination of "
            "the rows of the model matrix); check that both levels occur and are not confounded with other terms."
        )
