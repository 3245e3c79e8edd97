"""The cell-level tools on an AnnData opened with ``backed="r"``: the same results as on the matrix in memory."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scmlm
from scmlm.engine import GeneColumns
from scmlm.io import BackedCounts

CONTRAST = ("condition", "case", "ctrl")
# small data: some genes are singular or too sparse, and the tools say so (the same in memory and backed)
pytestmark = pytest.mark.filterwarnings("ignore:.*gene fits:UserWarning")


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    a = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=24, n_batches=2, seed=3)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    a.X = sp.csr_matrix(a.X)
    # a stored zero, which in-memory blocks keep: the backed blocks must keep it too
    a.X.data[0] = 0
    a.layers.clear()
    return a


def _write(a: ad.AnnData, path, fmt: str) -> ad.AnnData:
    b = a.copy()
    if fmt == "csc":
        b.X = sp.csc_matrix(b.X)
    elif fmt == "dense":
        b.X = b.X.toarray()
    b.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_gene_blocks_equal_memory(sim, tmp_path, fmt):
    backed = _write(sim, tmp_path / f"x_{fmt}.h5ad", fmt)
    store = BackedCounts.from_adata(backed, None)
    store.scan("counts", None)
    np.testing.assert_array_equal(store.sum(axis=1), np.asarray(sim.X.sum(axis=1)).ravel())
    genes = np.array([5, 1, 0, 23, 7, 19], dtype=np.int64)  # unordered, with a gap
    rows = np.flatnonzero(np.arange(sim.n_obs) % 3 != 1)
    inmem = {"csr": sim.X, "csc": sp.csc_matrix(sim.X), "dense": sim.X.toarray()}[fmt]  # dense: no stored zero
    mem = GeneColumns(inmem, genes).take_rows(rows)
    disk = GeneColumns(store, genes).take_rows(rows)
    for idx in (np.arange(genes.size), np.array([2, 4])):
        m, d = mem.block(idx, dtype=np.float64), disk.block(idx, dtype=np.float64)
        for attr in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(m, attr), getattr(d, attr))
    np.testing.assert_array_equal(mem.column_stats()[0], disk.column_stats()[0])
    store.close()


def test_small_row_blocks(sim, tmp_path):
    """Many row blocks (the file is streamed in pieces): blocks still equal the in-memory ones."""
    sim.write_h5ad(tmp_path / "x.h5ad")
    store = BackedCounts(tmp_path / "x.h5ad", block_nnz=97)
    store.scan("counts")
    assert len(store._blocks) > 10
    genes = np.arange(sim.n_vars, dtype=np.int64)
    m = GeneColumns(sim.X, genes).block(genes, dtype=np.float64)
    d = GeneColumns(store, genes).block(genes, dtype=np.float64)
    assert (m != d).nnz == 0 and m.nnz == d.nnz
    np.testing.assert_array_equal(m.indices, d.indices)
    store.close()


def _same(res_mem, res_disk):
    pd.testing.assert_frame_equal(res_mem.table, res_disk.table, check_exact=True)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_glmm_de_backed(sim, tmp_path, fmt):
    backed = _write(sim, tmp_path / "x.h5ad", fmt)
    design = "~ condition + (1|donor)"
    mem = scmlm.tl.glmm_de(sim, design, CONTRAST, inplace=False, n_jobs=1)
    disk = scmlm.tl.glmm_de(backed, design, CONTRAST, inplace=False, n_jobs=1)
    assert mem.params["offset"] == "tmm" and (mem.table["status"] == "ok").sum() > 10
    _same(mem, disk)
    two = scmlm.tl.glmm_de(backed, design, CONTRAST, inplace=False, n_jobs=2)
    _same(mem, two)
    scmlm.tl.glmm_de(backed, design, CONTRAST, n_jobs=1)  # results land in the backed object's uns
    pd.testing.assert_frame_equal(backed.uns["glmm_de"]["results"], mem.table, check_exact=True)


def test_glmm_de_backed_groups_and_layer(sim, tmp_path):
    a = sim.copy()
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(a.X.shape, dtype=np.float32)
    a.obs["ct"] = np.where(np.arange(a.n_obs) % 2 == 0, "A", "B")
    backed = _write(a, tmp_path / "x.h5ad", "csr")
    kw = {"layer": "counts", "groups_key": "ct", "inplace": False, "n_jobs": 1, "genes": a.var_names[:10]}
    _same(
        scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST, **kw),
        scmlm.tl.glmm_de(backed, "~ condition + (1|donor)", CONTRAST, **kw),
    )
    with pytest.raises(scmlm.InputError, match="nope"):
        scmlm.tl.glmm_de(backed, "~ condition + (1|donor)", CONTRAST, layer="nope", inplace=False)


def test_gee_de_backed(sim, tmp_path):
    backed = _write(sim, tmp_path / "x.h5ad", "csr")
    mem = scmlm.tl.gee_de(sim, "~ condition", CONTRAST, inplace=False, n_jobs=1)
    assert (mem.table["status"] == "ok").sum() > 10
    _same(mem, scmlm.tl.gee_de(backed, "~ condition", CONTRAST, inplace=False, n_jobs=1))
    _same(mem, scmlm.tl.gee_de(backed, "~ condition", CONTRAST, inplace=False, n_jobs=2))


def test_variance_partition_backed(sim, tmp_path):
    backed = _write(sim, tmp_path / "x.h5ad", "csr")
    design = "~ (1|donor) + condition"
    mem = scmlm.tl.variance_partition(sim, design, inplace=False, n_jobs=1)
    _same(mem, scmlm.tl.variance_partition(backed, design, inplace=False, n_jobs=1))
    _same(mem, scmlm.tl.variance_partition(backed, design, inplace=False, n_jobs=2))


def test_backed_bad_counts(sim, tmp_path):
    a = sim.copy()
    a.X = a.X.astype(np.float32)
    a.X.data[5] = 0.5
    backed = _write(a, tmp_path / "x.h5ad", "csr")
    with pytest.raises(scmlm.InputError, match="non-negative integer counts"):
        scmlm.tl.glmm_de(backed, "~ condition + (1|donor)", CONTRAST, inplace=False)


def test_backed_copy_refused_before_fitting(sim, tmp_path):
    backed = _write(sim, tmp_path / "x.h5ad", "csr")
    with pytest.raises(scmlm.InputError, match=r"copy=True\) cannot copy an AnnData opened backed"):
        scmlm.tl.gee_de(backed, "~ condition", CONTRAST, copy=True)
    assert "gee_de" not in backed.uns


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_check_after_scan(sim, tmp_path, fmt):
    """A store read once without a check still checks the values when asked later."""
    a = sim.copy()
    a.X = a.X.astype(np.float32)
    a.X.data[7] = -1.0
    backed = _write(a, tmp_path / f"x_{fmt}.h5ad", fmt)
    store = BackedCounts.from_adata(backed, None)
    store.scan()
    store.scan("finite")  # the values are finite
    with pytest.raises(scmlm.InputError, match="must hold raw non-negative integer counts"):
        store.scan("counts")
    store.close()


def test_random_effects_backed(sim, tmp_path):
    backed = _write(sim, tmp_path / "x.h5ad", "csr")
    mem = sim.copy()
    for a in (backed, mem):
        scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST, n_jobs=1)
    genes = list(sim.var_names[:3])
    tables = [scmlm.tl.random_effects(a, key="glmm_de", genes=genes, inplace=False).table for a in (mem, backed)]
    assert len(tables[0]) > 0
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_gaussian_nan_is_refused_in_memory_and_backed_alike(sim, tmp_path, fmt):
    """One check and one message for non-finite values, whether the values are in memory or read from the file."""
    g = sim.copy()
    g.X = sp.csr_matrix(np.log1p(g.X.toarray()))
    g.X.data[3] = np.nan
    backed = _write(g, tmp_path / f"nan_{fmt}.h5ad", fmt)
    msg = r"^adata\.X has non-finite values \(NaN or inf\); the Gaussian family needs finite values\.$"
    for a in (g, backed):
        with pytest.raises(scmlm.InputError, match=msg):
            scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST, family="gaussian", offset=None, inplace=False)
    backed.file.close()
