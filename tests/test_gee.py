"""Population-average DE (GEE): agreement with statsmodels, null calibration, logit attenuation, bad inputs, API."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse as sp
import statsmodels.api as sm
from scipy import stats
from scipy.special import expit, logit

import scmlm
from scmlm import DesignError, InputError
from scmlm.models.gee import nb_alpha_moment
from scmlm.tl import gee_de

CONTRAST = ("condition", "case", "ctrl")


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=200, seed=2)
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    return adata[keep].copy()


def _expressed_genes(adata: ad.AnnData, k: int, min_cells: int = 40) -> list[str]:
    n_expr = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    return list(adata.var_names[np.flatnonzero(n_expr >= min_cells)[:k]])


def _direct_gee(adata, gene, family, alpha=None, cov_type="bias_reduced"):
    """The same model written directly with statsmodels, as a user would."""
    y = adata[:, gene].X.toarray().ravel().astype(float)
    if family == "binomial":
        y = (y > 0).astype(float)
    X = np.column_stack([np.ones(adata.n_obs), (adata.obs["condition"] == "case").to_numpy(float)])
    off = np.log(np.asarray(adata.X.sum(axis=1)).ravel())
    fam = {
        "nb": lambda: sm.families.NegativeBinomial(alpha=alpha),
        "poisson": sm.families.Poisson,
        "binomial": sm.families.Binomial,
    }[family]()
    model = sm.GEE(
        y,
        X,
        groups=adata.obs["donor"].cat.codes.to_numpy(),
        offset=off,
        family=fam,
        cov_struct=sm.cov_struct.Exchangeable(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(cov_type=cov_type, maxiter=200)
    return model, fit, y, X, off


# ---------------------------------------------------------------- (a) agreement with statsmodels


@pytest.mark.parametrize("family", ["nb", "poisson", "binomial"])
def test_matches_direct_statsmodels_gee(small, family):
    genes = _expressed_genes(small, 4)
    kw = {"family": family, "genes": genes, "inplace": False}
    md = gee_de(small, "~ condition", CONTRAST, small_sample="md", df="clusters", **kw).table.set_index("gene")
    plain = gee_de(small, "~ condition", CONTRAST, small_sample="none", **kw).table.set_index("gene")
    default = gee_de(small, "~ condition", CONTRAST, **kw).table.set_index("gene")
    kc_bm = gee_de(small, "~ condition", CONTRAST, small_sample="kc", df="satterthwaite", **kw).table.set_index("gene")
    for g in genes:
        row = md.loc[g]
        assert row["status"] == "ok"
        alpha = row["dispersion"] if family == "nb" else None
        if family != "nb":
            assert np.isnan(row["dispersion"])
        model, fit, *_ = _direct_gee(small, g, family, alpha=alpha)
        np.testing.assert_allclose(row["coef"], fit.params[1], rtol=1e-5, atol=1e-6)
        # Mancl-DeRouen = statsmodels' bias_reduced; no correction = statsmodels' robust sandwich
        np.testing.assert_allclose(row["se"], fit.bse[1], rtol=1e-5)
        np.testing.assert_allclose(plain.loc[g, "se"], np.sqrt(fit.cov_robust[1, 1]), rtol=1e-5)
        np.testing.assert_allclose(row["working_corr"], model.cov_struct.dep_params, rtol=1e-4, atol=1e-7)
        # t test with donor df: 6 donors - 2 donor-level columns (intercept, condition)
        assert row["df"] == 4
        np.testing.assert_allclose(row["stat"], row["coef"] / row["se"], rtol=1e-12)
        np.testing.assert_allclose(row["pvalue"], 2 * stats.t.sf(abs(row["stat"]), 4), rtol=1e-10)
        np.testing.assert_allclose(row["log2fc"], row["coef"] / np.log(2), rtol=1e-12)
        assert row["method"] == "gee"
        assert row["converged"]
        # Kauermann-Carroll with the Bell-McCaffrey df stays below the cluster count rule and uses its own df
        s = kc_bm.loc[g]
        # the default: the average of the Kauermann-Carroll and Mancl-DeRouen covariances; t with the df of the
        # donor-level design, two groups of 3 donors: 6 - 2 = 4
        d = default.loc[g]
        assert d["df"] == 4 and d["coef"] == row["coef"]
        np.testing.assert_allclose(d["se"] ** 2, (row["se"] ** 2 + s["se"] ** 2) / 2, rtol=1e-10)
        np.testing.assert_allclose(d["pvalue"], 2 * stats.t.sf(abs(d["stat"]), 4), rtol=1e-10)
        assert 1.0 < s["df"] <= 4 and s["coef"] == row["coef"]
        np.testing.assert_allclose(s["pvalue"], 2 * stats.t.sf(abs(s["stat"]), s["df"]), rtol=1e-10)


def test_nb_dispersion_solves_pearson_moment_equation(small):
    g = _expressed_genes(small, 1, min_cells=80)[0]
    row = gee_de(small, "~ condition", CONTRAST, genes=[g], inplace=False).table.iloc[0]
    _, _, y, X, off = _direct_gee(small, g, "poisson", cov_type="robust")
    mu = sm.GLM(y, X, family=sm.families.Poisson(), offset=off).fit().fittedvalues
    alpha = row["dispersion"]
    assert alpha > 1e-6  # this simulated gene is over-dispersed
    pearson = np.sum((y - mu) ** 2 / (mu + alpha * mu**2))
    np.testing.assert_allclose(pearson, len(y) - 2, rtol=1e-4)
    # no over-dispersion: Poisson data give the lower bound
    rng = np.random.default_rng(0)
    yp = rng.poisson(3.0, 5000).astype(float)
    assert nb_alpha_moment(yp, np.full(yp.size, 3.0), 1) < 0.01


def test_kauermann_carroll_matches_explicit_matrices(small):
    """The closed-form KC correction equals B^-1 [sum D'V^-1 (I-H)^-1/2 r r' (I-H)^-T/2 V^-1 D] B^-1 built densely."""
    g = _expressed_genes(small, 1, min_cells=80)[0]
    row = gee_de(small, "~ condition", CONTRAST, genes=[g], small_sample="kc", inplace=False).table.iloc[0]
    model, fit, y, X, off = _direct_gee(small, g, "nb", alpha=row["dispersion"], cov_type="robust")
    rho = model.cov_struct.dep_params
    codes = small.obs["donor"].cat.codes.to_numpy()
    mu = np.exp(X @ fit.params + off)
    D = X * mu[:, None]
    blocks = []
    for c in np.unique(codes):
        i = codes == c
        a = np.sqrt(mu[i] + row["dispersion"] * mu[i] ** 2)
        R = np.full((i.sum(), i.sum()), rho)
        np.fill_diagonal(R, 1.0)
        blocks.append((D[i], np.linalg.inv(a[:, None] * R * a[None, :]), y[i] - mu[i]))
    B = sum(d.T @ vi @ d for d, vi, _ in blocks)
    Binv = np.linalg.inv(B)
    meat = np.zeros((2, 2))
    for d, vi, r in blocks:
        H = d @ Binv @ d.T @ vi
        root = np.real(scipy.linalg.sqrtm(np.linalg.inv(np.eye(len(r)) - H)))
        u = d.T @ vi @ root @ r
        meat += np.outer(u, u)
    cov = Binv @ meat @ Binv
    np.testing.assert_allclose(row["se"], np.sqrt(cov[1, 1]), rtol=1e-4)


def test_within_donor_design_df_and_f_tests():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=120, design="within", seed=4)
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    genes = _expressed_genes(adata, 5)
    t = gee_de(adata, "~ condition", CONTRAST, genes=genes, df="clusters", inplace=False).table
    assert (t["df"] == 6 - 1).all()  # only the intercept is constant within donors
    # a contrast within donors keeps the full Mancl-DeRouen correction (no (K - q) / K factor)
    md = gee_de(adata, "~ condition", CONTRAST, genes=genes, small_sample="md", inplace=False).table
    np.testing.assert_allclose(t["se"], md["se"], rtol=1e-12)
    # a donor-level contrast in the same fit gets the average of Kauermann-Carroll and Mancl-DeRouen, and the df of
    # the donor-level design: batch1 vs batch0 rests on their 2 + 2 donors (Welch: 2), not on 6 - 3 = 3
    kw = {"genes": genes, "inplace": False}
    b_def = gee_de(adata, "~ batch + condition", [0, 1, 0, 0], **kw).table
    b_md = gee_de(adata, "~ batch + condition", [0, 1, 0, 0], small_sample="md", **kw).table
    b_kc = gee_de(adata, "~ batch + condition", [0, 1, 0, 0], small_sample="kc", **kw).table
    np.testing.assert_allclose(b_def["se"] ** 2, (b_md["se"] ** 2 + b_kc["se"] ** 2) / 2, rtol=1e-10)
    np.testing.assert_allclose(b_def["df"], 2.0, rtol=1e-10)
    assert (b_md["df"] == b_def["df"]).all()
    assert (gee_de(adata, "~ batch + condition", [0, 1, 0, 0], df="clusters", **kw).table["df"] == 3).all()
    # two contrasts in one call, one donor-level and one within donors: each keeps its own factor
    c_def = gee_de(adata, "~ batch + condition", [0, 0, 0, 1], **kw).table
    both = gee_de(adata, "~ batch + condition", {"b": [0, 1, 0, 0], "c": [0, 0, 0, 1]}, **kw).table
    for name, single in (("b", b_def), ("c", c_def)):
        got = both[both["contrast"] == name]
        np.testing.assert_allclose(got["se"].to_numpy(), single["se"].to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(got["pvalue"].to_numpy(), single["pvalue"].to_numpy(), rtol=1e-8)
    # a named contrast is the same test under its name
    named = gee_de(adata, "~ condition", {"cond": CONTRAST}, genes=genes, df="clusters", inplace=False).table
    np.testing.assert_allclose(named["stat"], t["stat"], rtol=1e-12)
    assert (named["contrast"] == "cond").all()
    # a joint F test is a dict value listing its rows; it does not depend on how the hypothesis is parametrised
    a = gee_de(adata, "~ batch + condition", {"F": [[0, 1, 0, 0], [0, 0, 1, 0]]}, genes=genes, inplace=False).table
    b = gee_de(adata, "~ batch + condition", {"F": [[0, 1, 0, 0], [0, -1, 1, 0]]}, genes=genes, inplace=False).table
    assert np.isfinite(a["stat"]).all() and a["coef"].isna().all() and (a["contrast"] == "F").all()
    np.testing.assert_allclose(a["stat"], b["stat"], rtol=1e-8)
    with pytest.raises(DesignError, match="linearly dependent"):
        gee_de(adata, "~ batch + condition", {"F": [[0, 1, 0, 0], [0, 2, 0, 0]]}, genes=genes, inplace=False)


# ---------------------------------------------------------------- (b) calibration on a null simulation


def _null_cells(n_donors: int, n_cells: int, n_genes: int, seed: int, unequal: bool = False) -> ad.AnnData:
    """Null data whose donors are independent clusters, as the GEE assumes. (With simulate's default 3 batches, a
    batch effect shared by a case and a control donor cancels from the contrast but not from the donor residuals,
    so any test of ``~ condition`` that ignores the batch is conservative there, whatever its correction.)"""
    adata = scmlm.datasets.simulate(
        null=True, n_donors=n_donors, n_cells=n_cells, n_genes=n_genes, n_batches=1, seed=seed
    )
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    if unequal:  # donors keep 20-100 % of their cells
        rng = np.random.default_rng(seed + 100)
        frac = rng.uniform(0.2, 1.0, n_donors)
        adata = adata[rng.random(adata.n_obs) < frac[adata.obs["donor"].cat.codes.to_numpy()]].copy()
    return adata


def test_null_calibration_ten_donors():
    """Type-I error of the donor-level contrast with 10 donors and few cells, default correction (average of
    Kauermann–Carroll and Mancl–DeRouen, t with the 10 - 2 = 8 df of two groups of 5 donors). ~700 genes: the
    standard error of the fraction at 0.05 is 0.008, so [0.025, 0.08] is about ±3 SE; the issue's band is checked
    on larger gene sets below."""
    adata = _null_cells(10, 40, 800, seed=11)
    t = gee_de(adata, "~ condition", CONTRAST, inplace=False).table
    ok = t["status"] == "ok"
    assert ok.sum() >= 650
    assert set(t.loc[~ok, "status"]) <= {"too few expressing cells", "not converged"}
    assert (t.loc[ok, "df"] == 8).all()
    p = t.loc[ok, "pvalue"].to_numpy()
    frac05, frac01 = np.mean(p < 0.05), np.mean(p < 0.01)
    print(f"null: {ok.sum()} genes, fraction p<0.05 = {frac05:.4f}, p<0.01 = {frac01:.4f}")
    assert 0.025 <= frac05 <= 0.08
    assert frac01 <= 0.025
    assert (t.loc[ok, "padj"] > 0.05).all()  # nothing survives BH on pure null data


@pytest.mark.parametrize(
    ("n_donors", "n_cells", "n_genes", "unequal"),
    [(6, 60, 2000, False), (6, 60, 2000, True), (20, 300, 1000, True)],
)
def test_null_calibration_across_donors_and_cells(n_donors, n_cells, n_genes, unequal):
    """The default on ``scmlm.datasets.simulate`` nulls: 6 donors with 60 cells, equal and unequal in size (each
    donor keeps 20-100 % of its cells), and 20 donors of unequal size with 300 cells. Fraction of p < 0.05 within
    [0.035, 0.06], except with 6 donors of equal size, where averaging in Mancl–DeRouen makes the default slightly
    conservative (0.034 measured; the bound there is 0.03). Plain Mancl–DeRouen is further below on the same data.
    The designs with several donor-level columns are in ``tests/test_gee_calibration.py``."""
    adata = _null_cells(n_donors, n_cells, n_genes, seed=n_donors * 1000 + n_cells + unequal, unequal=unequal)
    t = gee_de(adata, "~ condition", CONTRAST, inplace=False).table
    ok = (t["status"] == "ok").to_numpy()
    p = t.loc[ok, "pvalue"].to_numpy()
    frac = np.mean(p < 0.05)
    print(f"null {n_donors} donors x {n_cells} cells: {ok.sum()} genes, fraction p<0.05 = {frac:.4f}")
    assert ok.sum() >= 0.7 * n_genes
    assert (t.loc[ok, "df"] == n_donors - 2).all()
    assert (0.03 if n_donors == 6 and not unequal else 0.035) <= frac <= 0.06
    if n_donors == 6 and not unequal:  # plain Mancl-DeRouen is clearly conservative on the same data
        t2 = gee_de(adata, "~ condition", CONTRAST, small_sample="md", inplace=False).table
        frac2 = np.mean(t2.loc[t2["status"] == "ok", "pvalue"] < 0.05)
        print(f"  Mancl-DeRouen with t(4): {frac2:.4f}")
        assert frac2 < min(0.03, frac)


def test_bell_mccaffrey_df_matches_explicit_matrices(small):
    """The p × p closed form of the df equals the Satterthwaite df of the quadratic form sum_d (a_d' r_d)^2 built
    from dense n × n matrices: a_d = (I - H_dd)^-1/2' V_d^-1 D_d B^-1 c and Cov(r) = V - D B^-1 D'."""
    a = _null_cells(6, 40, 200, seed=2, unequal=True)
    g = _expressed_genes(a, 1, min_cells=60)[0]
    kw = {"genes": [g], "small_sample": "kc", "df": "satterthwaite", "inplace": False}
    row = gee_de(a, "~ condition", CONTRAST, **kw).table.iloc[0]
    model, fit, y, X, off = _direct_gee(a, g, "nb", alpha=row["dispersion"], cov_type="robust")
    rho = model.cov_struct.dep_params
    codes = a.obs["donor"].cat.codes.to_numpy()
    mu = np.exp(X @ fit.params + off)
    D = X * mu[:, None]
    n = len(y)
    V = np.zeros((n, n))
    for c in np.unique(codes):
        i = np.flatnonzero(codes == c)
        s = np.sqrt(mu[i] + row["dispersion"] * mu[i] ** 2)
        R = np.full((i.size, i.size), rho)
        np.fill_diagonal(R, 1.0)
        V[np.ix_(i, i)] = s[:, None] * R * s[None, :]
    Vinv = np.linalg.inv(V)
    Binv = np.linalg.inv(D.T @ Vinv @ D)
    cvec = np.array([0.0, 1.0])
    avecs = []
    for c in np.unique(codes):
        i = np.flatnonzero(codes == c)
        Vi = np.linalg.inv(V[np.ix_(i, i)])
        H = D[i] @ Binv @ D[i].T @ Vi
        root = np.real(scipy.linalg.sqrtm(np.linalg.inv(np.eye(i.size) - H)))
        ad_ = np.zeros(n)
        ad_[i] = root.T @ Vi @ D[i] @ Binv @ cvec
        avecs.append(ad_)
    Sigma = V - D @ Binv @ D.T
    Om = np.array([[u @ Sigma @ w for w in avecs] for u in avecs])
    df = np.trace(Om) ** 2 / np.trace(Om @ Om)
    np.testing.assert_allclose(row["df"], df, rtol=1e-4)
    assert row["df"] < 4  # unequal donors: below the cluster count rule (6 - 2)


# ---------------------------------------------------------------- (c) binomial: population-average attenuation


def _logistic_glmm_data(seed, n_donors=40, n_cells=50, n_genes=30, b0=-0.5, b1=1.0, sd=2.0, link="logit"):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), n_cells)
    x = np.tile((np.arange(n_cells) >= n_cells // 2).astype(float), n_donors)
    u = rng.normal(0.0, sd, (n_donors, n_genes))
    eta = b0 + b1 * x[:, None] + u[donor]
    if link == "logit":
        y = rng.random(eta.shape) < expit(eta)
    else:
        y = rng.poisson(np.exp(eta))
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"d{d:02d}" for d in donor]),
            "condition": pd.Categorical(np.where(x == 1, "case", "ctrl"), categories=["ctrl", "case"]),
        },
        index=[f"c{i}" for i in range(len(x))],
    )
    return ad.AnnData(X=sp.csr_matrix(y.astype(np.float32)), obs=obs)


def test_binomial_population_average_log_odds_ratio_is_attenuated():
    b0, b1, sd = -0.5, 1.0, 2.0
    adata = _logistic_glmm_data(3, b0=b0, b1=b1, sd=sd)
    t = gee_de(adata, "~ condition", CONTRAST, family="binomial", offset=None, inplace=False).table
    assert (t["status"] == "ok").all()
    est, se_mean = t["coef"].mean(), t["coef"].std() / np.sqrt(len(t))
    # exact marginal log OR of the simulated logistic GLMM (normal donor effect integrated out)
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    pa_exact = logit(np.sum(w * expit(b0 + b1 + sd * z))) - logit(np.sum(w * expit(b0 + sd * z)))
    zla = b1 / np.sqrt(1 + 0.346 * sd**2)  # Zeger–Liang–Albert approximation
    print(f"GEE {est:.3f} ± {se_mean:.3f}; exact PA {pa_exact:.3f}; ZLA {zla:.3f}; cluster-specific {b1}")
    assert est < b1 - 6 * se_mean  # clearly smaller than the cluster-specific log OR
    assert abs(est - pa_exact) < 4 * se_mean + 0.01
    assert abs(est - zla) < 4 * se_mean + 0.05  # ZLA is approximate for sd = 2
    assert (t["working_corr"] > 0.1).all()  # a large donor variance shows up as within-donor correlation


def test_log_link_is_not_attenuated():
    """Same donor variance with a log link: the population-average slope equals the cluster-specific one."""
    b1 = 1.0
    adata = _logistic_glmm_data(5, b0=-1.0, b1=b1, sd=1.0, link="log")
    t = gee_de(adata, "~ condition", CONTRAST, family="poisson", offset=None, inplace=False).table
    est, se_mean = t["coef"].mean(), t["coef"].std() / np.sqrt(len(t))
    assert abs(est - b1) < 4 * se_mean + 0.01


# ---------------------------------------------------------------- (d) bad inputs and failed genes


def test_random_term_is_refused_with_pointer_to_cluster_key(small):
    with pytest.raises(DesignError, match="cluster_key="):
        gee_de(small, "~ condition + (1|donor)", CONTRAST)


def test_missing_obs_keys_list_columns(small):
    with pytest.raises(InputError, match=r"cluster_key 'patient' is not a column.*'donor'"):
        gee_de(small, "~ condition", CONTRAST, cluster_key="patient")
    with pytest.raises(InputError, match=r"groups_key 'celltype'.*'cell_type'"):
        gee_de(small, "~ condition", CONTRAST, groups_key="celltype")
    with pytest.raises(InputError, match="offset 'sf'"):
        gee_de(small, "~ condition", CONTRAST, offset="sf")
    with pytest.raises(DesignError, match="'treatment'"):
        gee_de(small, "~ treatment", CONTRAST)


def test_non_integer_counts_name_the_layer(small):
    a = small.copy()
    a.X = a.X.multiply(1.0 / np.asarray(a.X.sum(axis=1))).tocsr()
    with pytest.raises(InputError, match=r"adata\.X.*layer=\"counts\""):
        gee_de(a, "~ condition", CONTRAST)
    a.layers["lognorm"] = a.X.copy()
    with pytest.raises(InputError, match="layer 'lognorm'"):
        gee_de(a, "~ condition", CONTRAST, layer="lognorm")
    # the raw counts layer works
    res = gee_de(a, "~ condition", CONTRAST, layer="counts", genes=_expressed_genes(small, 2), inplace=False)
    assert (res.table["status"] == "ok").all()


def test_zero_total_cells_are_reported(small):
    a = small.copy()
    X = a.X.tolil()
    X[3, :] = 0
    a.X = X.tocsr()
    with pytest.raises(InputError, match=r"1 cell\(s\) have zero total counts.*filter_cells"):
        gee_de(a, "~ condition", CONTRAST)
    # another offset makes the cell usable
    a.obs["log_sf"] = np.log(a.obs["size_factor"])
    res = gee_de(a, "~ condition", CONTRAST, offset="log_sf", genes=_expressed_genes(small, 2), inplace=False)
    assert res.params["offset"] == "log_sf"


def test_unknown_options(small):
    with pytest.raises(InputError, match="family='gamma'"):
        gee_de(small, "~ condition", CONTRAST, family="gamma")
    with pytest.raises(InputError, match="'nope'"):
        gee_de(small, "~ condition", CONTRAST, genes=["nope"])
    with pytest.raises(InputError, match="small_sample"):
        gee_de(small, "~ condition", CONTRAST, small_sample="jackknife")
    with pytest.raises(InputError, match="df='kr'"):
        gee_de(small, "~ condition", CONTRAST, df="kr")
    with pytest.raises(DesignError, match="level 'treated'"):
        gee_de(small, "~ condition", ("condition", "treated", "ctrl"))


def test_too_few_donor_degrees_of_freedom(small):
    # donor as a fixed effect: all 6 columns are constant within donors, leaving 6 - 6 = 0 donor df
    with pytest.raises(DesignError, match="donor degrees of freedom"):
        gee_de(small, "~ donor", ("donor", "donor01", "donor00"))


def test_failed_genes_keep_their_rows(small):
    a = small.copy()
    X = a.X.toarray()
    X[:, 0] = 0
    X[:5, 0] = 1  # 5 expressing cells
    X[:, 1] = np.maximum(X[:, 1], 1)  # expressed everywhere: no detection contrast left
    a.X = sp.csr_matrix(X)
    genes = list(a.var_names[:2]) + _expressed_genes(small, 2)
    t = gee_de(a, "~ condition", CONTRAST, family="binomial", genes=genes, inplace=False).table
    assert list(t["gene"]) == genes
    assert t["status"].tolist()[:2] == ["too few expressing cells", "expressed in every cell"]
    assert t.loc[:1, ["coef", "se", "stat", "pvalue", "padj"]].isna().all().all()
    assert not t.loc[:1, "converged"].any()
    assert (t.loc[2:, "status"] == "ok").all() and t.loc[2:, "pvalue"].notna().all()


def test_separated_gene_is_flagged_not_fatal(small):
    a = small.copy()
    X = a.X.toarray()
    case = (a.obs["condition"] == "case").to_numpy()
    X[:, 0] = 0
    X[case, 0] = 2  # counts only in case cells: the log fold change is infinite
    a.X = sp.csr_matrix(X)
    genes = [a.var_names[0], *_expressed_genes(small, 2)]
    for family in ("nb", "binomial"):
        t = gee_de(a, "~ condition", CONTRAST, family=family, genes=genes, inplace=False).table
        assert t.loc[0, "status"] in (
            "perfect separation",
            "diverged: no counts in some level of the design (separation)",
        )
        assert np.isnan(t.loc[0, "pvalue"]) and not t.loc[0, "converged"]
        assert (t.loc[1:, "status"] == "ok").all()


# ---------------------------------------------------------------- API conventions


def test_inplace_copy_and_uns(small):
    genes = _expressed_genes(small, 3)
    a = small.copy()
    assert gee_de(a, "~ condition", CONTRAST, genes=genes) is None
    entry = a.uns["gee_de"]
    assert set(entry) == {"params", "results"}
    assert entry["params"]["family"] == "nb" and entry["params"]["cluster_key"] == "donor"
    assert entry["params"]["small_sample"] == "avg" and entry["params"]["df"] == "design"
    table = scmlm.get.de_df(a, key="gee_de")
    cols = ["gene", "group", "contrast", "coef", "log2fc", "se", "stat", "df", "pvalue", "padj", "base_mean"]
    assert list(table.columns[: len(cols)]) == cols
    assert {"method", "converged", "status", "dispersion", "working_corr"} <= set(table.columns)
    np.testing.assert_allclose(table["base_mean"], np.asarray(small[:, genes].X.mean(axis=0)).ravel(), rtol=1e-6)
    b = gee_de(small, "~ condition", CONTRAST, genes=genes, copy=True, key_added="g2")
    assert "g2" in b.uns and "g2" not in small.uns and "gee_de" not in small.uns
    pd.testing.assert_frame_equal(b.uns["g2"]["results"], table)


def test_deterministic_across_n_jobs(small, monkeypatch):
    genes = _expressed_genes(small, 12, min_cells=20)
    monkeypatch.setattr(scmlm.settings, "chunk_size", 4)
    one = gee_de(small, "~ condition", CONTRAST, genes=genes, n_jobs=1, inplace=False).table
    two = gee_de(small, "~ condition", CONTRAST, genes=genes, n_jobs=2, inplace=False).table
    pd.testing.assert_frame_equal(one, two)


def test_groups_key_fits_each_cell_type():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=60, n_cell_types=2, seed=8)
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    t = gee_de(adata, "~ condition", CONTRAST, groups_key="cell_type", inplace=False).table
    assert t.groupby("group").size().to_dict() == {"type0": 60, "type1": 60}
    for _, sub in t.groupby("group"):
        np.testing.assert_allclose(sub["padj"], scmlm.results.bh_adjust(sub["pvalue"].to_numpy()), equal_nan=True)
