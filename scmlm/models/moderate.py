"""Empirical-Bayes moderated tests of unit-level contrasts of cell-level GLMMs (limma's ``squeezeVar`` on the GLMM).

A contrast that is constant within the levels of a random term (case vs control between donors; treated vs control
between the donor × condition samples of a paired design) is tested against the variation between those units. On
the latent scale, the unit means of gene ``g`` vary with

    τ²_g = σ²_unit,g + (within-unit sampling variance of a unit mean),

and the squared standard error of the contrast is ``SE²_g = c · τ̂²_g`` with ``c = L (X_u' X_u)⁻¹ L'`` from the
unit-level design ``X_u`` (one row per unit; per gene ``c_g`` when units weigh differently, below). In a balanced
Gaussian LMM this is exact: ``SE² = c · MS_between / m`` with ``m`` cells per unit, and ``τ̂²`` is a variance on ``d``
degrees of freedom, ``d`` the contrast's containment df at its level (units minus unit-level coefficients). Each gene
alone therefore tests on ``d`` df (8 with 10 donors). With the unit variance estimated at zero (a boundary fit, part of
the ``singular`` genes) ``SE² / c`` is only the sampling part ``τ0²``: in the balanced LMM REML gives ``τ̂² =
max(MS_between, MS_within) / m``, a truncated value.

Moderation borrows strength across the genes of one group and contrast, as limma's ``eBayes`` does, with a prior
built for few df per gene (:func:`prior`): ``log τ̂²_g`` gets a robust lowess trend in ``log(base_mean)`` (as
limma's ``fitFDistRobustly``); around it ``τ̂²_g / s0²_g ~ F(d_g, d0)`` is fitted by maximum likelihood
(:func:`profile_prior`: ``d0_hat`` and the scale; ``df_prior_fit``), and the profile likelihood gives ``d0_low``,
the lower 95 % confidence limit of ``d0``: the largest spread of the true variances the data cannot rule out. Each
gene then borrows ``d0_g = guarded_prior_df(d_g, d0_low, d0_hat)`` df (``df_prior``): the largest value, at most
``d0_hat``, at which genes in the top third of true variances keep at most :data:`TOP_THIRD_BOUND` of their null
p-values below 0.05, for every prior spread with ``d0 >= d0_low`` (computed on the prior model,
:func:`_top_third_rate`). ``τ̃²_g = (d τ̂²_g + d0_g s0²_g) / (d + d0_g)``; the moderated ``SE = sqrt(c_g τ̃²_g)``,
``t = coef / SE`` on ``d_g + d0_g`` df (at most the pooled df of all genes, as limma caps it); a joint F test
(``q`` rows) uses the same prior and the guard for ``F(q, ·)``.

Why not limma's robust ``squeezeVar`` (used until issue 19). With 1–3 df per gene the moment estimate of ``d0``
swung between 16 and ∞ between seeds of the same design (paired, 4 donors, ``sd_response`` 0.5 spread between
genes); at ∞ every gene became a z test against one trend variance and the genes in the top third of true
sample-level variance reached 10–13 % of p < 0.05 (bottom third 1–3.5 %). On the Kang data (2 donors) it gave
``d0 = ∞``, a ``df`` of ~1,240 for every gene and p-values down to 0, while the interferon genes, whose variances
lie far above the trend, were flagged as outliers and tested on ``d0 ≈ 0``: t on 1 df, not called. Two facts shape
the replacement. First, even the right prior costs the top third: when true variances spread as an inverse χ² on
``d0`` df, the moderated t with that very prior puts 9–10 % of the top third below 0.05 for ``d = 3`` and
``d0 = 5–20`` (8 % for ``d = 8``; 14 % at ``d0 = ∞``), because their variances are shrunk toward a smaller one;
the per-gene test (``d0 = 0``) holds every third at 5 %. Hence a cap on ``d0`` set by the top third, not a better
point estimate alone. Second, a spread that 1–3 df per gene cannot resolve must not be read as no spread: the cap
uses the least ``d0`` the data allow, so ``d0`` grows only as the genes show that their variances agree (3,000
genes with equal variances on 3 df borrow > 100 df; see ``tests/test_moderation_spread.py``). The maximum
likelihood fit is also stable where the moments were not: ``d0_hat`` 15.9 on both paired seeds that gave 16 and ∞.
limma's per-gene outlier df are not used: with few df a gene cannot be told to be an outlier, and on Kang they made
the strongest responders untestable; the cap protects every gene with a large variance instead.

Design choices and the measurements behind them (``scmlm.datasets.simulate`` nulls, 1,000–1,500 genes; figures are
fractions of p < 0.05; ``tests/test_moderation.py`` and ``benchmarks/bench_moderation.py`` print them):

* ``d`` is the containment df, not the gene's Satterthwaite df. Satterthwaite df fall below 1 for genes whose
  variance is near, not at, zero (2e-11 at worst), and squeezing on ``min(d, Satterthwaite)`` did not cure any
  of the excess below (10-donor ``(1|donor)+(1|batch)`` null: 6.7–7.8 % for every combination tried).
* Boundary fits enter the prior with the untruncated ``τ0² · X²/d`` (:func:`gene_tau2`; equal units),
  a Pearson statistic of the unit scores that is ``MS_between / m`` in the balanced LMM: a variance on ``d`` df, as
  the prior model assumes. Singular fits then borrow from the prior like the others (pooled over six null designs:
  4.8 % of 2,941 singular fits before the change below, 4.3 % of 2,948 after).
* Unequal units (20–2,000 cells per donor). The unit scale is per gene, ``c_g = Σ a_u²`` for the unit weights the
  gene's fit uses (``1/(σ̂² + 1/I_u)``; a boundary fit weighs donors by their information, a fit with a large
  ``σ̂²`` weighs them alike), so that ``τ̂² = se²/c_g`` is comparable between genes (dream weighs observations by
  precision weights and squeezes the weighted residual variance; here the weights come from each gene's fit). A
  boundary fit's ``τ̂²`` is ``V(0)/c_g + σ̂²`` with the moment estimate ``σ̂² = (X² - d)/T``, and its df is that
  estimate's Satterthwaite df (:func:`_boundary_df`), not ``d``: the Pearson statistic rests on the few large
  donors (0.6–2.7 df for 8). Four unbalanced nulls of 2,000 genes (seeds 2, 12, 22, 32), fraction of p < 0.05
  among boundary fits: 15.8, 13.5, 15.1, 14.3 % before (``c`` and ``d`` for all); 14.4 and 12.8 % (seeds 2, 12)
  with ``c_g`` alone; 4.7, 3.8, 2.8, 4.8 % (4.2 % of 624) with the boundary df floored at
  :data:`BOUNDARY_DF_MIN`; all genes 4.9, 4.6, 4.5, 5.9 %.
* Where the contrast's variance also rests on a coarser random term not balanced over the contrast (donors nested
  in 3 batches with unequal case/control counts, ``(1|donor)+(1|batch)``), ``se²`` carries the batch variance,
  estimated from 3 levels and treated as known by the REML standard error, which no prior for the donor term
  reaches. Moderating ``τ̂² = se²/c`` on the containment df (8) or on the residual df of the unit design with the
  batches fixed (6) gave, on 10-donor nulls: 60 cells, seed 1: 5.92 % / 5.71 %; seed 21: 4.84 % / 4.27 %;
  400 cells, seed 5: 6.26 % / 5.66 %; the benchmark's 1,800 non-DE genes 6.35 % / 5.63 % (64 calls at FDR 0.047
  against 37 per gene); but 100 cells, seed 12 (``tests/test_glmm_de.py``): 7.79 % / 7.27 % (5, 4 and 3 df:
  6.33, 6.27, 6.60 %), where the per-gene test gives 5.74 %. Such contrasts keep the per-gene test and say so in
  ``moderation``; with ``batch`` as a fixed effect the design is moderated. A balanced coarser term (the donor of a
  paired design) cancels from the contrast and does not block moderation.
* ``tests/test_moderation.py`` nulls (1,500 genes; all genes, then boundary fits), limma's robust prior → the
  guarded prior: 10 donors 4.65 % → 4.58 %, within-donor 5.06 → 5.34 %, unbalanced 20–2,000 cells 4.01 → 3.61 %,
  crossed donor + lane with a donor-level covariate 4.43 → 4.29 %, 3 vs 3 4.51 → 3.76 %, 2 vs 2 3.52 → 2.62 %
  (per-gene test 0.57 %); boundary fits pooled over the six cases 4.31 → 4.34 % of 2,948.
* Spread nulls (issue 19; ``tests/test_moderation_spread.py``, 1,500 genes each; paired 4 donors with
  ``sd_response`` 0.5, equal and 20–2,000 cells; 2, 3, 4 donors per condition between donors with 20–2,000
  cells): see that module for the pooled fractions, overall and in the top third of true variances.
* Power (``benchmarks/bench_moderation.py``, 2,000 genes, 10 % DE, calls at BH 0.05): between donors with
  ``batch`` fixed 49 calls, TPR 0.240, FDR 0.020 (per-gene ``(1|batch)`` 37, nb_ql 49); unbalanced 23 calls,
  TPR 0.115, FDR 0 (per gene 10, nb_ql 34) — figures with limma's robust prior, before issue 19. With one scale
  ``c`` for all genes the unbalanced set gave 29 calls but the nulls above were anticonservative (all genes up to
  7.0 %, boundary fits 13–16 %). On this simulator an AUC of 0.93 is out of reach: the z statistic with known donor
  and sampling variances ranks the genes at 0.925.
* Power with the guarded prior (``bench_moderation.py --power``: ``simulate(n_donors=10, frac_de=0.1)``, default
  ``~ condition + (1|donor)`` against pseudobulk ``~ condition``; calls at BH 0.05 / true genes among them / true genes
  within an observed FDP of 5 % of the ranking). 400 cells, seed 0: GLMM 28/28/60, nb_ql 40/39/64, voom 45/44/60; seed
  1: GLMM 41/39/61, nb_ql 45/42/32, voom 50/47/60. 20–2,000 cells, seed 0: GLMM 0/0/29, nb_ql 27/27/42, voom 34/31/25;
  seed 1: GLMM 22/22/47, nb_ql 34/33/39, voom 39/39/43. The GLMM ranks the genes as well as the pseudobulk methods or
  better (AUC 0.89, 0.92, 0.86, 0.88 against voom's 0.79, 0.83, 0.65, 0.64: pseudobulk filters out 11 % and 33–43 % of
  the genes, DE ones among them) but calls fewer. Where the calls go, per gene on the same fits: the GLMM's |t| match
  voom's (median ratio on the DE genes 0.97–0.99; the k-th largest |t| is at least 98 % of voom's for k = 1, 5, 10, 20,
  …, 60), and no false gene with a tiny p opens the ranking (first false ranks 9, 30: also 18th / 32nd for voom). The
  gap is the df of the t and the genes tested: the GLMM's t is on 11.7–13.9 df (voom 14.9–16.1, nb_ql 15.3–17.8) and BH
  runs over 1,992–1,997 genes (pseudobulk 1,140–1,787). The df: (1) the guard, not the data, caps the balanced sets:
  ``d0_low`` equals ``d0_hat`` there (7.1, 8.0; the simulated ``sd_donor`` spread alone implies ``d0 ≈ 5``, so a large
  ``d0_low`` is not to be expected) and the guard lowers them to 5.3, 5.9 because at ``d = 8`` even the right prior puts
  8.2 % of the top third below 0.05; uncapped the calls are 36/35 and 52/49 (TOP_THIRD_BOUND 0.08: 36/35, 42/40), still
  short of voom's on seed 0; unbalanced uncapped 0/0 and 21/21. (2) Unbalanced, ``d0_hat`` is 4.5 and 6.3 (voom 7.5,
  8.1): ``τ̂² = se²/c_g`` is not on one scale across genes, its residual from the trend falls with ``log c_g``
  (correlation -0.54, -0.49; balanced +0.16) since a gene with a small ``σ̂²`` weighs the large donors (large ``c_g``,
  small sampling part) and one with a large ``σ̂²`` weighs donors alike; within thirds of ``c_g`` the fit gives ``d0``
  11.3 / 7.1 / 3.6 and 10.0 / 10.0 / 7.1. ``log c_g`` as a trend covariate is circular (it follows from ``σ̂²``): 18
  calls, 14 true, null 6.6 %. Restricting the GLMM to the pseudobulk's genes with the cap removed gives 44/43, 47/44,
  5/5, 25/25. The pseudobulk methods pay for their calls in the top third of true variances (null p < 0.05 overall / top
  third: nb_ql 3.9/6.3, 4.1/8.1, 4.7/9.1, 4.5/8.9 %; voom 4.0/6.7, 3.4/6.8, 4.9/8.2, 4.4/7.7 %; GLMM 3.6/6.0, 3.2/5.7,
  4.3/6.7, 3.5/5.7 %). Issue 19's bar (at least the calls of the better of nb_ql and voom) is not reached; a ``τ̂²`` on
  one weighting for all genes is not the cure in its plain form: ``σ̂²`` plus the sampling part of equal unit weights
  (``se²`` rescaled to it) raised the unbalanced ``d0_hat`` to 14.2 and the calls to 34/29 and 37/34, but its non-DE
  genes went to 6.8 % and 4.6 % at p < 0.05 and false genes opened the ranking (true at FDP 5 %: 0, 23), because where
  the sampling part dominates that ``τ̂²`` hardly varies and is not a variance on ``d`` df; voom's own ``d0`` on the
  pseudobulk's genes would give 43/42, 47/44, 29/27, 29/29, and ``d0 = 20`` would meet the bar on all four (62/58,
  74/69, 39/36, 45/44), a value neither the data (``d0_hat`` 4.5–8.0) nor the top-third bound allow. Near-boundary fits
  (``σ̂²`` above 0 but under 2 % of the median), which take ``d`` and ``se²/c_g`` like interior fits, are not a cause:
  19 % of 32 such null genes at p < 0.05 in the four power sets, but 5.6 % of 36 (20–2,000 cells) and 0 % of 10 (400
  cells) on eight 1,500-gene nulls (seeds 10–13), where all genes give 3.6 % / 3.8 % and the top third 5.5 % / 7.3 %.
* Genes are moderated per group (``groups_key``) and per contrast: each has its own prior. A group with fewer than
  :data:`MIN_GENES` usable genes keeps per-gene tests.

Contrasts that vary from cell to cell are not moderated (they are tested on the cell-level residual df, where a
prior adds nothing). Sharded runs store the unmoderated quantities (``coef``, ``se_raw``, ``tau2``,
``df_resid``, ``unit_scale``, ``base_mean``) with ``moderation = "pending"``; :func:`scmlm.results.merge_shards` calls
:func:`scmlm.results.finish_moderation` over the concatenated shards, which gives the same numbers as an unsharded run.

Inputs are ndarrays; the cell-level model every gene of a chunk shares (design, random terms, offset, family, trials)
travels as one :class:`CellModel`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy import optimize, special, stats

from .ebayes import _loess_fit_unweighted
from .moderate_kernel import unit_scores_kernel

MIN_GENES = 10
"""Fewest genes of a group and contrast with a usable unmoderated test for a prior to be estimated."""

BOUNDARY_DF_MIN = 2.0
"""Floor of a boundary fit's df (:func:`_boundary_df`). Unbalanced nulls (20–2,000 cells per donor, 4 sets of 2,000
genes, 624 boundary fits): 3.5 % of their p < 0.05 with a floor of 1, 4.2 % with 2, 5.8 % with 3, 13.1 % on ``d``."""

TOP_THIRD_BOUND = 0.075
"""Largest fraction of p < 0.05 the prior df may give the genes in the top third of true variances (below)."""

PROFILE_DROP = stats.chi2.ppf(0.90, 1) / 2
"""Drop of the profile log-likelihood of ``d0`` that marks its lower confidence limit (one-sided 95 %)."""

_D0_GRID = np.concatenate([np.geomspace(0.02, 2e4, 121), [np.inf]])


def _profile_at(x: np.ndarray, d: np.ndarray, d0: float) -> tuple[float, float]:
    """``(max log-likelihood, log s0²)`` of ``x / s0² ~ F(d, d0)`` over the scale (``χ²_d / d`` at ``d0 = ∞``), up to a
    constant that does not depend on ``d0``."""
    if np.isinf(d0):
        log_s = float(np.log(np.sum(d * x) / np.sum(d)))
        y = d * x * np.exp(-log_s) / 2
        return float(np.sum(d / 2 * np.log(y) - y - special.gammaln(d / 2))), log_s

    def score(ls: float) -> float:  # d/d(log s) of the log-likelihood, decreasing in log s
        u = d * x * np.exp(-ls) / d0
        return float(np.sum(-d / 2 + (d + d0) / 2 * u / (1 + u)))

    lo, hi = float(np.log(np.min(x))) - 5, float(np.log(np.max(x))) + 5
    log_s = optimize.brentq(score, lo, hi, xtol=1e-10) if score(lo) > 0 > score(hi) else float(np.log(np.median(x)))
    u = d * x * np.exp(-log_s) / d0
    const = special.gammaln((d + d0) / 2) - special.gammaln(d / 2) - special.gammaln(d0 / 2) + d / 2 * np.log(d / d0)
    return float(np.sum(const + d / 2 * (np.log(x) - log_s) - (d + d0) / 2 * np.log1p(u))), log_s


def profile_prior(x: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Maximum-likelihood prior of detrended variances ``x`` on ``d`` df: ``x / s0² ~ F(d, d0)``.

    Returns ``(d0_hat, log s0², d0_low)``: the maximum-likelihood ``d0`` on a grid (``inf`` where the variances
    spread no more than their own df explain), the scale at it and the lower confidence limit of ``d0`` from the
    profile likelihood (:data:`PROFILE_DROP`): the largest spread of the true variances the data are compatible with.
    """
    x = np.asarray(x, dtype=float)
    d = np.broadcast_to(np.asarray(d, dtype=float), x.shape)
    fits = [_profile_at(x, d, d0) for d0 in _D0_GRID]
    ll = np.array([f[0] for f in fits])
    best = int(np.argmax(ll))
    low = int(np.argmax(ll >= ll[best] - PROFILE_DROP))  # first grid point inside the interval
    return float(_D0_GRID[best]), fits[best][1], float(_D0_GRID[low])


def _top_third_rate(d: float, d0_true: float, d0_used: float, q: int = 1, alpha: float = 0.05) -> float:
    """Fraction of null p < ``alpha`` of the moderated t (prior df ``d0_used``, the true prior scale) among genes in
    the top third of true variances, when these follow the scaled inverse χ² prior on ``d0_true`` df and each gene's
    variance is estimated on ``d`` df."""
    X = _chi2_nodes(d)
    r = _top_third_nodes(d0_true)
    fc = special.fdtri(q, d + d0_used, 1.0 - alpha)  # the F(q, d + d0) critical value
    post = (r * X + d0_used) / (d + d0_used)
    x = q * fc * post / r
    return float(np.mean(special.erfc(np.sqrt(x / 2)) if q == 1 else special.chdtrc(q, x)))


@functools.lru_cache(maxsize=256)
def _chi2_nodes(d: float) -> np.ndarray:
    """120 quantiles of ``χ²_d`` (a column): the sampling distribution of a gene's variance on ``d`` df."""
    return stats.chi2.ppf((np.arange(120) + 0.5) / 120, d)[:, None]


@functools.lru_cache(maxsize=256)
def _top_third_nodes(d0: float) -> np.ndarray:
    """40 quantiles (a row) of the top third of true variances ``d0 / χ²_d0`` (prior scale 1)."""
    if np.isinf(d0):
        return np.ones((1, 1))
    return (d0 / stats.chi2.ppf((np.arange(40) + 0.5) / 40 / 3, d0))[None, :]


def guarded_prior_df(d: float, d0_low: float, d0_hat: float, q: int = 1) -> float:
    """The largest prior df, at most ``d0_hat``, at which genes in the top third of true variances keep at most
    :data:`TOP_THIRD_BOUND` of p < 0.05 for every prior spread the data allow (``d0_true >= d0_low``)."""
    return min(_guard(_round2(d), _round2(d0_low), int(q)), d0_hat)


def _round2(x: float) -> float:
    """``x`` to two significant digits (the guard is cached on them)."""
    return float(f"{x:.2g}") if np.isfinite(x) else x


@functools.lru_cache(maxsize=4096)
def _guard(d: float, d0_low: float, q: int) -> float:
    trues = [d0_low * t for t in (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)] if np.isfinite(d0_low) else []
    trues.append(np.inf)

    def worst(c: float) -> float:
        return max(_top_third_rate(d, t, c, q) for t in trues)

    lo, hi = -3.0, 4.0  # log10 of the prior df: 0.001 … 10,000
    if worst(10**hi) <= TOP_THIRD_BOUND:
        return 10**hi
    if worst(10**lo) > TOP_THIRD_BOUND:
        return 0.0
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst(10**mid) <= TOP_THIRD_BOUND else (lo, mid)
    return 10**lo


PENDING = "pending"
"""``moderation`` value of a gene of a sharded run: finished when the shards are merged."""


class CellModel(NamedTuple):
    """The cell-level model every gene of a chunk was fitted with (what :func:`gene_tau2` needs besides the fits)."""

    X: np.ndarray
    """fixed-effect design, cells × p"""
    terms: tuple
    """random terms (:class:`~scmlm.models.RandomTerm`)"""
    offset: np.ndarray | None
    """per-cell offset on the link scale, or None"""
    family: str
    trials: np.ndarray | None
    """binomial trials per cell, or None (detection ``y > 0``)"""


def unit_scale(X: np.ndarray, unit_codes: list[np.ndarray], L: np.ndarray) -> tuple[float, int, int]:
    """``(c, n_units, k)`` with ``c = L (X_u' X_u)⁻¹ L'``: ``X_u`` holds one row per unit of the random term with the
    fewest levels within which the contrast is constant, and the fixed columns constant within them (``(1.0, 0)``
    when there is none). In a paired design the donor block is left out of ``X_u``: it changes ``c`` only in
    unbalanced designs, and ``c`` only sets the scale on which ``var_prior`` is reported (not the test)."""
    X = np.asarray(X, dtype=float)
    L = np.asarray(L, dtype=float).ravel()
    used = np.flatnonzero(np.abs(L) > 1e-12)
    best = None
    for k, codes in enumerate(unit_codes):
        _, first = np.unique(codes, return_index=True)
        inv = np.unique(codes, return_inverse=True)[1]
        const = np.array([np.ptp(X[:, j]) == 0 or np.allclose(X[:, j], X[first, j][inv]) for j in range(X.shape[1])])
        if not const[used].all():
            continue
        Xu = X[np.ix_(first, np.flatnonzero(const))]
        Lu = L[const]
        c = float(Lu @ np.linalg.pinv(Xu.T @ Xu) @ Lu)
        if np.isfinite(c) and c > 0 and (best is None or first.size < best[0]):
            best = (first.size, c, k)
    return (1.0, 0, -1) if best is None else (best[1], best[0], best[2])


def coarser_terms(X: np.ndarray, terms, L: np.ndarray) -> list[str]:
    """Random terms other than the contrast's unit term whose levels hold whole units and are not balanced over the
    contrast (e.g. ``batch`` over donors nested in batches with unequal case/control counts; not ``donor`` over the
    two samples of each donor in a paired design, which cancels). The contrast's variance then rests on their
    variance too, estimated from few levels; a prior for the unit term does not moderate that part (see the module
    docstring): such contrasts keep the per-gene test."""
    terms = tuple(terms)
    X = np.asarray(X, dtype=float)
    L = np.asarray(L, dtype=float).ravel()
    _, _, k = unit_scale(X, [t.codes for t in terms], L)
    if k < 0:
        return []
    unit = np.asarray(terms[k].codes)
    _, first = np.unique(unit, return_index=True)
    Lu = L
    Xu = X[first]
    c0 = float(Lu @ np.linalg.pinv(Xu.T @ Xu) @ Lu)
    out = []
    for j, t in enumerate(terms):
        if j == k:
            continue
        pairs = np.unique(np.column_stack([unit, np.asarray(t.codes)]), axis=0)  # distinct (unit, level) pairs
        n_units = np.unique(pairs[:, 0]).size
        if not (n_units == pairs.shape[0] and np.unique(pairs[:, 1]).size < n_units):
            continue
        tc = _first_seen_codes(np.asarray(t.codes)[first])
        Xd = np.hstack([Xu, np.eye(int(tc.max()) + 1)[tc]])
        Ld = np.concatenate([Lu, np.zeros(Xd.shape[1] - Lu.size)])
        c1 = float(Ld @ np.linalg.pinv(Xd.T @ Xd) @ Ld)
        if abs(c1 - c0) > 1e-8 * abs(c0):
            out.append(t.name)
    return out


def _first_seen_codes(values: np.ndarray) -> np.ndarray:
    """Integer code of each value, numbered in the order the values first appear (``pandas.factorize``)."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def gene_tau2(
    Y, res, se: np.ndarray, model: CellModel, L, df: float, *, weighted: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene between-unit variance ``τ̂²`` of a unit-level contrast, its unit scale ``c_g`` (``se² = c_g τ̂²``)
    and its df, from one chunk's fits (``res``) of the cell-level ``model``.

    ``weighted=False`` (or a unit term with slopes): ``c_g = c`` of :func:`unit_scale` for every gene. Otherwise the
    unit design is weighted as the gene's fit weighs the units: ``w_u = 1 / (σ̂² + 1/I_u)`` with ``I_u`` the
    information of unit ``u`` (:func:`unit_scores`) and ``σ̂²`` the gene's unit variance; the contrast is
    ``Σ a_u b̂_u`` with ``a = W X_u (X_u' W X_u)⁻¹ L`` and ``c_g = Σ a_u²`` (``c`` for equal units), so that
    ``τ̂² = se² / c_g`` is ``σ̂²`` plus a weighted mean of the sampling variances ``1/I_u``: comparable between genes
    whose fits lean on different units (with 20–2,000 cells per donor a fit at the boundary weighs donors by their
    cells, one with a large ``σ̂²`` weighs them alike).

    Where the unit variance is at zero (a boundary fit) ``se² / c_g`` is only the sampling part; it gets the
    moment estimate ``σ̂² = (X² - d) / T`` of :func:`unit_dispersion` (untruncated; ``X²/d`` times the sampling part
    where ``X² < d``), a variance on ``d`` df as the prior assumes (``MS_between / m`` in a balanced LMM). Measured
    on 10-donor nulls (``(1|donor)+(1|batch)``, 54 % singular), squeezing the truncated values estimated
    ``d0 ≈ 16`` for a distribution the prior does not fit.
    """
    X, terms = model.X, tuple(model.terms)
    c, _, k = unit_scale(X, [t.codes for t in terms], L)
    se2 = np.asarray(se, dtype=float) ** 2
    G = se2.size
    tau2 = se2 / c
    scale = np.full(G, c)
    if k < 0:
        return tau2, scale, np.full(G, float(df))
    names = terms[k].component_names()
    conv = np.asarray(res.converged, dtype=bool) & np.isfinite(tau2)
    zero = conv.copy()
    for name in names:
        zero &= np.asarray(res.var[name]) <= 0
    weighted = weighted and len(names) == 1
    idx = np.flatnonzero(conv if weighted else zero)
    if not idx.size:
        return tau2, scale, np.full(G, float(df))
    codes = np.unique(terms[k].codes, return_inverse=True)[1]
    S, info_u = unit_scores_kernel(Y, model, res.beta[idx], res.b[idx], np.asarray(res.phi)[idx], codes, genes=idx)
    Xu, Lu = _unit_design(X, codes, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        x2 = np.sum(np.where(info_u > 0, S**2 / info_u, 0.0), axis=0)
    z = zero[idx]
    if weighted:
        s2 = np.where(z, 0.0, np.asarray(res.var[names[0]], dtype=float)[idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(info_u > 0, 1.0 / (s2[None, :] + 1.0 / info_u), 0.0).T  # genes × units
        cg = _weighted_scale(Xu, Lu, w)
        ok = np.isfinite(cg) & (cg > 0)
        scale[idx[ok]] = cg[ok]
        tau2[idx[ok]] = se2[idx[ok]] / cg[ok]
    dfg = np.full(G, float(df))
    if z.any():
        zi = idx[z]
        ratio = np.where(x2[z] > df, _moment_inflation(Xu, Lu, info_u[:, z], x2[z], df), x2[z] / df)
        tau2[zi] = tau2[zi] * ratio
        dfg[zi] = _boundary_df(Xu, Lu, info_u[:, z], x2[z], df)
    return tau2, scale, dfg


def _boundary_df(Xu: np.ndarray, Lu: np.ndarray, info_u: np.ndarray, x2: np.ndarray, df: float) -> np.ndarray:
    """Satterthwaite df of a boundary fit's ``τ̂² = V(0)/Σa² + (X² - d)/T`` (:func:`_moment_inflation`), at
    ``σ² = max((X² - d)/T, 0)``, within ``[BOUNDARY_DF_MIN, d]``.

    ``X² = Σ λ_k χ²_1`` with ``λ`` the eigenvalues of ``B = W½ (I - P)(σ² I + W⁻¹)(I - P)' W½``:
    ``df = 2 E(τ̂²)² / Var(τ̂²)`` with ``Var = 2 tr(B²) / T²``. Equal units give ``d``. With 20–2,000 cells per donor the
    Pearson statistic rests on the few large donors: 0.6–2.7 df instead of 8, and boundary fits squeezed as if on 8
    df gave 13–16 % of null p < 0.05.
    """
    W = info_u.T  # genes × units
    A = np.einsum("gu,ui,uj->gij", W, Xu, Xu)
    Ainv = np.linalg.pinv(A)
    AL = Ainv @ Lu
    v0 = AL @ Lu
    a = W * (AL @ Xu.T)
    sa = np.sum(a**2, axis=1)
    n = Xu.shape[0]
    P = np.einsum("ui,gij,vj,gv->guv", Xu, Ainv, Xu, W)
    M = np.eye(n)[None] - P
    T = np.einsum("gu,guv->g", W, M**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = np.maximum((x2 - df) / T, 0.0)
        Sig = s2[:, None, None] * np.eye(n)[None] + np.einsum("uv,gu->guv", np.eye(n), 1.0 / W)
        rw = np.sqrt(W)
        B = rw[:, :, None] * np.einsum("guv,gvw,gxw->gux", M, Sig, M) * rw[:, None, :]
        mean = v0 / sa + (np.einsum("guu->g", B) - df) / T
        var = 2.0 * np.sum(B**2, axis=(1, 2)) / T**2
        out = 2.0 * mean**2 / var
    return np.clip(np.where(np.isfinite(out), out, df), min(BOUNDARY_DF_MIN, df), df)


def _unit_design(X: np.ndarray, codes: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per unit of the columns of ``X`` constant within units, and the matching entries of ``L``."""
    X = np.asarray(X, dtype=float)
    L = np.asarray(L, dtype=float).ravel()
    _, first, inv = np.unique(codes, return_index=True, return_inverse=True)
    const = [j for j in range(X.shape[1]) if np.allclose(X[:, j], X[first, j][inv])]
    return X[np.ix_(first, const)], L[const]


def _weighted_scale(Xu: np.ndarray, Lu: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ_u a_u²`` per gene for unit weights ``w`` (genes × units), ``a = W X_u (X_u' W X_u)⁻¹ L``; invariant to the
    scale of ``w``, ``c = L (X_u' X_u)⁻¹ L'`` for equal weights."""
    A = np.einsum("gu,ui,uj->gij", w, Xu, Xu)
    AL = np.linalg.pinv(A) @ Lu
    a = w * (AL @ Xu.T)
    return np.sum(a**2, axis=1)


UNIT_SCORE_ROWS = 16384
"""Cells per block in :func:`unit_scores`: dense temporaries stay at block × genes, not cells × genes (at 400k cells
and 128 genes a chunk's dense copies took 2-3 GB)."""


def unit_scores(
    Y, model: CellModel, beta: np.ndarray, b: np.ndarray, phi: np.ndarray, unit_codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(S, I)``, units × genes: the score ``S_u`` of a random effect of unit ``u`` at zero and its information
    ``I_u`` (see :func:`unit_dispersion`), from the fitted means of each gene's model; summed over blocks of cells."""
    from ._families import get_family
    from ._random import build_Z

    X, offset, trials = model.X, model.offset, model.trials
    fam = get_family(model.family)
    n = X.shape[0]
    Z = build_Z(tuple(model.terms), n)
    if hasattr(Y, "toarray"):
        Y = (Y if Y.shape[0] == n else Y.T).tocsr()
    else:
        Y = np.asarray(Y, dtype=float)
        if Y.ndim == 1 or Y.shape[0] != n:
            Y = np.atleast_2d(Y).T  # genes × cells → cells × genes
    m_all = np.ones(n) if trials is None else np.asarray(trials, dtype=float)
    n_units = int(unit_codes.max()) + 1
    S = np.zeros((n_units, beta.shape[0]))
    info_u = np.zeros((n_units, beta.shape[0]))
    for lo in range(0, n, UNIT_SCORE_ROWS):
        rows = slice(lo, min(n, lo + UNIT_SCORE_ROWS))
        eta = X[rows] @ beta.T + (Z[rows] @ b.T if b.size else 0.0)
        if offset is not None:
            eta = eta + offset[rows, None]
        Yd = Y[rows].toarray() if hasattr(Y, "toarray") else Y[rows]
        score, info = _cell_scores(fam, np.asarray(Yd, dtype=float), eta, phi, m_all[rows], trials is None)
        k = eta.shape[0]
        ind = sp.csr_matrix((np.ones(k), (unit_codes[rows], np.arange(k))), shape=(n_units, k))
        S += ind @ score
        info_u += ind @ info
    return S, info_u


def _cell_scores(fam, Yd: np.ndarray, eta: np.ndarray, phi: np.ndarray, m: np.ndarray, binary: bool):
    """Per-cell score and information of a unit's random intercept at zero, cells × genes of one block."""
    if fam.link == "logit":
        if binary:
            Yd = (Yd > 0).astype(float)
        p = fam.linkinv(eta)
        return Yd - m[:, None] * p, m[:, None] * p * (1 - p)
    if fam.link == "log":
        mu = fam.linkinv(eta)
        var = mu + phi[None, :] * mu**2 if fam.has_dispersion else mu
        return (Yd - mu) * mu / var, mu**2 / var
    return (Yd - eta) / phi[None, :], np.broadcast_to(1.0 / phi[None, :], eta.shape)


def unit_dispersion(
    Y,
    model: CellModel,
    beta: np.ndarray,
    b: np.ndarray,
    phi: np.ndarray,
    unit_codes: np.ndarray,
    df: float,
    L: np.ndarray | None = None,
) -> np.ndarray:
    """Inflation of the contrast's variance over its value with the unit variance at zero, per gene.

    ``1 + (X²/d - 1) r`` where ``X²/d > 1``, else ``X²/d``. ``X² = Σ_u S_u² / I_u`` with
    ``S_u = Σ_{i∈u} (y_i - μ_i) μ'_i / V_i`` the score of a random effect of unit ``u`` at zero and
    ``I_u = Σ_{i∈u} μ'_i² / V_i`` its information, from the fitted means ``μ`` of the gene's model
    (``E X² = d (1 + σ² I)`` for equal units); ``r = (Σ I_u² / Σ I_u) / mean(I_u)`` (1 for equal units), since an
    information-weighted contrast leans on the large units. Unbalanced nulls (20–2,000 cells per donor): boundary
    fits at 9.9 % of p < 0.05 with ``r = 1``, 9.3 % with it (151 genes).
    """
    S, info_u = unit_scores(Y, model, beta, b, phi, unit_codes)
    X = model.X
    with np.errstate(divide="ignore", invalid="ignore"):
        x2 = np.sum(np.where(info_u > 0, S**2 / info_u, 0.0), axis=0)
    if L is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            present = info_u > 0
            r = (np.sum(info_u**2, axis=0) / np.sum(info_u, axis=0)) / (np.sum(info_u, axis=0) / present.sum(axis=0))
        x2 = x2 / df
        return np.where(x2 > 1, 1.0 + (x2 - 1.0) * np.where(np.isfinite(r), r, 1.0), x2)
    return np.where(x2 > df, _moment_inflation(*_unit_design(X, unit_codes, L), info_u, x2, df), x2 / df)


def _moment_inflation(Xu: np.ndarray, Lu: np.ndarray, info_u: np.ndarray, x2: np.ndarray, df: float) -> np.ndarray:
    """``V(σ̂²) / V(0)`` for the information-weighted contrast of a boundary fit, per gene.

    With unit weights ``w_u = I_u`` the contrast is ``Σ_u a_u b̂_u`` (``a = W X_u A⁻¹ L``, ``A = X_u' W X_u``), whose
    variance is ``V(0) + σ² Σ a_u²`` with ``V(0) = L A⁻¹ L'``. The unit Pearson statistic has ``E X² = d + σ² T``,
    ``T = tr(W (I - P)(I - P)')`` with ``P = X_u A⁻¹ X_u' W``; ``σ̂² = (X² - d) / T``. Equal units give
    ``1 + (X²/d - 1)``, the balanced LMM's ``MS_between / MS_within``.
    """
    W = info_u.T  # genes × units
    A = np.einsum("gu,ui,uj->gij", W, Xu, Xu)
    Ainv = np.linalg.pinv(A)
    AL = Ainv @ Lu  # g × p
    v0 = AL @ Lu
    a = W * (AL @ Xu.T)  # g × units
    P = np.einsum("ui,gij,vj,gv->guv", Xu, Ainv, Xu, W)
    M = np.eye(Xu.shape[0])[None] - P
    T = np.einsum("gu,guv->g", W, M**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = 1.0 + (x2 - df) / T * np.sum(a**2, axis=1) / v0
    return np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)


def prior(
    tau2: np.ndarray, d: np.ndarray, covariate: np.ndarray, q: int = 1
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The moderation prior of one group and contrast: ``(d0_g, s0²_g, d0_hat, d0_low)``.

    ``log τ̂²`` gets a robust trend in ``covariate`` (lowess, span 0.4, as limma's robust ``fitFDistRobustly``);
    around it ``τ̂² / s0² ~ F(d, d0)`` is fitted by maximum likelihood (:func:`profile_prior`). Each gene's prior df
    ``d0_g`` is then :func:`guarded_prior_df` of its own ``d``: the estimate where the data pin the spread of the true
    variances down, less where they do not (few genes, 1-3 df each), and never a df at which the genes with the
    largest true variances would be tested against a variance they do not have.
    """
    tau2 = np.asarray(tau2, dtype=float)
    d = np.asarray(d, dtype=float)
    m = float(np.median(tau2))
    if not m > 0:
        raise ValueError("variances are mostly <= 0")
    x = np.maximum(tau2, 1e-12 * m)
    z = np.log(x)
    if np.ptp(covariate) > 0 and x.size >= 30:
        trend, _ = _loess_fit_unweighted(z, covariate, span=0.4)
    else:
        trend = np.full(z.size, float(np.median(z)))
    d0_hat, log_s, d0_low = profile_prior(x / np.exp(trend), d)
    s0 = np.exp(trend + log_s)
    grid = np.unique(np.round(d, 1))
    if grid.size > 8:
        grid = np.unique(np.round(np.quantile(d, np.linspace(0, 1, 8)), 1))
    g0 = np.array([guarded_prior_df(float(v), d0_low, d0_hat, q) for v in grid])
    d0 = np.interp(d, grid, g0) if grid.size > 1 else np.full(d.size, g0[0])
    return d0, s0, d0_hat, d0_low


def moderate(
    coef: np.ndarray,
    tau2: np.ndarray,
    df_resid: np.ndarray,
    base_mean: np.ndarray,
    scale: float | np.ndarray,
    usable: np.ndarray,
    q: int = 1,
) -> dict[str, np.ndarray]:
    """Moderated t tests for one group and contrast, with the guarded prior of :func:`prior`.

    Parameters
    ----------
    coef, tau2
        Per-gene estimate of the contrast and its between-unit variance (:func:`gene_tau2`).
    df_resid
        Per-gene residual df of ``τ̂²`` (the containment df at the contrast's level).
    base_mean
        Per-gene mean normalised expression (the trend covariate, on the log scale).
    scale
        The unit scale ``c_g`` of each gene, or one for all (:func:`gene_tau2`): ``se² = c_g τ²``.
    usable
        Genes whose fit can enter the prior (converged, finite ``tau2 > 0`` and ``df_resid >= 1``).

    q
        Rows of a joint F test (the guard on the prior df is computed for ``F(q, ·)``).

    Returns
    -------
    ``se``, ``stat``, ``df``, ``pvalue``, ``df_prior`` (the df each gene borrows, :func:`prior`), ``var_prior``,
    ``df_prior_fit`` (the maximum-likelihood prior df of the group, ``inf`` where the variances spread no more than
    their df explain; ``df_prior <= df_prior_fit``), all NaN outside ``usable``, and ``moderation``
    (``"moderated"``, or why not).
    """
    coef = np.asarray(coef, dtype=float)
    tau2_all = np.asarray(tau2, dtype=float)
    d = np.asarray(df_resid, dtype=float)
    G = coef.size
    out = {k: np.full(G, np.nan) for k in ("se", "stat", "df", "pvalue", "df_prior", "var_prior", "df_prior_fit")}
    why = np.full(G, "not moderated: the gene's fit has no usable test", dtype=object)
    usable = np.asarray(usable, dtype=bool) & np.isfinite(tau2_all) & (tau2_all > 0) & np.isfinite(d) & (d >= 1)
    idx = np.flatnonzero(usable)
    if idx.size < MIN_GENES:
        why[idx] = f"not moderated: fewer than {MIN_GENES} genes in the group to estimate a prior"
        return {**out, "moderation": why}
    tau2 = tau2_all[idx]
    cov = np.log(np.maximum(np.asarray(base_mean, dtype=float)[idx], 1e-8))
    cov = np.where(np.isfinite(cov), cov, np.nanmin(cov[np.isfinite(cov)]) if np.isfinite(cov).any() else 0.0)
    try:
        d0, s0, d0_hat, d0_low = prior(tau2, d[idx], cov, q)
    except (ValueError, np.linalg.LinAlgError) as err:
        why[idx] = f"not moderated: prior not estimable ({err})"
        return {**out, "moderation": why}
    post = (d[idx] * tau2 + d0 * s0) / (d[idx] + d0)
    df_total = np.minimum(d[idx] + d0, d[idx].sum())  # limma caps the total df at the pooled residual df
    se_mod = np.sqrt(np.broadcast_to(np.asarray(scale, dtype=float), (G,))[idx] * post)
    stat = coef[idx] / se_mod
    out["se"][idx] = se_mod
    out["stat"][idx] = stat
    out["df"][idx] = df_total
    out["pvalue"][idx] = 2.0 * stats.t.sf(np.abs(stat), df_total)
    out["df_prior"][idx] = d0
    out["df_prior_fit"][idx] = d0_hat
    out["var_prior"][idx] = s0
    why[idx] = "moderated"
    return {**out, "moderation": why}
