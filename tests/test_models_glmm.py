"""Cell-level GLMM kernel (scmlm.models.glmm): agreement with glmmTMB, statsmodels and direct computations."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import statsmodels.api as sm
import statsmodels.formula.api as smf
from helpers import read_reference_table
from scipy import optimize
from statsmodels.discrete.discrete_model import NegativeBinomial
from threadpoolctl import threadpool_limits

from scmlm.models import (
    RandomTerm,
    build_Z,
    contrast_df,
    cov_b,
    fit_glmm,
    get_family,
    glmm_contrast,
    glmm_lrt,
    intercept_term,
    prepare_glmm,
    satterthwaite_df,
)

N_REF_GENES = 60


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _codes(s: pd.Series) -> np.ndarray:
    return pd.Categorical(s).codes.astype(np.int64)


def _reference_model(adata, matched: bool):
    obs = adata.obs
    n = adata.n_obs
    case = (obs["condition"] == "case").to_numpy(float)
    donor = intercept_term("donor", _codes(obs["donor"]))
    batch = intercept_term("batch", _codes(obs["batch"]))
    between = obs.groupby("donor", observed=True)["condition"].nunique().max() == 1
    if not matched:
        return np.column_stack([np.ones(n), case]), [donor, batch]
    if between:
        B = pd.get_dummies(obs["batch"], drop_first=True).to_numpy(float)
        return np.column_stack([np.ones(n), case, B]), [donor]
    return np.column_stack([np.ones(n), case]), [donor]


# ----------------------------------------------------------------------------------------------------------------
# glmmTMB (nbinom2, Laplace ML)


@pytest.mark.parametrize("name", ["sim_between_small", "sim_within_small"])
@pytest.mark.parametrize("matched", [False, True], ids=["donor+batch", "matched"])
def test_nb_ml_matches_glmmtmb(name, matched, request):
    adata = request.getfixturevalue("sim_between" if "between" in name else "sim_within")
    ref = read_reference_table(name, "cell_glmmTMB_matched" if matched else "cell_glmmTMB")
    X, terms = _reference_model(adata, matched)
    counts = sp.csc_matrix(adata.X)
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    res = fit_glmm(counts[:, :N_REF_GENES], prepare_glmm(X, terms, offset, family="nb"), method="ML")
    L = np.zeros(X.shape[1])
    L[1] = 1.0
    con = glmm_contrast(res, L)
    ours = pd.DataFrame(
        {"coef": con.coef, "se": con.se, "phi": res.phi, "converged": res.converged}
        | {f"var_{k}": v for k, v in res.var.items()},
        index=adata.var_names[:N_REF_GENES],
    )
    both = ours.join(ref, rsuffix="_ref", how="inner")
    ok_ref = both["ok"].astype(bool)
    assert both.loc[ok_ref, "converged"].mean() >= 0.9
    m = ok_ref & both["converged"]
    assert m.sum() >= 40
    d = (both["coef"] - both["coef_ref"])[m].abs()
    assert d.median() <= 0.005
    assert d.quantile(0.95) <= 0.02
    ratio = (both["se"] / both["se_ref"])[m]
    assert 0.97 <= ratio.median() <= 1.03
    for comp in [t.name for t in terms]:
        r = np.corrcoef(both.loc[m, f"var_{comp}"], both.loc[m, f"var_{comp}_ref"])[0, 1]
        assert r >= 0.95, comp
    assert np.corrcoef(both.loc[m, "phi"], both.loc[m, "nb_disp"])[0, 1] >= 0.95


# ----------------------------------------------------------------------------------------------------------------
# GLMs (no random effects, or a variance estimated at zero) against statsmodels


def _glm_data(seed=1, n=600):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    grp = np.repeat(np.arange(12), n // 12)
    X = np.column_stack([np.ones(n), x, grp % 2])
    return rng, X, grp, x


def test_poisson_and_binomial_glm_match_statsmodels():
    rng, X, grp, x = _glm_data()
    off = rng.normal(0, 0.3, X.shape[0])
    y = rng.poisson(np.exp(0.3 + 0.5 * x - 0.4 * (grp % 2) + off))
    res = fit_glmm(y[None], prepare_glmm(X, [], off, family="poisson"), method="ML")
    ref = sm.GLM(y, X, family=sm.families.Poisson(), offset=off).fit()
    np.testing.assert_allclose(res.beta[0], ref.params, atol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[0])), ref.bse, rtol=1e-3)
    np.testing.assert_allclose(res.loglik[0], ref.llf, atol=1e-6)
    assert np.isnan(res.phi[0])

    prob = 1 / (1 + np.exp(-(0.2 + 0.7 * x - 0.5 * (grp % 2))))
    trials = rng.integers(1, 20, X.shape[0]).astype(float)
    yt = rng.binomial(trials.astype(int), prob).astype(float)
    res = fit_glmm(yt[None], prepare_glmm(X, [], None, family="binomial", trials=trials), method="ML")
    ref = sm.GLM(np.column_stack([yt, trials - yt]), X, family=sm.families.Binomial()).fit()
    np.testing.assert_allclose(res.beta[0], ref.params, atol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[0])), ref.bse, rtol=1e-3)
    np.testing.assert_allclose(res.loglik[0], ref.llf, atol=1e-6)

    # 0/1 detection: trials=None turns counts into y > 0
    yd = rng.poisson(2 * prob)
    res = fit_glmm(yd[None].astype(float), prepare_glmm(X, [], None, family="binomial"), method="REML")
    ref = sm.GLM((yd > 0).astype(float), X, family=sm.families.Binomial()).fit()
    np.testing.assert_allclose(res.beta[0], ref.params, atol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[0])), ref.bse, rtol=1e-6)


def test_nb_glm_matches_statsmodels():
    rng, X, grp, x = _glm_data(seed=3)
    off = rng.normal(0, 0.3, X.shape[0])
    mu = np.exp(0.3 + 0.5 * x - 0.4 * (grp % 2) + off)
    y = rng.poisson(rng.gamma(1 / 0.6, mu * 0.6))
    res = fit_glmm(y[None], prepare_glmm(X, [], off, family="nb"), method="ML")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NegativeBinomial(y, X, offset=off, loglike_method="nb2").fit(disp=0, maxiter=500, method="newton")
    np.testing.assert_allclose(res.beta[0], ref.params[:3], atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[0])), ref.bse[:3], rtol=1e-3)
    np.testing.assert_allclose(res.phi[0], ref.params[3], rtol=1e-3)
    assert res.loglik[0] >= ref.llf - 1e-6
    assert res.loglik[0] - ref.llf < 1e-4


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_zero_variance_fit_equals_glm(family):
    """Data without donor effects: where the donor SD is estimated at zero the fit is the GLM."""
    rng = np.random.default_rng(11)
    n_donors, n_cells, G = 8, 60, 24
    donor = np.repeat(np.arange(n_donors), n_cells)
    n = donor.size
    X = np.column_stack([np.ones(n), donor % 2])
    eta = -0.2 + 0.3 * (donor % 2)
    if family == "poisson":
        Y = rng.poisson(np.exp(eta), size=(G, n)).astype(float)
        fam = sm.families.Poisson()
    else:
        Y = rng.binomial(1, 1 / (1 + np.exp(-eta)), size=(G, n)).astype(float)
        fam = sm.families.Binomial()
    res = fit_glmm(Y, prepare_glmm(X, [intercept_term("donor", donor)], None, family=family), method="ML")
    singular = np.flatnonzero(res.status == "singular")
    assert singular.size >= 3
    assert np.all(res.var["donor"][singular] == 0.0)
    for g in singular:
        ref = sm.GLM(Y[g], X, family=fam).fit()
        np.testing.assert_allclose(res.beta[g], ref.params, atol=1e-5)
        np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[g])), ref.bse, rtol=1e-3)
        np.testing.assert_allclose(res.loglik[g], ref.llf, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Gaussian LMM against statsmodels MixedLM (REML and ML)


def _lmm_data():
    rng = np.random.default_rng(2)
    nd, nc = 10, 30
    n = nd * nc
    donor = np.repeat(np.arange(nd), nc)
    x = rng.normal(size=n)
    cond = (donor % 2).astype(float)
    batch = donor % 3
    y = (
        1.0
        + 0.5 * x
        + 0.3 * cond
        + rng.normal(0, 0.8, nd)[donor]
        + rng.normal(0, 0.4, nd)[donor] * x
        + rng.normal(0, 0.5, 3)[batch]
        + rng.normal(0, 1.0, n)
    )
    df = pd.DataFrame({"y": y, "x": x, "cond": cond, "donor": donor, "batch": batch, "one": 1})
    X = np.column_stack([np.ones(n), x, cond])
    return df, X


def _mixedlm(df, reml, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smf.mixedlm("y ~ x + cond", df, **kw).fit(reml=reml)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("structure", ["intercept", "correlated slope", "uncorrelated slope", "crossed", "nested"])
def test_gaussian_matches_mixedlm(method, structure):
    df, X = _lmm_data()
    donor = df["donor"].to_numpy()
    reml = method == "REML"
    if structure == "intercept":
        terms = [intercept_term("donor", donor)]
        ref = _mixedlm(df, reml, groups="donor")
        ref_var = {"donor": ref.cov_re.to_numpy()[0, 0]}
    elif structure == "correlated slope":
        cov = np.column_stack([np.ones(len(df)), df["x"]])
        terms = [RandomTerm("donor", donor, 10, cov, ("(Intercept)", "x"), correlated=True)]
        ref = _mixedlm(df, reml, groups="donor", re_formula="~x")
        ref_var = {"donor": ref.cov_re.to_numpy()[0, 0], "donor:x": ref.cov_re.to_numpy()[1, 1]}
    elif structure == "uncorrelated slope":
        cov = np.column_stack([np.ones(len(df)), df["x"]])
        terms = [RandomTerm("donor", donor, 10, cov, ("(Intercept)", "x"), correlated=False)]
        ref = _mixedlm(df, reml, groups="donor", re_formula="1", vc_formula={"x": "0 + C(donor):x"})
        ref_var = {"donor": ref.cov_re.to_numpy()[0, 0], "donor:x": ref.vcomp[0]}
    elif structure == "nested":
        # (1|donor) + (1|donor:half), as the parser expands (1|donor/half)
        half = (np.arange(len(df)) % 30 >= 15).astype(int)
        df["half"] = half
        terms = [intercept_term("donor", donor), intercept_term("donor:half", 2 * donor + half)]
        ref = _mixedlm(df, reml, groups="donor", re_formula="1", vc_formula={"half": "0 + C(half)"})
        ref_var = {"donor": ref.cov_re.to_numpy()[0, 0], "donor:half": ref.vcomp[0]}
    else:
        terms = [intercept_term("donor", donor), intercept_term("batch", df["batch"].to_numpy())]
        ref = _mixedlm(df, reml, groups="one", vc_formula={"donor": "0 + C(donor)", "batch": "0 + C(batch)"})
        ref_var = dict(zip(ref.model.exog_vc.names, ref.vcomp, strict=True))
    res = fit_glmm(df["y"].to_numpy()[None], prepare_glmm(X, terms, None, family="gaussian"), method=method)
    assert res.status[0] == "ok"
    se_ref = ref.bse_fe.to_numpy()
    np.testing.assert_allclose(res.beta[0], ref.fe_params.to_numpy(), atol=0.02 * se_ref.min())
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov_beta[0])), se_ref, rtol=0.01)
    for k, v in ref_var.items():
        np.testing.assert_allclose(res.var[k][0], v, rtol=0.01, atol=1e-3, err_msg=k)
    np.testing.assert_allclose(res.phi[0], ref.scale, rtol=1e-3)
    ll = res.restricted_loglik[0] if reml else res.loglik[0]
    # same likelihood (constants included); ours is at least as high (statsmodels stops earlier)
    assert ref.llf - 1e-6 <= ll <= ref.llf + 1e-3
    if structure == "intercept":
        blup = np.array([ref.random_effects[k].iloc[0] for k in range(10)])
        cvar = np.array([ref.random_effects_cov[k].iloc[0, 0] for k in range(10)])
        np.testing.assert_allclose(res.b[0], blup, atol=1e-4)
        np.testing.assert_allclose(res.b_se[0], np.sqrt(cvar), rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# the Laplace criterion itself, computed directly at the cell level


def _direct_laplace(y, X, Z, offset, beta, Sigma, phi, family, reml):
    """Laplace (or restricted Laplace) log-likelihood computed cell by cell with an independent Newton solver."""
    fam = get_family(family)
    Lc = np.linalg.cholesky(Sigma + 1e-300 * np.eye(Sigma.shape[0]))
    ZL = Z @ Lc

    def negh(u, b):
        eta = offset + X @ b + ZL @ u
        return -(fam.loglik(y, fam.linkinv(eta), phi).sum() - 0.5 * u @ u)

    def weights(eta):
        mu = np.exp(eta)
        if family == "nb":
            return mu * (1 + phi * y) / (1 + phi * mu) ** 2  # observed information of NB2, log link
        return mu

    def score(eta):
        mu = np.exp(eta)
        return (y - mu) / (1 + phi * mu) if family == "nb" else y - mu

    b = beta.copy()
    u = np.zeros(Z.shape[1])
    free_beta = reml
    for _ in range(100):
        eta = offset + X @ b + ZL @ u
        w, s = weights(eta), score(eta)
        A = np.hstack([X, ZL]) if free_beta else ZL
        H = A.T @ (w[:, None] * A)
        g = A.T @ s
        if free_beta:
            H[X.shape[1] :, X.shape[1] :] += np.eye(u.size)
            g[X.shape[1] :] -= u
        else:
            H += np.eye(u.size)
            g -= u
        step = np.linalg.solve(H, g)
        if free_beta:
            b, u = b + step[: X.shape[1]], u + step[X.shape[1] :]
        else:
            u = u + step
        if abs(g @ step) < 1e-20:
            break
    val = -negh(u, b)
    eta = offset + X @ b + ZL @ u
    w = weights(eta)
    if reml:
        A = np.hstack([X, ZL])
        H = A.T @ (w[:, None] * A)
        H[X.shape[1] :, X.shape[1] :] += np.eye(u.size)
        return val - 0.5 * np.linalg.slogdet(H)[1] + 0.5 * X.shape[1] * np.log(2 * np.pi), b
    H = ZL.T @ (w[:, None] * ZL) + np.eye(u.size)
    return val - 0.5 * np.linalg.slogdet(H)[1], b


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_nb_laplace_value_and_optimum_match_direct_computation(method, sim_between):
    counts = sp.csc_matrix(sim_between.X)
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    X, terms = _reference_model(sim_between, matched=False)
    genes = [1, 3, 16, 25]
    res = fit_glmm(counts[:, genes], prepare_glmm(X, terms, offset, family="nb"), method=method)
    Z = build_Z(tuple(terms), X.shape[0]).toarray()
    for j, g in enumerate(genes):
        assert res.converged[j]
        y = counts[:, g].toarray().ravel()

        def crit(theta, log_phi, beta, j=j, y=y):
            val, b = _direct_laplace(
                y, X, Z, offset, beta, cov_b(tuple(terms), theta), np.exp(log_phi), "nb", method == "REML"
            )
            return val

        theta, lphi, beta = res.theta[j], np.log(res.phi[j]), res.beta[j]
        value = crit(theta, lphi, beta)
        reported = res.loglik[j] if method == "ML" else res.restricted_loglik[j]
        np.testing.assert_allclose(reported, value, rtol=0, atol=1e-6 * abs(value))
        # the estimates maximise the direct criterion: no coordinate move improves it
        moves = [(0, 0.02), (1, 0.02), ("phi", 0.02)] + ([("beta", 0.01)] if method == "ML" else [])
        for k, h in moves:
            for sgn in (-1, 1):
                th, lp, be = theta.copy(), lphi, beta.copy()
                if k == "phi":
                    lp += sgn * h
                elif k == "beta":
                    be[1] += sgn * h
                else:
                    th[k] = abs(th[k] + sgn * h)
                assert crit(th, lp, be) <= value + 1e-7, (g, k, sgn)


def test_ml_estimate_is_optimum_of_scipy_search(sim_within):
    """Nelder-Mead over (theta, log phi, beta) on the direct criterion finds no better point than the kernel."""
    counts = sp.csc_matrix(sim_within.X)
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    X, terms = _reference_model(sim_within, matched=True)
    g = 11
    res = fit_glmm(counts[:, [g]], prepare_glmm(X, terms, offset, family="nb"), method="ML")
    y = counts[:, g].toarray().ravel()
    Z = build_Z(tuple(terms), X.shape[0]).toarray()

    def negcrit(par):
        Sigma = cov_b(tuple(terms), par[:1])
        val, _ = _direct_laplace(y, X, Z, offset, par[2:], Sigma, np.exp(par[1]), "nb", False)
        return -val

    start = np.r_[res.theta[0] * 1.3 + 0.05, np.log(res.phi[0]) + 0.2, res.beta[0] + 0.05]
    opt = optimize.minimize(
        negcrit, start, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 4000}
    )
    assert -opt.fun <= res.loglik[0] + 1e-6
    np.testing.assert_allclose(abs(opt.x[0]), res.theta[0, 0], atol=2e-3)
    np.testing.assert_allclose(opt.x[2:], res.beta[0], atol=2e-3)


# ----------------------------------------------------------------------------------------------------------------
# random-effect recovery (Poisson, binomial) on simulated data


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_variance_recovered_from_simulation(family):
    rng = np.random.default_rng(5)
    n_donors, n_cells, G = 12, 150, 60
    donor = np.repeat(np.arange(n_donors), n_cells)
    n = donor.size
    cond = (donor % 2).astype(float)
    X = np.column_stack([np.ones(n), cond])
    sd, beta = 0.5, np.array([0.2, 0.4])
    U = rng.normal(0, sd, (G, n_donors))
    eta = (X @ beta)[None, :] + U[:, donor]
    if family == "poisson":
        Y = rng.poisson(np.exp(eta)).astype(float)
    else:
        Y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
    res = fit_glmm(Y, prepare_glmm(X, [intercept_term("donor", donor)], None, family=family), method="REML")
    assert res.converged.all()
    # REML variance is about unbiased: its mean over genes is within 20 % of the truth
    assert abs(np.mean(res.var["donor"]) / sd**2 - 1) < 0.2
    # the condition effect: unbiased and 95 % intervals (t, 10 df) cover it about 95 % of the time
    L = np.array([0.0, 1.0])
    con = glmm_contrast(res, L, df=contrast_df(X, [intercept_term("donor", donor)], L))
    assert abs(np.mean(con.coef) - beta[1]) < 3 * np.std(con.coef) / np.sqrt(G)
    half = con.se * 2.228  # t_{0.975, 10}
    cover = np.mean(np.abs(con.coef - beta[1]) <= half)
    assert 0.85 <= cover <= 1.0
    # conditional modes track the simulated donor effects
    assert np.corrcoef(res.b.ravel(), U.ravel())[0, 1] > 0.8


# ----------------------------------------------------------------------------------------------------------------
# per-gene robustness, input formats


def test_bad_genes_get_a_status_not_an_exception():
    rng = np.random.default_rng(0)
    donor = np.repeat(np.arange(6), 40)
    n = donor.size
    cond = (donor % 2).astype(float)
    X = np.column_stack([np.ones(n), cond])
    Y = np.zeros((5, n))
    Y[1, :2] = 1.0  # two expressing cells
    Y[2] = rng.poisson(np.where(cond == 1, 0.0, 3.0))  # all zero in one condition (separation)
    Y[3] = rng.poisson(2.0, n) + 0.5  # not counts
    Y[4] = rng.poisson(np.exp(0.5 + rng.normal(0, 0.4, 6)[donor]))
    design = prepare_glmm(X, [intercept_term("donor", donor)], None, family="nb")
    res = fit_glmm(Y, design, method="REML", min_nonzero=3)
    assert res.status[0] == "all zero"
    assert res.status[1] == "too few expressing cells"
    assert res.status[3].startswith("failed")
    assert res.status[4] in ("ok", "singular")
    assert not res.converged[[0, 1, 3]].any()
    assert np.isnan(res.beta[[0, 1, 3]]).all()
    con = glmm_contrast(res, np.array([0.0, 1.0]))
    assert np.isnan(con.pvalue[[0, 1, 3]]).all()
    assert np.isfinite(con.pvalue[4])
    # the separated gene is flagged, with NaN estimates instead of a huge, uninformative one; it never raises
    assert res.status[2] == "separated"
    assert not res.converged[2] and np.isnan(res.beta[2]).all() and np.isnan(con.pvalue[2])


def test_dense_and_sparse_inputs_and_chunking_agree(sim_between):
    counts = sp.csc_matrix(sim_between.X)
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    X, terms = _reference_model(sim_between, matched=False)
    design = prepare_glmm(X, terms, offset, family="nb")
    a = fit_glmm(counts[:, :12], design)
    b = fit_glmm(counts[:, :12].toarray().T, design)
    c = fit_glmm(counts[:, 6:12], design)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_allclose(a.beta, b.beta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.beta[6:], c.beta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.cov_beta, b.cov_beta, rtol=1e-10)
    assert a.b.shape == (12, sum(t.n_levels for t in terms))
    assert set(a.var) == {"donor", "batch"}


# ----------------------------------------------------------------------------------------------------------------
# degrees of freedom and tests


def test_contrast_df_rule():
    n_donors, n_cells = 10, 20
    donor = np.repeat(np.arange(n_donors), n_cells)
    n = donor.size
    batch = donor % 3
    case = (donor % 2).astype(float)
    L = np.array([0.0, 1.0])
    X = np.column_stack([np.ones(n), case])
    terms = [intercept_term("donor", donor), intercept_term("batch", batch)]
    # donor-level contrast: donors - (intercept, condition)
    assert contrast_df(X, terms, L) == 8
    # batch as fixed effect: donors - 4 between-donor columns
    Xb = np.column_stack([X, batch == 1, batch == 2]).astype(float)
    assert contrast_df(Xb, [terms[0]], np.r_[L, 0, 0]) == 6
    # condition varies within donors: residual df n - rank([X, Z]), large (batches are nested in donors here)
    within = np.tile(np.arange(n_cells) >= n_cells // 2, n_donors).astype(float)
    Xw = np.column_stack([np.ones(n), within])
    assert contrast_df(Xw, terms, L) == n - (n_donors + 1)
    # ... unless it has a random slope over donors: donor-level df again
    slope = RandomTerm("donor", donor, n_donors, Xw, ("(Intercept)", "within"), correlated=True)
    assert contrast_df(Xw, [slope], L) == n_donors - 1
    # a factor that contains the contrast with fewer levels wins (condition constant within batch)
    Xc = np.column_stack([np.ones(n), (batch == 0).astype(float)])
    assert contrast_df(Xc, terms, L) == 1


def test_contrast_t_and_lrt():
    rng = np.random.default_rng(4)
    donor = np.repeat(np.arange(10), 80)
    n = donor.size
    case = (donor % 2).astype(float)
    X = np.column_stack([np.ones(n), case])
    terms = [intercept_term("donor", donor)]
    eta = 0.5 + np.array([[0.0], [0.8]]) * case + rng.normal(0, 0.3, (2, 10))[:, donor]
    Y = rng.poisson(np.exp(eta)).astype(float)
    L = np.array([0.0, 1.0])
    design = prepare_glmm(X, terms, None, family="poisson")
    res = fit_glmm(Y, design, method="REML")
    z = glmm_contrast(res, L)
    t = glmm_contrast(res, L, df=8)
    np.testing.assert_allclose(z.stat, t.stat)
    assert np.all(t.pvalue > z.pvalue)
    np.testing.assert_array_equal(t.df, [8.0, 8.0])
    lrt = glmm_lrt(Y, X, terms, L, family="poisson")
    assert np.all(lrt.stat**2 >= 0)
    assert lrt.pvalue[1] < 0.05 < lrt.pvalue[0]
    # the LR statistic is twice the difference of the ML log-likelihoods of the two fits
    full = fit_glmm(Y, design, method="ML")
    red = fit_glmm(Y, prepare_glmm(X[:, :1], terms, None, family="poisson"), method="ML")
    np.testing.assert_allclose(lrt.stat**2, 2 * (full.loglik - red.loglik), rtol=1e-6)
    # with 10 donors the ML Wald z test is more liberal than the LR test
    assert abs(glmm_contrast(full, L).stat[1]) > abs(lrt.stat[1])
    # without random effects the LR statistic is the deviance difference of the GLMs
    lrt0 = glmm_lrt(Y[:1], X, [], L, family="poisson")
    full = sm.GLM(Y[0], X, family=sm.families.Poisson()).fit()
    red = sm.GLM(Y[0], X[:, :1], family=sm.families.Poisson()).fit()
    np.testing.assert_allclose(lrt0.stat[0] ** 2, red.deviance - full.deviance, rtol=1e-6)


def test_satterthwaite_df_is_exact_for_a_balanced_lmm():
    """Balanced one-way LMM, donor-level contrast: Satterthwaite's df is exactly n_donors - 2 (lmerTest gives 8)."""
    rng = np.random.default_rng(3)
    nd, nc = 10, 30
    donor = np.repeat(np.arange(nd), nc)
    cond = (donor % 2).astype(float)
    x = np.tile(np.linspace(-1, 1, nc), nd)  # a cell-level covariate, balanced within donors
    X = np.column_stack([np.ones(donor.size), cond, x])
    Y = 1 + 0.3 * cond + rng.normal(0, 0.7, (20, nd))[:, donor] + rng.normal(0, 1, (20, donor.size))
    res = fit_glmm(Y, prepare_glmm(X, [intercept_term("donor", donor)], family="gaussian"), method="REML")
    ok = res.status == "ok"
    assert ok.sum() >= 15
    np.testing.assert_allclose(satterthwaite_df(res, np.array([0.0, 1.0, 0.0]))[ok], 8.0, atol=0.05)
    # the within-donor covariate is estimated from within-donor variation: residual-level df
    assert np.all(satterthwaite_df(res, np.array([0.0, 0.0, 1.0]))[ok] > 200)


def test_family_loglik_and_deviance():
    from scipy import stats

    rng = np.random.default_rng(0)
    mu = rng.gamma(2, 1, 200)
    y = rng.poisson(mu).astype(float)
    prob = rng.uniform(0.1, 0.9, 200)
    m = rng.integers(1, 10, 200).astype(float)
    yb = rng.binomial(m.astype(int), prob).astype(float)
    nb, pois, binom, gauss = (get_family(f) for f in ("nb", "poisson", "binomial", "gaussian"))
    np.testing.assert_allclose(nb.loglik(y, mu, 0.5), stats.nbinom.logpmf(y, 2.0, 2.0 / (2.0 + mu)), atol=1e-10)
    np.testing.assert_allclose(pois.loglik(y, mu), stats.poisson.logpmf(y, mu), atol=1e-10)
    np.testing.assert_allclose(binom.loglik(yb, prob, trials=m), stats.binom.logpmf(yb, m, prob), atol=1e-10)
    np.testing.assert_allclose(gauss.loglik(y, mu, 2.0), stats.norm.logpdf(y, mu, np.sqrt(2.0)), atol=1e-10)
    np.testing.assert_allclose(nb.deviance(y, mu, 0.5), sm.families.NegativeBinomial(alpha=0.5).deviance(y, mu))
    np.testing.assert_allclose(pois.deviance(y, mu), sm.families.Poisson().deviance(y, mu))
    dev = sm.families.Binomial().deviance(yb / m, prob, var_weights=m)
    np.testing.assert_allclose(binom.deviance(yb, prob, trials=m), dev)
    np.testing.assert_allclose(nb.variance(mu, phi=0.5), mu + 0.5 * mu**2)
    assert get_family("nbinom2") is nb
    with pytest.raises(ValueError, match="not known"):
        get_family("gamma")
