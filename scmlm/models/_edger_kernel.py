"""Numba kernel of edgeR's NB GLM fits (``mglmLevenberg``), gene by gene, for :mod:`scmlm.models._edger`.

The numpy path of ``_edger._levenberg`` runs all genes of a block in lock-step; profiling the 20,000 × 200 case
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

Also here: one-pass helpers over the counts (the ``lgamma`` table sums of the APL, the saturated part of the
deviance, aveLogCPM's one-group fit) that replace numpy expressions with several genes × samples temporaries.

Why numba: a fit is a chain of ~2-4 tiny dependent steps per gene and dispersion; numba is already a dependency
(through scanpy) and used for aggregation. ``cache=True`` keeps the compiled code on disk (the first call in a new
environment compiles for ~5 s; later processes load it in ~0.2 s).
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import intrinsic

from .._jit import jit

_LOW_VALUE = 1e-10
_LOG_LOW_VALUE = math.log(_LOW_VALUE)

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


@jit
def _exact_gain(Xu, idx, wyr, wt, YX, step, phi, em1, buf):  # pragma: no cover - compiled
    """Log-likelihood change of ``step``: ``YX' step - sum_j (y_j + 1/phi) log1p(phi w_j expm1(x_u' step))`` (``w``
    the IRLS weights before the step), accurate to rounding of the change itself rather than of the likelihood."""
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
    g = 0.0
    for k in range(p):
        g += YX[k] * step[k]
    return g - _rsum(buf, 0, n)


@jit
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


@jit
def _weights(y, wyr, starts, phi, mu, kl, wt, yi, Sw, Syi):  # pragma: no cover - compiled
    """At the means ``mu``: returns ``sum (y + 1/phi) log1p(phi mu)`` (terms in ``kl``); row sums of the IRLS weights
    ``wt`` into ``Sw`` and of ``y / (1 + phi mu)`` into ``Syi`` (the next step's ``X'WX`` and score)."""
    n = y.shape[0]
    for j in range(n):  # the vectorised pass (a gather in it would stop that)
        m = mu[j]
        lg, inv = log1p_inv(phi * m)
        kl[j] = wyr[j] * lg
        wt[j] = m * inv
        yi[j] = y[j] * inv
    for u in range(starts.shape[0] - 1):
        Sw[u], Syi[u] = _rsum2(wt, yi, starts[u], starts[u + 1])
    return _rsum(kl, 0, n)


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
        out += _LOG_LOW_VALUE if (d < _LOW_VALUE or not d <= _HUGE) else math.log(d)
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


@jit(nogil=True)
def levenberg_nb(
    Y, order, Xu, XXu, idx, starts, lib, c_null, phi, beta0, chain, tol, maxit, want_hld, beta_out, kern_out, ell_out,
    hld_out, n_iter_out, failed_out, mu_out, xtwx_out, bad_out
):  # pragma: no cover - compiled  # fmt: skip
    """Levenberg–Marquardt NB fits of every gene (row of ``Y``) at every dispersion ``phi[g, k]``.

    Samples are visited in the order ``order`` (by distinct design row): the ``j``-th visited sample, column
    ``order[j]`` of ``Y`` (G × n), has row ``idx[j]`` of ``Xu`` (U × p; ``XXu`` holds the flattened ``x_u x_u'``)
    and library size ``lib[j]``; row ``u``'s samples are visited at ``starts[u]:starts[u + 1]``.

    Fit ``k`` starts from ``beta0[g]`` or, with ``chain``, from fit ``k - 1`` (edgeR's dispersion grid); a start row
    that is not finite means edgeR's null start (``c_null`` times the log of the weighted mean count/library ratio).

    Outputs: coefficients ``beta_out`` (G × K × p), likelihood kernels ``sum (y + 1/phi) log1p(phi mu)``
    ``kern_out``, log-likelihoods ``YX' beta - kern`` (mean-dependent part) ``ell_out``, half log-determinants of
    ``X'WX`` ``hld_out`` (if ``want_hld``; NaN where not positive definite), iterations, failures (damping blew up
    or ``maxit`` reached), the fitted means of the last fit ``mu_out`` (if it has G rows; columns as ``Y``),
    ``X'WX`` at them ``xtwx_out`` (if it has G rows) and ``bad_out``: genes left to the caller (a damped system not
    positive definite).
    """
    G, n = Y.shape
    U, p = Xu.shape
    K = phi.shape[1]
    want_mu = mu_out.shape[0] == G
    want_xtwx = xtwx_out.shape[0] == G
    e = np.empty(U)
    mu = np.empty(n)
    mu_new = np.empty(n)
    kl = np.empty(n)
    kl_new = np.empty(n)
    wt = np.empty(n)
    wt_new = np.empty(n)
    em1 = np.empty(U)
    yi = np.empty(n)
    wyr = np.empty(n)
    Sw = np.empty(U)
    Syi = np.empty(U)
    Sw_new = np.empty(U)
    Syi_new = np.empty(U)
    Sy = np.empty(U)
    YX = np.empty(p)
    Af = np.empty(p * p)
    A = Af.reshape((p, p))
    C = np.empty((p, p))
    dl = np.empty(p)
    step = np.empty(p)
    b = np.empty(p)
    bn = np.empty(p)
    dbeta = np.empty(p)
    y = np.empty(n)
    for g in range(G):
        for j in range(n):
            y[j] = Y[g, order[j]]
        ymax = 0.0
        for j in range(n):
            if y[j] > ymax:
                ymax = y[j]
        for u in range(U):
            Sy[u] = _rsum(y, starts[u], starts[u + 1])
        for k in range(p):
            s = 0.0
            for u in range(U):
                s += Sy[u] * Xu[u, k]
            YX[k] = s
        bad = False
        for kk in range(K):
            ph = phi[g, kk]
            if kk == 0 or not chain:
                finite = True
                for k in range(p):
                    b[k] = beta0[g, k]
                    finite = finite and math.isfinite(b[k])
                if not finite:
                    _null_start(y, lib, ph, c_null, b)
            r = 1.0 / ph
            for j in range(n):
                wyr[j] = y[j] + r
            if kk == 0 or not chain:  # (else mu holds the mean at b from fit k - 1)
                _mean(lib, idx, Xu, b, e, mu)
            kern = _weights(y, wyr, starts, ph, mu, kl, wt, yi, Sw, Syi)
            ell = -kern
            for k in range(p):
                ell += YX[k] * b[k]
            lam = 0.0
            max_info = -1.0
            active = ymax >= _LOW_VALUE
            failed = False
            it = 0
            n_it = 0
            while active and it < maxit:
                it += 1
                _assemble(Xu, XXu, Sw, Syi, Af, dl)
                mi = A[0, 0]
                for k in range(1, p):
                    if A[k, k] > mi:
                        mi = A[k, k]
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
                    kern_n = _weights(y, wyr, starts, ph, mu_new, kl_new, wt_new, yi, Sw_new, Syi_new)
                    ell_n = -kern_n
                    for k in range(p):
                        ell_n += YX[k] * bn[k]
                    if ell > -math.inf and ell_n > -math.inf:
                        # the change from per-sample differences, free of the cancellation in ell_n - ell; where it
                        # is within rounding of the likelihood (last steps of high-count genes), recomputed exactly
                        # (edgeR compares deviances, which are small near the optimum: their rounding is negligible)
                        gain = -_rsum_diff(kl_new, kl)
                        for k in range(p):
                            gain += YX[k] * step[k]
                        if abs(gain) < 1e-14 * (kern + kern_n):  # rounding bound: ~4.4e-16 (kern + kern_n)
                            gain = _exact_gain(Xu, idx, wyr, wt, YX, step, ph, em1, yi)
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
                        break
                    dls = 0.0
                    for k in range(p):
                        dls += dl[k] * step[k]
                    if dls < tol:
                        # at the optimum already: edgeR would double the damping until a negligible step passes
                        break
                    lam *= 2.0
                    if not lam / max_info <= 1e13:  # (NaN too, as the numpy path)
                        fail = True
                        break
                if bad:
                    break
                div = 0.0
                for k in range(p):
                    div += dl[k] * dbeta[k]
                stop = fail or div < tol
                if not stop and lev == 1:
                    lam /= 10.0
                n_it = it
                if stop:
                    failed = fail
                    active = False
            if bad:
                break
            for k in range(p):
                beta_out[g, kk, k] = b[k]
            kern_out[g, kk] = kern
            ell_out[g, kk] = ell
            n_iter_out[g, kk] = n_it
            failed_out[g, kk] = failed or active
            if want_hld or (want_xtwx and kk == K - 1):
                _assemble(Xu, XXu, Sw, Syi, Af, dl)
                if want_hld:
                    hld_out[g, kk] = _half_logdet(A, C)
                if want_xtwx and kk == K - 1:
                    for k in range(p):
                        for m in range(p):
                            xtwx_out[g, k, m] = A[k, m]
        bad_out[g] = bad
        if want_mu and not bad:
            for j in range(n):
                mu_out[g, order[j]] = mu[j]


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
            if Y[g, j] > _LOW_VALUE:
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
