"""The model a cell-level tool fits: the design as written plus the terms its contrasts' unit of replication needs.

``glmm_de`` fits, for every group of cells, the formula the user wrote or (``replication="auto"``) that formula with
the sample-level terms and random slopes its contrasts need (:func:`~scmlm.design.replication`), and with every random
intercept of fewer than :data:`MIN_RANDOM_LEVELS` levels that holds whole units of replication (donors nested in
three batches) fitted as a fixed effect. :func:`fitted_design` makes that decision once, as a
:class:`FittedDesign`; the variance partition of the same analysis, ``random_effects``, the report and the command
line read it from there, and :func:`fitted_params` / :func:`stored_formula` are the plain values ``uns`` stores and
how they are read back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._errors import InputError, ScmlmError, _fmt_list
from ._design import Contrast, Design, build_design
from ._formula import _split_top_level, parse_formula
from ._replication import Replication, _cross, _nested_in, _pattern, _same_partition
from ._replication import replication as find_replication

REPLICATION_RULES: tuple[str, ...] = ("auto", "as_written")
"""``replication=`` choices: add the sample-level terms the contrasts need, or fit the design as written."""

MIN_RANDOM_LEVELS = 5
"""A random intercept with fewer levels than this that holds whole units of replication is fitted as a fixed effect
under ``replication="auto"``. Its variance rests on ``levels - 1 <= 3`` df: the REML estimate is often zero or large by
chance, a contrast between the units it holds is tested against a variance that is mostly noise, and where the
batches are unbalanced for the contrast the moderated test falls back to per-gene tests. Measured on NB nulls of
``(1|donor) + (1|batch)``, donors in 3 batches: 12 donors, 4.3-4.6 % of p < 0.05 with batch fixed, 5.1-5.4 % random;
8 donors, 5.8 % and 7.0 %; unbalanced batches with 10 % DE genes, 69 true positives at an observed FDP of 0.05 with
batch fixed against 54 random (two seeds; docs/replication.md). Five levels is the usual floor below which a random
effect is advised against (lme4's FAQ, Bolker et al. 2009); as a fixed effect it costs ``levels - 1`` df of the
between-unit test, which with so few levels is the cheaper error."""


@dataclass(frozen=True)
class FittedDesign:
    """The model fitted for one set of observations (all cells, or one group), and why it differs from the written one.

    ``design`` and ``contrasts`` are the built design matrix and the contrasts on it (for fitting); the other fields
    are plain values, the ones ``params`` stores.
    """

    written: str
    """The formula as the user wrote it."""
    formula: str
    """The formula as fitted: ``written`` plus ``added_terms``."""
    added_terms: tuple[str, ...]
    """Terms added for the unit of replication (``replication="auto"``), e.g. ``("(1|donor:condition)",)``."""
    replication: tuple[Replication, ...]
    """Per contrast: where it is replicated in the model as written (its unit, e.g. ``"donor"``, and unit count)."""
    sample_key: str | None
    """The obs column naming the samples, or ``None``: samples are the random factors crossed with the contrast."""
    rule: str = "auto"
    """The ``replication=`` rule that chose ``formula`` (``"auto"`` or ``"as_written"``)."""
    design: Design | None = field(default=None, compare=False, repr=False)
    contrasts: tuple[Contrast, ...] = field(default=(), compare=False, repr=False)
    few_levels: tuple[str, ...] = ()
    """Random intercepts of fewer than :data:`MIN_RANDOM_LEVELS` levels holding whole units (e.g. ``("(1|batch)",)``);
    fitted as fixed effects under ``rule="auto"`` (:attr:`as_fixed`), kept random (with a warning) as written."""

    @property
    def as_fixed(self) -> tuple[str, ...]:
        """The random terms of ``written`` fitted as fixed effects, e.g. ``("(1|batch)",)``."""
        return self.few_levels if self.rule == "auto" else ()

    @property
    def units(self) -> tuple[str, ...]:
        """The replication unit of each contrast (``"donor"``, ``"donor:condition"``, ``"cell"``)."""
        return tuple(r.unit for r in self.replication)


def fitted_design(
    obs: pd.DataFrame,
    design: str,
    contrast,
    *,
    sample_key: str | None = None,
    replication: str = "auto",
    built: Design | None = None,
) -> FittedDesign:
    """The design to fit on ``obs``: as written, or with every sample-level term any contrast needs.

    Several contrasts share one model: it holds the union of the terms their replication asks for, and each contrast
    keeps its own replication (and so its own df and moderation) in that model. A joint test is replicated at the
    finest level among its rows, and each row adds its own term (a term for the union of the rows' columns could be
    a redundant finer one, e.g. ``donor:condition:sex`` for a donor-level ``sex`` next to a paired ``condition``).

    Parameters
    ----------
    obs
        One row per observation (cell) with the design's columns.
    design
        The formula as written, e.g. ``"~ condition + (1|donor)"``.
    contrast
        A ``contrast=`` argument (see :func:`~scmlm.design.parse_contrasts`).
    sample_key
        obs column naming each sample; ``None``: samples are the random factors crossed with the contrast.
    replication
        ``"auto"``: add the terms; ``"as_written"``: keep ``design`` (the replication is still recorded).
    built
        ``design`` already built on ``obs`` (saves building it twice).
    """
    if replication not in REPLICATION_RULES:
        raise InputError(f"replication={replication!r} is not known; use one of {_fmt_list(REPLICATION_RULES)}.")
    d = built if built is not None else build_design(obs, design, factors=[sample_key], warn=False)
    cons = d.contrasts(contrast)
    sample = None if sample_key is None else obs[sample_key].rename(sample_key)
    reps, added = [], []
    for c in cons:
        rows = [find_replication(d, r, sample) for r in np.atleast_2d(c.L)]
        reps.append(max(rows, key=lambda r: r.n_units))
        added.extend(t for r in rows if r.level in ("sample", "slope") and r.term for t in _split_top_level(r.term))
    added = list(dict.fromkeys(added))
    d1 = d
    if added:
        d1 = build_design(obs, " + ".join([design, *added]), factors=[sample_key], warn=False)
    few = _few_level_terms(d1, [np.abs(np.atleast_2d(c.L)).sum(axis=0) for c in cons])
    if replication == "as_written" or not (added or few):
        return FittedDesign(
            design, d.formula, (), tuple(reps), sample_key, replication, d, tuple(cons), tuple(f"(1|{g})" for g in few)
        )
    fixed, d2, cons2 = [], d1, _moved(cons, d, d1, contrast)
    for g in few:
        try:
            trial = build_design(obs, _as_fixed(d2.formula, g), factors=[sample_key, *few], warn=False)
            moved = _moved(cons, d, trial, contrast)
        except ScmlmError:
            continue  # the term is needed to estimate the model or a contrast: it stays random
        if all(_estimable(trial.X, c.L) for c in moved):
            fixed.append(f"(1|{g})")
            d2, cons2 = trial, moved
    if not added and not fixed:
        return FittedDesign(design, d.formula, (), tuple(reps), sample_key, replication, d, tuple(cons))
    return FittedDesign(
        design, d2.formula, tuple(added), tuple(reps), sample_key, replication, d2, tuple(cons2), tuple(fixed)
    )


def _few_level_terms(d: Design, supports: list[np.ndarray]) -> list[str]:
    """Random intercepts ``(1|g)`` with fewer than :data:`MIN_RANDOM_LEVELS` levels that hold whole units.

    ``g`` is one obs column, each level of another random term lies within one of its levels (donors in batches),
    and no random term is crossed with it (each term's levels lie within ``g``'s or contain them). A ``g`` that pairs a
    contrast (donors of a paired design: a term nested in it is ``g`` × the contrast's values, as
    ``(1|donor:condition)``) stays random: its levels are the blocks the contrast is estimated within, whatever their
    number. ``supports`` holds, per contrast, the columns its rows use (nonzero entries).
    """
    out = []
    for spec, t in zip(d.parsed.random, d.terms, strict=True):
        codes = np.asarray(t.codes, dtype=np.int64)
        n = int(np.unique(codes).size)
        if spec.lhs.replace(" ", "") != "1" or len(spec.group) != 1 or n >= MIN_RANDOM_LEVELS or t.name in out:
            continue
        if sum(1 for u in d.terms if u.name == t.name) > 1:
            continue  # the grouping has slopes too: not a plain intercept
        others = [np.asarray(u.codes, dtype=np.int64) for u in d.terms if u.name != t.name]
        holds = any(np.unique(u).size > n and _nested_in(u, codes) for u in others)
        # crossed with another grouping (donor labels reused in every batch): not a plain batch of whole units
        crossed = any(not _nested_in(u, codes) and not _nested_in(codes, u) for u in others)
        patterns = [_pattern(d.X, np.flatnonzero(v > 1e-12)) for v in supports]
        pairs = any(_same_partition(u, _cross(codes, p)) for u in others for p in patterns)
        if holds and not crossed and not pairs:
            out.append(t.name)
    return out


def _as_fixed(formula: str, group: str) -> str:
    """``formula`` with the random intercept ``(1|group)`` replaced by the fixed effect ``group``."""
    parsed = parse_formula(formula)
    random = [f"({r.lhs}|{r.group_name})" for r in parsed.random if not (r.lhs == "1" and r.group_name == group)]
    return " + ".join([parsed.fixed, group, *random])


def _moved(cons: list[Contrast], old: Design, new: Design, contrast) -> list[Contrast]:
    """The contrasts of ``old`` on the columns of ``new``: by column name (numeric vectors too), else built anew."""
    if all(name in new.columns for name in old.columns):
        return [Contrast(c.name, _map_columns(c.L, old.columns, new.columns)) for c in cons]
    return list(new.contrasts(contrast))


def _map_columns(L: np.ndarray, old: list[str], new: list[str]) -> np.ndarray:
    """A contrast over the columns ``old`` as the same contrast over ``new`` (which holds every named column of old)."""
    L = np.asarray(L, dtype=float)
    out = np.zeros((*L.shape[:-1], len(new)))
    for j, name in enumerate(old):
        out[..., new.index(name)] = L[..., j]
    return out


def _estimable(X: np.ndarray, L: np.ndarray) -> bool:
    rows = np.atleast_2d(L)
    coef, *_ = np.linalg.lstsq(X.T, rows.T, rcond=None)
    return bool(np.linalg.norm(rows.T - X.T @ coef) <= 1e-6 * max(1.0, float(np.linalg.norm(rows))))


def one_or_all(per_group: Mapping[str, object], default):
    """The value every group shares, else ``{group: value}``; ``default`` when there is no group."""
    values = list(dict.fromkeys(per_group.values()))
    if not values:
        return default
    return values[0] if len(values) == 1 else dict(per_group)


def fitted_params(per_group: Mapping[str, FittedDesign], design: str, names: list[str], *, single: bool) -> dict:
    """What ``params`` stores of fitted designs: ``design_fitted``, ``added_terms``, ``as_fixed``, ``replication_unit``.

    ``single``: the run had one unnamed contrast, whose unit is stored as a string (else ``{contrast: unit}``).
    """
    units = {name: one_or_all({g: f.units[i] for g, f in per_group.items()}, "") for i, name in enumerate(names)}
    return {
        "design_fitted": one_or_all({g: f.formula for g, f in per_group.items()}, design),
        "added_terms": sorted({a for f in per_group.values() for a in f.added_terms}),
        "as_fixed": sorted({a for f in per_group.values() for a in f.as_fixed}),
        "replication_unit": units[names[0]] if single else units,
    }


def stored_formula(params: Mapping, group: str) -> str:
    """The formula a stored run fitted in ``group`` (``"all"`` without groups), from its ``params``."""
    design = str(params["design"])
    fitted = params.get("design_fitted") or design
    if isinstance(fitted, Mapping):
        return str(fitted.get(group, design))
    return str(fitted)
