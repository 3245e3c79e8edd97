"""Run a per-gene kernel over chunks of genes, serially or in joblib workers, with results in gene order.

The kernel is any callable ``fit_chunk(Y_chunk) -> result`` where ``Y_chunk`` holds the counts of a block of genes.
What is shared by all genes (design, offsets, random-effect structure) is bound into the callable once
(``functools.partial``) and sent to each worker once per task. Inside workers BLAS is pinned to one thread: with
two BLAS threads on a 2-core machine, the small dense solves of a mixed model ran 26× slower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._settings import settings

PROGRESS_MIN_GENES = 5000
"""Runs with at least this many genes show a progress bar on an interactive terminal."""


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Worker count for ``n_jobs``: ``None`` means ``settings.n_jobs``, 0 means 1, negatives count from all cores."""
    n = settings.n_jobs if n_jobs is None else n_jobs
    if isinstance(n, str) and n.strip().lstrip("-").isdigit():
        n = int(n)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int | np.integer)):
        from ._errors import InputError

        raise InputError(f"n_jobs={n!r} must be a whole number of worker processes (1, 2, …; -1 for all cores).")
    if n is None or n == 0:
        n = 1
    if n < 0:
        n = max(1, (os.cpu_count() or 1) + 1 + n)
    return int(n)


def gene_chunks(n_genes: int, chunk_size: int | None = None) -> list[np.ndarray]:
    """Contiguous blocks of gene indices. The blocks do not depend on ``n_jobs``, so results are identical."""
    size = int(chunk_size or settings.chunk_size)
    return [np.arange(s, min(n_genes, s + size)) for s in range(0, n_genes, size)]


def _call(fit_chunk: Callable, Y_chunk: Any) -> Any:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return fit_chunk(Y_chunk)


def column_block(matrix, idx: np.ndarray):
    """Columns ``idx`` (genes) of a cells × genes matrix, as CSC sparse or dense, without densifying sparse input."""
    if sp.issparse(matrix):
        return matrix[:, idx].tocsc() if matrix.format == "csc" else sp.csc_matrix(matrix[:, idx])
    return np.asarray(matrix[:, idx])


def run_chunks(
    fit_chunk: Callable[[Any], Any],
    matrix,
    chunks: Sequence[np.ndarray],
    *,
    n_jobs: int | None = None,
    progress: bool | None = None,
    desc: str = "genes",
) -> list[Any]:
    """Apply ``fit_chunk`` to the gene blocks of ``matrix`` (cells × genes); returns the results in block order."""
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
