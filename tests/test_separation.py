"""Separated genes (no counts in one condition): a valid test and a finite, labelled fold change.

A gene with no counts in one condition has no finite maximum-likelihood estimate; its Wald test is void. ``glmm_de``
keeps the status ``separated`` (now a usable status), reports the prior-count fold change of
:func:`scmlm.models.prior_count_coef` (``se_raw`` NaN) and tests it: moderated contrasts against the prior variance of
the other genes (:func:`scmlm.models.moderate_separated`), the others by the likelihood ratio at the supremum
(:func:`scmlm.models.separated_lrt`), in both cases never below the exact bound of
:func:`scmlm.models.separation_bound`.
The nulls below have many low-expressed NB genes (means 0.003-0.3 per cell) so that chance separation is common.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scmlm
from scmlm.models import fit_glmm, intercept_term, prepare_glmm, separated_lrt, sup_loglik

CONTRAST = ("condition", "case", "ctrl")


def low_count_null(design: str, n_per: int, seed: int, *, n_genes: int = 2000, induced: int = 0) -> ad.AnnData:
    """NB counts (dispersion 0.5) with small means and donor effects (sd 0.5); ``paired``: ``n_per`` donors seen in
    both conditions, with sample effects (sd 0.3); ``between``: ``n_per`` donors per condition. 40 cells per sample,
    30 well-expressed genes (not tested) for the library sizes. The first ``induced`` genes have no counts in ctrl and
    0.2 per cell (times the donor effect) in case."""
    rng = np.random.default_rng(seed)
    if design == "between":
        samples = [(d, "case" if d % 2 else "ctrl") for d in range(2 * n_per)]
    else:
        samples = [(d, c) for d in range(n_per) for c in ("ctrl", "case")]
    n_donors = len({s[0] for s in samples})
    donor = np.repeat([s[0] for s in samples], 40)
    cond = np.repeat([s[1] for s in samples], 40)
    sample = np.repeat(np.arange(len(samples)), 40)
    lib = np.exp(rng.normal(0, 0.3, donor.size))
    mu = np.exp(rng.uniform(np.log(0.003), np.log(0.3), n_genes))
    b_d = rng.normal(0, 0.5, (n_genes, n_donors))
    b_s = rng.normal(0, 0.3, (n_genes, len(samples))) if design == "paired" else np.zeros((n_genes, len(samples)))
    m = mu[:, None] * lib[None, :] * np.exp(b_d[:, donor] + b_s[:, sample])
    m[:induced] = 0.2 * lib[None, :] * np.exp(b_d[:induced, donor]) * (cond == "case")[None, :]
    Y = rng.negative_binomial(2, 2 / (2 + m))
    house = rng.negative_binomial(2, 2 / (2 + 20 * lib[None, :]), size=(30, donor.size))
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"d{d}" for d in donor]),
            "condition": pd.Categorical(cond, categories=["ctrl", "case"]),
        },
        index=[f"c{i}" for i in range(donor.size)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)] + [f"h{i}" for i in range(30)])
    return ad.AnnData(sp.csr_matrix(np.vstack([Y, house]).T.astype(np.float32)), obs=obs, var=var)


def _de(a: ad.AnnData, family: str, **kw) -> pd.DataFrame:
    genes = [g for g in a.var_names if g.startswith("g")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scmlm.tl.glmm_de(
            a, "~ condition + (1|donor)", CONTRAST, family=family, genes=genes, min_cells_expressing=3,
            inplace=False, n_jobs=1, **kw,
        ).table  # fmt: skip


NULLS = [  # design, donors (per condition for "between"), family, seeds
    ("paired", 3, "nb", (1, 11)),
    ("paired", 6, "nb", (2, 12)),
    ("between", 3, "nb", (3, 13)),
    ("between", 6, "nb", (4, 14)),
    ("paired", 4, "binomial", (5, 15)),
    ("between", 4, "binomial", (6, 16)),
]


@pytest.mark.slow
@pytest.mark.parametrize("moderate", [True, False], ids=["moderated", "per-gene"])
def test_separated_null_genes_are_calibrated(moderate):
    """Among separated null genes and among all tested null genes, at most 6 % of p < 0.05, pooled over 2 seeds of
    each design and family (2,000 genes each; 76-133 separated genes per design); and not absurdly conservative:
    overall at least 1.5 %, and the separated genes' p-values not all piled at 1.

    Measured (separated genes, p < 0.05): moderated 4.1 % of 683 pooled (per design 0-9.2 %), per-gene 1.2 %; all
    tested genes 3.0 % and 2.3 % of 19,601. The highest, paired with 3 donors (9.2 % of 120), is separated genes with
    6-8 counts all in one condition, whose p-value is the exact bound itself (2 * 0.5^T): conditioning on separation
    selects the most extreme null genes, and each design is allowed 6 % plus two binomial SEs."""
    sep_p, all_p = [], []
    for design, n_per, family, seeds in NULLS:
        tabs = [_de(low_count_null(design, n_per, s), family, moderate=moderate) for s in seeds]
        t = pd.concat(tabs)
        sep = t.loc[t["status"] == "separated", "pvalue"].to_numpy(dtype=float)
        usable = t.loc[t["status"].isin(scmlm.models.USABLE_STATUS), "pvalue"].to_numpy(dtype=float)
        assert np.isfinite(sep).all() and np.isfinite(t.loc[t["status"] == "separated", "coef"]).all()
        assert sep.size >= 50, (design, family, sep.size)
        frac = float(np.mean(sep < 0.05))
        assert frac <= 0.06 + 2 * np.sqrt(0.05 * 0.95 / sep.size), (design, n_per, family, sep.size, frac)
        assert float(np.mean(usable < 0.05)) <= 0.06, (design, n_per, family, float(np.mean(usable < 0.05)))
        sep_p.append(sep)
        all_p.append(usable)
    sep_p, all_p = np.concatenate(sep_p), np.concatenate(all_p)
    assert np.mean(sep_p < 0.05) <= 0.06, (sep_p.size, np.mean(sep_p < 0.05))
    assert 0.015 <= np.mean(all_p < 0.05) <= 0.06, (all_p.size, np.mean(all_p < 0.05))
    assert np.mean(sep_p < 0.5) >= 0.2


@pytest.mark.parametrize("design", ["paired", "between"])
@pytest.mark.parametrize("family", ["nb", "binomial"])
def test_induced_genes_are_discoveries(design, family):
    """Genes with no counts in ctrl and 0.2 per cell in case (6 donors per condition, or 6 paired donors) are
    ``separated`` with a finite, positive fold change and a small p-value, moderated or not."""
    a = low_count_null(design, 6, 21, n_genes=300, induced=20)
    for moderate in (True, False):
        t = _de(a, family, moderate=moderate).set_index("gene")
        ind = t.loc[[f"g{i}" for i in range(20)]]
        assert (ind["status"] == "separated").all()
        assert (ind["coef"] > 1.5).all() and np.isfinite(ind["log2fc"]).all() and ind["se_raw"].isna().all()
        p = ind["pvalue"].to_numpy(dtype=float)
        if moderate:
            # between 6 + 6 donors the randomisation bound is 2 / C(12, 6) = 0.0022 for a gene seen in all six case
            # donors, 2 * 6 / C(12, 5) = 0.015 for one seen in five
            assert (p < 0.02).all() and np.median(p) < 0.005, (moderate, p.max(), np.median(p))
            assert np.mean(ind["padj"] < 0.05) >= 0.9
        else:  # the likelihood ratio of the gene alone, on the containment df (paired: 5, between: 10)
            assert (p < 0.05).all() and np.median(p) < 0.01, (moderate, p.max(), np.median(p))


def test_supremum_is_the_ml_fit_without_separation():
    """Without separation the supremum is the ordinary ML fit (the LRT of glmm_lrt); with no counts in one group it is
    the fit of the other group alone, which the full model approaches along beta -> -inf."""
    rng = np.random.default_rng(1)
    donor = np.repeat(np.arange(8), 40)
    cond = (donor % 2).astype(float)
    X = np.column_stack([np.ones(donor.size), cond])
    terms = [intercept_term("donor", donor)]
    Y = rng.poisson(0.4 * np.exp(rng.normal(0, 0.3, 8))[donor], size=(4, donor.size)).astype(float)
    Y[:2, cond == 0] = 0
    ml = fit_glmm(Y, prepare_glmm(X, terms, family="nb"), method="ML")
    assert list(ml.status[:2]) == ["separated"] * 2 and ml.status[2] in ("ok", "singular")
    sup = sup_loglik(Y, X, terms, family="nb")
    np.testing.assert_allclose(sup[2:], ml.loglik[2:], rtol=1e-10)
    case = cond == 1
    alone = fit_glmm(
        Y[:2][:, case], prepare_glmm(X[case][:, :1], [intercept_term("donor", donor[case] // 2)]), method="ML"
    )
    np.testing.assert_allclose(sup[:2], alone.loglik, rtol=1e-8)
    con = separated_lrt(Y, X, terms, np.array([0.0, 1.0]), family="nb", df=6, n_units=8, genes=np.array([0, 1]))
    assert np.all(con.coef > 0) and np.all(np.isnan(con.se)) and np.all(con.pvalue < 0.05)


def test_kang_induced_genes_are_discoveries():
    """Kang 2018 CD14+ monocytes (2 donors, paired, IFN-beta): IFIT1 and IFI44L have no counts in control cells; the
    default glmm_de call gives them a finite log2FC and padj < 0.05 (moderated against the other genes' prior)."""
    kang = scmlm.datasets.kang2018()
    mono = kang[kang.obs["cell_type"] == "CD14+ Monocytes"].copy()
    genes = ["IFIT1", "IFI44L"]
    ctrl = (mono.obs["condition"] == "ctrl").to_numpy()
    assert mono[ctrl, genes].X.sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = scmlm.tl.glmm_de(mono, "~ condition + (1|donor)", ("condition", "stim", "ctrl"), inplace=False).table
    t = t.set_index("gene")
    sel = t.loc[genes]
    assert (sel["status"] == "separated").all()
    assert np.isfinite(sel["log2fc"]).all() and (sel["log2fc"] > 3).all()
    assert (sel["padj"] < 0.05).all()
    assert (sel["moderation"] == "moderated").all()


def test_separated_genes_through_shards_lrt_and_joint_tests():
    """A sharded run merges to the unsharded numbers for separated genes (their moderation is finished over all
    genes by merge_shards); test="lrt" and a joint F test give separated genes a likelihood-ratio p-value."""
    a = low_count_null("paired", 4, 3, n_genes=200, induced=10)
    full = _de(a, "nb").set_index("gene")
    parts = [_de(a, "nb", shard=(i, 3)).assign(shard=f"{i}/3") for i in (1, 2, 3)]
    merged = scmlm.results.merge_shards(parts).set_index("gene").loc[full.index]
    sep = full.index[full["status"] == "separated"]
    assert sep.size >= 10
    pd.testing.assert_frame_equal(
        merged.loc[sep, ["coef", "pvalue", "padj", "p_bound", "status", "moderation"]],
        full.loc[sep, ["coef", "pvalue", "padj", "p_bound", "status", "moderation"]],
        rtol=1e-10,
    )
    lrt = _de(a, "nb", test="lrt").set_index("gene")
    ind = lrt.loc[[f"g{i}" for i in range(10)]]
    assert (ind["status"] == "separated").all() and (ind["coef"] > 1.5).all() and (ind["pvalue"] < 0.2).all()
    a.obs["dose"] = pd.Categorical(
        np.where(a.obs["condition"] == "ctrl", "0", np.where(a.obs["donor"].cat.codes % 2 == 0, "1", "2"))
    )
    genes = [g for g in a.var_names if g.startswith("g")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = scmlm.tl.glmm_de(
            a, "~ dose + (1|donor)", {"any": ["dose[T.1]", "dose[T.2]"]}, genes=genes, min_cells_expressing=3,
            inplace=False,
        ).table.set_index("gene")  # fmt: skip
    js = joint.loc[[f"g{i}" for i in range(10)]]
    assert (js["status"] == "separated").all() and np.isfinite(js["pvalue"]).all() and js["coef"].isna().all()
