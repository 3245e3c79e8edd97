"""Precision-weighted LMM (REML) and Satterthwaite df: against statsmodels MixedLM, dense GLS / REML formulas,
numerical derivatives and the balanced one-way closed form."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from threadpoolctl import threadpool_limits

from scmlm.models import RandomTerm, build_Z, fit_weighted_lmm, intercept_term


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def crossed_data(seed=1, n=48, sd_donor=1.0, sd_batch=0.6):
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, 9, n)
    batch = rng.integers(0, 4, n)
    x = rng.normal(size=n)
    cond = (donor % 2).astype(float)
    X = np.column_stack([np.ones(n), cond, x])
    y = X @ [1.0, 0.4, 0.3] + rng.normal(0, sd_donor, 9)[donor] + rng.normal(0, sd_batch, 4)[batch]
    w = rng.uniform(0.3, 3.0, n)
    y = y + rng.normal(0, 1, n) / np.sqrt(w)
    return y, X, donor, batch, x, w


def test_random_intercept_matches_statsmodels():
    rng = np.random.default_rng(7)
    sizes = rng.integers(2, 8, 10)
    groups = np.repeat(np.arange(10), sizes)
    n = groups.size
    x = rng.normal(size=n)
    g_cov = rng.normal(size=10)[groups]
    y = 0.5 + 0.8 * x - 0.3 * g_cov + rng.normal(0, 0.9, 10)[groups] + rng.normal(0, 0.6, n)
    X = np.column_stack([np.ones(n), x, g_cov])
    res = fit_weighted_lmm(y, X, (intercept_term("g", groups),), None, np.array([0.0, 1.0, 0.0]))
    d = pd.DataFrame({"y": y, "x": x, "gc": g_cov, "g": groups})
    sm = smf.mixedlm("y ~ x + gc", d, groups=d["g"]).fit(reml=True)
    np.testing.assert_allclose(res.beta[0], sm.fe_params.to_numpy(), atol=1e-5)
    # statsmodels takes SEs from the observed information of all parameters; lme4/lmerTest (and we) use
    # sigma² (X'V⁻¹X)⁻¹ at the estimates (checked exactly against dense GLS below), so they differ slightly
    np.testing.assert_allclose(np.sqrt(np.diag(res.vcov_beta[0])), sm.bse_fe.to_numpy(), rtol=3e-3)
    np.testing.assert_allclose(res.var_components["g"][0], float(sm.cov_re.iloc[0, 0]), rtol=1e-4)
    np.testing.assert_allclose(res.sigma2[0], sm.scale, rtol=1e-5)
    assert res.converged[0] and res.status[0] == "ok"


def test_random_slope_matches_statsmodels():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(12), 6)
    n = groups.size
    x = rng.normal(size=n)
    b0 = rng.normal(0, 1.0, 12)
    b1 = 0.5 * b0 + rng.normal(0, 0.5, 12)
    y = 1.0 + 0.7 * x + b0[groups] + b1[groups] * x + rng.normal(0, 0.5, n)
    X = np.column_stack([np.ones(n), x])
    term = RandomTerm(
        name="g", codes=groups, n_levels=12, covariates=np.column_stack([np.ones(n), x]),
        col_names=("(Intercept)", "x"), correlated=True,
    )  # fmt: skip
    res = fit_weighted_lmm(y, X, (term,), None, np.array([0.0, 1.0]))
    d = pd.DataFrame({"y": y, "x": x, "g": groups})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = smf.mixedlm("y ~ x", d, groups=d["g"], re_formula="~x").fit(reml=True, method=["lbfgs"])
    np.testing.assert_allclose(res.beta[0], sm.fe_params.to_numpy(), atol=1e-4)
    np.testing.assert_allclose(
        [res.var_components["g"][0], res.var_components["g:x"][0]], np.diag(sm.cov_re.to_numpy()), rtol=2e-3
    )
    np.testing.assert_allclose(res.sigma2[0], sm.scale, rtol=1e-3)


def dense_V(X, Z_blocks, w, sigma2, variances):
    V = sigma2 * np.diag(1.0 / w)
    for Zt, v in zip(Z_blocks, variances, strict=True):
        V = V + v * Zt @ Zt.T
    return V


def test_weighted_fit_agrees_with_dense_gls_and_reml():
    y, X, donor, batch, _, w = crossed_data()
    terms = (intercept_term("donor", donor), intercept_term("batch", batch))
    res = fit_weighted_lmm(y, X, terms, w, np.array([0.0, 1.0, 0.0]))
    assert res.converged[0]
    Z = build_Z(terms, y.size).toarray()
    blocks = [Z[:, :9], Z[:, 9:]]
    V = dense_V(X, blocks, w, res.sigma2[0], [res.var_components["donor"][0], res.var_components["batch"][0]])
    Vi = np.linalg.inv(V)
    C = np.linalg.inv(X.T @ Vi @ X)
    beta = C @ X.T @ Vi @ y
    np.testing.assert_allclose(res.beta[0], beta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.vcov_beta[0], C, rtol=1e-8, atol=1e-12)
    # REML deviance: lme4's profiled criterion equals the dense one up to log|W^-1|
    n, p = X.shape
    P = Vi - Vi @ X @ C @ X.T @ Vi
    dense = n * 0 + (n - p) * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + np.linalg.slogdet(X.T @ Vi @ X)[1]
    dense += y @ P @ y
    np.testing.assert_allclose(res.reml_deviance[0] - np.sum(np.log(w)), dense, rtol=1e-10)
    # optimality: moving either variance component increases the dense REML deviance
    for k, factor in ((0, 1.1), (0, 0.9), (1, 1.2), (1, 0.8)):
        comps = [res.var_components["donor"][0], res.var_components["batch"][0]]
        comps[k] *= factor
        Vk = dense_V(X, blocks, w, res.sigma2[0], comps)
        Vki = np.linalg.inv(Vk)
        Ck = np.linalg.inv(X.T @ Vki @ X)
        Pk = Vki - Vki @ X @ Ck @ X.T @ Vki
        devk = (n - p) * np.log(2 * np.pi) + np.linalg.slogdet(Vk)[1] + np.linalg.slogdet(X.T @ Vki @ X)[1]
        assert devk + y @ Pk @ y > dense


def test_weights_are_precisions():
    y, X, donor, batch, _, w = crossed_data(seed=3)
    terms = (intercept_term("donor", donor),)
    L = np.array([0.0, 1.0, 0.0])
    a = fit_weighted_lmm(y, X, terms, w, L)
    b = fit_weighted_lmm(y, X, terms, 4.0 * w, L)  # Var(e_i) = sigma² / w_i: only sigma² rescales
    np.testing.assert_allclose(b.beta, a.beta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.stat, a.stat, rtol=1e-6)
    np.testing.assert_allclose(b.sigma2, 4.0 * a.sigma2, rtol=1e-6)
    np.testing.assert_allclose(b.var_components["donor"], a.var_components["donor"], rtol=1e-5)


def test_satterthwaite_balanced_one_way_closed_form():
    rng = np.random.default_rng(5)
    k, m = 7, 4
    groups = np.repeat(np.arange(k), m)
    trait = rng.normal(size=k)[groups]
    y = 2.0 + 0.5 * trait + rng.normal(0, 1.0, k)[groups] + rng.normal(0, 0.7, k * m)
    X = np.column_stack([np.ones(k * m), trait])
    res = fit_weighted_lmm(y, X, (intercept_term("g", groups),), None, np.array([0.0, 1.0]))
    # a between-group effect in a balanced one-way layout: df = groups - between-group coefficients
    np.testing.assert_allclose(res.df[0], k - 2, rtol=1e-5)
    res0 = fit_weighted_lmm(y, X[:, :1], (intercept_term("g", groups),), None, np.array([1.0]))
    np.testing.assert_allclose(res0.df[0], k - 1, rtol=1e-5)


def test_satterthwaite_matches_numerical_derivatives():
    y, X, donor, batch, _, w = crossed_data(seed=8, sd_donor=1.2, sd_batch=0.9)
    terms = (intercept_term("donor", donor), intercept_term("batch", batch))
    ell = np.array([0.0, 1.0, -0.5])
    res = fit_weighted_lmm(y, X, terms, w, ell)
    psi = np.array([res.sigma2[0], res.var_components["donor"][0], res.var_components["batch"][0]])
    assert np.all(psi > 1e-3)
    Z = build_Z(terms, y.size).toarray()
    blocks = [Z[:, :9], Z[:, 9:]]

    def parts(ps):
        V = dense_V(X, blocks, w, ps[0], ps[1:])
        Vi = np.linalg.inv(V)
        C = np.linalg.inv(X.T @ Vi @ X)
        P = Vi - Vi @ X @ C @ X.T @ Vi
        loglik = -0.5 * (np.linalg.slogdet(V)[1] + np.linalg.slogdet(X.T @ Vi @ X)[1] + y @ P @ y)
        return loglik, float(ell @ C @ ell)

    h = 1e-4 * psi
    k = psi.size
    H = np.empty((k, k))
    grad = np.empty(k)
    for i in range(k):
        ei = np.zeros(k)
        ei[i] = h[i]
        grad[i] = (parts(psi + ei)[1] - parts(psi - ei)[1]) / (2 * h[i])
        for j in range(k):
            ej = np.zeros(k)
            ej[j] = h[j]
            H[i, j] = (
                parts(psi + ei + ej)[0] - parts(psi + ei - ej)[0] - parts(psi - ei + ej)[0] + parts(psi - ei - ej)[0]
            ) / (4 * h[i] * h[j])
    A = np.linalg.inv(-H)
    v = parts(psi)[1]
    df_num = 2 * v**2 / (grad @ A @ grad)
    np.testing.assert_allclose(res.df[0], df_num, rtol=1e-3)
    np.testing.assert_allclose(res.se[0] ** 2, v, rtol=1e-8)


def lmertest_data():
    rng = np.random.default_rng(5)
    n = 40
    donor = rng.integers(0, 8, n)
    batch = rng.integers(0, 3, n)
    x = rng.normal(size=n)
    cond = (donor % 2).astype(float)
    w = rng.uniform(0.3, 3, n)
    y = 1 + 0.4 * cond + 0.3 * x + rng.normal(0, 0.8, 8)[donor] + rng.normal(0, 0.5, 3)[batch]
    y = y + rng.normal(0, 1, n) / np.sqrt(w)
    return y, np.column_stack([np.ones(n), cond, x]), donor, batch, x, w


def test_matches_lmertest():
    """R 4.2.2, lme4 1.1-31, lmerTest 3.1-3, on these data written to CSV (donor, batch as factors):
    m <- lmer(y ~ cond + x + (1|donor) + (1|batch), d, weights = w, REML = TRUE)
    summary(m)$coefficients["cond", ]: -0.8846151 0.6372170 df 6.011914, p 0.214317240; VarCorr donor 0.6661633,
    batch 0 (singular), residual 0.9724043
    contest(m, rbind(c(0,1,0), c(0,0,1))): F 6.534241, DenDF 9.133458, p 0.01731244
    m2 <- lmer(y ~ cond + x + (1 + x|donor), d, weights = w, REML = TRUE)
    summary(m2)$coefficients["x", ]: 0.4643309 0.1661197 df 5.290963; VarCorr 0.68517672, 0.05331528, resid 0.88828053
    """
    y, X, donor, batch, x, w = lmertest_data()
    terms = (intercept_term("donor", donor), intercept_term("batch", batch))
    a = fit_weighted_lmm(y, X, terms, w, np.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose([a.coef[0], a.se[0], a.pvalue[0]], [-0.8846151, 0.6372170, 0.214317240], rtol=2e-6)
    np.testing.assert_allclose(a.df[0], 6.011914, rtol=2e-6)
    np.testing.assert_allclose(a.var_components["donor"][0], 0.6661633, rtol=1e-5)
    assert a.var_components["batch"][0] < 1e-8
    np.testing.assert_allclose(a.sigma2[0], 0.9724043, rtol=1e-6)
    L = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).T
    f = fit_weighted_lmm(y, X, terms, w, L)
    np.testing.assert_allclose([f.stat[0], f.df[0], f.pvalue[0]], [6.534241, 9.133458, 0.01731244], rtol=2e-6)
    assert f.df1 == 2 and f.coef.shape == (1, 2) and np.isnan(f.se).all()
    slope = RandomTerm(
        name="donor", codes=donor, n_levels=8, covariates=np.column_stack([np.ones(x.size), x]),
        col_names=("(Intercept)", "x"), correlated=True,
    )  # fmt: skip
    s = fit_weighted_lmm(y, X, (slope,), w, np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose([s.coef[0], s.se[0], s.df[0]], [0.4643309, 0.1661197, 5.290963], rtol=5e-6)
    np.testing.assert_allclose(
        [s.var_components["donor"][0], s.var_components["donor:x"][0], s.sigma2[0]],
        [0.68517672, 0.05331528, 0.88828053],
        rtol=5e-5,
    )


def test_multi_column_contrast_f_statistic_is_invariant():
    y, X, donor, batch, _, w = crossed_data(seed=4)
    terms = (intercept_term("donor", donor), intercept_term("batch", batch))
    L = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).T
    a = fit_weighted_lmm(y, X, terms, w, L)
    b = fit_weighted_lmm(y, X, terms, w, L @ np.array([[2.0, 1.0], [0.0, 1.0]]))
    # the F statistic is invariant to re-mixing the contrast columns; lmerTest's df (averaged over the
    # eigen-directions of L'CL) is not, so only the statistic is compared
    np.testing.assert_allclose(b.stat, a.stat, rtol=1e-6)
    assert 0 < a.pvalue[0] <= 1
    np.testing.assert_allclose(a.coef[0], a.beta[0, 1:], rtol=1e-12)


def test_batch_of_genes_with_failures_reports_status():
    y, X, donor, batch, _, w = crossed_data(seed=2)
    Y = np.vstack([y, np.full_like(y, np.nan), y * 2 + 1])
    W = np.vstack([w, w, w])
    W[2, 0] = 0.0
    res = fit_weighted_lmm(Y, X, (intercept_term("donor", donor),), W, np.array([0.0, 1.0, 0.0]))
    assert res.status[0] == "ok" and res.converged[0]
    assert not res.converged[1] and "non-finite" in res.status[1]
    assert not res.converged[2] and "weight" in res.status[2]
    assert np.isnan(res.pvalue[1]) and np.isfinite(res.pvalue[0])


# ---------------------------------------------------------------------------------------------------------------------
# Kenward-Roger (dream below 20 samples) against lmerTest / pbkrtest
# ---------------------------------------------------------------------------------------------------------------------


def _kr_fixture():
    from helpers import REFERENCE

    base = REFERENCE / "dream_kr"
    E = pd.read_csv(base / "logcpm.csv", index_col="gene")
    W = pd.read_csv(base / "weights.csv", index_col="gene")
    s = pd.read_csv(base / "samples.csv", index_col="sample")
    ref = pd.read_csv(base / "lmer_kr.csv", index_col="gene")
    assert list(E.columns) == list(s.index) == list(W.columns)
    X = np.column_stack([np.ones(len(s)), (s["condition"] == "case").to_numpy(float)])
    return E.to_numpy(), W.to_numpy(), X, pd.Categorical(s["batch"]).codes.astype(int), ref


def test_kenward_roger_matches_lmertest():
    """dream's per-gene model on 12 pseudobulk samples with a 3-level random batch and voom weights: coef, SE
    (pbkrtest's adjusted covariance), df and p against ``summary(lmer(..., weights = w), ddf = "Kenward-Roger")``
    fitted in the equivalent unweighted form (``tests/data/reference/R/run_lmer_kr.R``)."""
    E, W, X, batch, ref = _kr_fixture()
    r = fit_weighted_lmm(E, X, (intercept_term("batch", batch),), W, np.array([0.0, 1.0]), ddf="kenward-roger")
    assert r.converged.all()
    np.testing.assert_allclose(r.coef, ref["coef"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.se, ref["se"], rtol=1e-4)
    np.testing.assert_allclose(r.df, ref["df"], rtol=1e-5)
    np.testing.assert_allclose(r.pvalue, ref["p"], rtol=1e-4)
    np.testing.assert_allclose(r.var_components["batch"], ref["var_batch"], rtol=1e-3, atol=1e-6)
    # pbkrtest 0.5.2 on the weighted lmer call leaves the weights out of its covariance: df of 100+ with 12 samples
    assert (ref["df_naive"] > 20).any() and (r.df < 12).all()


def test_kenward_roger_equals_satterthwaite_in_a_balanced_one_way_layout():
    """Balanced one-way random effects, contrast on a between-group covariate: both give k - 2 df, and KR's adjusted
    variance equals the unadjusted one (no small-sample bias to correct in this layout)."""
    rng = np.random.default_rng(5)
    k, m = 8, 4
    groups = np.repeat(np.arange(k), m)
    X = np.column_stack([np.ones(k * m), (groups % 2).astype(float)])
    y = X @ [1.0, 0.5] + rng.normal(0, 1.0, k)[groups] + rng.normal(0, 0.7, k * m)
    terms = (intercept_term("g", groups),)
    kr = fit_weighted_lmm(y, X, terms, None, np.array([0.0, 1.0]), ddf="kenward-roger")
    sat = fit_weighted_lmm(y, X, terms, None, np.array([0.0, 1.0]))
    np.testing.assert_allclose(kr.df[0], k - 2, rtol=1e-6)
    np.testing.assert_allclose(kr.se[0], sat.se[0], rtol=1e-6)
    np.testing.assert_allclose(kr.pvalue[0], sat.pvalue[0], rtol=1e-6)


def test_batched_single_term_fit_equals_gene_by_gene():
    """The vectorised golden-section path for one random intercept gives the per-gene optimiser's answer."""
    from scmlm.models.dream import _fit_gene, _LambdaMap

    E, W, X, batch, _ = _kr_fixture()
    terms = (intercept_term("batch", batch),)
    L = np.array([0.0, 1.0])
    r = fit_weighted_lmm(E, X, terms, W, L)
    Z = build_Z(terms, X.shape[0]).toarray()
    for i in range(0, E.shape[0], 7):
        one = _fit_gene(E[i], X, Z, W[i], terms, _LambdaMap(terms), L[:, None])
        np.testing.assert_allclose(r.reml_deviance[i], one["dev"], rtol=1e-9)
        np.testing.assert_allclose(r.coef[i], one["est"][0], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(r.df[i], one["df"], rtol=1e-4)
        np.testing.assert_allclose(r.fitted[i], one["fitted"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.sigma2[i], one["sigma2"], rtol=1e-5)


def test_kenward_roger_matches_lmertest_two_random_terms():
    """The gene-by-gene path (two random intercepts, batch variance on the boundary) and the batched one-term path.
    R 4.2.2, lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2, on ``lmertest_data()`` in the weighted model's unweighted
    form (``ys = sqrt(w) y``, ``x0, x1, x2 = sqrt(w) X``):
    m <- lmer(ys ~ 0 + x0 + x1 + x2 + (0 + sw | donor) + (0 + sw | batch), d, REML = TRUE)
    summary(m, ddf = "Kenward-Roger"): x1 -0.8846150514 0.6447502974 df 5.841045654 p 0.220413349406;
    x2 0.4623397886 0.1489286593 df 32.821293117 p 0.003910080450
    m1 (donor only): x1 -0.8846151035 0.6394379501 df 5.842707676 p 0.217070800953;
    x2 0.4623397582 0.1450071868 df 33.517223658 p 0.003095645224
    """
    y, X, donor, batch, x, w = lmertest_data()
    two = (intercept_term("donor", donor), intercept_term("batch", batch))
    one = (intercept_term("donor", donor),)
    expected = {
        (2, 1): [-0.8846150514, 0.6447502974, 5.841045654, 0.220413349406],
        (2, 2): [0.4623397886, 0.1489286593, 32.821293117, 0.003910080450],
        (1, 1): [-0.8846151035, 0.6394379501, 5.842707676, 0.217070800953],
        (1, 2): [0.4623397582, 0.1450071868, 33.517223658, 0.003095645224],
    }
    for (nterms, col), ref in expected.items():
        L = np.eye(3)[col]
        r = fit_weighted_lmm(y, X, two if nterms == 2 else one, w, L, ddf="kenward-roger")
        np.testing.assert_allclose([r.coef[0], r.se[0], r.df[0], r.pvalue[0]], ref, rtol=2e-6)
