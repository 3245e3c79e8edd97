"""filter_genes_by_expr reproduces edgeR's filterByExpr on the reference fixtures (the genes edgeR tested)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_reference, read_reference_table

import scmlm


@pytest.mark.parametrize(
    ("name", "sample_key", "design"),
    [("sim_between_small", "donor", "~ batch + condition"), ("sim_within_small", "sample", "~ donor + condition")],
)
def test_filter_by_expr_matches_edger(name, sample_key, design):
    adata = load_reference(name)
    adata.obs["sample"] = adata.obs["donor"].astype(str) + ":" + adata.obs["condition"].astype(str)
    pb = scmlm.pp.pseudobulk(adata, sample_key, layer="counts")
    keep = scmlm.pp.filter_genes_by_expr(pb, design, inplace=False)
    ref = read_reference_table(name, "pb_edgeR_QL")
    tested = ref["pvalue"].notna().reindex(pb.var_names).to_numpy()
    assert 0 < tested.sum() < len(tested)  # the rule removes some genes and keeps others
    np.testing.assert_array_equal(keep, tested)
    limma = read_reference_table(name, "pb_limma_voom")["pvalue"].notna().reindex(pb.var_names).to_numpy()
    np.testing.assert_array_equal(keep, limma)
    n = pb.n_vars
    scmlm.pp.filter_genes_by_expr(pb, design)
    assert pb.n_vars == int(tested.sum()) < n


def test_filter_by_group_column(sim_between):
    pb = scmlm.pp.pseudobulk(sim_between, "donor")
    by_group = scmlm.pp.filter_genes_by_expr(pb, "condition", inplace=False)
    by_design = scmlm.pp.filter_genes_by_expr(pb, "~ condition", inplace=False)
    np.testing.assert_array_equal(by_group, by_design)  # one factor: group sizes equal 1/max(hat)
    with pytest.raises(scmlm.InputError, match="'sex' is not a column"):
        scmlm.pp.filter_genes_by_expr(pb, "sex", inplace=False)
