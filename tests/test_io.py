from __future__ import annotations

import pandas as pd
import pytest

import scmlm
from scmlm import io


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_until_success(tmp_path):
    target = tmp_path / "table.csv"
    io.write_csv(pd.DataFrame({"a": [1]}), target)
    bad = pd.DataFrame({"a": [object()]})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            bad.to_csv(tmp)
            raise RuntimeError("fail after partial write")
    assert pd.read_csv(target)["a"].tolist() == [1]


def test_write_h5ad_round_trip(tmp_path):
    adata = scmlm.datasets.simulate(n_donors=2, n_cells=5, n_genes=4)
    io.write_h5ad(adata, tmp_path / "a.h5ad")
    back = io.read(tmp_path / "a.h5ad")
    assert back.shape == adata.shape
    with pytest.raises(scmlm.InputError, match="does not exist"):
        io.read(tmp_path / "nope.h5ad")


def test_read_genes_streams_a_subset_with_all_gene_offsets(tmp_path):
    import numpy as np

    adata = scmlm.datasets.simulate(n_donors=3, n_cells=40, n_genes=30, seed=4)
    adata.write_h5ad(tmp_path / "a.h5ad")
    genes = ["g00007", "g00002", "g00020"]
    sub = io.read_genes(tmp_path / "a.h5ad", genes, layer="counts", block_nnz=50)
    assert list(sub.var_names) == genes
    np.testing.assert_array_equal(sub.X.toarray(), adata[:, genes].layers["counts"].toarray())
    np.testing.assert_allclose(sub.obs[io.LOG_TOTAL], np.log(np.asarray(adata.X.sum(axis=1)).ravel()))
    with pytest.raises(scmlm.InputError, match="genes not in"):
        io.read_genes(tmp_path / "a.h5ad", ["nope"])
    with pytest.raises(scmlm.InputError, match="layer 'raw' is not in"):
        io.read_genes(tmp_path / "a.h5ad", genes, layer="raw")


def test_csc_on_disk_is_read_whole_or_refused_for_streaming(tmp_path):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    adata = scmlm.datasets.simulate(n_donors=3, n_cells=20, n_genes=12, seed=6)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    sub = io.read_genes(tmp_path / "csc.h5ad", ["g00003"])  # CSC: read whole, same numbers
    np.testing.assert_array_equal(sub.X.toarray(), adata[:, ["g00003"]].X.toarray())
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    try:
        with pytest.raises(scmlm.InputError, match=r"stored as CSC; streaming needs row blocks"):
            scmlm.pp.pseudobulk(backed, "donor")
    finally:
        backed.file.close()
