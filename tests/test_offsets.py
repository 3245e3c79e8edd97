"""offset="tmm": edgeR's TMM factors carried to the cells, and what they change on the Kang 2018 IFN-β data."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from helpers import REFERENCE

import scmlm
from scmlm.design import design_samples, resolve_offset, resolve_samples, tmm_offset
from scmlm.errors import InputError
from scmlm.tl._common import cell_offset

STIM = ("condition", "stim", "ctrl")


def _log_total(adata):
    """Log total counts; the 100-gene Kang subset has cells without counts (-inf: they add 0 to their sample)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(adata.X.sum(axis=1), dtype=float).ravel())


def _datasets(sim_within):
    sim = sim_within.copy()
    return {
        "kang2018": (scmlm.datasets.kang2018(), "sample_id", "cell_type"),
        "kang2018_100genes": (scmlm.datasets.kang2018_100genes(), "sample_id", "cell_type"),
        "sim_within_small": (sim, ["donor", "condition"], None),
    }


def test_factors_equal_edger_calcnormfactors(sim_within):
    """Factors, library sizes and effective library sizes equal edgeR's on the same pseudobulk (80 samples)."""
    ref = pd.read_csv(REFERENCE / "tmm" / "tmm_factors.csv", dtype={"sample": str, "group": str})
    n_checked = 0
    for name, (adata, samples, groups_key) in _datasets(sim_within).items():
        off, tab = tmm_offset(adata.obs, adata.X, _log_total(adata), samples, groups_key)
        r = ref[ref["dataset"] == name]
        m = tab.merge(r, on=["group", "sample"], suffixes=("", "_r"), validate="one_to_one")
        assert len(m) == len(r) == len(tab), name
        np.testing.assert_array_equal(m["lib_size"], m["lib_size_r"])
        np.testing.assert_allclose(m["norm_factor"], m["norm_factor_r"], rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(m["eff_lib_size"], m["eff_lib_size_r"], rtol=1e-10, err_msg=name)
        n_checked += len(m)
        # the identity behind the offset: the cells' exp(offset) sum to edgeR's effective library size of their sample
        cols = [samples] if isinstance(samples, str) else samples
        key = adata.obs[cols].astype(str).agg(":".join, axis=1)
        grp = adata.obs[groups_key].astype(str) if groups_key else pd.Series("all", index=adata.obs_names)
        sums = pd.Series(np.exp(off), index=adata.obs_names).groupby([grp, key]).sum()
        eff = tab.set_index(["group", "sample"])["eff_lib_size"]
        np.testing.assert_allclose(sums.loc[eff.index].to_numpy(), eff.to_numpy(), rtol=1e-10, err_msg=name)
    assert n_checked == 80
    # the factors are not all 1: the test would catch an offset that ignored them
    assert ref["norm_factor"].sub(1).abs().max() > 0.3


def test_cell_offset_dispatch_and_errors(sim_within):
    a = sim_within
    base = cell_offset(a, a.X, "log_total", None)
    off = cell_offset(a, a.X, "tmm", None, samples=["donor", "condition"])
    f = np.exp(off - base)
    # one factor per donor × condition sample, geometric mean 1 over the samples
    per_sample = pd.Series(f).groupby([a.obs["donor"].to_numpy(), a.obs["condition"].to_numpy()]).agg(["min", "max"])
    np.testing.assert_allclose(per_sample["min"], per_sample["max"])
    assert np.isclose(np.exp(np.log(per_sample["min"]).mean()), 1.0)
    with pytest.raises(InputError, match="needs the samples"):
        cell_offset(a, a.X, "tmm", None)
    with pytest.raises(InputError, match="sample_key 'plate' is not a column"):
        cell_offset(a, a.X, "tmm", None, samples="plate")
    with pytest.raises(InputError, match="design '~ condition' names none"):
        resolve_samples(None, "~ condition", "conditioncase")
    with pytest.raises(InputError, match="sample_key must be"):
        resolve_samples([1, 2], "~ condition", "conditioncase")


def test_design_samples(sim_within):
    obs = sim_within.obs
    assert design_samples("~ condition + (1|donor)", STIM) == ["donor", "condition"]
    assert design_samples("~ condition + (1|donor) + (1|sample_id)", STIM) == ["donor", "sample_id", "condition"]
    assert design_samples("~ condition + (1|batch/donor)", "conditionstim") == ["batch", "donor"]
    # without a factor contrast, the design's categorical fixed variables (numeric ones are not samples)
    assert design_samples("~ condition + size_factor + (1|batch/donor)", "conditioncase", obs) == [
        "batch",
        "donor",
        "condition",
    ]
    assert design_samples("~ condition + (1 + condition|donor)", [0, 1], obs) == ["donor", "condition"]
    assert design_samples("~ (1|donor) + (1|batch) + condition", None, obs) == ["donor", "batch", "condition"]
    assert design_samples("~ condition", STIM, cluster="donor") == ["donor", "condition"]
    assert resolve_samples("sample_id", "~ condition", STIM) == ["sample_id"]


def test_resolve_offset_is_the_one_auto_rule(sim_within):
    """offset="auto": TMM for the log-link count families when the samples are known, else the log total count."""
    obs = sim_within.obs
    assert resolve_offset("auto", "nb", design="~ condition + (1|donor)") == "tmm"
    assert resolve_offset("auto", "poisson", design="~ condition", contrast=STIM) == "tmm"  # the contrast's factor
    assert resolve_offset("auto", "nb", design="~ condition") == "log_total"
    assert resolve_offset("auto", "nb", design="~ condition", sample_key="sample_id") == "tmm"
    assert resolve_offset("auto", "nb", sample_key=["donor", "condition"]) == "tmm"
    assert resolve_offset("auto", "nb") == "log_total"
    # a coefficient contrast: the design's categorical fixed variables are samples only when obs tells them apart
    assert resolve_offset("auto", "nb", design="~ condition", contrast="conditionstim") == "log_total"
    assert resolve_offset("auto", "nb", design="~ condition", contrast="conditionstim", obs=obs) == "tmm"
    for family in ("binomial", "gaussian"):
        assert resolve_offset("auto", family, design="~ condition + (1|donor)", sample_key="sample_id") == "log_total"
    for given in ("log_total", "tmm", "size_factor", None):
        assert resolve_offset(given, "nb", design="~ condition + (1|donor)") == given


def test_gee_and_variance_partition_take_the_tmm_offset(sim_within):
    """gee_de and variance_partition read their samples from the design (GEE: cluster × contrast factor); the fits
    equal those with the same offset passed as an obs column."""
    a = sim_within.copy()
    a.obs["tmm_off"] = cell_offset(a, a.X, "tmm", None, samples=["donor", "condition"])
    assert not np.allclose(a.obs["tmm_off"], cell_offset(a, a.X, "log_total", None))
    genes = a.var_names[:6]
    contrast = ("condition", "case", "ctrl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tabs = [
            scmlm.tl.gee_de(a, "~ condition", contrast, cluster_key="donor", offset=o, genes=genes, inplace=False).table
            for o in ("tmm", "tmm_off")
        ]
        vps = [
            scmlm.tl.variance_partition(a, "~ (1|donor) + condition", offset=o, genes=genes, inplace=False).table
            for o in ("tmm", "tmm_off")
        ]
    pd.testing.assert_frame_equal(tabs[0], tabs[1])
    pd.testing.assert_frame_equal(vps[0], vps[1])


def _summary(tab: pd.DataFrame) -> dict:
    ok = tab[tab["status"].isin(["ok", "singular"]) & tab["log2fc"].notna()]
    called = ok[ok["padj"] < 0.05]
    return {
        "median": float(ok["log2fc"].median()),
        "frac_up": float((ok["log2fc"] > 0).mean()),
        "up": int((called["log2fc"] > 0).sum()),
        "down": int((called["log2fc"] < 0).sum()),
        "ok": ok.set_index("gene"),
    }


@pytest.fixture(scope="module")
def kang_monocytes():
    """Kang 2018 CD14+ monocytes: 2 donors × ctrl/stim, 100 cells per sample, 1,267 genes."""
    a = scmlm.datasets.kang2018()
    mono = a[a.obs["cell_type"] == "CD14+ Monocytes"].copy()
    pb = scmlm.pp.pseudobulk(mono, "sample_id")
    paired = scmlm.tl.pseudobulk_de(pb, "~ donor + condition", STIM, inplace=False).table
    glmm = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the status summary (singular sample variances)
        for offset in ("log_total", "tmm"):
            glmm[offset] = scmlm.tl.glmm_de(
                mono, "~ condition + (1|donor) + (1|sample_id)", STIM, offset=offset, inplace=False
            )
    return _summary(paired), glmm


def test_kang_tmm_offset_agrees_with_paired_pseudobulk(kang_monocytes):
    """The composition-robust offset brings the GLMM onto paired pseudobulk's scale; log_total does not.

    Criteria (each must hold for offset="tmm" and fail for offset="log_total"):
    median log2FC over all tested genes within 0.1 of paired pseudobulk's; the fraction of genes estimated up within
    0.05 of pseudobulk's; the per-gene log2FC difference to pseudobulk centred within 0.05 of 0; and among the genes
    ranked most significant by the GLMM (as many as pseudobulk calls at padj < 0.05: the sample-aware GLMM tests on
    2 df with 2 donors and calls none at that level) the fraction up on the same side of 1/2 as among pseudobulk's.
    """
    pb, glmm = kang_monocytes
    assert glmm["tmm"].params["offset"] == "tmm"
    assert glmm["tmm"].params["offset_samples"] == ["donor", "sample_id", "condition"]
    n_called = pb["up"] + pb["down"]
    assert n_called > 100
    pb_up_side = pb["up"] / n_called > 0.5
    verdict = {}
    for offset, res in glmm.items():
        g = _summary(res.table)
        both = g["ok"].join(pb["ok"], lsuffix="_glmm", rsuffix="_pb", how="inner")
        assert len(both) > 1000
        top = g["ok"].nsmallest(n_called, "pvalue")
        verdict[offset] = {
            "median": abs(g["median"] - pb["median"]) < 0.1,
            "frac_up": abs(g["frac_up"] - pb["frac_up"]) < 0.05,
            "paired_shift": abs(float(np.median(both["log2fc_glmm"] - both["log2fc_pb"]))) < 0.05,
            "top_split": (float((top["log2fc"] > 0).mean()) > 0.5) == pb_up_side,
        }
        # the estimates themselves track pseudobulk's closely with either offset: the offset shifts, not scrambles
        assert np.corrcoef(both["log2fc_glmm"], both["log2fc_pb"])[0, 1] > 0.99
    assert all(verdict["tmm"].values()), verdict
    assert not any(verdict["log_total"].values()), verdict


def test_tmm_per_group_equals_subset():
    """With groups_key each group gets the factors of its own pseudobulk, as fitting the group alone does."""
    a = scmlm.datasets.kang2018()
    off_all = cell_offset(a, a.X, "tmm", None, samples="sample_id", groups_key="cell_type")
    mono = (a.obs["cell_type"] == "CD14+ Monocytes").to_numpy()
    sub = a[mono].copy()
    off_sub = cell_offset(sub, sub.X, "tmm", None, samples="sample_id")
    np.testing.assert_allclose(off_all[mono], off_sub, rtol=1e-12)
    pooled = cell_offset(a, a.X, "tmm", None, samples="sample_id")
    assert np.max(np.abs(pooled[mono] - off_sub)) > 0.05  # pooling cell types would dilute the monocytes' factors


def test_glmm_de_tmm_groups_and_params():
    adata = scmlm.datasets.simulate(n_donors=4, n_cells=40, n_genes=30, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = scmlm.tl.glmm_de(
            adata, "~ condition + (1|donor)", ("condition", "case", "ctrl"), offset="tmm", inplace=False
        )
        explicit = scmlm.tl.glmm_de(
            adata,
            "~ condition + (1|donor)",
            ("condition", "case", "ctrl"),
            offset="tmm",
            sample_key="donor",
            inplace=False,
        )
    assert res.params["offset_samples"] == ["donor", "condition"]
    assert explicit.params["offset_samples"] == ["donor"]
    # condition is a donor trait here, so donor × condition and donor are the same samples
    pd.testing.assert_frame_equal(res.table, explicit.table)


def test_normalisation_page_runs():
    """The snippet of docs/normalisation.md runs and prints what the page says."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "normalisation.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exec(compile(block, "docs/normalisation.md", "exec"), ns)
    median = ns["scmlm"].get.de_df(ns["mono"], key="glmm_de")["log2fc"].median()
    assert round(float(median), 3) == float(re.search(r"# (-?\d\.\d+); with", block).group(1))


def test_tmm_keeps_null_calibration():
    """On null data (8 donors, case–control) the estimated factors do not make the donor-level test liberal: the
    fraction of p < 0.05 stays at most nominal and close to offset="log_total"'s (measured: 0.025 vs 0.028)."""
    a = scmlm.datasets.simulate(n_donors=8, n_cells=100, n_genes=1000, design="between", null=True, seed=11)
    frac = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for off in ("log_total", "tmm"):
            tab = scmlm.tl.glmm_de(
                a, "~ condition + (1|donor)", ("condition", "case", "ctrl"), offset=off, inplace=False
            ).table
            ok = tab[tab["status"].isin(["ok", "singular"])]
            assert len(ok) > 900
            frac[off] = float((ok["pvalue"] < 0.05).mean())
    assert 0.01 <= frac["tmm"] <= 0.065, frac
    assert abs(frac["tmm"] - frac["log_total"]) < 0.015, frac


def test_known_composition_shift_is_removed():
    """Ground truth: 15 genes (expression ranks 21–35) raised 8-fold in case cells take 12 % → 51 % of the case
    libraries; the other 285 genes are unchanged. With offset="tmm" the unchanged genes stay near 0 (as edgeR's
    pseudobulk with TMM: both about −0.12 log2, TMM's own trimming bias here), the raised ones near log2(8) = 3,
    and few unchanged genes reach p < 0.05; with "log_total" the unchanged genes are pushed down ~0.9 and half of
    them reach p < 0.05."""
    import scipy.sparse as sp

    # unchanged genes really unchanged in every donor (no donor-specific responses): the shift is composition only
    a = scmlm.datasets.simulate(
        n_donors=6, n_cells=100, n_genes=300, design="within", null=True, sd_response=0.0, seed=5
    )
    X = a.layers["counts"].toarray()
    raised = np.argsort(X.mean(axis=0))[::-1][20:35]
    case = (a.obs["condition"] == "case").to_numpy()
    X[np.ix_(case, raised)] += np.random.default_rng(0).poisson(7 * X[np.ix_(case, raised)])
    a.X = sp.csr_matrix(X)
    de = np.isin(np.arange(a.n_vars), raised)
    contrast = ("condition", "case", "ctrl")
    pb = scmlm.pp.pseudobulk(a, "sample_id")
    pbt = scmlm.tl.pseudobulk_de(pb, "~ donor + condition", contrast, inplace=False).table.set_index("gene")
    pb_lfc = pbt["log2fc"].reindex(a.var_names).to_numpy()
    got, pb_null = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for off in ("log_total", "tmm"):
            t = scmlm.tl.glmm_de(a, "~ condition + (1|donor) + (1|sample_id)", contrast, offset=off, inplace=False)
            tab = t.table
            # medians over the genes both methods test (GLMM fits ok; pseudobulk kept by filterByExpr)
            ok = tab["status"].isin(["ok", "singular"]).to_numpy() & np.isfinite(pb_lfc)
            pb_null[off] = float(np.median(pb_lfc[~de & ok]))
            got[off] = (
                float(np.median(tab["log2fc"][~de & ok])),
                float(np.median(tab["log2fc"][de & ok])),
                float(np.mean(tab["pvalue"][~de & ok] < 0.05)),
            )
    null_med, de_med, fp = got["tmm"]
    assert abs(null_med - pb_null["tmm"]) < 0.05 and abs(null_med) < 0.2, (got, pb_null)
    assert abs(de_med - 3.0) < 0.3, got
    assert fp <= 0.05, got
    null_med, de_med, fp = got["log_total"]
    assert null_med < -0.5 and abs(de_med - 3.0) > 0.5 and fp > 0.3, got


def test_streamed_tmm_equals_in_memory(tmp_path):
    """The workflow's shards and `scmlm hierarchy` stream the input once: the TMM offset they store equals glmm_de's.

    Row blocks of a backed h5ad (CSR, several blocks) accumulate the same pseudobulk, so read_genes(tmm=...) gives
    the offset glmm_de(offset="tmm") computes on the whole matrix, per group, and a gene-subset file refuses to
    compute log_total/tmm from its own columns through the CLI.
    """
    from scmlm import io
    from scmlm.cli import _glmm_offset

    adata = scmlm.datasets.kang2018()
    spec = {"design": "~ condition + (1|donor)", "contrast": list(STIM), "sample_key": None, "groups_key": "cell_type"}
    path = tmp_path / "kang.h5ad"
    adata.write_h5ad(path)
    genes = list(adata.var_names[:7])
    sub = io.read_genes(path, genes, tmm=spec, block_nnz=5_000)  # many row blocks
    samples = resolve_samples(None, spec["design"], STIM, adata.obs)
    expect, _ = tmm_offset(adata.obs, adata.X, _log_total(adata), samples, "cell_type")
    np.testing.assert_allclose(sub.obs[io.TMM_OFFSET].to_numpy(), expect, rtol=0, atol=1e-12)

    def args(offset):
        return SimpleNamespace(offset=offset, family="nb", design=spec["design"], contrast=STIM, sample_key=None)

    assert _glmm_offset(sub, args("auto")) == io.TMM_OFFSET
    assert _glmm_offset(sub, args("log_total")) == io.LOG_TOTAL
    del sub.obs[io.TMM_OFFSET]
    with pytest.raises(scmlm.ScmlmError, match="counts of some genes only"):
        _glmm_offset(sub, args("tmm"))
