"""Empirical-Bayes moderated GLMM tests: null calibration by design, singular fits, shards, LRT, switches."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import scmlm
from scmlm.models.moderate import (
    BOUNDARY_DF_MIN,
    _boundary_df,
    coarser_terms,
    moderate,
    unit_scale,
)

CONTRAST = ("condition", "case", "ctrl")
GENES = 1500


def _fit(adata, formula, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scmlm.tl.glmm_de(adata, formula, CONTRAST, inplace=False, **kw)


def _crossed():
    # batch crossed with donors (every donor's cells spread over three lanes) and a donor-level covariate
    adata = scmlm.datasets.simulate(n_donors=12, n_cells=60, n_genes=GENES, null=True, n_batches=1, seed=7)
    rng = np.random.default_rng(0)
    age = rng.normal(size=12)
    adata.obs["age"] = age[adata.obs["donor"].cat.codes.to_numpy()]
    adata.obs["lane"] = pd.Categorical(rng.integers(0, 3, adata.n_obs).astype(str))
    return adata, "~ condition + age + (1|donor) + (1|lane)"


CASES = {
    "10 donors": lambda: (
        scmlm.datasets.simulate(n_donors=10, n_cells=60, n_genes=GENES, null=True, n_batches=1, seed=1),
        "~ condition + (1|donor)",
    ),
    "within-donor": lambda: (
        scmlm.datasets.simulate(n_donors=8, n_cells=80, n_genes=GENES, null=True, design="within", seed=4),
        "~ condition + (1|donor)",
    ),
    "unbalanced 20-2000": lambda: (
        scmlm.datasets.simulate(n_donors=10, n_cells=(20, 2000), n_genes=GENES, null=True, n_batches=1, seed=2),
        "~ condition + (1|donor)",
    ),
    "crossed + covariate": _crossed,
    "3 vs 3": lambda: (
        scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=GENES, null=True, n_batches=1, seed=5),
        "~ condition + (1|donor)",
    ),
    "2 vs 2": lambda: (
        scmlm.datasets.simulate(n_donors=4, n_cells=60, n_genes=GENES, null=True, n_batches=1, seed=6),
        "~ condition + (1|donor)",
    ),
}


@pytest.fixture(scope="module")
def nulls():
    out = {}
    for name, make in CASES.items():
        adata, formula = make()
        out[name] = _fit(adata, formula).table
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_null_calibrated(nulls, case, capsys):
    tab = nulls[case]
    tested = tab["pvalue"].notna()
    frac = float((tab.loc[tested, "pvalue"] < 0.05).mean())
    sing = tested & (tab["status"] == "singular")
    with capsys.disabled():
        print(
            f"\n{case}: {frac:.4f} of {int(tested.sum())} at p<0.05; singular {int(sing.sum())}, "
            f"{float((tab.loc[sing, 'pvalue'] < 0.05).mean()):.4f}; df_prior {tab['df_prior'].median():.2f}"
        )
    assert tested.mean() > 0.8
    assert (tab.loc[tested, "moderation"] == "moderated").all()
    # 2 vs 2 donors: each gene's variance rests on 2 df and the per-gene test is at 0.6 % (moderate=False); the
    # guarded prior borrows about 2 df (scmlm.models.moderate) and lands at 2.6 % (3.5 % with limma's robust fit,
    # whose top third of true donor variances reached 10 % on such data)
    assert (0.02 if case == "2 vs 2" else 0.035) <= frac <= 0.06


def test_singular_fits_pooled(nulls, capsys):
    p = pd.concat([t.loc[t["status"] == "singular", "pvalue"] for t in nulls.values()]).dropna()
    frac = float((p < 0.05).mean())
    with capsys.disabled():
        print(f"\nsingular fits pooled over the null cases: {frac:.4f} of {p.size} at p<0.05")
    assert p.size > 500
    assert 0.035 <= frac <= 0.065


def test_paired_alike_is_conservative_not_anticonservative(capsys):
    # paired samples without donor-specific responses: the sample variance is at zero for most genes, the prior df
    # is infinite and every gene gets the expression trend, which lies a little above the truth at low counts
    adata = scmlm.datasets.simulate(
        n_donors=8, n_cells=100, n_genes=GENES, design="within", null=True, sd_response=0.0, seed=4
    )
    t = _fit(adata, "~ condition + (1|donor)").table
    p = t["pvalue"].dropna()
    frac = float((p < 0.05).mean())
    with capsys.disabled():
        print(f"\npaired, donors respond alike: {frac:.4f} of {p.size} at p<0.05")
    assert 0.012 <= frac <= 0.06


def test_columns_params_and_switch(nulls):
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=120, null=True, n_batches=1, seed=3)
    mod = _fit(adata, "~ condition + (1|donor)")
    raw = _fit(adata, "~ condition + (1|donor)", moderate=False)
    t, r = mod.table, raw.table
    assert mod.params["moderate"] is True and raw.params["moderate"] is False
    for col in ("df_prior", "var_prior", "se_raw", "tau2", "df_resid", "unit_scale", "moderation"):
        assert col in t.columns
    done = t["moderation"] == "moderated"
    assert done.sum() > 80
    # the moderated df is the gene's residual df plus the prior df; the point estimate does not change
    np.testing.assert_allclose(t.loc[done, "df"], t.loc[done, "df_resid"] + t.loc[done, "df_prior"])
    np.testing.assert_allclose(t["coef"], r["coef"], equal_nan=True)
    np.testing.assert_allclose(t["se_raw"], r["se"], equal_nan=True)
    assert (r["moderation"].isin(["off"]) | r["pvalue"].isna()).all()
    assert r["df_prior"].isna().all()
    # every gene keeps a row; genes that were not fitted say why and are not moderated
    assert len(t) == adata.n_vars
    assert (t.loc[~done, "moderation"].str.startswith("not moderated")).all()


def test_shards_merge_equal_unsharded():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=150, n_batches=3, seed=9)
    formula = "~ condition + (1|donor) + (1|batch)"
    full = _fit(adata, formula).table
    parts = []
    for i in (1, 2, 3):
        t = _fit(adata, formula, shard=(i, 3)).table
        assert (t["moderation"].isin(["pending"]) | t["se_raw"].isna()).all()
        t["shard"] = f"{i}/3"
        parts.append(t)
    merged = scmlm.results.merge_shards(parts[::-1])
    assert merged["gene"].tolist() == full["gene"].tolist()
    for col in ("se", "stat", "df", "pvalue", "padj", "df_prior", "var_prior"):
        np.testing.assert_allclose(merged[col], full[col], rtol=1e-8, atol=1e-12, equal_nan=True)
    assert (merged["moderation"] == full["moderation"]).all()


def test_nested_batch_falls_back_to_per_gene_tests(capsys):
    # donors nested in 3 batches with unequal case/control counts: the contrast's variance rests on the batch
    # variance too (3 levels), which a prior for the donor term does not moderate; the per-gene test stays
    adata = scmlm.datasets.simulate(n_donors=10, n_cells=60, n_genes=800, null=True, n_batches=3, seed=1)
    # as written: replication="auto" fits the 3-level batch as a fixed effect, which is moderated
    t = _fit(adata, "~ condition + (1|donor) + (1|batch)", replication="as_written").table
    tested = t["pvalue"].notna()
    assert t.loc[tested, "moderation"].str.contains(r"\(1\|batch\)").all()
    assert t["df_prior"].isna().all()
    frac = float((t.loc[tested, "pvalue"] < 0.05).mean())
    with capsys.disabled():
        print(f"\nnested batch, per-gene fallback: {frac:.4f} of {int(tested.sum())} at p<0.05")
    assert 0.03 <= frac <= 0.065
    # donors nested in batches not balanced over case/control: the coarser term is found
    donor = np.repeat(np.arange(10), 5)
    X = np.column_stack([np.ones(50), donor % 2])

    class T:
        def __init__(self, name, codes):
            self.name, self.codes = name, codes

    assert coarser_terms(X, [T("donor", donor), T("batch", donor % 3)], np.array([0.0, 1.0])) == ["batch"]


def test_cell_level_contrast_not_moderated():
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=60, n_batches=1, seed=2)
    adata.obs["score"] = np.random.default_rng(1).normal(size=adata.n_obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # as written: replication="auto" adds the random slope (0 + score|donor), a donor-level test
        t = scmlm.tl.glmm_de(adata, "~ score + (1|donor)", "score", replication="as_written", inplace=False).table
    fitted = t["pvalue"].notna()
    assert (t.loc[fitted, "moderation"] == "cell-level contrast").all()
    assert t["df_prior"].isna().all()


def test_moderate_prior_recovers_scaled_chi2():
    # genes with a common between-unit variance: the prior df is large and the prior variance close to the truth
    rng = np.random.default_rng(0)
    G, d = 3000, 8
    tau2 = 0.3 * rng.chisquare(d, G) / d
    res = moderate(np.zeros(G), tau2, np.full(G, d), np.exp(rng.normal(size=G)), 0.4, np.ones(G, bool))
    assert np.median(res["df_prior"]) > 50
    assert abs(np.median(res["var_prior"]) - 0.3) < 0.02
    few = moderate(np.zeros(5), tau2[:5], np.full(5, d), np.ones(5), 0.4, np.ones(5, bool))
    assert np.isnan(few["pvalue"]).all() and few["moderation"][0].startswith("not moderated: fewer than")


def test_unit_scale_balanced():
    # 10 donors, 5 per arm: c = 1/5 + 1/5 for the case-control difference
    donor = np.repeat(np.arange(10), 7)
    X = np.column_stack([np.ones(70), donor % 2])
    c, n_units, k = unit_scale(X, [donor], np.array([0.0, 1.0]))
    assert n_units == 10 and k == 0
    assert c == pytest.approx(0.4)


def test_lrt_calibrated_null(capsys):
    adata = scmlm.datasets.simulate(n_donors=10, n_cells=40, n_genes=600, null=True, n_batches=1, seed=11)
    t = _fit(adata, "~ condition + (1|donor)", test="lrt").table
    p = t["pvalue"].dropna()
    frac = float((p < 0.05).mean())
    with capsys.disabled():
        print(f"\nLRT (F = df (exp(LR/units) - 1) on F(1, df)): {frac:.4f} of {p.size} at p<0.05")
    assert p.size > 450
    assert 0.03 <= frac <= 0.07


def test_boundary_df_equal_and_unequal_units():
    # the Satterthwaite df of a boundary fit's tau2: d for equal units, far fewer when a few units carry the
    # information (20-2,000 cells per donor), floored at BOUNDARY_DF_MIN
    Xu = np.column_stack([np.ones(10), np.arange(10) % 2])
    L = np.array([0.0, 1.0])
    equal = _boundary_df(Xu, L, np.full((10, 1), 50.0), np.array([8.0]), 8.0)
    assert equal[0] == pytest.approx(8.0)
    cells = np.array([1231, 1026, 51, 1709, 24, 179, 25, 525, 32, 24], dtype=float)
    unequal = _boundary_df(Xu, L, (cells * 0.05)[:, None], np.array([8.0]), 8.0)
    assert unequal[0] == pytest.approx(BOUNDARY_DF_MIN)
    raw = _boundary_df(Xu, L, (cells * 0.05)[:, None], np.array([40.0]), 8.0)
    assert BOUNDARY_DF_MIN <= raw[0] < 4
