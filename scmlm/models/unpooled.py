"""Unpooled estimates of the levels of a random intercept: each level's own maximum-likelihood effect, no shrinkage.

:func:`scmlm.tl.random_effects` sets them beside the partially pooled conditional modes (BLUPs) of the GLMM: with the
fixed effects and the other random effects held at their fitted values (the offset ``eta0``), the effect ``u_l`` of
level ``l`` alone is fitted by Newton's method on the link scale, all levels at once (they share no parameter).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._families import BINOMIAL, GAUSSIAN, get_family

__all__ = ["UnpooledFit", "fit_unpooled"]


class UnpooledFit(NamedTuple):
    """Per level: the unpooled estimate on the link scale and its standard error from the Fisher information."""

    estimate: np.ndarray
    """``-inf`` for a level without counts (count families: its MLE is not finite)"""
    se: np.ndarray


def fit_unpooled(
    y: np.ndarray,
    eta0: np.ndarray,
    codes: np.ndarray,
    n_levels: int,
    family: str,
    phi: float,
    *,
    n_iter: int = 25,
) -> UnpooledFit:
    """Per-level ML of an additive effect ``u_l`` on the link scale with everything else fixed (vectorised Newton).

    Parameters
    ----------
    y
        One gene's response per cell (counts; ``binomial``: detection ``y > 0``).
    eta0
        Linear predictor of each cell without the level's effect (offset, fixed effects, other random effects).
    codes
        Level of each cell (``0 .. n_levels - 1``).
    n_levels
        Number of levels.
    family
        ``"nb"``, ``"poisson"``, ``"binomial"`` or ``"gaussian"``.
    phi
        NB dispersion (``Var = mu + phi mu^2``; a non-finite value fits Poisson) or Gaussian residual variance.
    n_iter
        Most Newton steps (each clipped to ±3); stops when no step exceeds 1e-10.
    """
    fam = get_family(family)
    u = np.zeros(n_levels)
    y = np.asarray(y, dtype=float)
    if fam.code == BINOMIAL:
        y = (y > 0).astype(float)
    for _ in range(n_iter):
        eta = eta0 + u[codes]
        if fam.link == "log":
            mu = np.exp(eta)
            ph = phi if fam.has_dispersion and np.isfinite(phi) else 0.0
            score = (y - mu) / (1 + ph * mu)
            info = mu / (1 + ph * mu)
        elif fam.code == BINOMIAL:
            p = 1 / (1 + np.exp(-eta))
            score = y - p
            info = p * (1 - p)
        else:
            score = (y - eta) / phi
            info = np.full(y.shape, 1.0 / phi)
        S = np.bincount(codes, weights=score, minlength=n_levels)
        I = np.bincount(codes, weights=info, minlength=n_levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.clip(S / I, -3, 3)
        step = np.where(np.isfinite(step), step, 0.0)
        u = u + step
        if np.max(np.abs(step)) < 1e-10:
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        se = 1.0 / np.sqrt(I)
    # a level with no counts at all has no finite unpooled estimate (its MLE is -inf)
    ysum = np.bincount(codes, weights=y, minlength=n_levels)
    if fam.code != GAUSSIAN:
        u = np.where(ysum > 0, u, -np.inf)
    return UnpooledFit(estimate=u, se=se)
