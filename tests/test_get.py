"""scmlm.get: reading results back, the genes × groups matrix for decoupler and ranked lists for preranked GSEA."""

from __future__ import annotations

import doctest
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scmlm
from scmlm.errors import InputError

STIM = ("condition", "stim", "ctrl")


@pytest.fixture(scope="module")
def kang_pb():
    pb = scmlm.pp.pseudobulk(scmlm.datasets.kang2018(), "sample_id", groups_key="cell_type")
    scmlm.tl.pseudobulk_de(pb, "~ donor + condition", STIM, groups_key="cell_type")
    return pb


def test_docstring_examples_run():
    res = doctest.testmod(scmlm.get, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 10
    assert res.failed == 0


def test_de_matrix_holds_the_table_values(kang_pb):
    tab = scmlm.get.de_df(kang_pb)
    for col in ("log2fc", "pvalue", "padj", "stat"):
        mat = scmlm.get.de_matrix(kang_pb, values=col)
        assert mat.index.name == "gene" and mat.columns.name == "group"
        assert mat.index.tolist() == kang_pb.var_names.tolist()
        assert mat.columns.tolist() == list(dict.fromkeys(tab["group"]))
        long = mat.stack(future_stack=True).rename("v").reset_index()
        m = tab.merge(long, on=["gene", "group"], validate="one_to_one")
        assert len(m) == len(tab)
        np.testing.assert_array_equal(m["v"].to_numpy(), m[col].to_numpy())  # NaN where the gene was not tested
    # filtered genes are NaN in their group, not 0
    filtered = tab[tab["status"] == "filtered"].iloc[0]
    assert np.isnan(scmlm.get.de_matrix(kang_pb).loc[filtered["gene"], filtered["group"]])
    sub = scmlm.get.de_matrix(kang_pb, values="log2fc", groups=["CD8 T cells", "B cells"])
    assert sub.columns.tolist() == ["CD8 T cells", "B cells"]


def test_signed_stat_of_nb_ql_is_on_the_t_scale(kang_pb):
    """nb_ql's stat is the QL F (1 df): sign(log2fc) sqrt(F) with the F test's df gives the same two-sided p-value."""
    tab = scmlm.get.de_df(kang_pb, status="ok")
    assert (tab["stat"] >= 0).all()  # unsigned: ranking by it mixes down- with up-regulated genes
    mat = scmlm.get.de_matrix(kang_pb)  # signed_stat by default
    long = mat.stack().rename("s").reset_index().merge(tab, on=["gene", "group"])
    assert len(long) == len(tab)
    np.testing.assert_array_equal(np.sign(long["s"]), np.sign(long["log2fc"]))
    np.testing.assert_allclose(long["s"] ** 2, long["stat"], rtol=1e-12)
    p_t = 2 * stats.t.sf(np.abs(long["s"]), long["df"])
    # edgeR's Poisson bound may raise a p-value above the F test's for a few genes; elsewhere they are equal
    same = np.isclose(p_t, long["pvalue"], rtol=1e-8)
    assert same.mean() > 0.95
    assert (long["pvalue"][~same] >= p_t[~same]).all()


def test_signed_stat_of_glmm_is_its_wald_t():
    adata = scmlm.datasets.simulate(n_donors=4, n_cells=40, n_genes=30, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", ("condition", "case", "ctrl"), groups_key="cell_type")
    tab = scmlm.get.de_df(adata)
    mat = scmlm.get.de_matrix(adata, key_added="glmm_stat")
    assert mat.shape == (30, tab["group"].nunique())
    raw = scmlm.get.de_matrix(adata, values="stat")
    pd.testing.assert_frame_equal(mat, raw)
    stored = adata.varm["glmm_stat"]
    assert stored.index.equals(adata.var_names)
    pd.testing.assert_frame_equal(stored, mat, check_names=False)
    logp = scmlm.get.de_matrix(adata, values="signed_logp")
    ok = raw.notna() & logp.notna()
    np.testing.assert_array_equal(np.sign(raw[ok]), np.sign(logp[ok]))


def test_varm_storage_roundtrips_and_reindexes(kang_pb, tmp_path):
    pb = kang_pb.copy()
    mat = scmlm.get.de_matrix(pb, values="log2fc", key_added="de_log2fc")
    pd.testing.assert_frame_equal(pb.varm["de_log2fc"], mat, check_names=False)
    path = tmp_path / "pb.h5ad"
    pb.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(np.asarray(back.varm["de_log2fc"]), mat.to_numpy())
    # genes the result lacks are NaN in varm; genes unknown to adata are refused
    small = pb[:, pb.var_names[:50]].copy()
    scmlm.tl.pseudobulk_de(small, "~ donor + condition", STIM, groups_key="cell_type", key_added="sub")
    wide = pb.copy()
    scmlm.get.de_matrix(small, "sub", key_added="sub_stat")  # same genes: fine
    wide.uns["sub"] = small.uns["sub"]
    scmlm.get.de_matrix(wide, "sub", key_added="sub_stat")
    assert wide.varm["sub_stat"].iloc[:50].notna().any().any()
    assert wide.varm["sub_stat"].iloc[50:].isna().all().all()
    small.uns["full"] = pb.uns["pseudobulk_de"]
    with pytest.raises(InputError, match="not in adata.var_names"):
        scmlm.get.de_matrix(small, "full", key_added="x")


def test_rank_genes(kang_pb):
    r = scmlm.get.rank_genes(kang_pb, group="B cells")
    tab = scmlm.get.de_df(kang_pb, group="B cells")
    tested = tab[tab["stat"].notna()]
    assert r.size == len(tested)
    assert r.is_monotonic_decreasing and r.index.is_unique
    assert r.index[0] == tested.loc[(tested["log2fc"] > 0), :].sort_values("stat").iloc[-1]["gene"]
    assert r.index[-1] == tested.loc[(tested["log2fc"] < 0), :].sort_values("stat").iloc[-1]["gene"]
    full = scmlm.get.rank_genes(kang_pb, group="B cells", by="log2fc", dropna=False)
    assert full.size == len(tab) and full.isna().sum() == tab["log2fc"].isna().sum()
    assert full.dropna().is_monotonic_decreasing
    with pytest.raises(InputError, match="several groups"):
        scmlm.get.rank_genes(kang_pb)
    with pytest.raises(InputError, match="group 'NK cells' not in the result"):
        scmlm.get.rank_genes(kang_pb, group="NK cells")
    with pytest.raises(InputError, match="'tstat' is not a column"):
        scmlm.get.rank_genes(kang_pb, group="B cells", by="tstat")
    with pytest.raises(InputError, match="not numeric"):
        scmlm.get.rank_genes(kang_pb, group="B cells", by="status")


def test_several_contrasts_need_a_choice(kang_pb):
    pb = kang_pb.copy()
    donor = scmlm.tl.pseudobulk_de(pb, "~ donor + condition", "donor[T.107]", groups_key="cell_type", inplace=False)
    both = pd.concat([pb.uns["pseudobulk_de"]["results"], donor.table], ignore_index=True)
    pb.uns["two"] = {"params": {}, "results": both}
    names = both["contrast"].unique().tolist()
    assert len(names) == 2
    with pytest.raises(InputError, match="several contrasts"):
        scmlm.get.de_matrix(pb, "two")
    with pytest.raises(InputError, match="several contrasts"):
        scmlm.get.rank_genes(pb, "two", group="B cells")
    for name in names:
        mat = scmlm.get.de_matrix(pb, "two", values="log2fc", contrast=name)
        ref = both[both["contrast"] == name].pivot(index="gene", columns="group", values="log2fc")
        pd.testing.assert_frame_equal(mat.sort_index(), ref.sort_index(), check_names=False)
    with pytest.raises(InputError, match="contrast 'x' not in the result"):
        scmlm.get.de_matrix(pb, "two", contrast="x")
    pb.uns["dup"] = {"params": {}, "results": pd.concat([both[both["contrast"] == names[0]]] * 2)}
    with pytest.raises(InputError, match="several rows for gene"):
        scmlm.get.de_matrix(pb, "dup")


def test_handoff_page_runs(tmp_path, monkeypatch):
    """The Python snippets of docs/handoff.md run as written (the decoupler one needs decoupler and the internet)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "handoff.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "decoupler" not in b]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "docs/handoff.md", "exec"), ns)
    assert ns["mat"].shape == (1267, 5)
    assert ns["ranked"].index[:3].tolist() == ["APOBEC3A_ENSG00000128383", "IFIT1", "IDO1"]  # IFIT1: 0 in ctrl
    back = pd.read_csv(tmp_path / "cd14_mono_ranked.csv")
    assert back.columns.tolist() == ["gene", "stat"] and len(back) == ns["ranked"].size
