"""edgeR kernels (filterByExpr, TMM, estimateDisp + glmQLFit(robust) + glmQLFTest) against edgeR 3.40.2 outputs.

The reference tables in ``tests/data/reference/sim_*_small/pb_edgeR_QL.csv`` were written by
``tests/data/reference/R/run_pseudobulk.R``; pseudobulk counts are rebuilt here with numpy exactly as that script
does (sum per donor, or per donor × condition; samples ordered by sorted key; design ``~ batch + condition`` or
``~ donor + condition`` with sorted factor levels and ``ctrl`` as the reference condition).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from helpers import REFERENCE, null_pseudobulk, read_reference_table, reference_pseudobulk, unit_contrast
from scipy import stats
from threadpoolctl import threadpool_limits

from scmlm.models import filter_by_expr, fit_f_dist_robustly, nb_ql, tmm_factors
from scmlm.models.edger import fit_nb_glm
from scmlm.models.edger.dispersion import _locfit_deg0, _maximize_interpolant
from scmlm.models.edger.tmm import _average_rank

# ---------------------------------------------------------------------------------------------------------------------
# helpers shared with test_models_limma.py (kept local: test modules do not import each other)
# ---------------------------------------------------------------------------------------------------------------------


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {
        "max_abs": float(np.max(np.abs(ours - ref))),
        "max_rel": float(np.max(np.abs(ours / ref - 1))),
        "pearson": float(np.corrcoef(ours, ref)[0, 1]),
        "spearman": float(stats.spearmanr(ours, ref)[0]),
    }


# ---------------------------------------------------------------------------------------------------------------------
# against edgeR
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["between", "within"])
def edger_case(request, sim_between, sim_within):
    scenario = request.param
    adata = sim_between if scenario == "between" else sim_within
    counts, X, names, _ = reference_pseudobulk(adata, scenario)
    ref = read_reference_table(f"sim_{scenario}_small", "pb_edgeR_QL").reindex(adata.var_names)
    keep = filter_by_expr(counts, design=X)
    y = counts[keep]
    with threadpool_limits(1):
        res = nb_ql(y, X, unit_contrast(names), norm_factors=tmm_factors(y))
    return scenario, adata.var_names.to_numpy(), keep, ref, res


def test_filter_by_expr_keeps_the_genes_edger_tested(edger_case):
    _, genes, keep, ref, _ = edger_case
    tested = ref["logFC"].notna().to_numpy()
    assert 0 < keep.sum() < keep.size
    assert np.array_equal(keep, tested), f"differ on {genes[keep != tested].tolist()}"


def test_filter_by_expr_matches_limma_voom_gene_set(sim_between, sim_within):
    for name, adata, scenario in (
        ("sim_between_small", sim_between, "between"),
        ("sim_within_small", sim_within, "within"),
    ):
        counts, X, _, _ = reference_pseudobulk(adata, scenario)
        ref = read_reference_table(name, "pb_limma_voom").reindex(adata.var_names)
        assert np.array_equal(filter_by_expr(counts, design=X), ref["logFC"].notna().to_numpy())


def test_nb_ql_matches_edger(edger_case):
    scenario, _, keep, ref, res = edger_case
    r = ref[keep]
    coef = agreement(res.coef, r["logFC"].to_numpy())
    pval = agreement(res.pvalue, r["pvalue"].to_numpy())
    # the criteria
    assert pval["spearman"] >= 0.99
    assert coef["pearson"] >= 0.995
    # near-exact: same method as edgeR, differences only from convergence tolerances (measured: coefficients
    # 3.8e-14 (between) and 3.0e-9 (within) apart, p-values 1.4e-6 and 2.1e-7 relative)
    assert coef["max_abs"] < 5e-9, coef
    assert pval["max_rel"] < 2e-6, pval
    assert res.converged.all()
    assert np.all(res.df1 == 1)
    assert np.all(res.df2 > res.df1)


def test_nb_ql_outputs_are_consistent(edger_case):
    _, _, _, _, res = edger_case
    n = res.pvalue.size
    for field in ("coef", "se", "stat", "df2", "pvalue", "dispersion", "trended_dispersion", "s2_post", "df_prior"):
        arr = getattr(res, field)
        assert arr.shape == (n,)
        assert np.all(np.isfinite(arr)), field
    assert np.all((res.pvalue > 0) & (res.pvalue <= 1))
    assert np.all(res.dispersion > 0) and np.all(res.trended_dispersion > 0) and res.common_dispersion > 0
    # F p-values follow from stat, df1, df2 (the Poisson bound can only raise them)
    assert np.all(res.pvalue >= stats.f.sf(res.stat, res.df1, res.df2) - 1e-12)
    # a 1-df QL Wald z from coef/se tracks the F statistic
    assert stats.spearmanr((res.coef / res.se) ** 2, res.stat)[0] > 0.95


def test_nb_ql_matches_edger_with_infinite_prior_df():
    """A paired null (6 donors × 2 conditions, ``~ donor + condition``) where ``glmQLFit(robust = TRUE)`` gives
    ``df.prior = Inf`` for every tested gene, some of them with reduced residual df (zero fitted values): the robust
    prior then sits in limma's infinite-df branch, whose F tail functions are the chi-square limit."""
    base = REFERENCE / "paired_null_edger"
    counts = pd.read_csv(base / "counts.csv", index_col="gene")
    samples = pd.read_csv(base / "samples.csv", index_col="sample")
    ref = pd.read_csv(base / "pb_edgeR_QL.csv", index_col="gene")
    assert list(samples.index) == list(counts.columns)
    donor = samples["donor"].astype(str).to_numpy()
    levels = np.unique(donor)
    X = np.column_stack(
        [np.ones(len(samples))]
        + [(donor == lev).astype(float) for lev in levels[1:]]
        + [(samples["condition"] == "case").to_numpy(float)]
    )
    Y = counts.to_numpy(float)
    keep = filter_by_expr(Y, design=X)
    assert np.array_equal(counts.index[keep], ref.index)
    y = Y[keep]
    with threadpool_limits(1):
        res = nb_ql(y, X, np.eye(X.shape[1])[-1], norm_factors=tmm_factors(y))
    assert np.isinf(ref["df_prior"]).mean() > 0.5  # the fixture exercises the infinite branch
    np.testing.assert_array_equal(np.isinf(res.df_prior), np.isinf(ref["df_prior"].to_numpy()))
    # measured: s2_post 2.6e-8 relative, coefficients 1.8e-9 apart, log10 p-values 1.1e-7 apart
    np.testing.assert_allclose(res.s2_post, ref["s2_post"], rtol=5e-8)
    np.testing.assert_allclose(res.coef, ref["logFC"], atol=3e-9)
    dlog = np.abs(np.log10(res.pvalue) - np.log10(ref["pvalue"].to_numpy()))
    assert dlog.max() < 2e-7, dlog.max()


def test_fit_f_dist_robustly_infinite_df_uses_the_chi_square_limit():
    """Residual variances less spread than scaled chi-square(df1)/df1 (quantiles of chi-square(8)/8 with df1 = 4,
    every 40th with df1 = 3): the prior df is infinite, and the variances with 3 residual df are mapped onto df1 = 4
    through the chi-square limit (scipy's F with df2 = inf gives NaN, which used to drop the robust fit back to the
    non-robust scale 0.79996). The expected scale is limma 3.54.1's
    ``fitFDistRobustly(0.8 * qchisq((1:2000 - 0.5) / 2000, 8) / 8, df1)``."""
    n = 2000
    df1 = np.full(n, 4.0)
    df1[::40] = 3.0
    x = 0.8 * stats.chi2.ppf((np.arange(n) + 0.5) / n, 8) / 8
    scale, df2, shrunk = fit_f_dist_robustly(x, df1)
    assert np.isinf(df2) and np.all(np.isinf(shrunk))
    np.testing.assert_allclose(scale, 0.916569936126578, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# building blocks, against independent computations
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_nb_glm_matches_statsmodels():
    rng = np.random.default_rng(3)
    n = 12
    X = np.column_stack([np.ones(n), rng.normal(size=n), np.repeat([0.0, 1.0], n // 2)])
    lib = rng.uniform(5e3, 2e4, n)
    phi = np.array([0.05, 0.3, 1.0, 0.01])
    beta_true = np.array([[-5.0, 0.3, 0.5], [-6.0, -0.2, 1.0], [-4.0, 0.0, -0.7], [-7.0, 0.1, 0.2]])
    mu = np.exp(beta_true @ X.T) * lib
    y = rng.negative_binomial(1 / phi[:, None], 1 / (1 + phi[:, None] * mu)).astype(float)
    fit = fit_nb_glm(y, X, np.log(lib), phi, tol=1e-12)
    for g in range(len(phi)):
        sm_fit = sm.GLM(y[g], X, family=sm.families.NegativeBinomial(alpha=phi[g]), offset=np.log(lib)).fit(tol=1e-12)
        np.testing.assert_allclose(fit.coef[g], sm_fit.params, atol=1e-6)
        np.testing.assert_allclose(fit.deviance[g], sm_fit.deviance, rtol=1e-6)
    assert not fit.failed.any()


def test_fit_nb_glm_zero_rows_and_zero_groups_do_not_fail():
    X = np.column_stack([np.ones(6), np.repeat([0.0, 1.0], 3)])
    y = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 5, 7, 6], [3, 4, 5, 6, 7, 8]], dtype=float)
    fit = fit_nb_glm(y, X, np.zeros(6), 0.1)
    assert np.all(np.isnan(fit.coef[0])) and fit.deviance[0] == 0
    assert np.all(fit.mu[1, :3] < 1e-4)  # fitted values of the all-zero group go to zero
    assert np.all(np.isfinite(fit.coef[2]))


def test_null_fit_of_an_on_off_gene_converges_from_edgers_start():
    """A gene without counts in one group: its full fit sends the intercept towards -inf. Started from that
    intercept, the null (intercept-only) fit overshoots to huge means and crawls back ~1 unit per iteration: a true
    failure within ``maxit``, reported as such. :func:`nb_ql` gives such genes edgeR's null start: converged, with a
    finite QL F-test p-value."""
    lib = np.array([7266, 6658, 6938, 7246, 8014, 7134, 6055, 7654.0])
    case = np.tile([0.0, 1.0], 4)
    X = np.column_stack([np.ones(8), case])
    y = np.array([[0, 296, 0, 310, 0, 333, 0, 278.0]])
    full = fit_nb_glm(y, X, np.log(lib), 0.15)
    assert not full.failed[0] and full.coef[0, 0] < -20 and np.all(full.mu[0, case == 0] < 1e-4)
    warm = fit_nb_glm(y, X[:, :1], np.log(lib), 0.15, start=full.coef[:, :1])
    assert warm.failed[0]
    null = fit_nb_glm(y, X[:, :1], np.log(lib), 0.15)
    assert not null.failed[0] and null.n_iter[0] < 10
    rng = np.random.default_rng(3)
    mu = rng.gamma(5.0, 40.0, size=(300, 1)) * lib / lib.mean()
    counts = rng.negative_binomial(10, 10 / (10 + mu)).astype(float)
    counts[:3] = 0.0
    counts[:3, case == 1] = [[27, 12, 20, 26], [296, 310, 333, 278], [440, 1200, 3215, 900]]
    res = nb_ql(counts, X, np.array([0.0, 1.0]))
    assert res.converged[:3].all() and np.all(res.pvalue[:3] < 1e-4)
    assert np.all(np.isfinite(res.coef[:3])) and np.all(res.coef[:3] > 3)
    assert res.converged.all()


def test_maximize_interpolant_is_exact_for_cubics():
    x = np.linspace(-10, 10, 21)
    peaks = np.array([-3.3, 0.0, 2.71, 7.9])
    # -(x - m)^2 (x + 20) / 40 has a local max at m and is a cubic: the FMM spline reproduces it exactly
    L = np.array([-((x - m) ** 2) * (x + 20) / 40 for m in peaks])
    np.testing.assert_allclose(_maximize_interpolant(x, L), peaks, atol=1e-10)


def test_locfit_deg0_matches_r_locfit():
    # R 4.2.2, locfit 1.5-9.7:
    #   x <- (1:25)^1.3/3; y <- sin(x) + ((1:25) %% 3)/2
    #   fitted(locfit(y ~ x, alpha = 0.6, deg = 0))
    expected = [
        0.725708302033706, 0.720176709387995, 0.713712308792354, 0.706556330622661, 0.698837777418758,
        0.666436725919546, 0.611378212045789, 0.553901581563189, 0.49785447138718, 0.475975863633714,
        0.453429991577145, 0.431406734555797, 0.486108019970749, 0.542087405966458, 0.58839681357297,
        0.578033866490438, 0.567474671390368, 0.556727390593219, 0.54579940772325, 0.534697439487413,
        0.542023468678073, 0.551893501127713, 0.561899086747029, 0.572036070286415, 0.582300592957759,
    ]  # fmt: skip
    i = np.arange(1, 26)
    x = i**1.3 / 3
    y = np.sin(x) + (i % 3) / 2
    m = _locfit_deg0(x, np.column_stack([y, np.full(25, 2.5)]), span=0.6)
    np.testing.assert_allclose(m[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(m[:, 1], 2.5)


def test_tmm_factors_properties():
    rng = np.random.default_rng(2)
    base = rng.negative_binomial(5, 5 / (5 + rng.lognormal(3, 1, 1000)[:, None]), size=(1000, 4)).astype(float)
    f = tmm_factors(base)
    assert np.isclose(np.exp(np.mean(np.log(f))), 1.0)
    # identical libraries give factors of 1
    np.testing.assert_allclose(tmm_factors(np.column_stack([base[:, 0]] * 3)), 1.0)
    # composition: doubling 10 % of genes in sample 2 makes its effective library larger than its size alone says,
    # so its TMM factor (the non-DE scaling) drops
    comp = base.copy()
    comp[:100, 1] *= 4
    f2 = tmm_factors(comp)
    assert f2[1] < f2[0] and f2[1] < f2[2]


def test_average_rank_matches_scipy_with_ties():
    rng = np.random.default_rng(4)
    a = np.log2(rng.poisson(5, 3000) + 1.0) - np.log2(rng.poisson(5, 3000) + 1.0)  # many ties
    np.testing.assert_array_equal(_average_rank(a), stats.rankdata(a))


def test_filter_by_expr_group_rules():
    lib = np.full(6, 1e6)
    y = np.array([[10, 10, 10, 0, 0, 0], [10, 10, 0, 0, 0, 0], [9, 9, 9, 9, 9, 9], [0, 0, 0, 0, 0, 16]], dtype=float)
    keep = filter_by_expr(y, lib, group=np.array([0, 0, 0, 1, 1, 1]))
    # CPM cutoff 10; needs 3 samples (smallest group) and a total of 15
    assert keep.tolist() == [True, False, False, False]
    X = np.column_stack([np.ones(6), np.repeat([0.0, 1.0], 3)])
    assert np.array_equal(filter_by_expr(y, lib, design=X), keep)  # 1/max(hat) = 3 here


# ---------------------------------------------------------------------------------------------------------------------
# contrasts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case(sim_between):
    counts, X, names, _ = reference_pseudobulk(sim_between, "between")
    y = counts[filter_by_expr(counts, design=X)]
    return y, X, names, tmm_factors(y)


def test_contrast_scaling_and_reparametrisation(small_case):
    y, X, names, nf = small_case
    with threadpool_limits(1):
        base = nb_ql(y, X, unit_contrast(names), norm_factors=nf)
        scaled = nb_ql(y, X, 2 * unit_contrast(names), norm_factors=nf)
        # batch1 - batch2 as a contrast, and as a coefficient of a reparametrised design
        L = np.zeros(len(names))
        L[names.index("batchbatch1")], L[names.index("batchbatch2")] = 1.0, -1.0
        as_contrast = nb_ql(y, X, L, norm_factors=nf)
        Xr = X.copy()
        Xr[:, names.index("batchbatch1")] = X[:, names.index("batchbatch1")] + X[:, names.index("batchbatch2")]
        # in Xr, column batchbatch1 is "batch1 or batch2" and batchbatch2 is "batch2 minus that": beta1' = beta1,
        # beta2' = beta2 - beta1, so -beta2' is the contrast
        as_coef = nb_ql(y, Xr, -unit_contrast(names, "batchbatch2"), norm_factors=nf)
    np.testing.assert_allclose(scaled.pvalue, base.pvalue, rtol=1e-8)
    np.testing.assert_allclose(scaled.coef, 2 * base.coef, rtol=1e-8)
    np.testing.assert_allclose(as_contrast.stat, as_coef.stat, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(as_contrast.coef, as_coef.coef, atol=1e-6)


def test_multi_column_contrast_is_an_f_test(small_case):
    y, X, names, nf = small_case
    L = np.zeros((len(names), 2))
    L[names.index("batchbatch1"), 0] = 1.0
    L[names.index("batchbatch2"), 1] = 1.0
    with threadpool_limits(1):
        res = nb_ql(y, X, L, norm_factors=nf)
        one = nb_ql(y, X, L[:, 0], norm_factors=nf)
    assert res.coef.shape == (y.shape[0], 2)
    np.testing.assert_allclose(res.coef[:, 0], one.coef, atol=1e-10)
    assert np.all(res.df1 == 2)
    assert np.all(np.isnan(res.se))
    assert np.all((res.pvalue > 0) & (res.pvalue <= 1))


# ---------------------------------------------------------------------------------------------------------------------
# calibration on null data
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("design", ["between", "within"])
def test_nb_ql_calibrated_on_null(design):
    counts, X, names, _ = null_pseudobulk(design, seed=11)
    keep = filter_by_expr(counts, design=X)
    y = counts[keep]
    assert y.shape[0] >= 2000
    with threadpool_limits(1):
        res = nb_ql(y, X, unit_contrast(names), norm_factors=tmm_factors(y))
    frac = float(np.mean(res.pvalue < 0.05))
    assert 0.03 <= frac <= 0.065, frac
