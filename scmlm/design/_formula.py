"""Model formulas: lme4-style random terms parsed here, the fixed part handed to formulaic.

Supported random terms: ``(1|g)`` random intercept; crossed terms by adding several; ``(1|a/b)`` nested, expanded to
``(1|a) + (1|a:b)``; ``(1 + x|g)`` correlated intercept and slope; ``(0 + x|g)`` slope only; ``(1 + x||g)``
uncorrelated intercept and slope (lme4's double bar), the same as ``(1|g) + (0 + x|g)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._errors import DesignError


@dataclass(frozen=True)
class RandomSpec:
    """One random term as written: ``(lhs | group)``, after expanding nesting and ``||``."""

    lhs: str
    """Covariate part, e.g. ``"1"``, ``"1 + x"``, ``"0 + x"``."""
    group: tuple[str, ...]
    """Grouping factors whose interaction defines the levels, e.g. ``("donor",)`` or ``("a", "b")`` for ``a:b``."""
    correlated: bool = True

    @property
    def group_name(self) -> str:
        return ":".join(self.group)

    def __str__(self) -> str:
        bar = "|" if self.correlated else "||"
        return f"({self.lhs} {bar} {self.group_name})"


@dataclass(frozen=True)
class ParsedFormula:
    formula: str
    fixed: str
    """Right-hand side of the fixed part for formulaic, always starting with ``~``."""
    random: tuple[RandomSpec, ...]

    @property
    def has_random(self) -> bool:
        return bool(self.random)


_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


def _split_top_level(s: str, sep: str = "+") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise DesignError(f"unbalanced parentheses in formula part {s!r}.")
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DesignError(f"unbalanced parentheses in formula part {s!r}.")
    parts.append("".join(cur).strip())
    return parts


def parse_formula(formula: str) -> ParsedFormula:
    """Split ``formula`` into its fixed part and random terms.

    Examples
    --------
    >>> p = parse_formula("~ condition + (1|donor) + (1|batch)")
    >>> p.fixed, [str(r) for r in p.random]
    ('~ condition', ['(1 | donor)', '(1 | batch)'])
    """
    if not isinstance(formula, str) or not formula.strip():
        raise DesignError(f"the design must be a formula string such as '~ condition + (1|donor)', got {formula!r}.")
    text = formula.strip()
    if "~" not in text:
        raise DesignError(f"design {formula!r} has no '~'; write it like '~ condition + (1|donor)'.")
    lhs, rhs = text.split("~", 1)
    if lhs.strip():
        raise DesignError(
            f"design {formula!r} has a response ({lhs.strip()!r}) before '~'; the response is each gene, so write the "
            "right-hand side only, e.g. '~ condition'."
        )
    if "offset(" in rhs.replace(" ", ""):
        raise DesignError(
            "offsets are not given in the formula; use the offset= argument (default: log of each cell's total counts)."
        )
    fixed_parts: list[str] = []
    random: list[RandomSpec] = []
    for part in _split_top_level(rhs):
        if not part:
            raise DesignError(f"design {formula!r} has an empty term (check for a stray '+').")
        inner = part
        if part.startswith("(") and part.endswith(")") and "|" in part:
            inner = part[1:-1].strip()
            random.extend(_parse_random(inner, formula))
        elif "|" in part:
            raise DesignError(f"random term {part!r} in {formula!r} must be in parentheses, e.g. '(1|donor)'.")
        else:
            fixed_parts.append(part)
    fixed = "~ " + (" + ".join(fixed_parts) if fixed_parts else "1")
    return ParsedFormula(formula=formula, fixed=fixed, random=tuple(random))


def _parse_random(inner: str, formula: str) -> list[RandomSpec]:
    correlated = True
    if "||" in inner:
        lhs, grp = inner.split("||", 1)
        correlated = False
    else:
        lhs, grp = inner.split("|", 1)
    lhs, grp = lhs.strip(), grp.strip()
    if not lhs:
        raise DesignError(f"random term ({inner}) in {formula!r} has nothing before '|'; write (1|{grp}).")
    if not grp or "|" in grp:
        raise DesignError(f"random term ({inner}) in {formula!r} needs one grouping factor after '|'.")
    # grouping: a/b (nested) or a:b (interaction)
    if "/" in grp:
        factors = [g.strip() for g in grp.split("/")]
        groups = [tuple(factors[: i + 1]) for i in range(len(factors))]
    else:
        groups = [tuple(g.strip() for g in grp.split(":"))]
    for g in groups:
        for name in g:
            if not _NAME.match(name):
                raise DesignError(
                    f"grouping factor {name!r} in ({inner}) must be a plain obs column name (letters, digits, _ .)."
                )
    lhs_terms = [t.strip() for t in lhs.split("+")]
    if correlated:
        return [RandomSpec(lhs=_norm_lhs(lhs_terms), group=g, correlated=True) for g in groups]
    # uncorrelated: one term per covariate
    has_int = "0" not in lhs_terms and "-1" not in lhs_terms
    covs = [t for t in lhs_terms if t not in ("0", "1", "-1")]
    out = []
    for g in groups:
        if has_int:
            out.append(RandomSpec(lhs="1", group=g, correlated=True))
        out.extend(RandomSpec(lhs=f"0 + {c}", group=g, correlated=True) for c in covs)
    return out


def _norm_lhs(terms: list[str]) -> str:
    return " + ".join(terms)
