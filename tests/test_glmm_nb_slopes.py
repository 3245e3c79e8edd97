"""NB random slopes against glmmTMB ``nbinom2``: ``y ~ condition + (1 + condition|donor) + offset(log total)``.

The fixture ``sim_slope_small`` (8 donors x 2 conditions, 150-300 cells per sample, 80 genes, donor-specific
intercepts and responses with per-gene correlation) and both references (Laplace ML and ``REML=TRUE``) were made by
``tests/data/reference/R/run_glmm_slopes.R``.
"""

from __future__ import annotations

import gzip
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from helpers import REFERENCE, read_reference_table
from threadpoolctl import threadpool_limits

import scmlm
from scmlm.models import RandomTerm, contrast_df, fit_glmm, glmm_contrast, prepare_glmm, satterthwaite_df

NAME = "sim_slope_small"


@pytest.fixture(scope="module")
def slope_data() -> ad.AnnData:
    base = REFERENCE / NAME
    with gzip.open(base / "counts.mtx.gz") as fh:
        X = sp.csr_matrix(scipy.io.mmread(fh), dtype=np.float64)
    obs = pd.read_csv(base / "obs.csv", index_col="cell")
    obs.index = obs.index.astype(str)
    obs["donor"] = pd.Categorical(obs["donor"].astype(str))
    obs["condition"] = pd.Categorical(obs["condition"], categories=["ctrl", "case"])
    var = pd.read_csv(base / "truth.csv", index_col="gene")
    return ad.AnnData(X=X, obs=obs, var=var)


def _model(adata):
    n = adata.n_obs
    X = np.column_stack([np.ones(n), (adata.obs["condition"] == "case").to_numpy(float)])
    donor = adata.obs["donor"].cat.codes.to_numpy().astype(np.int64)
    term = RandomTerm("donor", donor, int(donor.max()) + 1, X.copy(), ("(Intercept)", "conditioncase"))
    return X, [term]


def _compare(adata, method):
    X, terms = _model(adata)
    counts = sp.csc_matrix(adata.X)
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    with threadpool_limits(1):
        res = fit_glmm(counts, prepare_glmm(X, terms, offset, family="nb"), method=method)
    th = res.theta  # Cholesky factor by rows: l00, l10, l11
    ours = pd.DataFrame(
        {
            "coef": res.beta[:, 1],
            "se": np.sqrt(res.cov_beta[:, 1, 1]),
            "coef_int": res.beta[:, 0],
            "se_int": np.sqrt(res.cov_beta[:, 0, 0]),
            "var_donor": res.var["donor"],
            "var_slope": res.var["donor:conditioncase"],
            "cor": np.sign(th[:, 0]) * th[:, 1] / np.sqrt(th[:, 1] ** 2 + th[:, 2] ** 2),
            "phi": res.phi,
            "crit": res.loglik if method == "ML" else res.restricted_loglik,
            "status": res.status,
        },
        index=adata.var_names,
    )
    both = ours.join(read_reference_table(NAME, f"cell_glmmTMB_slope_{method}"), rsuffix="_ref", how="inner")
    assert len(both) == adata.n_vars
    # glmmTMB: positive-definite Hessian, converged, no warning; scmlm: "ok" (not at the boundary)
    regular = both["ok"].astype(bool) & ~both["warned"].astype(bool)
    return both, regular


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_nb_random_slope_matches_glmmtmb(slope_data, method):
    both, regular = _compare(slope_data, method)
    # the same genes are regular / at the boundary (correlation +-1) in both
    assert (both.loc[regular, "status"] == "ok").all()
    assert (both.loc[~regular, "status"] == "singular").all()
    assert regular.sum() >= 65
    m = regular
    d = (both["coef"] - both["coef_ref"])[m].abs()
    assert d.median() <= 1e-5
    assert d.max() <= 2e-4
    assert (both["coef_int"] - both["coef_int_ref"])[m].abs().max() <= 2e-4
    ratio = (both["se"] / both["se_ref"])[m]
    if method == "ML":
        # both are the beta block of the inverse Hessian of the Laplace likelihood in all fixed parameters
        assert 0.9995 <= ratio.median() <= 1.0005
        assert ratio.between(0.999, 1.001).all()
        assert (both["se_int"] / both["se_int_ref"])[m].between(0.999, 1.001).all()
    else:
        # REML: scmlm reports the beta block of the inverse (beta, b) Hessian; glmmTMB's sdreport adds the
        # uncertainty of the variance parameters to the integrated-out beta, so its SEs are slightly larger
        assert 0.995 <= ratio.median() <= 1.0001
        assert ratio.between(0.96, 1.0001).all()
    for comp in ("var_donor", "var_slope"):
        r = (both[comp] / both[f"{comp}_ref"])[m]
        assert r.between(0.998, 1.002).all(), comp
    assert (both["cor"] - both["cor_ref"])[m].abs().max() <= 2e-3
    assert (both["phi"] / both["nb_disp"])[m].between(0.999, 1.001).all()
    # the criterion itself (Laplace log-likelihood, or glmmTMB's REML criterion): same value, ours never lower
    dll = (both["crit"] - both["loglik"])[m]
    assert dll.abs().max() <= 1e-3
    assert dll.min() >= -1e-4
    # boundary fits (correlation +-1): the same estimates
    s = ~regular
    assert (both["coef"] - both["coef_ref"])[s].abs().max() <= 1e-3
    assert (both["cor"].abs()[s] > 0.999).all()


def test_glmm_de_random_slope_matches_glmmtmb_reml(slope_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tab = scmlm.tl.glmm_de(
            slope_data,
            "~ condition + (1 + condition|donor)",
            ("condition", "case", "ctrl"),
            offset="log_total",  # the reference's offset(log total)
            moderate=False,  # per-gene REML inference, as glmmTMB's
            n_jobs=1,
            inplace=False,
        ).table.set_index("gene")
    ref = read_reference_table(NAME, "cell_glmmTMB_slope_REML")
    both = tab.join(ref, rsuffix="_ref", how="inner")
    m = both["ok"].astype(bool) & ~both["warned"].astype(bool)
    assert (both.loc[m, "status"] == "ok").all()
    assert (both["coef"] - both["coef_ref"])[m].abs().median() <= 1e-5
    assert 0.995 <= (both["se"] / both["se_ref"])[m].median() <= 1.0001
    assert ((both["var_donor"] / both["var_donor_ref"])[m]).between(0.998, 1.002).all()
    # a random slope of the contrast over donors: containment df 8 donors - 1; a contrast within donors is tested on
    # the gene's Satterthwaite df (glmm_de's rule for paired contrasts), which stays near it here
    X, terms = _model(slope_data)
    assert contrast_df(X, terms, np.array([0.0, 1.0])) == 7
    df = both.loc[m, "df"]
    assert (df >= 1).all() and 6 <= df.median() <= 8, df.describe()


def test_continuous_covariate_random_slope_null_is_calibrated():
    """``~ x + (1 + x|donor)`` with a cell-level ``x`` and donor-specific slopes but no average effect of ``x``: the
    REML t test on min(containment, Satterthwaite) df (7 = donors - 1) keeps the nominal level."""
    rng = np.random.default_rng(1)
    n_genes, nd, nc = 2000, 8, 40
    donor = np.repeat(np.arange(nd), nc)
    n = donor.size
    x = rng.normal(size=n) + rng.normal(0, 0.3, nd)[donor]
    lib = np.exp(rng.normal(np.log(2000), 0.4, n))
    log_mu = rng.uniform(-8.5, -5.0, n_genes)
    phi = rng.uniform(0.1, 0.8, n_genes)
    b0 = rng.normal(0, 0.3, (n_genes, nd))
    b1 = rng.normal(0, 0.2, (n_genes, nd))
    mu = np.exp(log_mu[:, None] + b0[:, donor] + b1[:, donor] * x[None, :] + np.log(lib)[None, :])
    Y = rng.poisson(rng.gamma(1.0 / phi[:, None], mu * phi[:, None])).astype(np.float64)
    X = np.column_stack([np.ones(n), x])
    terms = [RandomTerm("donor", donor, nd, X.copy(), ("(Intercept)", "x"))]
    L = np.array([0.0, 1.0])
    with threadpool_limits(1):
        res = fit_glmm(Y, prepare_glmm(X, terms, np.log(lib), family="nb"), method="REML")
    assert res.converged.mean() >= 0.99
    df = np.minimum(contrast_df(X, terms, L), satterthwaite_df(res, L))
    p = glmm_contrast(res, L, df=df).pvalue
    ok = np.isfinite(p)
    assert np.median(df[ok]) <= 7.0 + 1e-9
    frac = np.mean(p[ok] < 0.05)
    assert 0.035 <= frac <= 0.06, frac
    # without the random slope the same data are badly anti-conservative (x tested against cell-level noise)
    with threadpool_limits(1):
        res0 = fit_glmm(Y[:300], prepare_glmm(X, [_intercept(donor, nd)], np.log(lib), family="nb"))
    df0 = contrast_df(X, [_intercept(donor, nd)], L)
    p0 = glmm_contrast(res0, L, df=df0).pvalue
    assert df0 > 300
    assert np.mean(p0[np.isfinite(p0)] < 0.05) > 0.2


def _intercept(donor, nd):
    return RandomTerm("donor", donor, nd, np.ones((donor.size, 1)))
