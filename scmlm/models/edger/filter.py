"""edgeR's ``filterByExpr.default``: the genes worth testing.

CPM cutoff ``min_count / median(lib_size) * 1e6`` met in at least the minimum group size (from ``group``, or
``1 / max(hat values)`` of the design), with the ``large_n`` / ``min_prop`` relaxation, plus a total-count cutoff
(tolerance 1e-14), as edgeR 3.40.
"""

from __future__ import annotations

import numpy as np

__all__ = ["filter_by_expr"]


def _hat_values(X: np.ndarray) -> np.ndarray:
    """Diagonal of the hat matrix of ``cbind(1, X)`` (R's ``hat(X)``, which adds an intercept)."""
    X = np.asarray(X, dtype=float)
    Xi = np.column_stack([np.ones(X.shape[0]), X])
    U, s, _ = np.linalg.svd(Xi, full_matrices=False)
    r = int(np.sum(s > s[0] * 1e-7))
    return np.sum(U[:, :r] ** 2, axis=1)


def filter_by_expr(
    counts: np.ndarray,
    lib_size: np.ndarray | None = None,
    *,
    design: np.ndarray | None = None,
    group: np.ndarray | None = None,
    min_count: float = 10,
    min_total_count: float = 15,
    large_n: float = 10,
    min_prop: float = 0.7,
) -> np.ndarray:
    """Genes worth testing, by edgeR's ``filterByExpr.default`` rule.

    Parameters
    ----------
    counts
        Genes × samples counts.
    lib_size
        Library sizes (default: column sums). ``filterByExpr`` on a DGEList uses ``lib.size * norm.factors``.
    design, group
        The minimum group size comes from ``group`` (smallest non-empty level) or, if only ``design`` is given,
        from ``1 / max(hat values)``; with neither, all samples form one group.
    min_count, min_total_count, large_n, min_prop
        As in edgeR.

    Returns
    -------
    Boolean mask over genes.

    Examples
    --------
    >>> y = np.array([[0, 0, 1, 0], [20, 30, 25, 40]])
    >>> filter_by_expr(y, group=np.array([0, 0, 1, 1])).tolist()
    [False, True]
    """
    y = np.asarray(counts, dtype=float)
    lib = y.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=float)
    if group is not None:
        _, n_per = np.unique(np.asarray(group), return_counts=True)
        min_size = float(n_per[n_per > 0].min())
    elif design is not None:
        min_size = 1.0 / float(np.max(_hat_values(design)))
    else:
        min_size = float(y.shape[1])
    if min_size > large_n:
        min_size = large_n + (min_size - large_n) * min_prop
    cutoff = min_count / np.median(lib) * 1e6
    cpm = y / lib[None, :] * 1e6
    tol = 1e-14
    keep_cpm = np.sum(cpm >= cutoff, axis=1) >= (min_size - tol)
    keep_total = y.sum(axis=1) >= (min_total_count - tol)
    return keep_cpm & keep_total
