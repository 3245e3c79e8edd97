"""Run a per-gene kernel over chunks of genes, serially or in parallel workers, with results in gene order.

The kernel is any callable ``fit_chunk(Y_chunk) -> result`` where ``Y_chunk`` holds the counts of a block of genes
(cells × genes, CSC). What is shared by all genes (design, offsets, random-effect structure) is bound into the
callable once (``functools.partial``). BLAS is pinned to one thread while chunks run: with two BLAS threads on a
2-core machine, the small dense solves of a mixed model ran 26× slower.

Two ways to run chunks in parallel (``backend=``):

* ``"threads"`` (for kernels that release the GIL: every scmlm numba kernel is compiled ``nogil``; ``glmm_de``,
  ``variance_partition``, ``random_effects`` and ``gee_de`` use it): threads of this
  process share the counts, the design and the loaded kernels, so a worker costs nothing to start and receives no
  copy. Each thread cuts its own chunk out of the matrix (:class:`GeneColumns`) just before fitting it, so at most
  ``n_jobs`` chunks exist at a time. Chunks are handed out in order (a CSR matrix's rows are then read once over all
  chunks); :func:`parallel_chunks` keeps the last ones short so that both cores stay busy to the end.
* ``"loky"`` (pure-Python/numpy kernels that hold the GIL): joblib's worker processes; each chunk is pickled to
  them.

The counts stay where they are: :class:`GeneColumns` selects genes (and cells) of a CSR, CSC or dense matrix
without copying it, and builds the CSC block of one chunk at a time (one pass over the chunk's entries; a CSR
matrix with sorted column indices is searched row by row, so the cost is the chunk's entries, not the matrix's).
A matrix on disk (:class:`scmlm.io.BackedCounts`, a backed h5ad) hands the chunk's entries over in segments
(``column_segments``), from which the same CSC block is built.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from ._jit import jit
from ._settings import settings

PROGRESS_MIN_GENES = 5000
"""Runs with at least this many genes show a progress bar on an interactive terminal."""

BACKENDS: tuple[str, ...] = ("threads", "loky")

CHUNK_ENTRIES = 8_000_000
"""Most stored counts in the chunks fitted at one time (split among ``n_jobs``), when the counts per gene are known.

A chunk's fit holds about 50 bytes per stored count (its CSC block with float64 values and 64-bit indices, the
moderation's CSR copy of it, the kernel's work arrays): 128 genes of a 400,000-cell atlas (13 M counts) added
0.61 GB at the peak; 8 M counts keep the whole call within input + 1 GB. Smaller data are not affected."""


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Worker count for ``n_jobs``: ``None`` means ``settings.n_jobs``, negatives count from all cores.

    0 is refused, as by the command line and joblib.
    """
    n = settings.n_jobs if n_jobs is None else n_jobs
    if isinstance(n, str) and n.strip().lstrip("-").isdigit():
        n = int(n)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int | np.integer)):
        from ._errors import InputError

        raise InputError(f"n_jobs={n!r} must be a whole number of worker processes (1, 2, …; -1 for all cores).")
    if n == 0:
        from ._errors import InputError

        raise InputError("n_jobs=0 is not a number of workers; use 1 or more (or -1 for all cores).")
    if n is None:
        n = 1
    if n < 0:
        n = max(1, (os.cpu_count() or 1) + 1 + n)
    return int(n)


def gene_chunks(n_genes: int, chunk_size: int | None = None) -> list[np.ndarray]:
    """Contiguous blocks of gene indices. The blocks do not depend on ``n_jobs``, so results are identical."""
    size = int(chunk_size or settings.chunk_size)
    return [np.arange(s, min(n_genes, s + size)) for s in range(0, n_genes, size)]


def parallel_chunks(n_genes: int, n_jobs: int | None, entries: np.ndarray | None = None) -> list[np.ndarray]:
    """:func:`gene_chunks` for ``n_jobs`` workers: at least 16 chunks per worker (down to 16 genes a chunk).

    The last chunks, fitted while the other workers are idle, are then short. With ``entries`` (stored counts per
    gene) a chunk is also cut where its counts would pass ``CHUNK_ENTRIES / n_jobs``, which bounds the memory of the
    fits in flight. The per-gene GLMM fits do not depend on which genes share a chunk (the golden master's
    two-worker case checks it to 1e-10), so results stay independent of ``n_jobs``.
    """
    n = resolve_n_jobs(n_jobs)
    size = int(settings.chunk_size)
    if n > 1:
        size = min(size, max(16, -(-n_genes // (16 * n))))
    chunks = gene_chunks(n_genes, size)
    if entries is None:
        return chunks
    cap = max(1, CHUNK_ENTRIES // n)
    out = []
    for c in chunks:
        cum = np.cumsum(np.asarray(entries, dtype=np.int64)[c])
        # a new piece starts at the gene whose counts would pass the cap (each piece keeps at least one gene)
        while c.size:
            k = max(1, int(np.searchsorted(cum, cap, side="right")))
            out.append(c[:k])
            c, cum = c[k:], cum[k:] - cum[k - 1]
    return out


# ---------------------------------------------------------------- gene blocks without a copy of the matrix


@jit
def _csr_count(indptr, indices, rows, colpos, cursor, hi, is_sorted, counts):
    """Entries per chunk column (``colpos[gene] >= 0``) over the cells ``rows`` of a CSR matrix.

    Sorted rows are read from ``cursor`` (where the previous chunk stopped) up to the first column ``>= hi``.
    """
    for k in range(rows.shape[0]):
        r = rows[k]
        e = indptr[r + 1]
        j = cursor[k] if is_sorted else np.int64(indptr[r])
        while j < e:
            col = indices[j]
            if is_sorted and col >= hi:
                break
            c = colpos[col]
            if c >= 0:
                counts[c] += 1
            j += 1


@jit
def _csr_fill(indptr, indices, data, rows, colpos, cursor, hi, is_sorted, out_indptr, out_indices, out_data):
    """Scatter the chunk's entries into CSC arrays (``out_indptr`` from the counts), cells in row order.

    Sorted rows advance ``cursor`` past the chunk.
    """
    nxt = out_indptr[:-1].copy()
    for k in range(rows.shape[0]):
        r = rows[k]
        e = indptr[r + 1]
        j = cursor[k] if is_sorted else np.int64(indptr[r])
        while j < e:
            col = indices[j]
            if is_sorted and col >= hi:
                break
            c = colpos[col]
            if c >= 0:
                p = nxt[c]
                out_indices[p] = k
                out_data[p] = data[j]
                nxt[c] = p + 1
            j += 1
        if is_sorted:
            cursor[k] = j


@jit
def _csr_stats(indptr, indices, data, rows, colpos, w, nnz, n_expr, colsum, wsum):
    """Per selected column of a CSR matrix over the cells ``rows``: entries, non-zero values, sum, weighted sum.

    The sum is float64; ``Σ w_k y`` is accumulated in ``wsum``'s dtype in row order (scipy's order for ``csc.T @ w``).
    """
    for k in range(rows.shape[0]):
        r = rows[k]
        wk = w[k]
        for j in range(indptr[r], indptr[r + 1]):
            c = colpos[indices[j]]
            if c >= 0:
                v = data[j]
                nnz[c] += 1
                if v != 0:
                    n_expr[c] += 1
                colsum[c] += v
                wsum[c] += v * wk


@jit
def _csc_count(indptr, indices, cols, rowpos, counts):
    """Entries of the CSC columns ``cols`` over the cells with ``rowpos >= 0``."""
    for c in range(cols.shape[0]):
        g = cols[c]
        n = 0
        for j in range(indptr[g], indptr[g + 1]):
            if rowpos[indices[j]] >= 0:
                n += 1
        counts[c] = n


@jit
def _csc_fill(indptr, indices, data, cols, rowpos, out_indptr, out_indices, out_data):
    for c in range(cols.shape[0]):
        g = cols[c]
        p = out_indptr[c]
        for j in range(indptr[g], indptr[g + 1]):
            k = rowpos[indices[j]]
            if k >= 0:
                out_indices[p] = k
                out_data[p] = data[j]
                p += 1


@jit
def _seg_count(starts, ends, indices, row0, rowpos, counts):
    """Entries of each chunk column in one segment (rows ``row0 + indices``) over the cells with ``rowpos >= 0``."""
    for c in range(starts.shape[0]):
        n = 0
        for j in range(starts[c], ends[c]):
            if rowpos[row0 + indices[j]] >= 0:
                n += 1
        counts[c] += n


@jit
def _seg_fill(starts, ends, indices, data, row0, rowpos, use_rowpos, nxt, out_indices, out_data):
    """Append one segment's entries of each chunk column (rows ``row0 + indices``) to the CSC arrays at ``nxt``."""
    for c in range(starts.shape[0]):
        p = nxt[c]
        for j in range(starts[c], ends[c]):
            r = row0 + indices[j]
            k = rowpos[r] if use_rowpos else r
            if k >= 0:
                out_indices[p] = k
                out_data[p] = data[j]
                p += 1
        nxt[c] = p


@jit
def _seg_group_sums(starts, ends, indices, data, row0, codes, cols, out):
    """Add one segment's entries of columns ``cols`` into ``out[codes[row], col]`` (rows with a code < 0 skipped)."""
    for c in range(starts.shape[0]):
        g = cols[c]
        for j in range(starts[c], ends[c]):
            k = codes[row0 + indices[j]]
            if k >= 0:
                out[k, g] += data[j]


def segment_group_sums(m, codes: np.ndarray, n_groups: int, genes_per_read: int = 256) -> np.ndarray:
    """Groups × genes float64 sums over the cells of each group (``codes``) of a matrix read in segments.

    The sums of whole counts are exact, so they equal those of :func:`scmlm.models.sample_sums` on the matrix.
    """
    n_vars = m.shape[1]
    out = np.zeros((n_groups, n_vars))
    codes = np.asarray(codes, dtype=np.int64)
    for lo in range(0, n_vars, genes_per_read):
        cols = np.arange(lo, min(n_vars, lo + genes_per_read), dtype=np.int64)
        for row0, starts, ends, indices, data in m.column_segments(cols):
            _seg_group_sums(starts, ends, indices, data, row0, codes, cols, out)
    return out


def _segments_block(m, cols: np.ndarray, rows: np.ndarray | None, dtype, index_dtype):
    """The CSC block of columns ``cols`` (cells ``rows``) of a matrix read in segments (an on-disk matrix).

    ``m.column_segments(cols)`` gives, in row order, ``(row0, starts, ends, indices, data)``: the entries of chunk
    column ``c`` in that segment are ``indices[starts[c]:ends[c]]`` (rows counted from ``row0``) and the same slice of
    ``data``. Segments in row order with sorted rows give a block with sorted rows, as a CSR or CSC source does.
    """
    segs = list(m.column_segments(cols))
    counts = np.zeros(cols.size, dtype=np.int64)
    use_rowpos = rows is not None
    rowpos = np.empty(0, dtype=np.int64)
    if use_rowpos:
        rowpos = np.full(m.shape[0], -1, dtype=np.int64)
        rowpos[rows] = np.arange(rows.size)
    for row0, starts, ends, indices, _ in segs:
        if use_rowpos:
            _seg_count(starts, ends, indices, row0, rowpos, counts)
        else:
            counts += ends - starts
    indptr, out_indices, out_data = _alloc(counts, dtype, index_dtype)
    nxt = indptr[:-1].copy()
    for row0, starts, ends, indices, data in segs:
        _seg_fill(starts, ends, indices, data, row0, rowpos, use_rowpos, nxt, out_indices, out_data)
    n_rows = m.shape[0] if rows is None else rows.size
    return _csc(n_rows, indptr, out_indices, out_data, bool(getattr(m, "has_sorted_indices", False)))


def _alloc(counts: np.ndarray, dtype, index_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, np.empty(int(indptr[-1]), dtype=index_dtype), np.empty(int(indptr[-1]), dtype=dtype)


def _csc(n_rows: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, sorted_rows: bool):
    out = sp.csc_matrix((n_rows, indptr.size - 1), dtype=data.dtype)
    # assigned, not passed to the constructor: scipy would narrow 64-bit indices to 32 bits (and the GLMM kernel
    # would widen them back), two copies of the block's indices
    out.indptr = indptr if indices.dtype == np.int64 else indptr.astype(indices.dtype)
    out.indices, out.data = indices, data
    out.has_sorted_indices = sorted_rows
    if not sorted_rows:
        out.sort_indices()
    return out


@dataclass
class GeneColumns:
    """Columns ``genes`` and rows ``rows`` (``None``: all) of a cells × genes matrix, kept as a view of it.

    ``block(idx)`` returns the CSC matrix of the selected cells and of the genes at positions ``idx`` of ``genes``,
    built from the matrix in one pass over those entries; the matrix itself (CSR, CSC or dense) is never copied
    whole. Stored zeros are kept, so a block equals the same columns of the whole matrix converted to CSC.
    """

    matrix: Any
    genes: np.ndarray
    rows: np.ndarray | None = None
    nnz_per_gene: np.ndarray | None = field(default=None, repr=False)
    """Stored entries of each selected gene over the selected cells, once known (a chunk is then cut in one pass)."""
    _stats: tuple | None = field(default=None, repr=False)
    _cursor: np.ndarray | None = field(default=None, repr=False)
    _cursor_hi: int = field(default=0, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(selected cells, selected genes)."""
        n = self.matrix.shape[0] if self.rows is None else self.rows.size
        return (int(n), int(self.genes.size))

    @property
    def dtype(self):
        """The matrix's dtype."""
        return self.matrix.dtype

    def take_rows(self, rows: np.ndarray) -> GeneColumns:
        """The same genes on cells ``rows`` (positions among the selected cells, increasing)."""
        base = np.arange(self.matrix.shape[0]) if self.rows is None else self.rows
        return GeneColumns(self.matrix, self.genes, np.asarray(base[rows], dtype=np.int64))

    def block(self, idx: np.ndarray, dtype=None, index_dtype=np.int64):
        """CSC block (selected cells × genes ``idx``), with ``dtype`` data (default: the matrix's own)."""
        m = self.matrix
        cols = np.asarray(self.genes[idx], dtype=np.int64)
        dtype = np.dtype(m.dtype if dtype is None else dtype)
        n_rows = self.shape[0]
        if hasattr(m, "column_segments"):  # an on-disk matrix (scmlm.io.BackedCounts), read gene block by block
            return _segments_block(m, cols, self.rows, dtype, index_dtype)
        if not sp.issparse(m) or m.format not in ("csr", "csc"):
            dense = np.asarray(m[:, cols] if not sp.issparse(m) else m.tocsc()[:, cols].toarray())
            if self.rows is not None:
                dense = dense[self.rows]
            out = sp.csc_matrix(dense)
            return out.astype(dtype, copy=False)
        # the entries per gene are known after column_stats: then one pass over the chunk's entries, not two
        known = self.nnz_per_gene is not None
        counts = np.array(self.nnz_per_gene[idx], dtype=np.int64) if known else np.zeros(cols.size, dtype=np.int64)
        if m.format == "csr":
            with self._lock:  # the row cursors are shared: one chunk is cut at a time
                return self._csr_block(m, cols, counts, known, dtype, index_dtype)
        rowpos = np.arange(m.shape[0], dtype=np.int64)
        if self.rows is not None:
            rowpos = np.full(m.shape[0], -1, dtype=np.int64)
            rowpos[self.rows] = np.arange(self.rows.size)
        if not known:
            _csc_count(m.indptr, m.indices, cols, rowpos, counts)
        indptr, indices, data = _alloc(counts, dtype, index_dtype)
        _csc_fill(m.indptr, m.indices, m.data, cols, rowpos, indptr, indices, data)
        return _csc(n_rows, indptr, indices, data, bool(m.has_sorted_indices))

    def _csr_block(self, m, cols, counts, known, dtype, index_dtype):
        """A chunk of a CSR matrix.

        With sorted column indices each row is read from where the previous chunk stopped, so chunks in increasing
        column order read every stored entry once in all (a binary search per row and chunk read most of the
        matrix's cache lines for every chunk: 5 s more CPU at 400,000 cells).
        """
        rows = np.arange(m.shape[0], dtype=np.int64) if self.rows is None else self.rows
        colpos = np.full(m.shape[1], -1, dtype=np.int64)
        colpos[cols] = np.arange(cols.size)
        lo, hi = (int(cols.min()), int(cols.max()) + 1) if cols.size else (0, 0)
        is_sorted = bool(m.has_sorted_indices)
        if self._cursor is None or lo < self._cursor_hi or not is_sorted:
            self._cursor = np.asarray(m.indptr[rows], dtype=np.int64)  # the rows' starts
        if not known:
            _csr_count(m.indptr, m.indices, rows, colpos, self._cursor, hi, is_sorted, counts)
        indptr, indices, data = _alloc(counts, dtype, index_dtype)
        self._cursor_hi = sys.maxsize  # until the fill is done: a failed fill leaves the cursors reset next time
        _csr_fill(m.indptr, m.indices, m.data, rows, colpos, self._cursor, hi, is_sorted, indptr, indices, data)
        self._cursor_hi = hi
        return _csc(rows.size, indptr, indices, data, True)

    def column_stats(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per gene: cells with a non-zero value, column sum, and ``Σ_i w_i y_ig`` (if ``weights``), float64.

        Computed block by block exactly as on the whole CSC matrix (same operations, same order, same dtype), so
        the numbers equal those of a full conversion; only one block is in memory at a time. The sums are kept:
        a later call without weights (or with the same weights) does not read the counts again.
        """
        cached = self._stats
        if cached is not None and (weights is None or (cached[3] is not None and np.array_equal(weights, cached[3]))):
            return cached[0], cached[1], cached[2] if weights is not None else None
        G = self.genes.size
        m = self.matrix
        if sp.issparse(m) and m.format == "csr":
            return self._csr_stats(weights)
        n_expr = np.zeros(G, dtype=np.int64)
        colsum = np.zeros(G)
        wsum = None if weights is None else np.zeros(G)
        nnz = np.zeros(G, dtype=np.int64)
        self.nnz_per_gene = None  # counted afresh by this pass
        for idx in gene_chunks(G, max(int(settings.chunk_size), 1)):
            sub = self.block(idx, index_dtype=np.int32 if max(self.shape) < 2**31 - 1 else np.int64)
            nnz[idx] = np.diff(sub.indptr)
            if sub.nnz == sub.count_nonzero():
                n_expr[idx] = np.diff(sub.indptr)
            else:
                n_expr[idx] = np.asarray((sub != 0).sum(axis=0)).ravel()
            colsum[idx] = np.asarray(sub.sum(axis=0), dtype=float).ravel()
            if weights is not None:
                # a vector of the matrix's own dtype: a float64 vector would make scipy copy the block to float64
                wsum[idx] = np.asarray(sub.T @ weights.astype(sub.dtype)).ravel().astype(float)
        self.nnz_per_gene = nnz
        self._stats = (n_expr, colsum, wsum, None if weights is None else np.array(weights))
        return n_expr, colsum, wsum

    def _csr_stats(self, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`column_stats` of a CSR matrix in one pass over its rows, without building blocks.

        The weighted sums are accumulated as scipy's ``csc.T @ w.astype(dtype)`` does (the matrix's dtype, cells in
        order), so they are the same numbers; the column sums are accumulated in float64 (equal to scipy's float32
        sums of integer counts below 2**24 per gene, and closer to the exact sum beyond).
        """
        m = self.matrix
        G = self.genes.size
        rows = np.arange(m.shape[0], dtype=np.int64) if self.rows is None else self.rows
        colpos = np.full(m.shape[1], -1, dtype=np.int64)
        colpos[self.genes] = np.arange(G)
        w = (np.zeros(rows.size) if weights is None else np.asarray(weights)).astype(m.dtype)
        nnz, n_expr = np.zeros(G, dtype=np.int64), np.zeros(G, dtype=np.int64)
        colsum, wsum = np.zeros(G), np.zeros(G, dtype=np.result_type(m.dtype, w.dtype))
        _csr_stats(m.indptr, m.indices, m.data, rows, colpos, w, nnz, n_expr, colsum, wsum)
        wsum = None if weights is None else wsum.astype(float)
        self.nnz_per_gene = nnz
        self._stats = (n_expr, colsum, wsum, None if weights is None else np.array(weights))
        return n_expr, colsum, wsum

    def toarray(self) -> np.ndarray:
        """The selected cells × genes, dense (for a handful of genes)."""
        return self.block(np.arange(self.genes.size)).toarray()


def column_block(matrix, idx: np.ndarray):
    """Columns ``idx`` (genes) of a cells × genes matrix, as CSC sparse or dense, without densifying sparse input.

    A :class:`GeneColumns` gives its CSC block with float64 data and 64-bit indices (what the kernels take).
    """
    if isinstance(matrix, GeneColumns):
        return matrix.block(idx, dtype=np.float64)
    if sp.issparse(matrix):
        return matrix[:, idx].tocsc() if matrix.format == "csc" else sp.csc_matrix(matrix[:, idx])
    return np.asarray(matrix[:, idx])


# ---------------------------------------------------------------- the driver


def _call(fit_chunk: Callable, Y_chunk: Any) -> Any:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return fit_chunk(Y_chunk)


def run_chunks(
    fit_chunk: Callable[[Any], Any],
    matrix,
    chunks: Sequence[np.ndarray],
    *,
    n_jobs: int | None = None,
    progress: bool | None = None,
    desc: str = "genes",
    backend: Literal["threads", "loky"] = "loky",
) -> list[Any]:
    """Apply ``fit_chunk`` to the gene blocks of ``matrix`` (cells × genes, or a :class:`GeneColumns`), in order.

    ``backend="threads"`` needs a ``fit_chunk`` that spends its time without the GIL (numba ``nogil`` kernels);
    ``"loky"`` (the default, for any callable) runs it in worker processes. Returns the results in block order.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
    n = resolve_n_jobs(n_jobs)
    total = int(sum(len(c) for c in chunks))
    if progress is None:
        # verbosity 2 always; otherwise only for long runs on an interactive terminal (not in logs or tests)
        long_run = total >= PROGRESS_MIN_GENES and settings.verbosity >= 1 and sys.stderr.isatty()
        show = settings.verbosity >= 2 or long_run
    else:
        show = progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="gene")
    try:
        if n == 1 or len(chunks) <= 1:
            out = []
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1):
                for idx in chunks:
                    out.append(fit_chunk(column_block(matrix, idx)))
                    if bar is not None:
                        bar.update(len(idx))
            return out
        if backend == "threads":
            return _run_threads(fit_chunk, matrix, chunks, min(n, len(chunks)), bar)
        from joblib import Parallel, delayed

        gen = Parallel(n_jobs=n, backend="loky", return_as="generator")(
            delayed(_call)(fit_chunk, column_block(matrix, idx)) for idx in chunks
        )
        out = []
        for idx, res in zip(chunks, gen, strict=True):
            out.append(res)
            if bar is not None:
                bar.update(len(idx))
        return out
    finally:
        if bar is not None:
            bar.close()


def _run_threads(fit_chunk: Callable, matrix, chunks: Sequence[np.ndarray], n: int, bar) -> list[Any]:
    """Chunks on ``n`` threads of this process.

    Each thread cuts its own chunk's block, in chunk order (a :class:`GeneColumns` then reads each row once over all
    chunks), and fits it while the next one is cut.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from threadpoolctl import threadpool_limits

    out: list[Any] = [None] * len(chunks)
    turn = threading.Condition()
    state = {"next": 0, "failed": False}

    def task(i: int) -> int:
        with turn:  # tasks start in submission order (FIFO), so chunk i's turn always comes
            turn.wait_for(lambda: state["next"] == i or state["failed"])
            if state["failed"]:
                return i
            try:
                Y = column_block(matrix, chunks[i])
            finally:
                state["next"] = i + 1
                turn.notify_all()
        out[i] = fit_chunk(Y)
        return i

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=n, thread_name_prefix="scmlm") as pool:
        pending = {pool.submit(task, i) for i in range(len(chunks))}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                err = f.exception()
                if err is not None:  # a chunk failed: the chunks not started are dropped, its error raised
                    with turn:
                        state["failed"] = True
                        turn.notify_all()
                    for p in pending:
                        p.cancel()
                    raise err
                if bar is not None:
                    bar.update(len(chunks[f.result()]))
    return out
