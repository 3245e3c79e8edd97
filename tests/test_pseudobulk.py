from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scmlm
from scmlm import InputError


@pytest.fixture(scope="module")
def sim():
    return scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=60, n_cell_types=3, seed=3)


def _dense_sums(adata, keys):
    X = adata.layers["counts"].toarray()
    df = adata.obs[keys].astype(str).agg("|".join, axis=1)
    out = {}
    for k in df.unique():
        rows = (df == k).to_numpy()
        out[k] = (X[rows].sum(axis=0), (X[rows] > 0).sum(axis=0), rows.sum())
    return out


@pytest.mark.parametrize("groups_key", [None, "cell_type"])
@pytest.mark.parametrize("as_dense", [False, True])
def test_sums_match_dense_numpy(sim, groups_key, as_dense):
    adata = sim.copy()
    if as_dense:
        adata.X = adata.X.toarray()
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key=groups_key)
    keys = ["donor"] + ([groups_key] if groups_key else [])
    expected = _dense_sums(sim, keys)
    assert pb.n_obs == len(expected)
    got_keys = pb.obs[keys].astype(str).agg("|".join, axis=1)
    for i, k in enumerate(got_keys):
        s, ne, n = expected[k]
        np.testing.assert_array_equal(pb.X[i], s)
        np.testing.assert_array_equal(pb.layers["counts"][i], s)
        np.testing.assert_array_equal(pb.layers["n_expressing"][i], ne)
        assert pb.obs["n_cells"].iloc[i] == n
        assert pb.obs["total_counts"].iloc[i] == s.sum()


def test_covariates_carried_only_when_constant(sim):
    adata = sim.copy()
    adata.obs["age"] = adata.obs["donor"].cat.codes.astype(float) * 10  # donor-level
    adata.obs["cell_score"] = np.arange(adata.n_obs, dtype=float)  # varies within donor
    pb = scmlm.pp.pseudobulk(adata, "donor")
    assert {"batch", "condition", "age"} <= set(pb.obs.columns)
    assert "cell_score" not in pb.obs.columns
    assert "cell_score" in pb.uns["pseudobulk"]["dropped_columns"]
    assert "size_factor" in pb.uns["pseudobulk"]["dropped_columns"]
    # carried values are the donors' values, and categoricals stay categorical with the same level order
    ages = adata.obs.groupby("donor", observed=True)["age"].first()
    np.testing.assert_array_equal(pb.obs["age"].to_numpy(), ages.loc[pb.obs["donor"]].to_numpy())
    assert isinstance(pb.obs["condition"].dtype, pd.CategoricalDtype)
    assert list(pb.obs["condition"].cat.categories) == ["ctrl", "case"]


def test_within_design_needs_donor_by_condition(sim):
    adata = scmlm.datasets.simulate(n_donors=4, n_cells=30, n_genes=20, design="within", seed=1)
    pb = scmlm.pp.pseudobulk(adata, "donor")
    assert "condition" not in pb.obs.columns  # condition varies within donor
    pb2 = scmlm.pp.pseudobulk(adata, "sample_id")
    assert "condition" in pb2.obs.columns and "donor" in pb2.obs.columns
    assert pb2.n_obs == 8


def test_min_cells_drops_and_records(sim):
    pb_all = scmlm.pp.pseudobulk(sim, "donor", groups_key="cell_type")
    cut = int(np.median(pb_all.obs["n_cells"])) + 1
    pb = scmlm.pp.pseudobulk(sim, "donor", groups_key="cell_type", min_cells=cut)
    assert (pb.obs["n_cells"] >= cut).all()
    assert len(pb.uns["pseudobulk"]["dropped_rows"]) == int((pb_all.obs["n_cells"] < cut).sum()) > 0


def test_backed_streaming_equals_in_memory(sim, tmp_path):
    path = tmp_path / "cells.h5ad"
    sim.write_h5ad(path)
    mem = scmlm.pp.pseudobulk(sim, "donor", groups_key="cell_type", layer="counts")
    backed = ad.read_h5ad(path, backed="r")
    try:
        streamed = scmlm.pp.pseudobulk(backed, "donor", groups_key="cell_type", layer="counts", chunk_size=37)
    finally:
        backed.file.close()
    np.testing.assert_array_equal(streamed.X, mem.X)
    np.testing.assert_array_equal(streamed.layers["n_expressing"], mem.layers["n_expressing"])
    pd.testing.assert_frame_equal(streamed.obs, mem.obs)


def test_missing_key_lists_columns(sim):
    with pytest.raises(InputError, match=r"'donr'.*available columns: .*'donor'"):
        scmlm.pp.pseudobulk(sim, "donr")


def test_nan_in_key(sim):
    adata = sim.copy()
    adata.obs["donor"] = adata.obs["donor"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("donor")] = np.nan
    with pytest.raises(InputError, match=r"'donor' has 1 missing value"):
        scmlm.pp.pseudobulk(adata, "donor")


@pytest.mark.parametrize("bad", [0.5, -1.0, np.nan])
def test_non_count_values_name_layer(sim, bad):
    adata = sim.copy()
    X = adata.X.copy().astype(np.float64)
    X.data[0] = bad
    adata.X = X
    with pytest.raises(InputError, match=r'adata\.X must hold raw non-negative integer counts.*layer="counts"'):
        scmlm.pp.pseudobulk(adata, "donor")
    adata.layers["lognorm"] = X
    with pytest.raises(InputError, match=r"layer 'lognorm' must hold raw"):
        scmlm.pp.pseudobulk(adata, "donor", layer="lognorm")


def test_log_normalised_matrix_rejected(sim):
    adata = sim.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(InputError, match="normalised or log-transformed"):
        scmlm.pp.pseudobulk(adata, "donor")


def test_unknown_layer(sim):
    with pytest.raises(InputError, match=r"layer 'raw' is not in adata.layers; available layers: 'counts'"):
        scmlm.pp.pseudobulk(sim, "donor", layer="raw")


def test_empty_selection(sim):
    with pytest.raises(InputError, match=r"no 'donor' row has at least min_cells=1000 cells"):
        scmlm.pp.pseudobulk(sim, "donor", min_cells=1000)
    with pytest.raises(InputError, match="empty"):
        scmlm.pp.pseudobulk(sim[:0].copy(), "donor")


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicate_names(sim, axis):
    adata = sim.copy()
    names = list(getattr(adata, f"{axis}_names"))
    names[1] = names[0]
    setattr(adata, f"{axis}_names", names)
    with pytest.raises(InputError, match=rf"{axis}_names are not unique.*{axis}_names_make_unique"):
        scmlm.pp.pseudobulk(adata, "donor")


def test_filter_samples(sim):
    pb = scmlm.pp.pseudobulk(sim, "donor", groups_key="cell_type")
    cut = int(pb.obs["n_cells"].median())
    mask = scmlm.pp.filter_samples(pb, min_cells=cut, inplace=False)
    np.testing.assert_array_equal(mask, pb.obs["n_cells"].to_numpy() >= cut)
    n_before = pb.n_obs
    scmlm.pp.filter_samples(pb, min_cells=cut)
    assert pb.n_obs == int(mask.sum()) < n_before
    with pytest.raises(InputError, match="would remove all"):
        scmlm.pp.filter_samples(pb, min_cells=10**6)
