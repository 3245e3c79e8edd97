"""The unit scores of :func:`~scmlm.models.moderate.gene_tau2` in one pass over the cells per gene (numba).

``S_u = Σ_{i∈u} (y_i - μ_i) μ'_i / V_i`` and ``I_u = Σ_{i∈u} μ'_i² / V_i`` (:func:`~scmlm.models.moderate.unit_scores`)
split into a part every cell has (its value at ``y = 0``) and a part only the non-zero cells add:

* NB: ``S_u = Σ_{y>0} y / (1 + φ μ) - Σ μ / (1 + φ μ)``, ``I_u = Σ μ / (1 + φ μ)``; Poisson: ``φ = 0``;
* binomial (logit): ``S_u = Σ y - Σ m p``, ``I_u = Σ m p (1 - p)`` (``y > 0`` counts 1 for detection);
* Gaussian: ``S_u = (Σ y - Σ η) / φ``, ``I_u = Σ 1 / φ``.

Cells are ordered by unit once per call and cut into *runs* of consecutive cells with the same row of the fixed
design and of ``Z``: a run shares the linear predictor up to the offsets, so a gene's predictor is computed once per
run, and for a log link ``μ_i = exp(η_r + c) exp(o_i - c)`` with the second factor (``c`` the mean offset) computed
once per call: the zero part is then one multiplication and one division per cell and gene, with no temporary of
cells × genes. The non-zero part is one pass over the gene's non-zeros. The numpy version
(:func:`~scmlm.models.moderate.unit_scores`, dense blocks of cells × genes) gives the same sums up to rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .._jit import jit
from ._families import BINOMIAL, GAUSSIAN, NB, POISSON, get_family


class UnitCells(NamedTuple):
    """The cells of a model ordered by unit and cut into runs sharing their design rows."""

    x: np.ndarray
    """fixed design, cells × p (float64)"""
    zc: np.ndarray
    """column of ``b`` of each stored entry of a cell's row of ``Z``, cells × m (int64)"""
    zv: np.ndarray
    """value of that entry, cells × m (float64)"""
    start: np.ndarray
    """first position (in the unit order) of each run, and the number of cells at the end (int64)"""
    rep: np.ndarray
    """a cell of each run (int64)"""
    run_unit: np.ndarray
    """unit of each run (int64)"""
    run_of: np.ndarray
    """run of each cell (int64)"""
    q_sorted: np.ndarray
    """per position in the unit order: ``exp(o - c)`` (log link) or the offset ``o`` (other links)"""
    q_cell: np.ndarray
    """the same per cell"""
    m_sorted: np.ndarray
    """trials per position in the unit order (ones without trials)"""


@jit
def _unit_order(codes, n_units):
    """Cells ordered by unit, stably (a counting sort)."""
    n = codes.shape[0]
    count = np.zeros(n_units + 1, dtype=np.int64)
    for i in range(n):
        count[codes[i] + 1] += 1
    for u in range(n_units):
        count[u + 1] += count[u]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        u = codes[i]
        order[count[u]] = i
        count[u] += 1
    return order


@jit
def _runs(order, codes, x, zc, zv):
    """Start positions (plus the end), representative cell and unit of each run of equal rows, and the run of each
    cell."""
    n = order.shape[0]
    p = x.shape[1]
    m = zc.shape[1]
    start = np.empty(n + 1, dtype=np.int64)
    rep = np.empty(n, dtype=np.int64)
    unit = np.empty(n, dtype=np.int64)
    run_of = np.empty(n, dtype=np.int64)
    nr = 0
    prev = -1
    for k in range(n):
        i = order[k]
        new = prev < 0 or codes[i] != codes[prev]
        if not new:
            for j in range(p):
                if x[i, j] != x[prev, j]:
                    new = True
                    break
        if not new:
            for j in range(m):
                if zc[i, j] != zc[prev, j] or zv[i, j] != zv[prev, j]:
                    new = True
                    break
        if new:
            start[nr] = k
            rep[nr] = i
            unit[nr] = codes[i]
            nr += 1
        run_of[i] = nr - 1
        prev = i
    start[nr] = n
    return start[: nr + 1].copy(), rep[:nr].copy(), unit[:nr].copy(), run_of


@jit(nogil=True)
def _scores(cells, fam, binary, c, ycols, params):
    """``(S, I)``, units × genes, from the genes' non-zeros (``ycols``: CSC ``indptr, indices, data`` and the
    column of each gene) and fits (``params``: ``beta`` genes × p, ``b`` genes × q, ``phi``)."""
    indptr, indices, data, cols = ycols
    beta, b, phi = params
    x, zc, zv = cells.x, cells.zc, cells.zv
    start, rep, run_unit, run_of = cells.start, cells.rep, cells.run_unit, cells.run_of
    qs, qc, ms = cells.q_sorted, cells.q_cell, cells.m_sorted
    G = beta.shape[0]
    p = x.shape[1]
    m = zc.shape[1]
    R = rep.shape[0]
    n_units = 0
    for r in range(R):
        n_units = max(n_units, run_unit[r] + 1)
    S = np.zeros((n_units, G))
    info = np.zeros((n_units, G))
    lin = np.empty(R)
    ex = np.empty(R)
    log_link = fam == NB or fam == POISSON
    for g in range(G):
        ph = phi[g] if fam == NB or fam == GAUSSIAN else 0.0
        for r in range(R):
            i = rep[r]
            xb = 0.0
            for j in range(p):
                xb += x[i, j] * beta[g, j]
            zb = 0.0
            for j in range(m):
                zb += zv[i, j] * b[g, zc[i, j]]
            lin[r] = xb + zb
            ex[r] = math.exp(lin[r] + c) if log_link else 0.0
        for r in range(R):
            u = run_unit[r]
            s = 0.0
            w = 0.0
            if fam == NB:
                e = ex[r]
                for k in range(start[r], start[r + 1]):
                    mu = e * qs[k]
                    s += mu / (1.0 + ph * mu)
                w = s
            elif fam == POISSON:
                e = ex[r]
                for k in range(start[r], start[r + 1]):
                    s += e * qs[k]
                w = s
            elif fam == BINOMIAL:
                for k in range(start[r], start[r + 1]):
                    pr = 1.0 / (1.0 + math.exp(-(lin[r] + qs[k])))
                    s += ms[k] * pr
                    w += ms[k] * pr * (1.0 - pr)
            else:
                for k in range(start[r], start[r + 1]):
                    s += lin[r] + qs[k]
                s /= ph
                w = (start[r + 1] - start[r]) / ph
            S[u, g] -= s
            info[u, g] += w
        for j in range(indptr[cols[g]], indptr[cols[g] + 1]):
            i = indices[j]
            y = data[j]
            r = run_of[i]
            u = run_unit[r]
            if fam == NB:
                mu = ex[r] * qc[i]
                S[u, g] += y / (1.0 + ph * mu)
            elif fam == POISSON:
                S[u, g] += y
            elif fam == BINOMIAL:
                S[u, g] += (1.0 if y > 0 else 0.0) if binary else y
            else:
                S[u, g] += y / ph
    return S, info


def _cells(model, unit_codes: np.ndarray, log_link: bool) -> tuple[UnitCells, float]:
    """The :class:`UnitCells` of ``model`` and the offset centre ``c``."""
    X = np.ascontiguousarray(model.X, dtype=np.float64)
    n = X.shape[0]
    zc_cols, zv_cols, col0 = [], [], 0
    for t in model.terms:
        cov = np.asarray(t.covariates, dtype=np.float64)
        for j in range(t.k):
            zc_cols.append(col0 + np.asarray(t.codes, dtype=np.int64) * t.k + j)
            zv_cols.append(cov[:, j])
        col0 += t.q
    zc = np.ascontiguousarray(np.column_stack(zc_cols) if zc_cols else np.zeros((n, 0)), dtype=np.int64)
    zv = np.ascontiguousarray(np.column_stack(zv_cols) if zv_cols else np.zeros((n, 0)), dtype=np.float64)
    codes = np.ascontiguousarray(unit_codes, dtype=np.int64)
    order = _unit_order(codes, int(codes.max()) + 1)
    start, rep, run_unit, run_of = _runs(order, codes, X, zc, zv)
    off = np.zeros(n) if model.offset is None else np.asarray(model.offset, dtype=np.float64)
    c = float(np.mean(off)) if log_link and n else 0.0
    q = np.exp(off - c) if log_link else off
    m = np.ones(n) if model.trials is None else np.asarray(model.trials, dtype=np.float64)
    cells = UnitCells(X, zc, zv, start, rep, run_unit, run_of, np.ascontiguousarray(q[order]), q, m[order])
    return cells, c


def _gene_columns(Y, n: int):
    """CSC ``(indptr, indices, data)`` with genes as columns, from cells × genes (sparse or dense) or dense genes ×
    cells, read as :func:`~scmlm.models.moderate.unit_scores` reads them; a CSC matrix with float64 values and int64
    indices (an engine chunk) is read in place."""
    if sp.issparse(Y):
        Yc = Y if Y.shape[0] == n else Y.T
        Yc = Yc if Yc.format == "csc" else sp.csc_matrix(Yc)
    else:
        Y = np.asarray(Y, dtype=float)
        Yc = sp.csr_matrix(np.atleast_2d(Y)) if Y.ndim == 1 or Y.shape[0] != n else sp.csc_matrix(Y)
    return (
        np.asarray(Yc.indptr, dtype=np.int64),
        np.asarray(Yc.indices, dtype=np.int64),
        np.asarray(Yc.data, dtype=np.float64),
    )


def unit_scores_kernel(
    Y, model, beta: np.ndarray, b: np.ndarray, phi: np.ndarray, unit_codes: np.ndarray, *, genes=None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~scmlm.models.moderate.unit_scores` (same arguments and result, ``(S, I)`` units × genes) in one pass
    over the cells and one over the non-zeros per gene.

    ``genes``: the genes of ``Y`` the fits (rows of ``beta``, ``b``, ``phi``) belong to (default: all, in order);
    ``unit_scores(Y[:, genes], ...)`` without copying the columns.

    Examples
    --------
    >>> import numpy as np
    >>> from scmlm.models import CellModel, intercept_term
    >>> donor = np.repeat(np.arange(4), 5)
    >>> model = CellModel(np.ones((20, 1)), (intercept_term("donor", donor),), None, "poisson", None)
    >>> S, info = unit_scores_kernel(np.ones((1, 20)), model, np.zeros((1, 1)), np.zeros((1, 4)), np.ones(1), donor)
    >>> S.ravel().tolist(), info.ravel().tolist()
    ([0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0])
    """
    fam = get_family(model.family)
    n = np.asarray(model.X).shape[0]
    log_link = fam.code in (NB, POISSON)
    cells, c = _cells(model, unit_codes, log_link)
    beta = np.ascontiguousarray(beta, dtype=np.float64)
    G = beta.shape[0]
    b = np.ascontiguousarray(b, dtype=np.float64).reshape(G, -1)
    phi = np.ascontiguousarray(phi, dtype=np.float64).reshape(G)
    cols = np.arange(G, dtype=np.int64) if genes is None else np.asarray(genes, dtype=np.int64).reshape(G)
    ycols = (*_gene_columns(Y, n), cols)
    S, info = _scores(cells, int(fam.code), model.trials is None, c, ycols, (beta, b, phi))
    n_units = int(np.max(unit_codes)) + 1
    if S.shape[0] < n_units:  # units without cells (not expected): zero rows, as the numpy version gives
        S = np.vstack([S, np.zeros((n_units - S.shape[0], G))])
        info = np.vstack([info, np.zeros((n_units - info.shape[0], G))])
    return S, info
