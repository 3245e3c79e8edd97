from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scmlm


@pytest.fixture(scope="module")
def sim():
    return scmlm.datasets.simulate(n_donors=12, n_cells=300, n_genes=400, frac_de=0.2, seed=11)


def test_schema(sim):
    assert sim.shape == (12 * 300, 400)
    for col in ("donor", "batch", "condition", "cell_type"):
        assert isinstance(sim.obs[col].dtype, pd.CategoricalDtype)
    assert list(sim.obs["condition"].cat.categories) == ["ctrl", "case"]
    assert {"is_de", "logfc", "log_mu", "dispersion", "sd_donor", "sd_batch"} <= set(sim.var.columns)
    X = sim.X.toarray()
    np.testing.assert_array_equal(X, np.round(X))
    assert (X >= 0).all()
    np.testing.assert_array_equal(X, sim.layers["counts"].toarray())
    assert sim.var["is_de"].sum() == 80
    assert (sim.var.loc[~sim.var["is_de"], "logfc"] == 0).all()


def test_reproducible_and_null():
    a = scmlm.datasets.simulate(n_donors=4, n_cells=20, n_genes=30, seed=5)
    b = scmlm.datasets.simulate(n_donors=4, n_cells=20, n_genes=30, seed=5)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    n = scmlm.datasets.simulate(n_donors=4, n_cells=20, n_genes=30, null=True)
    assert not n.var["is_de"].any()


def test_between_and_within_designs():
    b = scmlm.datasets.simulate(n_donors=6, n_cells=10, n_genes=5, design="between")
    assert (b.obs.groupby("donor", observed=True)["condition"].nunique() == 1).all()
    w = scmlm.datasets.simulate(n_donors=6, n_cells=10, n_genes=5, design="within")
    assert (w.obs.groupby("donor", observed=True)["condition"].nunique() == 2).all()
    # batches are donor-level, round robin
    assert (b.obs.groupby("donor", observed=True)["batch"].nunique() == 1).all()


def test_de_genes_shift_by_logfc(sim):
    X = sim.X.toarray() / sim.obs["size_factor"].to_numpy()[:, None]
    case = (sim.obs["condition"] == "case").to_numpy()
    lfc_obs = np.log(X[case].mean(0) + 1e-9) - np.log(X[~case].mean(0) + 1e-9)
    de = sim.var["is_de"].to_numpy()
    expressed = sim.var["log_mu"].to_numpy() > -1.5
    truth = sim.var["logfc"].to_numpy()
    sel = de & expressed
    # observed shift tracks the truth for DE genes (donor noise with 12 donors keeps it from being exact)
    assert np.corrcoef(lfc_obs[sel], truth[sel])[0, 1] > 0.8
    assert np.median(np.abs(lfc_obs[sel] - truth[sel])) < 0.35
    assert np.median(np.abs(lfc_obs[~de & expressed])) < 0.3


def test_donor_variance_shows_between_donors(sim):
    X = sim.X.toarray() / sim.obs["size_factor"].to_numpy()[:, None]
    donor = sim.obs["donor"].cat.codes.to_numpy()
    ctrl = (sim.obs["condition"] == "ctrl").to_numpy()
    expressed = np.flatnonzero(sim.var["log_mu"].to_numpy() > 0)
    sds = []
    for g in expressed:
        means = [np.log(X[(donor == d) & ctrl, g].mean()) for d in np.unique(donor[ctrl])]
        sds.append(np.std(means, ddof=1))
    sds = np.array(sds)
    truth = np.sqrt(sim.var["sd_donor"].to_numpy()[expressed] ** 2 + sim.var["sd_batch"].to_numpy()[expressed] ** 2)
    # spread of donor means is of the size of the simulated donor (+ batch) SD, well above sampling noise
    assert 0.6 < np.median(sds / truth) < 1.4


def test_bad_arguments():
    with pytest.raises(scmlm.InputError, match="n_donors=1"):
        scmlm.datasets.simulate(n_donors=1)
    with pytest.raises(scmlm.InputError, match="design='paired'"):
        scmlm.datasets.simulate(design="paired")


def test_samples_and_donor_specific_responses():
    w = scmlm.datasets.simulate(n_donors=8, n_cells=300, n_genes=300, design="within", sd_response=0.5, seed=3)
    obs = w.obs
    assert (obs["sample"].astype(str) == obs["donor"].astype(str) + "_" + obs["condition"].astype(str)).all()
    assert obs["sample"].nunique() == 16 and (obs["sample_id"] == obs["sample"]).all()
    X = w.X.toarray() / obs["size_factor"].to_numpy()[:, None]
    expressed = np.flatnonzero(w.var["log_mu"].to_numpy() > 0)
    donor, case = obs["donor"].cat.codes.to_numpy(), (obs["condition"] == "case").to_numpy()
    lfc = np.array(
        [[np.log(X[(donor == d) & case, g].mean() / X[(donor == d) & ~case, g].mean()) for g in expressed] for d in
         range(8)]
    )  # fmt: skip
    # the condition effect differs between donors with sd ≈ sd_response (per gene, drawn around 0.5)
    ratio = lfc.std(axis=0, ddof=1) / w.var["sd_response"].to_numpy()[expressed]
    assert 0.7 < np.median(ratio) < 1.3
    assert 0.35 < np.median(w.var["sd_response"]) < 0.7
    # donors that respond alike: the spread is sampling noise only
    alike = scmlm.datasets.simulate(n_donors=8, n_cells=300, n_genes=300, design="within", sd_response=0, seed=3)
    Xa = alike.X.toarray() / alike.obs["size_factor"].to_numpy()[:, None]
    lfc_a = np.array(
        [[np.log(Xa[(donor == d) & case, g].mean() / Xa[(donor == d) & ~case, g].mean()) for g in expressed] for d in
         range(8)]
    )  # fmt: skip
    assert np.median(lfc_a.std(axis=0, ddof=1)) < 0.2 * np.median(lfc.std(axis=0, ddof=1))
    assert (alike.var["sd_response"] == 0).all()


def test_between_design_has_no_sample_effects():
    a = scmlm.datasets.simulate(n_donors=6, n_cells=30, n_genes=50, seed=4)
    b = scmlm.datasets.simulate(n_donors=6, n_cells=30, n_genes=50, seed=4, sd_response=0)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())  # a donor is one sample: its effect is the donor's
    assert (a.var["sd_response"] == 0).all() and a.obs["sample"].nunique() == 6


def test_unbalanced_samples():
    u = scmlm.datasets.simulate(n_donors=6, n_cells=(20, 2000), n_genes=20, design="within", seed=7)
    sizes = u.obs["sample"].value_counts()
    assert len(sizes) == 12 and sizes.between(20, 2000).all()
    assert sizes.max() / sizes.min() > 5  # log-uniform over two decades
    assert u.uns["simulate"]["n_cells"] == [20, 2000]
    with pytest.raises(scmlm.InputError, match=r"n_cells=\(50, 10\)"):
        scmlm.datasets.simulate(n_cells=(50, 10))
    with pytest.raises(scmlm.InputError, match="sd_response=-1"):
        scmlm.datasets.simulate(sd_response=-1)
