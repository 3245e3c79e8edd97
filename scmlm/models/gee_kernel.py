"""The per-gene GEE fit as a numba kernel: starting GLM, NB2 moment dispersion, exchangeable GEE, cluster blocks.

:func:`gee_chunk` fits every gene of a chunk (CSC counts, genes as columns) one after the other and writes, per gene,
the coefficients, the working correlation, the dispersion, the iteration count, a status code and the per-cluster
information ``A_d`` and scores ``g_d`` at the solution, from which :mod:`scmlm.models.gee` builds the corrected
sandwich and the tests (vectorised over genes; p × p algebra only).

Cells are sorted by cluster and, within a cluster, by design row (a *pattern*), so the linear predictor and its
exponential are evaluated once per pattern (``mu_i = exp(x_p' beta) * exp(offset_i)`` for the log link) and every
cluster sum is one pass over contiguous cells. The Poisson starting fit needs only per-pattern sums of the counts and
of ``exp(offset)``. Per gene a fit costs a few passes over the cells (dispersion Newton steps and GEE iterations),
without the cells × genes temporaries of a vectorised numpy version.

Algorithms (the same as the numpy version they replace, so results agree to the convergence tolerances):

1. Starting GLM (Poisson for ``nb``/``poisson``, logistic for ``binomial``) with the offset: one weighted least
   squares step from ``mu = (y + mean) / 2`` (statsmodels' start), then Newton steps with step halving on the log
   likelihood until no coefficient moves by more than 1e-10 (at most 50).
2. ``nb``: ``alpha`` solving ``sum (y - mu)^2 / (mu + alpha mu^2) = n - p`` (MASS ``theta.mm``) by Newton's method
   from ``alpha = 0``: the left side is decreasing and convex in ``alpha``, so the iterates increase monotonically to
   the root; bounds ``[1e-8, 1e4]``.
3. GEE, exchangeable working correlation, statsmodels' alternating updates: ``rho`` by the moment estimator at the
   current ``beta``, then one Fisher-scoring step for ``beta``; stop when no coefficient moves by more than 1e-9
   and ``rho`` by no more than 1e-9 (at most ``maxiter``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._jit import jit

ST_OK, ST_SEPARATION, ST_NONFINITE, ST_RUNAWAY = 0, 1, 2, 3
FAM_NB, FAM_POISSON, FAM_BINOMIAL = 0, 1, 2
_ALPHA_MIN, _ALPHA_MAX = 1e-8, 1e4
_BETA_MAX = 30.0


class GEEKernelDesign(NamedTuple):
    """What every gene of a cell group shares, cells sorted by (cluster, pattern)."""

    xp: np.ndarray
    """patterns × p: the distinct design rows of each cluster"""
    pat_start: np.ndarray
    """patterns + 1 (int64): first sorted cell of each pattern"""
    clus_start: np.ndarray
    """clusters + 1 (int64): first pattern of each cluster"""
    sizes: np.ndarray
    """clusters (float64): cells per cluster"""
    s: np.ndarray
    """sorted cells: ``exp(offset)``"""
    off: np.ndarray
    """sorted cells: the offset"""
    pos: np.ndarray
    """cells (int64): sorted position of each original cell"""
    family: int
    maxiter: int


class GEEWork(NamedTuple):
    """Scratch arrays of one gene's fit, allocated once per chunk."""

    eta: np.ndarray
    """patterns: linear predictor without the offset"""
    H: np.ndarray
    """p × p"""
    sc: np.ndarray
    """p"""
    upd: np.ndarray
    """p: the last Newton / scoring step"""
    ypat: np.ndarray
    """patterns: sum of the counts"""
    spat: np.ndarray
    """patterns: sum of ``exp(offset)``"""
    Sww: np.ndarray
    """clusters × p × p"""
    Sd: np.ndarray
    """clusters × p"""
    Sdr: np.ndarray
    """clusters × p"""
    Tk: np.ndarray
    """clusters: sum of the Pearson residuals"""
    ssk: np.ndarray
    """clusters: sum of their squares"""
    A: np.ndarray
    """clusters × p × p"""
    g: np.ndarray
    """clusters × p"""
    B: np.ndarray
    """p × p"""
    score: np.ndarray
    """p"""


class GEEKernelOut(NamedTuple):
    """Per-gene outputs the kernel fills (genes of the chunk in order)."""

    beta: np.ndarray
    """genes × p"""
    rho: np.ndarray
    alpha: np.ndarray
    n_iter: np.ndarray
    last_step: np.ndarray
    status: np.ndarray
    """int64 codes ``ST_*``"""
    A: np.ndarray
    """genes × clusters × p × p: ``D_d' V_d^-1 D_d`` (scale omitted)"""
    g: np.ndarray
    """genes × clusters × p: ``D_d' V_d^-1 r_d``"""


@jit(nogil=True)
def _solve(M, b, out):
    """Solve ``M x = b`` (p × p, Gaussian elimination with partial pivoting) into ``out``; False if singular."""
    p = b.shape[0]
    a = M.copy()
    x = b.copy()
    scale = 0.0
    for i in range(p):
        for j in range(p):
            scale = max(scale, abs(a[i, j]))
    if not scale > 0.0:
        return False
    for c in range(p):
        piv = c
        for r in range(c + 1, p):
            if abs(a[r, c]) > abs(a[piv, c]):
                piv = r
        if abs(a[piv, c]) <= 1e-13 * scale:
            return False
        if piv != c:
            for j in range(p):
                a[c, j], a[piv, j] = a[piv, j], a[c, j]
            x[c], x[piv] = x[piv], x[c]
        for r in range(c + 1, p):
            f = a[r, c] / a[c, c]
            for j in range(c, p):
                a[r, j] -= f * a[c, j]
            x[r] -= f * x[c]
    for c in range(p - 1, -1, -1):
        acc = x[c]
        for j in range(c + 1, p):
            acc -= a[c, j] * out[j]
        out[c] = acc / a[c, c]
    return True


@jit(nogil=True)
def _pattern_eta(dz, beta, eta):
    for pt in range(dz.xp.shape[0]):
        acc = 0.0
        for a in range(dz.xp.shape[1]):
            acc += dz.xp[pt, a] * beta[a]
        eta[pt] = acc


@jit(nogil=True)
def _mu(fam, etap, dz, i):
    """Mean of sorted cell ``i`` given its pattern's linear predictor (offset added here)."""
    if fam == FAM_BINOMIAL:
        e = etap + dz.off[i]
        e = min(max(e, -700.0), 700.0)
        return 1.0 / (1.0 + math.exp(-e))
    return math.exp(min(etap, 700.0)) * dz.s[i]


@jit(nogil=True)
def _poisson_start(dz, y, beta, w):
    """Poisson GLM with the offset, Newton in pattern sums; returns iterations (negative: singular system)."""
    eta, H, sc, upd, ypat, spat = w.eta, w.H, w.sc, w.upd, w.ypat, w.spat
    P, p = dz.xp.shape
    tot_y = 0.0
    tot_s = 0.0
    for pt in range(P):
        a = 0.0
        b = 0.0
        for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
            a += y[i]
            b += dz.s[i]
        ypat[pt] = a
        spat[pt] = b
        tot_y += a
        tot_s += b
    rate = tot_y / tot_s
    # statsmodels' start mu = (y + mean y) / 2 as one weighted least squares step, in pattern sums
    H[:, :] = 0.0
    sc[:] = 0.0
    for pt in range(P):
        m = 0.5 * ypat[pt] + 0.5 * rate * spat[pt]
        z = math.log(m / spat[pt])
        for a in range(p):
            xa = dz.xp[pt, a]
            sc[a] += xa * m * z
            for b in range(p):
                H[a, b] += xa * dz.xp[pt, b] * m
    if not _solve(H, sc, beta):
        return -1
    ll_old = -np.inf
    for it in range(50):
        _pattern_eta(dz, beta, eta)
        ll = 0.0
        H[:, :] = 0.0
        sc[:] = 0.0
        for pt in range(P):
            m = math.exp(min(eta[pt], 700.0)) * spat[pt]
            ll += ypat[pt] * eta[pt] - m
            r = ypat[pt] - m
            for a in range(p):
                xa = dz.xp[pt, a]
                sc[a] += xa * r
                for b in range(p):
                    H[a, b] += xa * dz.xp[pt, b] * m
        if ll < ll_old - 1e-9 * abs(ll_old) and it > 0:  # step halving
            for a in range(p):
                upd[a] *= 0.5
                beta[a] -= upd[a]
            continue
        ll_old = ll
        if not _solve(H, sc, upd):
            return -1
        step = 0.0
        for a in range(p):
            beta[a] += upd[a]
            step = max(step, abs(upd[a]))
        big = 0.0
        for a in range(p):
            big = max(big, abs(beta[a]))
        if step < 1e-10 or not np.isfinite(step) or big > 2 * _BETA_MAX:
            return it + 1
    return 50


@jit(nogil=True)
def _logistic_start(dz, y, beta, w):
    """Logistic GLM with the offset (IRLS from statsmodels' start, then Newton with step halving)."""
    eta, H, sc, upd = w.eta, w.H, w.sc, w.upd
    P, p = dz.xp.shape
    n = y.shape[0]
    ybar = 0.0
    for i in range(n):
        ybar += y[i]
    ybar /= n
    H[:, :] = 0.0
    sc[:] = 0.0
    for pt in range(P):
        for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
            m = min(max(0.5 * (y[i] + ybar), 1e-3), 1 - 1e-3)
            w = m * (1.0 - m)
            z = math.log(m / (1.0 - m)) - dz.off[i]
            for a in range(p):
                xa = dz.xp[pt, a]
                sc[a] += xa * w * z
                for b in range(p):
                    H[a, b] += xa * dz.xp[pt, b] * w
    if not _solve(H, sc, beta):
        return -1
    ll_old = -np.inf
    for it in range(50):
        _pattern_eta(dz, beta, eta)
        ll = 0.0
        H[:, :] = 0.0
        sc[:] = 0.0
        for pt in range(P):
            for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
                e = min(max(eta[pt] + dz.off[i], -700.0), 700.0)
                m = 1.0 / (1.0 + math.exp(-e))
                ll += y[i] * e - (e + math.log1p(math.exp(-e)) if e > 0 else math.log1p(math.exp(e)))
                w = m * (1.0 - m)
                r = y[i] - m
                for a in range(p):
                    xa = dz.xp[pt, a]
                    sc[a] += xa * r
                    for b in range(p):
                        H[a, b] += xa * dz.xp[pt, b] * w
        if ll < ll_old - 1e-9 * abs(ll_old) and it > 0:
            for a in range(p):
                upd[a] *= 0.5
                beta[a] -= upd[a]
            continue
        ll_old = ll
        if not _solve(H, sc, upd):
            return -1
        step = 0.0
        big = 0.0
        for a in range(p):
            beta[a] += upd[a]
            step = max(step, abs(upd[a]))
            big = max(big, abs(beta[a]))
        if step < 1e-10 or not np.isfinite(step) or big > 2 * _BETA_MAX:
            return it + 1
    return 50


@jit(nogil=True)
def _nb_alpha(dz, y, eta, n_coef):
    """NB2 ``alpha`` from the Pearson moment equation at the starting means (Newton from 0, monotone)."""
    n = y.shape[0]
    target = max(n - n_coef, 1)
    alpha = 0.0
    for _ in range(200):
        f = 0.0
        d = 0.0
        for pt in range(dz.xp.shape[0]):
            e = math.exp(min(eta[pt], 700.0))
            for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
                m = max(e * dz.s[i], 1e-12)
                r = y[i] - m
                q = 1.0 / (1.0 + alpha * m)
                t = r * r / m * q
                f += t
                d += t * m * q
        f -= target
        if alpha == 0.0 and f <= 0.0:
            return _ALPHA_MIN
        if not d > 0.0:
            break
        new = alpha + f / d
        if new >= _ALPHA_MAX:
            return _ALPHA_MAX
        if abs(new - alpha) <= 1e-12 * new:
            alpha = new
            break
        alpha = new
    return max(alpha, _ALPHA_MIN)


@jit(nogil=True)
def _cluster_sums(dz, y, eta, alpha, k, Sww, Sd, Sdr):
    """Sums over the cells of cluster ``k``: ``sum x x' dt^2``, ``sum x dt``, ``sum x dt rt``; returns ``(T, ssr)``
    (sums of the Pearson residuals and of their squares); ``dt = dmu / sd``, ``rt = (y - mu) / sd``."""
    fam = dz.family
    p = dz.xp.shape[1]
    Sww[:, :] = 0.0
    Sd[:] = 0.0
    Sdr[:] = 0.0
    T = 0.0
    ssr = 0.0
    for pt in range(dz.clus_start[k], dz.clus_start[k + 1]):
        a2 = 0.0
        a1 = 0.0
        ar = 0.0
        e = math.exp(min(eta[pt], 700.0))
        for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
            if fam == FAM_BINOMIAL:
                m = _mu(fam, eta[pt], dz, i)
                dmu = m * (1.0 - m)
                var = dmu
            else:
                m = e * dz.s[i]
                dmu = m
                var = m + alpha * m * m
            isd = 1.0 / math.sqrt(max(var, 1e-300))
            dt = dmu * isd
            rt = (y[i] - m) * isd
            a2 += dt * dt
            a1 += dt
            ar += dt * rt
            T += rt
            ssr += rt * rt
        for a in range(p):
            xa = dz.xp[pt, a]
            Sd[a] += xa * a1
            Sdr[a] += xa * ar
            for b in range(p):
                Sww[a, b] += xa * dz.xp[pt, b] * a2
    return T, ssr


@jit(nogil=True)
def _gee_blocks(dz, y, w, alpha, rho, A, g):
    """Cluster information ``A_d`` and scores ``g_d`` at ``w.eta`` (``rho < -1``: only the sums, ``w.Tk`` and
    ``w.ssk`` for the moment estimate of ``rho``; the blocks are then built by :func:`_blocks_from_sums`)."""
    for k in range(dz.sizes.shape[0]):
        w.Tk[k], w.ssk[k] = _cluster_sums(dz, y, w.eta, alpha, k, w.Sww[k], w.Sd[k], w.Sdr[k])
    if rho < -1.0:
        return
    _blocks_from_sums(dz.sizes, rho, w.Sww, w.Sd, w.Sdr, w.Tk, A, g)


@jit(nogil=True)
def _blocks_from_sums(sizes, rho, Sww, Sd, Sdr, Tk, A, g):
    f = 1.0 / (1.0 - rho)
    p = Sd.shape[1]
    for k in range(sizes.shape[0]):
        c = rho / (1.0 - rho + sizes[k] * rho)
        for a in range(p):
            g[k, a] = f * (Sdr[k, a] - c * Sd[k, a] * Tk[k])
            for b in range(p):
                A[k, a, b] = f * (Sww[k, a, b] - c * Sd[k, a] * Sd[k, b])


@jit(nogil=True)
def _rho(Tk, ssk, sizes, n, p):
    """statsmodels' ``Exchangeable.update``."""
    scale = 0.0
    num = 0.0
    pairs = 0.0
    for k in range(sizes.shape[0]):
        scale += ssk[k]
        num += 0.5 * (Tk[k] * Tk[k] - ssk[k])
        pairs += 0.5 * sizes[k] * (sizes[k] - 1.0)
    scale /= n - p
    if pairs - p <= 0:
        return 0.0
    return num / scale / (pairs - p)


@jit(nogil=True)
def _fit_one(dz, y, out, gi, w):
    """One gene: start, dispersion, GEE iterations, blocks at the solution (into ``out`` row ``gi``)."""
    eta, upd, Tk, ssk, A, g, B, score = w.eta, w.upd, w.Tk, w.ssk, w.A, w.g, w.B, w.score
    fam = dz.family
    n = y.shape[0]
    p = dz.xp.shape[1]
    K = dz.sizes.shape[0]
    beta = out.beta[gi]
    if fam == FAM_BINOMIAL:
        it0 = _logistic_start(dz, y, beta, w)
    else:
        it0 = _poisson_start(dz, y, beta, w)
    big = 0.0
    for a in range(p):
        big = max(big, abs(beta[a]))
    if not np.all(np.isfinite(beta)):
        out.status[gi] = ST_NONFINITE
        return
    if big > _BETA_MAX:  # the starting GLM ran off: no counts in some level of the design
        out.status[gi] = ST_RUNAWAY
        return
    if it0 < 0:
        out.status[gi] = ST_NONFINITE
        return
    _pattern_eta(dz, beta, eta)
    alpha = 0.0
    if fam == FAM_NB:
        alpha = _nb_alpha(dz, y, eta, p)
        out.alpha[gi] = alpha
    if fam == FAM_BINOMIAL:  # fitted probabilities equal the 0/1 outcomes: perfect separation
        perfect = True
        for pt in range(dz.xp.shape[0]):
            for i in range(dz.pat_start[pt], dz.pat_start[pt + 1]):
                if abs(_mu(fam, eta[pt], dz, i) - y[i]) > 1e-8 + 1e-5 * abs(y[i]):
                    perfect = False
                    break
            if not perfect:
                break
        if perfect:
            out.status[gi] = ST_SEPARATION
            return
    n_max = 0.0
    for k in range(K):
        n_max = max(n_max, dz.sizes[k])
    rho_lo = -1.0 / (n_max - 1.0) * 0.999 if n_max > 1 else -0.999
    rho = 0.0
    for it in range(dz.maxiter):
        _gee_blocks(dz, y, w, alpha, -2.0, A, g)
        rho_new = min(max(_rho(Tk, ssk, dz.sizes, n, p), rho_lo), 0.999)
        _blocks_from_sums(dz.sizes, rho_new, w.Sww, w.Sd, w.Sdr, Tk, A, g)
        B[:, :] = 0.0
        score[:] = 0.0
        for k in range(K):
            for a in range(p):
                score[a] += g[k, a]
                for b in range(p):
                    B[a, b] += A[k, a, b]
        if not _solve(B, score, upd):
            out.status[gi] = ST_NONFINITE
            out.n_iter[gi] = it + 1
            return
        step = abs(rho_new - rho)
        big = 0.0
        finite = True
        for a in range(p):
            beta[a] += upd[a]
            step = max(step, abs(upd[a]))
            big = max(big, abs(beta[a]))
            finite = finite and np.isfinite(beta[a])
        rho = rho_new
        out.n_iter[gi] = it + 1
        out.last_step[gi] = step
        out.rho[gi] = rho
        if not finite:
            out.status[gi] = ST_NONFINITE
            return
        if big > _BETA_MAX:
            out.status[gi] = ST_RUNAWAY
            return
        _pattern_eta(dz, beta, eta)
        if step < 1e-9:
            break
    _gee_blocks(dz, y, w, alpha, rho, out.A[gi], out.g[gi])


@jit(nogil=True)
def gee_chunk(dz, data, indices, indptr, out):
    """Fit every gene (CSC column ``data[indptr[j]:indptr[j+1]]`` at rows ``indices``) into ``out``."""
    n = dz.pos.shape[0]
    P, p = dz.xp.shape
    K = dz.sizes.shape[0]
    y = np.zeros(n)
    w = GEEWork(
        eta=np.empty(P), H=np.empty((p, p)), sc=np.empty(p), upd=np.zeros(p), ypat=np.empty(P), spat=np.empty(P),
        Sww=np.empty((K, p, p)), Sd=np.empty((K, p)), Sdr=np.empty((K, p)), Tk=np.empty(K), ssk=np.empty(K),
        A=np.empty((K, p, p)), g=np.empty((K, p)), B=np.empty((p, p)), score=np.empty(p),
    )  # fmt: skip
    binary = dz.family == FAM_BINOMIAL
    for gi in range(indptr.shape[0] - 1):
        for j in range(indptr[gi], indptr[gi + 1]):
            v = data[j]
            y[dz.pos[indices[j]]] = (1.0 if v > 0 else 0.0) if binary else v
        w.upd[:] = 0.0
        _fit_one(dz, y, out, gi, w)
        for j in range(indptr[gi], indptr[gi + 1]):
            y[dz.pos[indices[j]]] = 0.0


def kernel_design(X: np.ndarray, clusters: np.ndarray, n_clusters: int, offset, family: int, maxiter: int):
    """Cells sorted by (cluster, design row): the :class:`GEEKernelDesign` of a cell group."""
    X = np.ascontiguousarray(X, dtype=float)
    n, p = X.shape
    _, row_code = np.unique(X, axis=0, return_inverse=True)
    row_code = np.asarray(row_code).ravel()
    order = np.lexsort((row_code, clusters))
    key = clusters[order].astype(np.int64) * (int(row_code.max()) + 1) + row_code[order]
    new_pat = np.r_[True, key[1:] != key[:-1]]
    pat_start = np.r_[np.flatnonzero(new_pat), n].astype(np.int64)
    pat_cluster = clusters[order][pat_start[:-1]]
    clus_start = np.searchsorted(pat_cluster, np.arange(n_clusters + 1)).astype(np.int64)
    off = np.zeros(n) if offset is None else np.asarray(offset, dtype=float)[order]
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return GEEKernelDesign(
        xp=np.ascontiguousarray(X[order][pat_start[:-1]]),
        pat_start=pat_start,
        clus_start=clus_start,
        sizes=np.bincount(clusters, minlength=n_clusters).astype(float),
        s=np.exp(off),
        off=np.ascontiguousarray(off),
        pos=pos,
        family=int(family),
        maxiter=int(maxiter),
    )


def kernel_out(n_genes: int, n_clusters: int, p: int) -> GEEKernelOut:
    """Output arrays for a chunk (NaN where a gene stops early)."""
    return GEEKernelOut(
        beta=np.zeros((n_genes, p)),
        rho=np.zeros(n_genes),
        alpha=np.full(n_genes, np.nan),
        n_iter=np.zeros(n_genes),
        last_step=np.full(n_genes, np.inf),
        status=np.zeros(n_genes, dtype=np.int64),
        A=np.full((n_genes, n_clusters, p, p), np.nan),
        g=np.full((n_genes, n_clusters, p), np.nan),
    )
