"""Variance partition / ICC, partial pooling (BLUPs vs unpooled), and within- vs between-donor effects."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scmlm


@pytest.fixture(scope="module")
def sim():
    # large donor variance for half the genes, none for the others: the partition must tell them apart
    adata = scmlm.datasets.simulate(n_donors=12, n_cells=80, n_genes=80, n_batches=3, seed=21)
    return adata[:, adata.var["log_mu"] > -1.5].copy()


@pytest.fixture(scope="module")
def vp(sim):
    return scmlm.tl.variance_partition(sim, "~ (1|donor) + (1|batch) + condition", inplace=False).table


def test_fractions_sum_to_one_and_icc_formula(vp):
    ok = vp["converged"].to_numpy()
    assert ok.mean() > 0.9
    parts = vp.loc[ok, ["donor", "batch", "fixed", "residual"]]
    np.testing.assert_allclose(parts.sum(axis=1), 1.0, atol=1e-10)
    assert (parts >= 0).all().all()
    v = vp.loc[ok]
    icc = v["var_donor"] / (v["var_donor"] + v["var_batch"] + v["var_residual"])
    np.testing.assert_allclose(v["icc_donor"], icc, rtol=1e-10)
    # NB residual variance on the latent scale: log(1 + 1/lambda + phi) > 0
    assert (v["var_residual"] > 0).all()


def test_donor_variance_tracks_truth(sim, vp):
    ok = vp["converged"].to_numpy()
    truth = sim.var["sd_donor"].to_numpy() ** 2
    est = vp["var_donor"].to_numpy()
    r = np.corrcoef(est[ok], truth[ok])[0, 1]
    assert r > 0.5, f"correlation of estimated and simulated donor variance {r:.2f}"


def test_inplace_and_groups(sim):
    a = sim[:, :12].copy()
    scmlm.tl.variance_partition(a, "~ (1|donor) + condition", key_added="vp")
    assert set(a.uns["vp"]) == {"params", "results"}
    assert a.uns["vp"]["params"]["tool"] == "variance_partition"
    df = a.uns["vp"]["results"]
    assert list(df.index) == list(a.var_names)
    a.obs["part"] = pd.Categorical(np.where(a.obs["cell_type"].cat.codes.to_numpy() % 1 == 0, "x", "y"))
    a.obs["half"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2 == 0, "h1", "h2"))
    g = scmlm.tl.variance_partition(a, "~ (1|donor) + condition", groups_key="half", inplace=False).table
    assert sorted(g["group"].unique()) == ["h1", "h2"] and len(g) == 2 * a.n_vars
    with pytest.raises(scmlm.DesignError, match="no random terms"):
        scmlm.tl.variance_partition(a, "~ condition")


def test_partial_pooling_shrinks_small_donors():
    rng = np.random.default_rng(4)
    n_donors, G = 10, 6
    sizes = np.array([8, 12, 20, 30, 60, 100, 150, 200, 300, 400])  # unbalanced donors
    donor = np.repeat(np.arange(n_donors), sizes)
    n = donor.size
    u = rng.normal(0, 0.4, (n_donors, G))
    mu = np.exp(0.5 + u[donor])
    y = rng.negative_binomial(1 / 0.2, 1 / (1 + 0.2 * mu))
    obs = pd.DataFrame(
        {"donor": pd.Categorical([f"d{d}" for d in donor]), "condition": pd.Categorical(np.where(donor % 2, "b", "a"))},
        index=[f"c{i}" for i in range(n)],
    )
    obs["total"] = 1.0
    adata = ad.AnnData(X=sp.csr_matrix(y.astype(np.float32)), obs=obs)
    adata.var_names = [f"g{j}" for j in range(G)]
    scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", ("condition", "b", "a"), offset=None)
    assert scmlm.tl.random_effects(adata, genes=list(adata.var_names)) is None
    assert adata.uns["random_effects"]["params"]["tool"] == "random_effects"
    assert adata.uns["random_effects"]["params"]["source_key"] == "glmm_de"
    copied = scmlm.tl.random_effects(adata, genes=["g0"], key_added="re_g0", copy=True)
    assert "re_g0" in copied.uns and "re_g0" not in adata.uns
    re = adata.uns["random_effects"]["results"]
    assert set(re.columns) >= {"gene", "term", "level", "blup", "blup_se", "unpooled", "unpooled_se", "n_cells"}
    d = re[re["term"] == "donor"].copy()
    d["shrink"] = 1 - d["blup"].abs() / d["unpooled"].abs()
    # BLUPs are pulled toward 0, more for small donors (pooled within condition, so compare by size)
    small = d[d["n_cells"] <= 20]["shrink"].median()
    large = d[d["n_cells"] >= 200]["shrink"].median()
    assert small > large
    assert (d["blup"].abs() <= d["unpooled"].abs() + 1e-6).mean() > 0.9
    # conditional SDs are smaller than the unpooled SEs (information from the other donors)
    assert (d["blup_se"] < d["unpooled_se"]).mean() > 0.9
    ax = scmlm.pl.shrinkage(adata, "g0", term="donor", show=False)
    assert ax is not None


def test_random_effects_needs_glmm_result(sim):
    with pytest.raises(scmlm.InputError, match="holds no glmm_de result"):
        scmlm.tl.random_effects(sim, key="nothing", genes=["g00001"])


def _ecological_fallacy_data(seed=0):
    """Within each donor, more x → less expression; donors with more x have more expression overall."""
    rng = np.random.default_rng(seed)
    n_donors, n_cells, G = 20, 60, 20
    donor = np.repeat(np.arange(n_donors), n_cells)
    x_mean = np.linspace(-2, 2, n_donors)
    x = x_mean[donor] + rng.normal(0, 0.7, donor.size)
    within_slope, between_slope = -0.4, 0.8
    donor_eff = between_slope * x_mean + rng.normal(0, 0.15, n_donors)
    eta = 0.5 + donor_eff[donor] + within_slope * (x - x_mean[donor])
    mu = np.exp(eta)[:, None] * np.ones((1, G))
    y = rng.negative_binomial(1 / 0.1, 1 / (1 + 0.1 * mu))
    obs = pd.DataFrame(
        {"donor": pd.Categorical([f"d{d:02d}" for d in donor]), "x": x}, index=[f"c{i}" for i in range(donor.size)]
    )
    adata = ad.AnnData(X=sp.csr_matrix(y.astype(np.float32)), obs=obs)
    adata.var_names = [f"g{j}" for j in range(G)]
    return adata, within_slope, between_slope


def test_within_between_recovers_both_signs():
    adata, within_slope, between_slope = _ecological_fallacy_data()
    scmlm.pp.center_within(adata, "x", by="donor")
    res = scmlm.tl.glmm_de(adata, "~ x_within + x_between + (1|donor)", "x_within", offset=None, inplace=False).table
    assert (res["coef"] < 0).all()
    np.testing.assert_allclose(res["coef"].median(), within_slope, atol=0.05)
    res_b = scmlm.tl.glmm_de(adata, "~ x_within + x_between + (1|donor)", "x_between", offset=None, inplace=False).table
    assert (res_b["coef"] > 0).all()
    np.testing.assert_allclose(res_b["coef"].median(), between_slope, atol=0.15)
    # the between effect is tested on donor-level df; the within effect too by default (replication="auto" adds the
    # random slope (0 + x_within|donor): its average over donors is a donor-level quantity), on cell-level df as written
    assert (res_b["df_resid"] <= 20 - 2).all()  # the moderated df adds the prior df
    assert (res_b["df"] > 10).all()
    assert (res["df_resid"] <= 20 - 1).all() and "var_donor:x_within" in res.columns
    with pytest.warns(UserWarning, match="varies within each of the 20 donor levels"):
        cells = scmlm.tl.glmm_de(
            adata, "~ x_within + x_between + (1|donor)", "x_within", offset=None, replication="as_written",
            inplace=False,
        ).table  # fmt: skip
    assert (cells["df"] > 300).all()
    # a pooled model that ignores donors mixes the two and gets the within-donor sign wrong
    with pytest.warns(UserWarning, match="pseudoreplication"):
        pooled = scmlm.tl.glmm_de(adata, "~ x", "x", offset=None, family="nb", inplace=False).table
    assert (pooled["coef"] > 0).all()


def test_variance_partition_and_glmm_de_fit_the_same_genes():
    """One eligibility rule: genes glmm_de refuses are not fitted by variance_partition, and every gene gets the same
    status from both (same model, REML)."""
    import warnings

    a = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=120, seed=5)
    X = a.X.toarray()
    X[:, 0] = 0
    X[:4, 0] = 1  # 4 expressing cells: below min_cells_expressing=10
    X[:, 1] = 0  # all zero
    X[a.obs["condition"].to_numpy() == "case", 2] = 0  # no counts in one condition: separated
    a.X = sp.csr_matrix(X)
    design = "~ condition + (1|donor)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        de = scmlm.tl.glmm_de(a, design, ("condition", "case", "ctrl"), inplace=False).table.set_index("gene")
        vp = scmlm.tl.variance_partition(a, design, inplace=False).table
    assert de.loc["g00000", "status"] == "too few expressing cells"
    assert de.loc["g00001", "status"] == "all zero"
    assert de.loc["g00002", "status"] == "separated"
    pd.testing.assert_series_equal(vp["status"], de.loc[vp.index, "status"], check_names=False)
    pd.testing.assert_series_equal(vp["converged"], de.loc[vp.index, "converged"], check_names=False)
    refused = ~vp["converged"].to_numpy()
    assert refused.sum() >= 3
    assert vp.loc[refused, ["donor", "fixed", "residual", "var_donor"]].isna().all().all()
    # the threshold is a parameter of both, with the same meaning
    vp3 = scmlm.tl.variance_partition(a, design, min_cells_expressing=3, inplace=False).table
    assert vp3.loc["g00000", "status"] != "too few expressing cells"
