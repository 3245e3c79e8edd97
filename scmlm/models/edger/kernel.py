"""Numba kernel of edgeR's NB GLM fits (``mglmLevenberg``), gene by gene, for :mod:`scmlm.models.edger.glm`.

The numpy path of ``glm._levenberg`` runs all genes of a block in lock-step; profiling the 20,000 × 200 case
showed it spent most of its time on array passes, gathers and scatters of the shrinking active set and per-call
overhead rather than on arithmetic (about 12 ns per sample and likelihood evaluation; here about 4.5 ns). Here one
gene is fitted at a time with every work array of the gene in L1 cache, converged genes cost nothing, and the
likelihood, weights and score of a step come from one vectorised pass over the samples. The kernel covers the
common case (shared library sizes, no prior weights, positive per-gene dispersions); everything else keeps the
numpy path.

The arithmetic is edgeR's (and the numpy path's), only reordered:

* Samples are sorted by their distinct design row ``u``. The mean is ``mu_j = lib_j exp(x_u' beta)``; the
  weights ``w_j = mu_j / (1 + phi mu_j)`` and ``y_j / (1 + phi mu_j)`` enter ``X'WX`` and the score only through
  their sums over each row's samples, so ``X'WX = sum_u S_u x_u x_u'`` costs ``U p^2`` instead of ``n p^2``.
* The likelihood kernel ``sum_j (y_j + 1/phi) log1p(phi mu_j)`` uses :func:`log1p_inv`, a branch-free
  transcription of fdlibm's ``log`` (< 1 ulp, as glibc) with the rounding error of ``1 + t`` added back, so that
  LLVM vectorises the pass (numba has no vector ``log1p``; the scalar libm call was 5x slower).
* Sums over samples use reassociating (vectorised) reductions: results differ from the numpy path in the last bits
  of the sums only.
* A step is accepted when the log-likelihood does not decrease (edgeR: the deviance does not increase). The change
  is summed from per-sample differences rather than taken as a difference of two likelihoods of ~1e7 (high-count
  genes), whose rounding (~1e-9) would otherwise decide the last, tiny steps; where even that sum is within its
  rounding bound, the change is recomputed exactly (``log1p(phi w expm1(x' step))`` per sample). So the kernel
  follows edgeR's own (deviance-based, precise) decisions there, where the numpy path's are coin flips.
* Steps solve ``(X'WX + lambda I) d = score`` by Cholesky (edgeR's ``dpotrf``). A gene whose damped system is not
  numerically positive definite is flagged ``bad`` and refitted by the caller with the numpy path.

The entry point :func:`levenberg_nb` takes named records (module-level ``NamedTuple`` classes, which numba types as
tuples with attribute access and caches by class): :class:`KernelDesign` (what all genes share), :class:`KernelConfig`
(settings) and :class:`KernelOut` (outputs filled in place). Inside, a gene's data, the two per-sample passes (the
current iterate and a trial step, which swap roles when a step is accepted) and the work arrays are records too;
the per-fit iteration :func:`_fit` is inlined and the helpers it calls per step take plain arrays (each array of a
record passed to a compiled call costs a reference count).

Also here: one-pass helpers over the counts (the ``lgamma`` table sums of the APL, the saturated part of the
deviance, aveLogCPM's one-group fit) that replace numpy expressions with several genes × samples temporaries.

Why numba: a fit is a chain of ~2-4 tiny dependent steps per gene and dispersion; numba is already a dependency
(through scanpy) and used for aggregation. ``cache=True`` keeps the compiled code on disk (the first call in a new
environment compiles for ~5 s; later processes load it in ~0.2 s).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import types
from numba.extending import intrinsic

from ..._jit import jit

LOW_VALUE = 1e-10
LOG_LOW_VALUE = math.log(LOW_VALUE)

# fdlibm e_log.c
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_HUGE = 1.7976931348623157e308


@intrinsic
def _f64_bits(typingctx, x):  # pragma: no cover - compiled
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return sig, codegen


@intrinsic
def _bits_f64(typingctx, x):  # pragma: no cover - compiled
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@jit(inline="always")
def log1p_inv(t):  # pragma: no cover - compiled
    """``(log1p(t), 1 / (1 + t))`` for ``t > -1`` (inf and nan pass through), branch-free so that loops over it
    vectorise.

    ``u = 1 + t`` is split as ``2^k m`` with ``m`` in ``[sqrt(2)/2, sqrt(2))`` and ``log m`` taken from fdlibm's
    minimax polynomial in ``s = (m - 1) / (m + 1)``; the rounding error ``c`` of ``u`` adds ``c / u`` (as fdlibm's
    ``log1p``). Accurate to 1 ulp, as the libm and numpy versions. Inlined: never call it from a ``fastmath``
    function (reassociation would fold the correction ``c`` to zero).
    """
    u = 1.0 + t
    inv = 1.0 / u
    ib = _f64_bits(u)
    hx = (ib >> 32) + (0x3FF00000 - 0x3FE6A09E)
    k = float((hx >> 20) - 0x3FF)
    m = _bits_f64((((hx & 0x000FFFFF) + 0x3FE6A09E) << 32) | (ib & 0xFFFFFFFF))
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    c = (1.0 - (u - t) if k >= 2.0 else t - (u - 1.0)) * inv
    c = c if k < 54.0 else 0.0
    val = k * _LN2_HI - ((hfsq - (s * (hfsq + r) + (k * _LN2_LO + c))) - f)
    return (val if u <= _HUGE else u), inv


@jit(fastmath={"reassoc"})
def _rsum(a, lo, hi):  # pragma: no cover - compiled
    s = 0.0
    for j in range(lo, hi):
        s += a[j]
    return s


@jit(fastmath={"reassoc"})
def _rsum2(a, b, lo, hi):  # pragma: no cover - compiled
    s = 0.0
    t = 0.0
    for j in range(lo, hi):
        s += a[j]
        t += b[j]
    return s, t


@jit(fastmath={"reassoc"})
def _rsum_diff(a, b):  # pragma: no cover - compiled
    s = 0.0
    for j in range(a.shape[0]):
        s += a[j] - b[j]
    return s


# ---------------------------------------------------------------------------------------------------------------------
# named records of the Levenberg kernel (module level: numba types them as tuples and caches them by class)
# ---------------------------------------------------------------------------------------------------------------------


class KernelDesign(NamedTuple):
    """What every gene of a compiled fit shares: the design on its distinct rows, samples visited by row.

    The ``j``-th visited sample is column ``order[j]`` of the counts, has design row ``idx[j]`` of ``Xu`` and library
    size ``lib[j]``; row ``u``'s samples are visited at ``starts[u]:starts[u + 1]``.
    """

    order: np.ndarray
    """int64 (n): column of the counts of each visited sample."""
    Xu: np.ndarray
    """float64 (U × p): the distinct design rows."""
    XXu: np.ndarray
    """float64 (U × p²): the flattened products ``x_u x_u'``."""
    idx: np.ndarray
    """int64 (n): distinct row of each visited sample (sorted)."""
    starts: np.ndarray
    """int64 (U + 1): where each distinct row's samples start."""
    lib: np.ndarray
    """float64 (n): library sizes, in visiting order."""
    c_null: np.ndarray
    """float64 (p): edgeR's null start is ``c_null`` times the log of the weighted mean count/library ratio."""


class KernelConfig(NamedTuple):
    """Settings of a compiled fit."""

    chain: bool
    """Fit ``k`` starts from fit ``k - 1`` (edgeR's dispersion grid) instead of from ``beta0``."""
    tol: float
    """edgeR's convergence tolerance on the score times the step."""
    maxit: int
    """Iteration limit."""
    want_hld: bool
    """Also compute half log-determinants of ``X'WX`` (the Cox–Reid adjustment)."""


class KernelOut(NamedTuple):
    """Outputs of :func:`levenberg_nb`, filled in place (G genes, K dispersions, n samples, p coefficients)."""

    beta: np.ndarray
    """float64 (G × K × p): coefficients."""
    kern: np.ndarray
    """float64 (G × K): likelihood kernels ``sum (y + 1/phi) log1p(phi mu)``."""
    ell: np.ndarray
    """float64 (G × K): log-likelihoods ``YX' beta - kern`` (mean-dependent part)."""
    hld: np.ndarray
    """float64 (G × K): half log-determinants of ``X'WX`` (if asked; NaN where not positive definite)."""
    n_iter: np.ndarray
    """int64 (G × K): iterations."""
    failed: np.ndarray
    """bool (G × K): the damping blew up or ``maxit`` was reached."""
    mu: np.ndarray
    """float64 (G × n, or 0 × 0 if not wanted): fitted means of the last dispersion, columns as the counts."""
    xtwx: np.ndarray
    """float64 (G × p × p, or 0 × p × p if not wanted): ``X'WX`` at those means."""
    bad: np.ndarray
    """bool (G): genes left to the caller (a damped system not positive definite)."""


class _Gene(NamedTuple):
    """One gene's counts in visiting order and what depends on them and the dispersion only."""

    y: np.ndarray  # n
    wyr: np.ndarray  # n: y + 1/phi
    Sy: np.ndarray  # U: counts summed per distinct row
    YX: np.ndarray  # p: X'y


class _Pass(NamedTuple):
    """The per-sample pass at one coefficient vector: means, likelihood terms, IRLS weights and their row sums."""

    mu: np.ndarray  # n
    kl: np.ndarray  # n: (y + 1/phi) log1p(phi mu)
    wt: np.ndarray  # n: mu / (1 + phi mu)
    Sw: np.ndarray  # U: row sums of wt
    Syi: np.ndarray  # U: row sums of y / (1 + phi mu)


class _Scratch(NamedTuple):
    """Work arrays of the Levenberg iterations, reused gene after gene."""

    b: np.ndarray  # p: current coefficients
    bn: np.ndarray  # p: trial coefficients
    step: np.ndarray  # p
    dbeta: np.ndarray  # p: accepted step of the iteration
    dl: np.ndarray  # p: score
    Af: np.ndarray  # p²: X'WX, flattened
    A: np.ndarray  # p × p view of Af
    C: np.ndarray  # p × p: Cholesky factor
    e: np.ndarray  # U: exp(x_u' b)
    em1: np.ndarray  # U: expm1(x_u' step)
    yi: np.ndarray  # n: buffer


@jit
def _exact_loss(Xu, idx, wyr, wt, step, phi, em1, buf):  # pragma: no cover - compiled
    """``sum_j (y_j + 1/phi) log1p(phi w_j expm1(x_u' step))`` (``w`` the IRLS weights before the step): with
    ``YX' step`` the log-likelihood change of ``step``, accurate to rounding of the change itself rather than of the
    likelihood."""
    U, p = Xu.shape
    n = wyr.shape[0]
    for u in range(U):
        s = 0.0
        for k in range(p):
            s += Xu[u, k] * step[k]
        em1[u] = math.expm1(s)
    for j in range(n):
        buf[j] = phi * wt[j] * em1[idx[j]]
    for j in range(n):
        buf[j] = wyr[j] * log1p_inv(buf[j])[0]
    return _rsum(buf, 0, n)


@jit(inline="always")
def _mean(lib, idx, Xu, b, e, mu):  # pragma: no cover - compiled
    """``mu_j = lib_j exp(x_u' b)`` (one exponential per distinct design row)."""
    U, p = Xu.shape
    for u in range(U):
        s = 0.0
        for k in range(p):
            s += Xu[u, k] * b[k]
        e[u] = math.exp(s)
    for j in range(mu.shape[0]):
        mu[j] = lib[j] * e[idx[j]]


@jit(inline="always")
def _weights(y, wyr, phi, mu, kl, wt, yi):  # pragma: no cover - compiled
    """At the means ``mu``: the terms ``(y + 1/phi) log1p(phi mu)`` into ``kl``, the IRLS weights into ``wt`` and
    ``y / (1 + phi mu)`` into ``yi``."""
    for j in range(y.shape[0]):  # the vectorised pass (a gather in it would stop that)
        m = mu[j]
        lg, inv = log1p_inv(phi * m)
        kl[j] = wyr[j] * lg
        wt[j] = m * inv
        yi[j] = y[j] * inv


@jit(inline="always")
def _row_sums(starts, wt, yi, Sw, Syi):  # pragma: no cover - compiled
    """Row sums of the IRLS weights ``wt`` into ``Sw`` and of ``yi`` into ``Syi`` (the next step's ``X'WX`` and
    score)."""
    for u in range(starts.shape[0] - 1):
        Sw[u], Syi[u] = _rsum2(wt, yi, starts[u], starts[u + 1])


@jit(inline="always")
def _dot(a, b):  # pragma: no cover - compiled
    s = 0.0
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@jit
def _assemble(Xu, XXu, Sw, Syi, Af, dl):  # pragma: no cover - compiled
    """``X'WX = sum_u Sw_u x_u x_u'`` (flattened into ``Af``, from the row products ``XXu``) and the score
    ``dl = sum_u (Syi_u - Sw_u) x_u``."""
    U, p = Xu.shape
    pp = XXu.shape[1]
    for q in range(pp):
        Af[q] = 0.0
    for k in range(p):
        dl[k] = 0.0
    for u in range(U):
        s = Sw[u]
        r = Syi[u] - s
        for q in range(pp):
            Af[q] += s * XXu[u, q]
        for k in range(p):
            dl[k] += r * Xu[u, k]


@jit
def _cholesky(A, lam, C):  # pragma: no cover - compiled
    """Lower Cholesky factor of ``A + lam I`` into ``C``; False if a pivot is not positive (or not finite)."""
    p = A.shape[0]
    for j in range(p):
        s = A[j, j] + lam
        for k in range(j):
            s -= C[j, k] * C[j, k]
        if not (s > 0.0 and s <= _HUGE):
            return False
        d = math.sqrt(s)
        C[j, j] = d
        for i in range(j + 1, p):
            s = A[i, j]
            for k in range(j):
                s -= C[i, k] * C[j, k]
            C[i, j] = s / d
    return True


@jit
def _chol_solve(C, b, x):  # pragma: no cover - compiled
    p = C.shape[0]
    for i in range(p):
        s = b[i]
        for k in range(i):
            s -= C[i, k] * x[k]
        x[i] = s / C[i, i]
    for i in range(p - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, p):
            s -= C[k, i] * x[k]
        x[i] = s / C[i, i]


@jit
def _half_logdet(A, C):  # pragma: no cover - compiled
    """Half of edgeR's log-determinant of ``X'WX`` (pivots floored at 1e-10); NaN if ``A`` is not positive definite
    (the caller then uses an LDL' factorisation)."""
    p = A.shape[0]
    if p == 1:
        return 0.5 * math.log(abs(A[0, 0]))
    if not _cholesky(A, 0.0, C):
        return np.nan
    out = 0.0
    for k in range(p):
        d = C[k, k] * C[k, k]
        out += LOG_LOW_VALUE if (d < LOW_VALUE or not d <= _HUGE) else math.log(d)
    return 0.5 * out


@jit
def _null_start(y, lib, phi, c_null, b):  # pragma: no cover - compiled
    num = 0.0
    den = 0.0
    for j in range(y.shape[0]):
        ww = lib[j] / (1.0 + phi * lib[j])
        num += y[j] * ww / lib[j]
        den += ww
    val = math.log(num / den) if num > 0.0 else -math.inf
    ok = True
    for k in range(b.shape[0]):
        b[k] = val * c_null[k]
        ok = ok and math.isfinite(b[k])
    if not ok:
        for k in range(b.shape[0]):
            b[k] = 0.0


@jit(inline="always")
def _fit(d, cfg, gene, phi, active, cur, new, s):  # pragma: no cover - compiled
    """Levenberg–Marquardt fit of one gene at dispersion ``phi`` from ``s.b`` (with its means in ``cur.mu``).

    Each iteration solves ``(X'WX + lam I) step = score`` by Cholesky and accepts the step when the log-likelihood
    does not decrease, else doubles the damping ``lam``. The change is summed from per-sample differences, free of
    the cancellation in ``ell_n - ell``; where it is within rounding of the likelihood (last steps of high-count
    genes), it is recomputed exactly (edgeR compares deviances, which are small near the optimum: their rounding is
    negligible).

    Returns ``kern``, ``ell``, iterations, failure (damping blew up or ``maxit`` reached), ``bad`` (a damped system
    not positive definite: the gene is left to the caller) and whether the final pass ended up in ``new`` (the two
    passes swap roles at every accepted step; the caller swaps its own references when this is True).

    Inlined into :func:`levenberg_nb` (numba IR), and every helper called per step takes plain arrays: a compiled
    call that receives the records costs a reference count per array, which at ~1 µs per fit (10 samples) is not
    negligible.
    """
    lib, idx, Xu, XXu, starts = d.lib, d.idx, d.Xu, d.XXu, d.starts
    y, wyr, YX = gene.y, gene.wyr, gene.YX
    mu, kl, wt, Sw, Syi = cur.mu, cur.kl, cur.wt, cur.Sw, cur.Syi
    mu_new, kl_new, wt_new, Sw_new, Syi_new = new.mu, new.kl, new.wt, new.Sw, new.Syi
    b, bn, step, dbeta, dl, yi = s.b, s.bn, s.step, s.dbeta, s.dl, s.yi
    Af, A, C, e, em1 = s.Af, s.A, s.C, s.e, s.em1
    p = b.shape[0]
    n = y.shape[0]
    _weights(y, wyr, phi, mu, kl, wt, yi)
    _row_sums(starts, wt, yi, Sw, Syi)
    kern = _rsum(kl, 0, n)
    ell = -kern
    for k in range(p):
        ell += YX[k] * b[k]
    lam = 0.0
    max_info = -1.0
    bad = False
    flipped = False
    it = 0
    n_it = 0
    fail = False
    while active and it < cfg.maxit:
        it += 1
        _assemble(Xu, XXu, Sw, Syi, Af, dl)
        mi = _max_diag(A)
        if mi > max_info:
            max_info = mi
        if it == 1:
            lam = max(max_info * 1e-6, 1e-13)
        lev = 0
        fail = False
        for k in range(p):
            dbeta[k] = 0.0
        while True:
            lev += 1
            if not _cholesky(A, lam, C):
                bad = True
                break
            _chol_solve(C, dl, step)
            for k in range(p):
                bn[k] = b[k] + step[k]
            _mean(lib, idx, Xu, bn, e, mu_new)
            _weights(y, wyr, phi, mu_new, kl_new, wt_new, yi)
            _row_sums(starts, wt_new, yi, Sw_new, Syi_new)
            kern_n = _rsum(kl_new, 0, n)
            ell_n = -kern_n
            for k in range(p):
                ell_n += YX[k] * bn[k]
            if ell > -math.inf and ell_n > -math.inf:
                gain = -_rsum_diff(kl_new, kl)
                for k in range(p):
                    gain += YX[k] * step[k]
                if abs(gain) < 1e-14 * (kern + kern_n):  # rounding bound: ~4.4e-16 (kern + kern_n)
                    gain = _dot(YX, step) - _exact_loss(Xu, idx, wyr, wt, step, phi, em1, yi)
                accept = gain >= 0.0
            else:
                accept = ell_n >= ell
            if accept:
                for k in range(p):
                    b[k] = bn[k]
                    dbeta[k] = step[k]
                ell = ell_n
                kern = kern_n
                mu, mu_new = mu_new, mu
                kl, kl_new = kl_new, kl
                wt, wt_new = wt_new, wt
                Sw, Sw_new = Sw_new, Sw
                Syi, Syi_new = Syi_new, Syi
                flipped = not flipped
                break
            if _dot(dl, step) < cfg.tol:
                # at the optimum already: edgeR would double the damping until a negligible step passes
                break
            lam *= 2.0
            if not lam / max_info <= 1e13:  # (NaN too, as the numpy path)
                fail = True
                break
        if bad:
            break
        stop = fail or _dot(dl, dbeta) < cfg.tol
        if not stop and lev == 1:
            lam /= 10.0
        n_it = it
        if stop:
            active = False
    return kern, ell, n_it, fail or active, bad, flipped


@jit(inline="always")
def _max_diag(A):  # pragma: no cover - compiled
    mi = A[0, 0]
    for k in range(1, A.shape[0]):
        if A[k, k] > mi:
            mi = A[k, k]
    return mi


@jit
def _load_gene(Y, g, order, starts, Xu, y, Sy, YX):  # pragma: no cover - compiled
    """Gene ``g``'s counts in visiting order into ``y``, with their row sums ``Sy`` and ``YX = X'y``; returns the
    largest count."""
    U, p = Xu.shape
    for j in range(y.shape[0]):
        y[j] = Y[g, order[j]]
    ymax = 0.0
    for j in range(y.shape[0]):
        if y[j] > ymax:
            ymax = y[j]
    for u in range(U):
        Sy[u] = _rsum(y, starts[u], starts[u + 1])
    for k in range(p):
        t = 0.0
        for u in range(U):
            t += Sy[u] * Xu[u, k]
        YX[k] = t
    return ymax


@jit
def _start(beta0, g, y, lib, phi, c_null, b):  # pragma: no cover - compiled
    """``b`` from row ``g`` of ``beta0``, or edgeR's null start where that row is not finite."""
    finite = True
    for k in range(b.shape[0]):
        b[k] = beta0[g, k]
        finite = finite and math.isfinite(b[k])
    if not finite:
        _null_start(y, lib, phi, c_null, b)


@jit
def _copy_matrix(A, out, g):  # pragma: no cover - compiled
    for k in range(A.shape[0]):
        for m in range(A.shape[1]):
            out[g, k, m] = A[k, m]


@jit(nogil=True)
def levenberg_nb(Y, phi, beta0, d, cfg, out):  # pragma: no cover - compiled
    """Levenberg–Marquardt NB fits of every gene (row of ``Y``, G × n) at every dispersion ``phi[g, k]`` (G × K).

    ``d`` (:class:`KernelDesign`) holds the design and the order in which samples are visited, ``cfg``
    (:class:`KernelConfig`) the settings. Fit ``k`` starts from ``beta0[g]`` or, with ``cfg.chain``, from fit
    ``k - 1`` (edgeR's dispersion grid); a start row that is not finite means edgeR's null start. Results go into
    ``out`` (:class:`KernelOut`).
    """
    G, n = Y.shape
    U, p = d.Xu.shape
    K = phi.shape[1]
    want_mu = out.mu.shape[0] == G
    want_xtwx = out.xtwx.shape[0] == G
    lib, c_null, Xu, XXu, order = d.lib, d.c_null, d.Xu, d.XXu, d.order
    gene = _Gene(np.empty(n), np.empty(n), np.empty(U), np.empty(p))
    Af = np.empty(p * p)
    s = _Scratch(
        np.empty(p), np.empty(p), np.empty(p), np.empty(p), np.empty(p), Af, Af.reshape((p, p)), np.empty((p, p)),
        np.empty(U), np.empty(U), np.empty(n),
    )  # fmt: skip
    cur = _Pass(np.empty(n), np.empty(n), np.empty(n), np.empty(U), np.empty(U))
    new = _Pass(np.empty(n), np.empty(n), np.empty(n), np.empty(U), np.empty(U))
    y, wyr, b, e, A, C, dl = gene.y, gene.wyr, s.b, s.e, s.A, s.C, s.dl
    for g in range(G):
        ymax = _load_gene(Y, g, order, d.starts, Xu, y, gene.Sy, gene.YX)
        bad = False
        for kk in range(K):
            ph = phi[g, kk]
            fresh = kk == 0 or not cfg.chain
            if fresh:
                _start(beta0, g, y, lib, ph, c_null, b)
            r = 1.0 / ph
            for j in range(n):
                wyr[j] = y[j] + r
            if fresh:  # (else cur.mu holds the mean at b from fit k - 1)
                _mean(lib, d.idx, Xu, b, e, cur.mu)
            kern, ell, n_it, failed, bad, flipped = _fit(d, cfg, gene, ph, ymax >= LOW_VALUE, cur, new, s)
            if flipped:
                cur, new = new, cur
            if bad:
                break
            for k in range(p):
                out.beta[g, kk, k] = b[k]
            out.kern[g, kk] = kern
            out.ell[g, kk] = ell
            out.n_iter[g, kk] = n_it
            out.failed[g, kk] = failed
            last = want_xtwx and kk == K - 1
            if cfg.want_hld or last:  # X'WX at the fit: its half log-determinant, or the matrix itself
                _assemble(Xu, XXu, cur.Sw, cur.Syi, s.Af, dl)
                if cfg.want_hld:
                    out.hld[g, kk] = _half_logdet(A, C)
                if last:
                    _copy_matrix(A, out.xtwx, g)
        out.bad[g] = bad
        if want_mu and not bad:
            mu = cur.mu
            for j in range(n):
                out.mu[g, order[j]] = mu[j]


# ---------------------------------------------------------------------------------------------------------------------
# one-pass helpers over the counts (no genes × samples temporaries)
# ---------------------------------------------------------------------------------------------------------------------


@jit(nogil=True)
def count_values(Y, limit):  # pragma: no cover - compiled
    """Presence of each value ``0..max(Y)`` among the counts, if all are integers in ``[0, limit]``; else an empty
    array."""
    G, n = Y.shape
    ymax = 0.0
    for g in range(G):
        for j in range(n):
            v = Y[g, j]
            if not (v >= 0.0 and v <= limit and v == math.floor(v)):
                return np.zeros(0, dtype=np.bool_)
            if v > ymax:
                ymax = v
    present = np.zeros(int(ymax) + 1, dtype=np.bool_)
    for g in range(G):
        for j in range(n):
            present[int(Y[g, j])] = True
    return present


@jit(nogil=True)
def table_row_sums(Y, rowmap, T, out):  # pragma: no cover - compiled
    """``out[g] = sum_j T[rowmap[Y[g, j]]]`` (rows of a table indexed by integer counts), summed in sample order."""
    G, n = Y.shape
    K = T.shape[1]
    for g in range(G):
        for k in range(K):
            out[g, k] = 0.0
        for j in range(n):
            row = rowmap[int(Y[g, j])]
            for k in range(K):
                out[g, k] += T[row, k]


@jit(nogil=True)
def saturated_terms(Y, phi, mu, out, special):  # pragma: no cover - compiled
    """Per gene ``sum y log y - sum (y + 1/phi) log1p(phi y)`` (the saturated part of the NB deviance), and whether
    any sample is in edgeR's gamma branch (``mu phi > 1e6``) or the gene in its Poisson branch (``phi < 1e-4``)."""
    G, n = Y.shape
    buf = np.empty(n)
    for g in range(G):
        ph = phi[g]
        r = 1.0 / ph if ph > 0.0 else 1.0
        sp = ph < 1e-4
        for j in range(n):
            if mu[g, j] * ph > 1e6:
                sp = True
        special[g] = sp
        for j in range(n):
            y = Y[g, j]
            yl = y * log1p_inv(y - 1.0)[0]
            buf[j] = (yl if y > 0.0 else 0.0) - (y + r) * log1p_inv(ph * y)[0]
        out[g] = _rsum(buf, 0, n)


@jit(nogil=True)
def one_group_nb(Y, lib, phi, maxit, tol, out):  # pragma: no cover - compiled
    """edgeR's ``mglmOneGroup`` for each gene: Newton steps on ``beta`` (``mu_j = lib_j exp(beta)``) from the mean
    count/library ratio, until a step is below ``tol`` or ``maxit`` steps; -inf for genes without a count.
    ``phi`` is G × 1 (per gene) or G × n."""
    G, n = Y.shape
    per_sample = phi.shape[1] > 1
    a = np.empty(n)
    b = np.empty(n)
    for g in range(G):
        s = 0.0
        ok = False
        for j in range(n):
            if Y[g, j] > LOW_VALUE:
                s += Y[g, j] / lib[j]
                ok = True
        if not ok:
            out[g] = -np.inf
            continue
        beta = math.log(s / n)
        for _ in range(maxit):
            eb = math.exp(beta)
            for j in range(n):
                mu = eb * lib[j]
                den = 1.0 + mu * (phi[g, j] if per_sample else phi[g, 0])
                a[j] = (Y[g, j] - mu) / den
                b[j] = mu / den
            dl, info = _rsum2(a, b, 0, n)
            step = dl / info
            beta += step
            if abs(step) < tol:
                break
        out[g] = beta
