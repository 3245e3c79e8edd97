"""The unit of replication: paired (within-donor) contrasts are tested against sample-level variation.

Null data from ``scmlm.datasets.simulate(design="within")``: 8 donors, each giving a control and a treated sample.
With donor-specific responses (the simulator's default, sd 0.25 of the condition effect between donors), a model
with only ``(1|donor)`` tests the condition against cell-to-cell noise; the default call adds the sample-level term.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pandas as pd
import pytest

import scmlm
from scmlm.design import build_design, containment_df, replication, within_parent

CONTRAST = ("condition", "case", "ctrl")
N_GENES = 2000


def _null(sd_response: float, seed: int):
    adata = scmlm.datasets.simulate(
        n_donors=8, n_cells=200, n_genes=N_GENES, n_batches=2, design="within", null=True, seed=seed,
        sd_response=sd_response,
    )  # fmt: skip
    return adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()


@pytest.fixture(scope="module")
def null_responses():
    return _null(0.25, seed=3)


@pytest.fixture(scope="module")
def null_alike():
    return _null(0.0, seed=4)


def _glmm(adata, formula, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scmlm.tl.glmm_de(adata, formula, CONTRAST, inplace=False, **kw)


def _warned(caught, pattern: str) -> bool:
    return any(issubclass(w.category, UserWarning) and re.search(pattern, str(w.message)) for w in caught)


def _fraction(table) -> float:
    p = table["pvalue"].dropna()
    assert len(p) >= 1500
    return float((p < 0.05).mean())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["nb", "binomial"])
def test_default_call_adds_sample_term_and_is_calibrated(null_responses, family, caplog):
    offset = "log_total" if family == "nb" else None
    with caplog.at_level(logging.INFO, logger="scmlm"):
        res = _glmm(null_responses, "~ condition + (1|donor)", family=family, offset=offset)
    p = res.params
    assert p["design_fitted"] == "~ condition + (1|donor) + (1|donor:condition)"
    assert p["added_terms"] == ["(1|donor:condition)"]
    assert p["replication"] == "auto" and p["replication_unit"] == "donor:condition"
    msgs = [r.getMessage() for r in caplog.records if "added (1|donor:condition)" in r.getMessage()]
    assert len(msgs) == 1 and "16 samples" in msgs[0]
    assert "var_donor:condition" in res.table.columns
    # sample-level df: about the 7 of a paired t test, not the ~1,500 cells
    assert res.table["df_resid"].median() < 60  # the moderated df adds the prior df to it
    assert 0.035 <= _fraction(res.table) <= 0.06


def test_model_as_written_pseudoreplicates_and_warns(null_responses):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = scmlm.tl.glmm_de(
            null_responses, "~ condition + (1|donor)", CONTRAST, replication="as_written", inplace=False
        )
    assert _warned(caught, r"constant within each of the 16 samples.*replication='as_written'")
    assert res.params["added_terms"] == [] and res.params["design_fitted"] == "~ condition + (1|donor)"
    assert _fraction(res.table) > 0.08  # the failure the default prevents


@pytest.mark.slow
@pytest.mark.parametrize(
    ("formula", "unit"),
    [("~ condition + (1|donor) + (1|sample)", "sample"), ("~ condition + (1 + condition|donor)", "donor")],
)
def test_explicit_sample_level_models_are_calibrated(null_responses, formula, unit):
    res = _glmm(null_responses, formula)
    assert res.params["added_terms"] == [] and res.params["design_fitted"] == formula
    assert res.params["replication_unit"] == unit
    assert 0.035 <= _fraction(res.table) <= 0.06


@pytest.mark.slow
def test_default_keeps_power_when_donors_respond_alike(null_alike):
    """Without donor-specific responses the sample variance is mostly estimated at zero; the Satterthwaite df then
    let the cells replicate the contrast again, instead of capping it at the 7 df of the paired t test (per-gene
    tests; the moderated default is covered in test_moderation.py)."""
    res = _glmm(null_alike, "~ condition + (1|donor)", moderate=False)
    assert res.params["added_terms"] == ["(1|donor:condition)"]
    assert 0.02 <= _fraction(res.table) <= 0.06


def test_gee_with_donor_clusters_is_calibrated():
    sub = scmlm.datasets.simulate(
        n_donors=8, n_cells=60, n_genes=1500, n_batches=2, design="within", null=True, seed=6
    )  # donor-specific responses (the default); few cells, as the GEE fits cost per cell
    sub = sub[np.asarray(sub.X.sum(axis=1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tab = scmlm.tl.gee_de(sub, "~ condition", CONTRAST, cluster_key="donor", inplace=False).table
    p = tab["pvalue"].dropna()
    assert len(p) >= 1200
    assert (tab["df"].dropna() <= 7 + 1e-9).all()  # at most donors - 1: clusters are donors, not cells
    assert 0.035 <= float((p < 0.05).mean()) <= 0.06


def _reused_labels(seed: int = 5):
    """Case–control across 12 donors in 3 batches, donor labels restarting at 1 in every batch."""
    adata = scmlm.datasets.simulate(
        n_donors=12, n_cells=60, n_genes=600, n_batches=3, design="between", null=True, seed=seed
    )
    obs = adata.obs
    first = obs.drop_duplicates("donor")
    rank = first.groupby("batch", observed=True).cumcount() + 1
    relabel = dict(zip(first["donor"].astype(str), rank.astype(str), strict=True))
    obs["donor_raw"] = obs["donor"]
    obs["donor"] = pd.Categorical(obs["donor_raw"].astype(str).map(relabel))
    return adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()


def test_reused_donor_labels_are_caught(caplog):
    adata = _reused_labels()
    # the condition varies within donor "1" (a different person in each batch): a crossed model is cell-level
    assert (adata.obs.groupby("donor", observed=True)["condition"].nunique() > 1).any()
    d = build_design(adata.obs, "~ condition + (1|batch) + (1|donor)")
    L = d.contrast(CONTRAST).L
    rep = replication(d, L)
    assert rep.level == "sample" and rep.unit == "batch:donor" and rep.n_units == 12 and rep.combined_groups
    assert "'(1|batch/donor)'" in rep.message("c", "f")
    with caplog.at_level(logging.INFO, logger="scmlm"):
        res = _glmm(adata, "~ condition + (1|batch) + (1|donor)")
    assert res.params["added_terms"] == ["(1|batch:donor)"]
    assert any("batch × donor combination" in r.getMessage() for r in caplog.records)
    # the added term gives the df of the nested model (the crossed donor term it keeps is only a nuisance)
    nested = _glmm(adata, "~ condition + (1|batch/donor)")
    assert nested.params["added_terms"] == [] and nested.params["replication_unit"] == "batch:donor"
    ok = res.table["pvalue"].notna() & nested.table["pvalue"].notna()
    assert np.corrcoef(np.log(res.table.loc[ok, "pvalue"]), np.log(nested.table.loc[ok, "pvalue"]))[0, 1] > 0.9
    assert (res.table["df_resid"].dropna() <= 10).all()  # 12 donors - 2, not cells (before the prior df)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong = scmlm.tl.glmm_de(
            adata, "~ condition + (1|batch) + (1|donor)", CONTRAST, replication="as_written", inplace=False
        )
    assert _warned(caught, r"batch × donor combination.*'\(1\|batch/donor\)'")
    assert wrong.table["df"].median() > 100
    assert _fraction_any(wrong.table) > 2 * _fraction_any(res.table)


def _fraction_any(table) -> float:
    p = table["pvalue"].dropna()
    return float((p < 0.05).mean())


def test_cell_level_covariates_get_donor_terms():
    """A contrast that varies within samples can still differ between donors: the default adds the donor-specific
    term (a random slope of a number, a donor × factor term of a factor); as written it keeps cell-level df."""
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=100, n_genes=40, design="within", seed=3)
    rng = np.random.default_rng(0)
    adata.obs["score"] = rng.normal(size=adata.n_obs)  # varies from cell to cell
    adata.obs["genotype"] = pd.Categorical(rng.choice(["wt", "mut"], adata.n_obs))  # per-cell, within samples
    runs = {}
    for rule in ("auto", "as_written"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            runs[rule] = (
                scmlm.tl.glmm_de(adata, "~ score + (1|donor)", "score", replication=rule, inplace=False),
                scmlm.tl.glmm_de(
                    adata, "~ genotype + condition + (1|donor)", ("genotype", "mut", "wt"), sample_key="sample",
                    replication=rule, inplace=False,
                ),
            )  # fmt: skip
    score, geno = runs["auto"]
    assert score.params["added_terms"] == ["(0 + score|donor)"] and score.params["replication_unit"] == "donor"
    assert geno.params["added_terms"] == ["(1|donor:genotype)"] and geno.params["replication_unit"] == "donor"
    for r in runs["auto"]:
        ok = r.table["status"].isin(["ok", "singular"])
        assert ok.sum() > 20 and (r.table.loc[ok, "df_resid"] <= 6).all()  # donor-level df (before the prior's)
    for r in runs["as_written"]:
        assert r.params["added_terms"] == [] and r.params["replication_unit"] == "donor"  # the unit it lacks
        ok = r.table["status"].isin(["ok", "singular"])
        assert ok.sum() > 20 and r.table.loc[ok, "df"].median() > 150
    # the same per-cell factor without sample_key is taken for a sample-defining variable (donor × genotype)
    d = build_design(adata.obs, "~ genotype + condition + (1|donor)")
    assert replication(d, d.contrast(("genotype", "mut", "wt")).L).unit == "donor:genotype"


def test_sample_key_names_the_unit():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=40, design="within", seed=2)
    adata.obs["library"] = adata.obs["sample"].cat.rename_categories(lambda s: "lib_" + s)
    res = _glmm(adata, "~ condition + (1|donor)", sample_key="library")
    assert res.params["added_terms"] == ["(1|library)"] and res.params["replication_unit"] == "library"
    assert res.params["sample_key"] == "library"
    with pytest.raises(scmlm.InputError, match="replication='always'"):
        scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, replication="always")


def test_containment_df_of_paired_and_between_designs():
    obs = scmlm.datasets.simulate(n_donors=8, n_cells=10, n_genes=2, design="within", seed=0).obs
    d = build_design(obs, "~ condition + (1|donor) + (1|donor:condition)")
    L = d.contrast(CONTRAST).L
    assert containment_df(d, L) == 7  # 16 samples - 8 donors - 1: the paired t test
    assert within_parent(d, L)
    slope = build_design(obs, "~ condition + (1 + condition|donor)")
    assert containment_df(slope, L) == 7 and within_parent(slope, L)
    cells = build_design(obs, "~ condition + (1|donor)")
    assert containment_df(cells, L) is None and not within_parent(cells, L)
    obs_b = scmlm.datasets.simulate(n_donors=10, n_cells=10, n_genes=2, n_batches=3, seed=0).obs
    b = build_design(obs_b, "~ condition + (1|donor) + (1|batch)")
    Lb = b.contrast(CONTRAST).L
    assert containment_df(b, Lb) == 8 and not within_parent(b, Lb)  # donors - 2, as before


def test_no_replication_is_not_testable():
    """One donor per condition: the contrast has no replication at its level; the fit stands, the test does not."""
    adata = scmlm.datasets.simulate(n_donors=2, n_cells=150, n_genes=30, design="between", seed=1)
    adata = adata[:, adata.var["log_mu"] > -1.5].copy()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tab = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, inplace=False).table
    fitted = tab["converged"]
    assert fitted.sum() >= 5
    assert (tab.loc[fitted, "status"] == "not testable").all()
    assert tab.loc[fitted, ["stat", "pvalue", "padj"]].isna().all().all()
    assert tab.loc[fitted, "coef"].notna().all()
