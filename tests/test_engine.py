"""The parallel driver: gene blocks cut from the matrix without a copy equal the blocks of a full CSC conversion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scmlm import engine
from scmlm.engine import GeneColumns, gene_chunks, parallel_chunks, run_chunks


def _counts(fmt: str, dtype, seed: int = 1, shape=(600, 300)):
    X = sp.random(*shape, density=0.08, format="csr", random_state=seed, dtype=np.float64)
    X.data = np.round(X.data * 20)
    X.data[::7] = 0  # explicit zeros are kept, as a full conversion keeps them
    X = X.astype(dtype)
    return X.tocsc() if fmt == "csc" else X


def _shuffle_rows(X, rng):
    """The same matrix with the stored entries of every row (CSR) or column (CSC) in random order."""
    X = X.copy()
    for i in range(X.indptr.size - 1):
        s, e = X.indptr[i], X.indptr[i + 1]
        p = rng.permutation(e - s)
        X.indices[s:e] = X.indices[s:e][p]
        X.data[s:e] = X.data[s:e][p]
    X.has_sorted_indices = False
    return X


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("shuffled", [False, True])
def test_blocks_and_column_stats_equal_full_conversion(fmt, dtype, shuffled):
    rng = np.random.default_rng(0)
    X = _counts(fmt, dtype)
    if shuffled:
        X = _shuffle_rows(X, rng)
    genes = rng.permutation(300)[:200]
    rows = np.sort(rng.choice(600, 450, replace=False))
    for sel in (None, rows):
        src = GeneColumns(X, genes) if sel is None else GeneColumns(X, genes).take_rows(sel)
        full = sp.csc_matrix(X[:, genes]) if sel is None else sp.csc_matrix(sp.csc_matrix(X[:, genes])[sel])
        full.sort_indices()
        w = rng.uniform(0.5, 2.0, src.shape[0])
        for stats_first in (False, True):
            if stats_first:
                n_expr, colsum, wsum = src.column_stats(w)
                assert np.array_equal(n_expr, np.asarray((full != 0).sum(axis=0)).ravel())
                assert np.array_equal(colsum, np.asarray(full.sum(axis=0), dtype=float).ravel())
                assert np.array_equal(wsum, np.asarray(full.T @ w.astype(full.dtype)).ravel().astype(float))
            # out of order, overlapping, then in increasing order (the cursor path of a CSR matrix)
            for idx in [np.arange(200), np.arange(10, 60), np.array([3, 150, 199]), *gene_chunks(200, 33)]:
                b = src.block(idx, dtype=np.float64)
                ref = full[:, idx].tocsc()
                ref.sort_indices()
                assert b.indices.dtype == np.int64 and b.data.dtype == np.float64 and b.has_sorted_indices
                assert np.array_equal(b.indptr, ref.indptr)
                assert np.array_equal(b.indices, ref.indices)
                assert np.array_equal(b.data, ref.data.astype(np.float64))


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_threads_give_chunks_in_order(n_jobs):
    rng = np.random.default_rng(3)
    X = _counts("csr", np.float32, seed=4, shape=(2000, 700))
    genes = np.sort(rng.choice(700, 500, replace=False))
    rows = np.sort(rng.choice(2000, 1500, replace=False))
    src = GeneColumns(X, genes).take_rows(rows)
    ref = sp.csc_matrix(X[rows][:, genes])
    src.column_stats()
    chunks = [c[c % 3 != 0] for c in gene_chunks(500, 37)]
    out = run_chunks(lambda Y: Y.toarray(), src, chunks, n_jobs=n_jobs, backend="threads")
    for c, got in zip(chunks, out, strict=True):
        np.testing.assert_array_equal(got, ref[:, c].toarray())


def test_threads_raise_a_chunks_error():
    X = _counts("csr", np.float64)
    src = GeneColumns(X, np.arange(300))

    def fit(Y):
        if Y.shape[1] < 50:
            raise ValueError("the last chunk failed")
        return Y.nnz

    with pytest.raises(ValueError, match="last chunk failed"):
        run_chunks(fit, src, gene_chunks(300, 60)[:-1] + [np.arange(290, 300)], n_jobs=2, backend="threads")


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_parallel_chunks_bounded_by_entries(monkeypatch, n_jobs):
    """Chunks are cut where their stored counts would pass CHUNK_ENTRIES / n_jobs; genes stay in order."""
    monkeypatch.setattr(engine, "CHUNK_ENTRIES", 1000)
    entries = np.random.default_rng(0).integers(0, 300, size=700)
    entries[5] = 5000  # a gene above the cap gets a chunk of its own
    chunks = parallel_chunks(entries.size, n_jobs, entries)
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(entries.size))
    cap = 1000 // n_jobs
    sums = np.array([entries[c].sum() for c in chunks])
    assert all(s <= cap or c.size == 1 for s, c in zip(sums, chunks, strict=True))
    # maximal pieces: adding the next gene of the same size-chunk would pass the cap
    plain = parallel_chunks(entries.size, n_jobs)
    assert len(chunks) > len(plain)
    assert any(c.size == 1 and c[0] == 5 for c in chunks)
    assert [c.tolist() for c in parallel_chunks(40, n_jobs, np.ones(40, dtype=int))] == [
        c.tolist() for c in parallel_chunks(40, n_jobs)
    ]
