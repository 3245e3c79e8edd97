"""scmlm.tl.glmm_de through the AnnData API: power vs pseudobulk, shards, determinism, CLI, families, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_pseudobulk_de import auc

import scmlm
from scmlm.cli import main as cli_main

CONTRAST = ("condition", "case", "ctrl")
DESIGN = "~ condition + (1|donor) + (1|batch)"


@pytest.fixture(scope="module")
def between():
    return scmlm.datasets.simulate(n_donors=10, n_cells=150, n_genes=1200, n_batches=3, seed=7)


@pytest.fixture(scope="module")
def between_fit(between):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # status summary
        # the random 3-level batch as written (replication="auto" fits it as a fixed effect: test_replication_auto.py)
        return scmlm.tl.glmm_de(between, DESIGN, CONTRAST, replication="as_written", inplace=False).table


def test_power_fdr_and_auc_vs_pseudobulk(between, between_fit, capsys):
    truth = between.var["is_de"].to_numpy()
    tab = between_fit
    sig = (tab["padj"] < 0.05).to_numpy()
    fdr = float((~truth[sig]).mean()) if sig.any() else 0.0
    a_glmm = auc(-np.log(tab["pvalue"].fillna(1.0).to_numpy()), truth)
    pb = scmlm.pp.pseudobulk(between, "donor", layer="counts")
    pbt = scmlm.tl.pseudobulk_de(pb, "~ batch + condition", CONTRAST, inplace=False).table
    a_pb = auc(-np.log(pbt["pvalue"].fillna(1.0).to_numpy()), truth)
    with capsys.disabled():
        print(
            f"\nGLMM: {int(sig.sum())} genes at padj<0.05, observed FDR {fdr:.3f}, AUC {a_glmm:.4f}; "
            f"pseudobulk nb_ql AUC {a_pb:.4f}"
        )
    assert sig.sum() >= 5
    assert fdr <= 0.05
    assert a_glmm >= a_pb - 0.005


def test_schema_statuses_and_df(between_fit):
    tab = between_fit
    assert tab.columns.tolist()[:14] == scmlm.results.COLUMNS
    for col in ("dispersion", "var_donor", "var_batch", "icc_donor", "icc_batch", "n_iter"):
        assert col in tab.columns
    assert set(tab["status"]) <= {"ok", "singular", "not converged", "too few expressing cells", "all zero"}
    fitted = tab["status"].isin(["ok", "singular"])
    assert fitted.mean() > 0.8
    # donor-level contrast: t test on at most donors - donor-level coefficients = 10 - 2 df (Satterthwaite can lower it)
    assert (tab.loc[fitted, "df"] <= 8).all()
    assert (tab.loc[fitted, "df"] == 8).mean() > 0.2
    assert (tab.loc[fitted, "df"] >= 1).all()
    few = tab["status"] == "too few expressing cells"
    assert tab.loc[few, "pvalue"].isna().all() and not tab.loc[few, "converged"].any()
    icc = tab.loc[fitted, ["icc_donor", "icc_batch"]]
    assert ((icc >= 0) & (icc < 1)).all().all()


def test_shards_merge_equal_full_run_and_n_jobs_deterministic(between, tmp_path):
    sub = between[:, :90].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        full = scmlm.tl.glmm_de(sub, DESIGN, CONTRAST, inplace=False, n_jobs=1).table
        par = scmlm.tl.glmm_de(sub, DESIGN, CONTRAST, inplace=False, n_jobs=2).table
        pd.testing.assert_frame_equal(full, par)
        parts = []
        for i in (1, 2, 3):
            t = scmlm.tl.glmm_de(sub, DESIGN, CONTRAST, inplace=False, shard=(i, 3)).table
            t["shard"] = f"{i}/3"
            parts.append(t)
    assert sum(len(p) for p in parts) == sub.n_vars
    merged = scmlm.results.merge_shards(parts[::-1])
    pd.testing.assert_frame_equal(merged, full)


def test_cli_shards_and_merge(between, tmp_path):
    sub = between[:, :40].copy()
    sub = sub[np.asarray(sub.X.sum(axis=1)).ravel() > 0].copy()  # log_total needs cells with counts
    cells = tmp_path / "cells.h5ad"
    sub.write_h5ad(cells)
    outs = []
    for i in (1, 2):
        out = tmp_path / f"shard{i}.csv"
        rc = cli_main(
            ["de", str(cells), "--tool", "glmm", "--family", "nb", "--design", DESIGN,
             "--contrast", "condition:case:ctrl", "--shard", f"{i}/2", "--out", str(out)]
        )  # fmt: skip
        assert rc == 0
        outs.append(str(out))
    t1 = pd.read_csv(outs[0])
    assert t1["padj"].isna().all() and (t1["shard"] == "1/2").all()
    assert cli_main(["merge", outs[0], "--out", str(tmp_path / "bad.csv")]) == 2
    assert not (tmp_path / "bad.csv").exists()
    assert cli_main(["merge", *outs, "--out", str(tmp_path / "all.csv")]) == 0
    merged = pd.read_csv(tmp_path / "all.csv")
    assert merged["gene"].tolist() == list(sub.var_names)
    np.testing.assert_allclose(merged["padj"], scmlm.results.bh_adjust(merged["pvalue"].to_numpy()), equal_nan=True)


def test_within_donor_contrast_gets_sample_level_df():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=100, n_genes=40, design="within", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, moderate=False, inplace=False)
        written = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, replication="as_written", inplace=False)
    # the condition is constant within the 12 donor × condition samples: the default fits (1|donor:condition) and
    # tests at the sample level (per-gene Satterthwaite df, about the 5 of the paired t test where the sample
    # variance is clearly non-zero); as written, the contrast gets the cell-level residual df
    assert res.params["added_terms"] == ["(1|donor:condition)"]
    ok = res.table["status"].isin(["ok", "singular"])
    assert res.table.loc[ok & (res.table["status"] == "ok"), "df"].median() < 20
    ok_w = written.table["status"].isin(["ok", "singular"])
    assert (written.table.loc[ok_w, "df"] > 50).all()
    assert written.table.loc[ok_w, "df"].median() > 150


@pytest.mark.parametrize("family", ["poisson", "binomial", "gaussian"])
def test_other_families_run_through_api(family):
    adata = scmlm.datasets.simulate(n_donors=8, n_cells=60, n_genes=25, seed=9)
    layer = None
    if family == "gaussian":
        import scanpy as sc

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        layer = None
    offset = None if family in ("gaussian", "binomial") else "log_total"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tab = scmlm.tl.glmm_de(
            adata, "~ condition + (1|donor)", CONTRAST, family=family, layer=layer, offset=offset, inplace=False
        ).table
    assert (tab["method"] == f"glmm_{family}").all()
    ok = tab["status"].isin(["ok", "singular"])
    assert ok.sum() >= 10
    assert tab.loc[ok, "pvalue"].between(0, 1).all()
    if family == "poisson":
        assert tab["dispersion"].isna().all()


def test_bad_input():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=30, n_genes=80, seed=1)
    adata = adata[:, adata.var["log_mu"] > -1].copy()
    with pytest.raises(scmlm.DesignError, match=r"uses 'patient', not found among the columns: 'donor'"):
        scmlm.tl.glmm_de(adata, "~ condition + (1|patient)", CONTRAST)
    with pytest.raises(scmlm.DesignError, match="'cell_type' has a single level"):
        scmlm.tl.glmm_de(adata, "~ condition + (1|cell_type)", CONTRAST)
    adata.obs["pair"] = pd.Categorical(np.where(adata.obs["donor"].cat.codes < 3, "p1", "p2"))
    with pytest.warns(UserWarning, match="only 2 levels"):
        scmlm.tl.glmm_de(adata, "~ condition + (1|donor) + (1|pair)", CONTRAST, inplace=False)
    with pytest.raises(scmlm.EstimabilityError, match=r"'condition' is constant within each level of 'donor'"):
        scmlm.tl.glmm_de(adata, "~ condition + donor + (1|batch)", CONTRAST)
    bad = adata.copy()
    bad.X = bad.X.astype(np.float64) * 0.5
    with pytest.raises(scmlm.InputError, match=r'adata\.X must hold raw non-negative integer counts.*layer="counts"'):
        scmlm.tl.glmm_de(bad, "~ condition + (1|donor)", CONTRAST)
    with pytest.raises(scmlm.InputError, match="family='zinb'"):
        scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, family="zinb")


def test_all_zero_gene_gets_status_not_crash():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=60, seed=2)
    X = adata.X.toarray()
    X[:, 0] = 0
    X[:, 1] = 0
    X[0, 1] = 3  # one expressing cell
    adata.X = sp.csr_matrix(X)
    with pytest.warns(UserWarning, match="all zero"):
        tab = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, inplace=False).table
    assert tab.loc[0, "status"] == "all zero" and np.isnan(tab.loc[0, "pvalue"])
    assert tab.loc[1, "status"] == "too few expressing cells"
    assert len(tab) == 60


@pytest.mark.parametrize(
    ("design", "formula", "n_donors"),
    [("between", DESIGN, 10), ("within", "~ condition + (1|donor)", 8)],
)
def test_null_calibration_through_api(design, formula, n_donors):
    adata = scmlm.datasets.simulate(
        n_donors=n_donors, n_cells=100, n_genes=1500, design=design, null=True, seed=12, n_batches=3
    )
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tab = scmlm.tl.glmm_de(adata, formula, CONTRAST, inplace=False).table
    p = tab["pvalue"].dropna()
    assert len(p) >= 1000
    assert 0.035 <= (p < 0.05).mean() <= 0.06


def test_lrt_and_groups():
    adata = scmlm.datasets.simulate(n_donors=8, n_cells=80, n_genes=30, n_cell_types=2, seed=5)
    adata = adata[:, adata.var["log_mu"] > -1.5].copy()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wald = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, groups_key="cell_type", inplace=False)
        lrt = scmlm.tl.glmm_de(
            adata, "~ condition + (1|donor)", CONTRAST, groups_key="cell_type", test="lrt", inplace=False
        )
    w, r = wald.table, lrt.table
    assert sorted(w["group"].unique()) == ["type0", "type1"]
    for _, sub in w.groupby("group"):
        np.testing.assert_allclose(sub["padj"], scmlm.results.bh_adjust(sub["pvalue"].to_numpy()), equal_nan=True)
    ok = w["pvalue"].notna() & r["pvalue"].notna()
    assert ok.sum() > 10
    # the likelihood-ratio and Wald tests of the same contrast agree closely on these well-determined fits
    assert np.corrcoef(np.log(w.loc[ok, "pvalue"]), np.log(r.loc[ok, "pvalue"]))[0, 1] > 0.95
    assert (np.sign(r.loc[ok, "stat"]) == np.sign(w.loc[ok, "coef"])).all()
