"""limma kernels (lowess, squeezeVar/fitFDist(Robustly), voom + lmFit + eBayes) against limma 3.54.1 / R 4.2.2,
and dream (voom_limma with random terms)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import null_pseudobulk, read_reference_table, reference_pseudobulk, unit_contrast
from scipy import stats
from threadpoolctl import threadpool_limits

from scmlm.models import (
    dream,
    filter_by_expr,
    fit_f_dist,
    fit_f_dist_robustly,
    intercept_term,
    lowess,
    squeeze_var,
    tmm_factors,
    voom_limma,
)

# ---------------------------------------------------------------------------------------------------------------------
# against limma
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["between", "within"])
def limma_case(request, sim_between, sim_within):
    scenario = request.param
    adata = sim_between if scenario == "between" else sim_within
    counts, X, names, _ = reference_pseudobulk(adata, scenario)
    ref = read_reference_table(f"sim_{scenario}_small", "pb_limma_voom").reindex(adata.var_names)
    keep = filter_by_expr(counts, design=X)
    y = counts[keep]
    with threadpool_limits(1):
        res = voom_limma(y, X, unit_contrast(names), norm_factors=tmm_factors(y))
    return keep, ref, res


def test_voom_limma_matches_limma(limma_case):
    keep, ref, res = limma_case
    assert np.array_equal(keep, ref["logFC"].notna().to_numpy())
    r = ref[keep]
    coef_ref, se_ref, p_ref = (r[c].to_numpy() for c in ("logFC", "se", "pvalue"))
    # the criteria
    assert stats.spearmanr(res.pvalue, p_ref)[0] >= 0.99
    assert np.corrcoef(res.coef, coef_ref)[0, 1] >= 0.995
    assert np.corrcoef(res.se, se_ref)[0, 1] >= 0.995
    # near-exact
    assert np.max(np.abs(res.coef - coef_ref)) < 1e-8
    assert np.max(np.abs(res.se / se_ref - 1)) < 1e-8
    assert np.max(np.abs(res.pvalue / p_ref - 1)) < 1e-6


def test_voom_limma_outputs(limma_case):
    keep, _, res = limma_case
    g = int(keep.sum())
    assert res.weights.shape[0] == g and np.all(res.weights > 0)
    assert res.converged.all()
    np.testing.assert_allclose(res.pvalue, 2 * stats.t.sf(np.abs(res.stat), res.df))
    np.testing.assert_allclose(res.stat, res.coef / res.se, rtol=1e-10)


def test_lowess_matches_r():
    # R 4.2.2: x <- (1:25)^1.3/3; y <- sin(x) + ((1:25) %% 3)/2; lowess(x, y, f = 0.5)$y
    expected = [
        1.41593561995227, 1.26712272584441, 1.0950751783682, 0.910482672212292, 0.7233005438051,
        0.53984233772, 0.343150246286806, 0.329157824080741, 0.384219464643728, 0.454400683466401,
        0.515645423048285, 0.517199225262084, 0.509512423104438, 0.536686951703838, 0.56239000083331,
        0.569475626865252, 0.564843386738248, 0.557165166846805, 0.587993213581158, 0.648261406974013,
        0.687937268261004, 0.695585230728507, 0.706618407309152, 0.732648309744326, 0.771695196661808,
    ]  # fmt: skip
    i = np.arange(1, 26)
    x = i**1.3 / 3
    _, fit = lowess(x, np.sin(x) + (i % 3) / 2, f=0.5)
    np.testing.assert_allclose(fit, expected, rtol=1e-12)


def test_empirical_bayes_matches_limma():
    # R 4.2.2, limma 3.54.1:
    #   i <- 1:60; x <- exp(sin(i)*1.5 + cos(i*0.7)); x[7] <- x[7]*40
    #   df1 <- rep(c(4,4,4,3), 15); cov <- log(i) + cos(i)/3
    #   fitFDistRobustly(x, df1, covariate = cov); fitFDist(x, df1); squeezeVar(x, df1, covariate = cov, robust = TRUE)
    i = np.arange(1, 61)
    x = np.exp(np.sin(i) * 1.5 + np.cos(i * 0.7))
    x[6] *= 40
    df1 = np.tile([4.0, 4.0, 4.0, 3.0], 15)
    cov = np.log(i) + np.cos(i) / 3
    pick = [0, 6, 29, 59]
    scale, df2, shrunk = fit_f_dist_robustly(x, df1, cov)
    np.testing.assert_allclose(df2, 2.22467620504, rtol=1e-9)
    np.testing.assert_allclose(scale[pick], [2.56783658725, 0.780742875408, 0.834538390721, 0.86715352335], rtol=1e-9)
    np.testing.assert_allclose(shrunk[pick], [2.22467620504, 1.10652773947, 2.22467620504, 2.22467620504], rtol=1e-9)
    np.testing.assert_allclose(fit_f_dist(x, df1), (0.880958804647, 2.31086988865), rtol=1e-9)
    post = squeeze_var(x, df1, cov, robust=True)[2]
    np.testing.assert_allclose(post[pick], [5.79615626901, 101.323411399, 0.382676468631, 0.612895399885], rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# contrasts and calibration
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def between_counts(sim_between):
    counts, X, names, donors = reference_pseudobulk(sim_between, "between")
    y = counts[filter_by_expr(counts, design=X)]
    return y, X, names, tmm_factors(y)


def test_contrasts(between_counts):
    y, X, names, nf = between_counts
    base = voom_limma(y, X, unit_contrast(names), norm_factors=nf)
    scaled = voom_limma(y, X, 3 * unit_contrast(names), norm_factors=nf)
    np.testing.assert_allclose(scaled.pvalue, base.pvalue, rtol=1e-10)
    np.testing.assert_allclose(scaled.coef, 3 * base.coef, rtol=1e-10)
    L = np.zeros((len(names), 2))
    L[names.index("batchbatch1"), 0] = L[names.index("batchbatch2"), 1] = 1.0
    two = voom_limma(y, X, L, norm_factors=nf)
    one = voom_limma(y, X, L[:, 0], norm_factors=nf)
    assert two.df1 == 2 and two.coef.shape == (y.shape[0], 2)
    np.testing.assert_allclose(two.coef[:, 0], one.coef)
    # an F test on a contrast and on the same contrast re-mixed (L @ B, B invertible) agree up to limma's
    # approximation: eBayes' F correlates the moderated t statistics with the unweighted design's cov.coefficients,
    # not each gene's voom-weighted one (tests/test_contrasts.py matches R's F to 1e-12)
    mixed = voom_limma(y, X, L @ np.array([[1.0, 1.0], [0.0, 2.0]]), norm_factors=nf)
    rel = np.abs(mixed.stat / two.stat - 1)
    assert np.median(rel) < 0.02 and rel.max() < 0.3, (np.median(rel), rel.max())
    assert rel.max() > 1e-6  # the weights do vary: not the exact Wald F
    assert np.all((two.pvalue > 0) & (two.pvalue <= 1))


@pytest.mark.parametrize("design", ["between", "within"])
def test_voom_calibrated_on_null(design):
    counts, X, names, _ = null_pseudobulk(design, seed=11)
    keep = filter_by_expr(counts, design=X)
    y = counts[keep]
    assert y.shape[0] >= 2000
    with threadpool_limits(1):
        res = voom_limma(y, X, unit_contrast(names), norm_factors=tmm_factors(y))
    frac = float(np.mean(res.pvalue < 0.05))
    assert 0.03 <= frac <= 0.065, frac


# ---------------------------------------------------------------------------------------------------------------------
# dream (random terms)
# ---------------------------------------------------------------------------------------------------------------------


def test_dream_within_donor_design(sim_within):
    """``~ condition + (1|donor)`` on the within-donor pseudobulk: estimates close to limma's donor-fixed-effect fit
    (the condition contrast is within donors, so both designs estimate it from the same differences)."""
    counts, X, names, donors = reference_pseudobulk(sim_within, "within")
    keep = filter_by_expr(counts, design=X)
    y = counts[keep][:80]
    nf = tmm_factors(counts[keep])
    Xf = X[:, [0, names.index("conditioncase")]]
    term = intercept_term("donor", np.unique(donors, return_inverse=True)[1])
    with threadpool_limits(1):
        fixed = voom_limma(y, X, unit_contrast(names), norm_factors=nf)
        mixed = voom_limma(y, Xf, np.array([0.0, 1.0]), norm_factors=nf, terms=(term,))
    assert mixed.converged.mean() > 0.95
    ok = mixed.converged
    assert np.corrcoef(mixed.coef[ok], fixed.coef[ok])[0, 1] > 0.98
    assert np.all((mixed.pvalue[ok] > 0) & (mixed.pvalue[ok] <= 1))
    # Satterthwaite df lie between the within-donor residual df and the total residual df
    assert np.all(mixed.df[ok] > 3) and np.all(mixed.df[ok] <= X.shape[0] - 2 + 1e-6)
    assert set(mixed.var_components) == {"donor"}
    assert mixed.weights.shape == y.shape and np.all(mixed.weights > 0)


def test_dream_null_with_three_level_random_batch_is_calibrated():
    """12 samples in 3 batches (condition unbalanced within batch), ``~ condition + (1|batch)``, no true effect:
    dream's default (Kenward–Roger below 20 samples) gives p < 0.05 for 0.0485 of ~2,000 genes on these data;
    Satterthwaite df with the unadjusted SE gave 0.0585."""
    rng = np.random.default_rng(1)
    G, n = 2000, 12
    batch = np.repeat([0, 1, 2], 4)
    cond = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0], float)
    X = np.column_stack([np.ones(n), cond])
    lib = rng.uniform(0.5e6, 2e6, n)
    mu = np.exp(rng.normal(-9, 1.5, G))[:, None] * lib[None] * np.exp(rng.normal(0, 0.5, (G, 3))[:, batch])
    counts = rng.negative_binomial(10, 10 / (10 + mu))
    counts = counts[(counts / lib * 1e6 > 1).sum(axis=1) >= 4]
    with threadpool_limits(1):
        r = dream(counts, X, np.array([0.0, 1.0]), (intercept_term("batch", batch),), lib)
    ok = r.converged
    assert ok.mean() > 0.99
    frac = np.mean(r.pvalue[ok] < 0.05)
    print(f"dream null: {ok.sum()} genes, fraction p<0.05 = {frac:.4f}, median df {np.median(r.df[ok]):.2f}")
    assert 0.035 <= frac <= 0.06
    assert np.all(r.df[ok] < n - 2)
