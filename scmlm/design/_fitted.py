"""The model a cell-level tool fits: the design as written plus the terms its contrasts' unit of replication needs.

``glmm_de`` fits, for every group of cells, the formula the user wrote or (``replication="auto"``) that formula with
the sample-level terms its contrasts need (:func:`~scmlm.design.replication`). :func:`fitted_design` makes that
decision once, as a :class:`FittedDesign`; the variance partition of the same analysis, ``random_effects``, the
report and the command line read it from there, and :func:`fitted_params` / :func:`stored_formula` are the plain
values ``uns`` stores and how they are read back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from ._design import Contrast, Design, build_design
from ._replication import Replication
from ._replication import replication as find_replication

REPLICATION_RULES: tuple[str, ...] = ("auto", "as_written")
"""``replication=`` choices: add the sample-level terms the contrasts need, or fit the design as written."""


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
        added.extend(r.term for r in rows if r.level == "sample" and r.term)
    added = list(dict.fromkeys(added))
    if replication == "as_written" or not added:
        return FittedDesign(design, d.formula, (), tuple(reps), sample_key, replication, d, tuple(cons))
    d2 = build_design(obs, " + ".join([design, *added]), factors=[sample_key], warn=False)
    return FittedDesign(
        design, d2.formula, tuple(added), tuple(reps), sample_key, replication, d2, tuple(d2.contrasts(contrast))
    )


def one_or_all(per_group: Mapping[str, object], default):
    """The value every group shares, else ``{group: value}``; ``default`` when there is no group."""
    values = list(dict.fromkeys(per_group.values()))
    if not values:
        return default
    return values[0] if len(values) == 1 else dict(per_group)


def fitted_params(per_group: Mapping[str, FittedDesign], design: str, names: list[str], *, single: bool) -> dict:
    """What ``params`` stores of the fitted designs of a run: ``design_fitted``, ``added_terms``, ``replication_unit``.

    ``single``: the run had one unnamed contrast, whose unit is stored as a string (else ``{contrast: unit}``).
    """
    units = {name: one_or_all({g: f.units[i] for g, f in per_group.items()}, "") for i, name in enumerate(names)}
    return {
        "design_fitted": one_or_all({g: f.formula for g, f in per_group.items()}, design),
        "added_terms": sorted({a for f in per_group.values() for a in f.added_terms}),
        "replication_unit": units[names[0]] if single else units,
    }


def stored_formula(params: Mapping, group: str) -> str:
    """The formula a stored run fitted in ``group`` (``"all"`` without groups), from its ``params``."""
    design = str(params["design"])
    fitted = params.get("design_fitted") or design
    if isinstance(fitted, Mapping):
        return str(fitted.get(group, design))
    return str(fitted)
