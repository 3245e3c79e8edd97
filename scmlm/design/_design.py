"""Build the fixed-effect matrix, random-effect terms and contrasts from a formula and a sample/cell table."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import formulaic
import numpy as np
import pandas as pd

from .._errors import DesignError, EstimabilityError, _fmt_list
from ..models import RandomTerm
from ._formula import ParsedFormula, parse_formula


@dataclass(frozen=True)
class Contrast:
    """A linear combination ``L'β`` of the fixed effects (or several, tested jointly), with a display name."""

    name: str
    L: np.ndarray
    """Length-p vector (a single contrast), or a q × p matrix of rows tested jointly (an F test)."""

    @property
    def is_f(self) -> bool:
        """Whether this is a joint test of several rows."""
        return self.L.ndim == 2


@dataclass(frozen=True)
class ContrastSpec:
    """One named entry of a ``contrast=`` argument, before a design is built."""

    name: str
    spec: object
    """A single contrast specification, or (``joint``) the rows of a joint test."""
    joint: bool = False


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

    def contrasts(self, spec) -> list[Contrast]:
        return make_contrasts(self, spec)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _clean(err: Exception) -> str:
    """The formulaic message on one line, without terminal colour codes."""
    return " ".join(_ANSI.sub("", str(err)).split())


def _backtick_hint(formula: str, columns) -> str:
    """Name columns with spaces or operator characters that the formula uses unquoted, and how to quote them."""
    odd = [str(c) for c in columns if not _PLAIN_NAME.match(str(c)) and str(c) in formula and f"`{c}`" not in formula]
    if not odd:
        return ""
    example = formula.replace(odd[0], f"`{odd[0]}`")
    return (
        f" Column name(s) {_fmt_list(odd)} contain spaces or characters that formulas read as operators (- ( ) : + * "
        f"/ ^); quote them in backticks: {example!r}."
    )


_FORMULA_FUNCTIONS = frozenset(formulaic.transforms.TRANSFORMS) | {"C", "I", "Q"}


def _check_function_names(columns, formula: str) -> None:
    """A column named like a formula function (``C``, ``I``, ``log``) used as a variable confuses formulaic."""
    used = set(re.findall(r"(?<![`\w.])([A-Za-z_][A-Za-z0-9_]*)(?![\w.`]|\s*\()", formula))
    clash = [str(c) for c in columns if str(c) in _FORMULA_FUNCTIONS and str(c) in used]
    if clash:
        v = clash[0]
        raise DesignError(
            f"column {v!r} used in design {formula!r} has the name of the formula function {v}(); rename the column, "
            f"e.g. adata.obs = adata.obs.rename(columns={{{v!r}: {v + '_'!r}}}), and write {v + '_'!r} in the design."
        )


def _variables(parsed: ParsedFormula, columns=()) -> list[str]:
    names: list[str] = []
    try:
        names.extend(sorted(formulaic.Formula(parsed.fixed).required_variables))
    except Exception as err:
        raise DesignError(
            f"cannot parse the fixed part {parsed.fixed!r} of design {parsed.formula!r}: {_clean(err)}"
            + _backtick_hint(parsed.formula, columns)
        ) from err
    for r in parsed.random:
        names.extend(r.group)
        if r.lhs not in ("1", "0", "-1"):
            try:
                names.extend(sorted(formulaic.Formula("~ " + r.lhs).required_variables))
            except Exception as err:
                raise DesignError(
                    f"cannot parse random term {r} of design {parsed.formula!r}: {_clean(err)}"
                    + _backtick_hint(parsed.formula, columns)
                ) from err
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


_ID_NAMES = ("donor", "sample", "batch", "patient", "subject", "individual", "id")
"""Column names (or name parts, split at ``_``, ``.`` and ``-``) that mark an identifier rather than a quantity."""

_ID_MIN_LEVELS = 10
"""An integer column whose values are the consecutive codes 0..k-1 or 1..k with at least this many levels looks like
an identifier."""


def _grouping_variables(parsed: ParsedFormula, factors: Sequence[str | None]) -> list[str]:
    """Columns used as groups: the random terms' grouping factors and the caller's keys (sample, groups, cluster)."""
    out = [g for r in parsed.random for g in r.group] + [f for f in factors if f]
    return list(dict.fromkeys(out))


def _as_factor(col: pd.Series) -> pd.Series:
    """A numeric or boolean column as a categorical of its values written as text, in numeric order."""
    values = pd.unique(col.to_numpy())
    try:
        values = sorted(values)
    except TypeError:
        pass
    cats = list(dict.fromkeys(str(v) for v in values))
    return pd.Series(pd.Categorical(col.astype(str), categories=cats), index=col.index)


def _looks_like_id(name: str, col: pd.Series) -> str | None:
    """Why an integer column entering a design as a number looks like an identifier (``None`` if it does not)."""
    if not (pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)):
        return None
    parts = [p for p in re.split(r"[_.\-\s]+", str(name)) if p]
    if any(p.lower() == "id" or p.endswith(("Id", "ID")) or p.lower().startswith(_ID_NAMES[:-1]) for p in parts):
        return "it is named like an identifier"
    levels = np.unique(col.to_numpy())
    k = levels.size
    if k >= _ID_MIN_LEVELS and levels[0] in (0, 1) and levels[-1] - levels[0] == k - 1:
        return f"its values are the consecutive codes {levels[0]}..{levels[-1]}"
    return None


def _numeric_in_fixed(var: str, column_names: Sequence[str]) -> bool:
    """Whether ``var`` enters the fixed part as a number (a column or interaction part named exactly ``var``)."""
    return any(var in c.split(":") for c in column_names)


def _warn_numeric_ids(df: pd.DataFrame, fixed_vars: Sequence[str], column_names: Sequence[str], formula: str) -> None:
    for v in fixed_vars:
        why = _looks_like_id(v, df[v])
        if why is None or not _numeric_in_fixed(v, column_names):
            continue
        warnings.warn(
            f"column {v!r} holds integers and enters design {formula!r} as one numeric slope, but {why}; if its "
            f"values are labels (donors, samples, batches), write C({v}) in the design or make it categorical: "
            f"adata.obs[{v!r}] = adata.obs[{v!r}].astype('category').",
            UserWarning,
            stacklevel=4,
        )


def _prepare_data(
    data: pd.DataFrame, variables: Sequence[str], formula: str, grouping: Sequence[str] = ()
) -> pd.DataFrame:
    missing = [v for v in variables if v not in data.columns]
    if missing:
        raise DesignError(
            f"design {formula!r} uses {_fmt_list(missing)}, not found among the columns: {_fmt_list(data.columns)}."
            + _backtick_hint(formula, data.columns)
        )
    _check_function_names(data.columns, formula)
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
            if not all(isinstance(c, str) for c in col.cat.categories):  # levels are text, as for other factors
                col = col.cat.rename_categories([str(c) for c in col.cat.categories])
        elif v in grouping:
            col = _as_factor(col)  # a grouping column is a factor, whatever its dtype
        elif col.dtype == object or pd.api.types.is_string_dtype(col) or pd.api.types.is_bool_dtype(col):
            col = pd.Categorical(col.astype(str))
            col = pd.Series(col, index=data.index)
        out[v] = col
    return out


def build_design(
    data: pd.DataFrame,
    formula: str,
    *,
    check_rank: bool = True,
    factors: Sequence[str | None] = (),
    warn: bool = True,
) -> Design:
    """Parse ``formula`` and evaluate it on ``data`` (one row per observation: sample or cell).

    Grouping columns are factors: a column that is a random term's grouping factor (``donor`` in ``(1|donor)``) or one
    of ``factors`` (the caller's sample, group or cluster keys) enters the fixed part, where it appears, as a factor
    with one coefficient per level, even when it holds integers (``~ donor + condition`` is then the paired design).
    Any other integer column enters as a number (one slope); when it looks like an identifier (named like one:
    donor, sample, batch, patient, subject, individual, ...id; or holding the consecutive codes 0..k-1 / 1..k with
    many levels) a :class:`UserWarning` says so and how to make it a factor (``C(donor)`` in the formula, or
    ``adata.obs['donor'] = adata.obs['donor'].astype('category')``).

    Parameters
    ----------
    data
        One row per observation with the design's columns.
    formula
        The model formula, e.g. ``"~ condition + (1|donor)"``.
    check_rank
        Raise :class:`EstimabilityError` for rank-deficient fixed effects.
    factors
        Further grouping columns (``None`` entries are ignored) treated as factors wherever the design uses them.
    warn
        Warn about integer identifier columns entering as numbers (``False`` for repeated builds of one design).

    Raises
    ------
    DesignError
        Unknown column (lists the valid ones), a factor with a single level, bad syntax.
    EstimabilityError
        Rank-deficient fixed effects (names the aliased columns and what they are confounded with), or more
        coefficients than observations.
    """
    parsed = parse_formula(formula)
    variables = _variables(parsed, data.columns)
    df = _prepare_data(data, variables, formula, _grouping_variables(parsed, factors))
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
        raise DesignError(
            f"cannot build the model matrix of {parsed.fixed!r}: {_clean(err)}" + _backtick_hint(formula, data.columns)
        ) from err
    X = np.asarray(mm, dtype=float)
    columns = [_rename(c) for c in mm.model_spec.column_names]
    if warn:
        _warn_numeric_ids(df, fixed_vars, mm.model_spec.column_names, formula)
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


def split_contrast(text: str) -> tuple[str, str, str] | None:
    r"""``"factor:test:reference"`` as a triple (``None`` for other text); ``\:`` is a colon inside a name or level.

    Examples
    --------
    >>> split_contrast("condition:case:ctrl")
    ('condition', 'case', 'ctrl')
    >>> split_contrast(r"time:8\:00:0\:00")
    ('time', '8:00', '0:00')
    """
    parts = re.split(r"(?<!\\):", text)
    if len(parts) != 3:
        return None
    return tuple(p.replace("\\:", ":") for p in parts)  # type: ignore[return-value]


def contrast_label(spec) -> str:
    """Display name of a contrast specification, the same whether or not a design was built."""
    if isinstance(spec, str) and split_contrast(spec) is not None:
        spec = split_contrast(spec)
    if _is_factor_triple(spec):
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
        if split_contrast(spec) is not None and spec not in cols:
            spec = split_contrast(spec)
        else:
            j = _find_column(cols, spec, design)
            L = np.zeros(p)
            L[j] = 1.0
            return Contrast(name=cols[j], L=L)
    if _is_factor_triple(spec):
        return _factor_contrast(design, *(str(v) for v in spec))
    arr = np.asarray(spec, dtype=float)
    if arr.ndim != 1 or arr.shape[0] != p:
        raise DesignError(
            f"numeric contrast has shape {arr.shape}, but the design has {p} coefficients: {_fmt_list(cols)}."
        )
    _check_contrast_estimable(design, arr)
    return Contrast(name="custom", L=arr)


def _find_column(cols: list[str], name: str, design: Design | None = None) -> int:
    if name in cols:
        return cols.index(name)
    simple = {c.replace("[T.", "").replace("]", ""): i for i, c in enumerate(cols)}
    if name in simple:
        return simple[name]
    raise DesignError(
        f"coefficient {name!r} is not in the design; the coefficients are: {_fmt_list(cols)}."
        + _level_hint(design, name)
    )


def _level_hint(design: Design | None, name: str) -> str:
    """A factor named without its two levels (``'condition'``, ``'condition:case'``): say how to write the contrast."""
    if design is None:
        return ""
    factor, _, test = name.partition(":")
    col = design.data[factor] if factor in design.data.columns else None
    if col is None or not isinstance(col.dtype, pd.CategoricalDtype) or len(col.cat.categories) < 2:
        return ""
    levels = [str(c) for c in col.cat.categories]
    test = test if test in levels else levels[-1]
    ref = next(lev for lev in levels if lev != test)
    return (
        f" {factor!r} is a factor: a contrast names it with the level tested and the reference level, e.g. "
        f"({factor!r}, {test!r}, {ref!r}) or '{factor}:{test}:{ref}'."
    )


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
        if _numeric_in_fixed(factor, design.model_spec.column_names):
            raise DesignError(
                f"contrast ({factor!r}, {test!r}, {ref!r}) compares levels, but {factor!r} is numeric and enters "
                f"design {design.formula!r} as one slope; write C({factor}) in the design (or make the column "
                f"categorical: adata.obs[{factor!r}] = adata.obs[{factor!r}].astype('category')) to compare levels, "
                f"or test the slope by its coefficient name {factor!r}."
            )
        return _wrapped_factor_contrast(design, fixed_vars, factor, test, ref)
    levels = [str(c) for c in col.cat.categories]
    for lev in (test, ref):
        if lev not in levels:
            raise DesignError(f"level {lev!r} of {factor!r} is not in the data; its levels are: {_fmt_list(levels)}.")
    if test == ref:
        raise DesignError(f"contrast compares level {test!r} of {factor!r} with itself; give two different levels.")
    base = {v: _base_value(design, v) for v in fixed_vars}
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


def _base_value(design: Design, v: str):
    """Where a contrast holds the other variables: a factor's reference level, a number at 0 (as R's coefficients).

    A numeric column that the design makes a factor (``C(dose)``) is held at its smallest value, the reference level.
    """
    c = design.data[v]
    if isinstance(c.dtype, pd.CategoricalDtype):
        return c.cat.categories[0]
    if any(part.startswith(f"C({v})") for col in design.model_spec.column_names for part in col.split(":")):
        return np.sort(pd.unique(c.to_numpy()))[0]
    return 0.0


def _wrapped_factor_contrast(design: Design, fixed_vars, factor: str, test: str, ref: str) -> Contrast:
    """A level contrast of a numeric column that the design turns into a factor, e.g. ``C(dose)``."""
    df = design.data
    values = {str(v): v for v in pd.unique(df[factor].to_numpy())}
    for lev in (test, ref):
        if lev not in values:
            raise DesignError(f"level {lev!r} of {factor!r} is not in the data; its levels are: {_fmt_list(values)}.")
    if test == ref:
        raise DesignError(f"contrast compares level {test!r} of {factor!r} with itself; give two different levels.")
    base = {v: _base_value(design, v) for v in fixed_vars}
    new = pd.DataFrame([{**base, factor: values[test]}, {**base, factor: values[ref]}])
    for v in fixed_vars:
        c = df[v]
        if isinstance(c.dtype, pd.CategoricalDtype):
            new[v] = pd.Categorical(new[v].astype(str), categories=[str(x) for x in c.cat.categories])
        else:
            new[v] = new[v].astype(c.dtype)
    L = np.asarray(design.model_spec.get_model_matrix(new), dtype=float)
    L = L[0] - L[1]
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


# ---------------------------------------------------------------------------------------------------------------------
# several contrasts in one call

_CONTRAST_FORMS = (
    "a contrast is (factor, test_level, reference_level) (levels as text, or the column's int/bool values), "
    "'factor:test:reference' (write \\: for a colon inside a level), a coefficient name or a numeric "
    "vector over the design's columns; several go in a list (of tuples or names) or a dict {name: contrast}; a dict "
    "value that is a list of contrasts (e.g. coefficient names) or a 2-D array of rows is one joint F test"
)


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _is_factor_triple(x) -> bool:
    """``(factor, test, reference)``: a column name and two levels, given as text or as the column's int/bool values."""
    return (
        isinstance(x, list | tuple)
        and len(x) == 3
        and isinstance(x[0], str)
        and all(isinstance(s, str | int | bool | np.integer | np.bool_) for s in x[1:])
    )


def _is_numeric_vector(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.size > 0 and np.issubdtype(x.dtype, np.number)
    return isinstance(x, list | tuple) and len(x) > 0 and all(_is_number(v) for v in x)


def _is_single(x) -> bool:
    """A specification of one contrast (not a collection of them)."""
    return isinstance(x, str) or _is_factor_triple(x) or _is_numeric_vector(x)


def _joint_rows(x) -> bool:
    """A dict value listing the rows of a joint test: a 2-D array, or a list of single contrasts."""
    if isinstance(x, np.ndarray):
        return x.ndim == 2 and x.shape[0] > 0 and np.issubdtype(x.dtype, np.number)
    return isinstance(x, list | tuple) and len(x) > 0 and all(_is_single(v) for v in x) and not _is_numeric_vector(x)


def _spec_text(spec) -> str:
    if isinstance(spec, np.ndarray):
        return np.array2string(spec, separator=", ")
    return repr(spec)


def parse_contrasts(spec) -> list[ContrastSpec]:
    """Normalise a ``contrast=`` argument into named entries, without a design.

    A single contrast (tuple ``(factor, test, ref)``, ``"factor:test:ref"``, a coefficient name or a numeric
    vector) gives one entry, named as today (``factor_test_vs_ref``, the name, or ``"custom"``). A list of tuples or
    names gives one entry per item. A dict ``{name: contrast}`` names each entry; a dict value that is a list of
    contrasts (coefficient names, tuples, numeric vectors) or a 2-D array of rows is a joint test (``joint=True``,
    an F test) of all its rows, except a 3-item list of strings, which stays ambiguous until the design is known
    (:func:`make_contrasts` reads it as a factor contrast when its first item is a categorical fixed effect).

    Raises
    ------
    DesignError
        An empty list or dict, a list of numeric vectors (they have no names: give a dict), an item of an unknown
        form (named), a name that is not a non-empty string, or two entries with the same name.
    """
    if isinstance(spec, dict):
        if not spec:
            raise DesignError(f"contrast= is an empty dict; {_CONTRAST_FORMS}.")
        out = []
        for name, value in spec.items():
            if not isinstance(name, str) or not name.strip():
                raise DesignError(f"contrast name {name!r} must be a non-empty string ({_spec_text(value)}).")
            if isinstance(value, list) and _is_factor_triple(value):
                # (factor, test, ref) or three coefficient names: decided by make_contrasts on the design
                out.append(ContrastSpec(name, list(value), joint=True))
            elif _is_single(value):
                out.append(ContrastSpec(name, _as_tuple(value), joint=False))
            elif _joint_rows(value):
                rows = (
                    np.asarray(value, dtype=float) if isinstance(value, np.ndarray) else [_as_tuple(v) for v in value]
                )
                out.append(ContrastSpec(name, rows, joint=True))
            else:
                raise DesignError(f"contrast {name!r}: value {_spec_text(value)} is not a contrast; {_CONTRAST_FORMS}.")
        return _check_unique(out)
    if isinstance(spec, np.ndarray) and spec.ndim == 2:
        raise DesignError(
            f"contrast= is a 2-D array of {spec.shape[0]} unnamed rows; give a dict: {{'name': row, ...}} for separate "
            "contrasts, or {'name': array} for one joint F test of all rows."
        )
    if _is_single(spec):
        spec = _as_tuple(spec)
        return [ContrastSpec(contrast_label(spec), spec)]
    if isinstance(spec, list | tuple):
        if not spec:
            raise DesignError(f"contrast= is an empty list; {_CONTRAST_FORMS}.")
        out = []
        for i, item in enumerate(spec):
            if _is_numeric_vector(item):
                raise DesignError(
                    f"contrast item {i} ({_spec_text(item)}) is a numeric vector without a name; several numeric "
                    "contrasts go in a dict: contrast={'dose_trend': [0, 1, 2], ...}."
                )
            if not (isinstance(item, str) or _is_factor_triple(item)):
                raise DesignError(f"contrast item {i} ({_spec_text(item)}) is not a contrast; {_CONTRAST_FORMS}.")
            item = _as_tuple(item)
            out.append(ContrastSpec(contrast_label(item), item))
        return _check_unique(out)
    raise DesignError(f"contrast={_spec_text(spec)} is not a contrast; {_CONTRAST_FORMS}.")


def _as_tuple(spec):
    if isinstance(spec, str) and split_contrast(spec) is not None:
        return split_contrast(spec)
    if _is_factor_triple(spec):
        return tuple(str(v) for v in spec)
    return spec


def _check_unique(specs: list[ContrastSpec]) -> list[ContrastSpec]:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DesignError(
            f"contrast names must be unique; {_fmt_list(dup)} occur more than once. Drop the repeated contrast or "
            "name each one in a dict {name: contrast}."
        )
    return specs


def contrast_names(spec) -> list[str]:
    """Names of the contrasts of a ``contrast=`` argument (the values of the results' ``contrast`` column)."""
    return [s.name for s in parse_contrasts(spec)]


def is_multi(spec) -> bool:
    """Whether ``contrast=`` asks for more than one test or for a named/joint one (anything but a single contrast)."""
    return not _is_single(spec)


def contrast_param(spec):
    """A storable form of a ``contrast=`` argument for ``params`` (strings, lists of strings, dicts of them)."""

    def one(s):
        if isinstance(s, str):
            return s
        if _is_factor_triple(s):
            return [str(v) for v in s]
        return [str(v) for v in np.atleast_1d(np.asarray(s, dtype=object))]

    if _is_single(spec):
        return one(spec)
    if isinstance(spec, dict):
        out = {}
        for s in parse_contrasts(spec):
            if s.joint:
                rows = s.spec if not isinstance(s.spec, np.ndarray) else list(s.spec)
                out[s.name] = [
                    r if isinstance(r, str) else _join_triple(r) if _is_factor_triple(r) else ",".join(one(r))
                    for r in rows
                ]
            else:
                out[s.name] = _join_triple(s.spec) if _is_factor_triple(s.spec) else one(s.spec)
        return out
    return [_join_triple(s.spec) if _is_factor_triple(s.spec) else one(s.spec) for s in parse_contrasts(spec)]


def _join_triple(t) -> str:
    """``factor:test:reference`` with colons inside names escaped, as :func:`split_contrast` reads it back."""
    return ":".join(str(v).replace(":", "\\:") for v in t)


def make_contrasts(design: Design, spec) -> list[Contrast]:
    """Every contrast of a ``contrast=`` argument on ``design`` (see :func:`parse_contrasts`).

    A joint entry becomes a :class:`Contrast` whose ``L`` is the q × p matrix of its rows (an F test); its rows must
    be linearly independent.
    """
    out = []
    for s in parse_contrasts(spec):
        try:
            if not s.joint:
                c = make_contrast(design, s.spec)
                out.append(Contrast(name=s.name, L=c.L))
                continue
            if not isinstance(s.spec, np.ndarray) and len(s.spec) == 3 and _factor_of(design, s.spec):
                out.append(Contrast(name=s.name, L=make_contrast(design, tuple(s.spec)).L))
                continue
            if isinstance(s.spec, np.ndarray):
                rows = [make_contrast(design, r).L for r in s.spec]
            else:
                rows = [make_contrast(design, r).L for r in s.spec]
            L = np.vstack(rows)
            if np.linalg.matrix_rank(L) < L.shape[0]:
                raise DesignError(
                    f"its {L.shape[0]} rows are linearly dependent (rank {np.linalg.matrix_rank(L)}); drop the "
                    "redundant rows."
                )
            out.append(Contrast(name=s.name, L=L if L.shape[0] > 1 else L[0]))
        except DesignError as err:
            if len(out) == 0 and not is_multi(spec):
                raise
            raise type(err)(f"contrast {s.name!r}: {err}") from err
    return out


def _factor_of(design: Design, triple) -> bool:
    """A 3-item list of strings read as (factor, test, ref): its first item is a categorical fixed effect."""
    fixed_vars = sorted(formulaic.Formula(design.parsed.fixed).required_variables)
    f = triple[0]
    return f in fixed_vars and f in design.data.columns and isinstance(design.data[f].dtype, pd.CategoricalDtype)
