"""Numba kernel of the cell-level GLMM: per-gene Laplace (ML) and restricted-Laplace (REML) fits.

Everything here works on *covariate patterns*: the distinct rows of (fixed design, random-term codes and
covariates). Cells of a pattern share the linear predictor ``e_p`` up to their offsets, so the log-likelihood of a
gene is a sum over patterns of one-dimensional functions ``F_p(e_p)`` (plus the dispersion ``tau = log phi``):

* NB2 with ``v = e + tau``, ``r = exp(-tau)``::

      F_p = Y_p e - U_p(v) - r V_p(v),   U_p(v) = sum_{i in p, y_i > 0} y_i softplus(v + o_i),
                                          V_p(v) = sum_{i in p} softplus(v + o_i)

  plus the gene-level ``D(tau) = sum_j c_j log1p(j phi)`` (``c_j`` = number of cells with ``y > j``), which is
  ``sum_i lgamma(y_i + r) - lgamma(r) - y_i log r`` computed in O(max y). ``V_p`` does not depend on the gene: it is
  tabulated once per design (Taylor coefficients on a grid, series in the tails). ``U_p`` only involves the
  gene's non-zero cells; it is replaced by its order-6 Taylor polynomial around a centre that is moved to the current
  mode after every outer step (a cheap O(nnz) pass), so all optimisation work is pattern-level and exact at
  convergence.
* Poisson: ``F_p = Y_p e - M_p exp(e)`` (exact). Binomial (logit): ``F_p = Y_p e - V_p(e)`` with ``V_p`` weighted by
  the trials. Gaussian (identity): exact sufficient statistics, ``tau = log sigma^2``.

For given variance parameters ``psi = (theta, tau)`` the conditional modes of ``gamma = (beta, u)``, ``b = Lambda u``,
are found by Newton's method on the penalised log-likelihood ``h = sum_p F_p - |u|^2/2`` (exact Hessian, as
glmmTMB). The criterion is ``h - log det(H_S)/2`` with ``H_S`` the ``u`` block of the negative Hessian (Laplace ML) or
the whole ``(beta, u)`` Hessian (REML: ``beta`` integrated out as well). ``psi`` is optimised by Newton's method with
the analytic gradient (implicit differentiation of the modes, third derivatives of ``F_p`` in the log-determinant)
and a forward-difference Hessian of that gradient. SDs that reach zero are fixed there (``singular``). For ML a second
stage moves ``beta`` into the outer parameters (only ``u`` integrated), which gives glmmTMB's Laplace-ML ``beta`` and,
from the Hessian in all fixed parameters, its standard errors.

Cost per gene: O(nnz) per re-centring pass (a handful per fit) plus pattern-level algebra; a design whose patterns
are few (categorical fixed effects and random intercepts) therefore costs about the same at 4,000 and 40,000 cells.
A continuous cell-level covariate makes every cell a pattern (one cell: evaluated exactly, no surrogate): still
linear in cells, but every Newton step is then O(cells); ``benchmarks/bench_glmm_slope.py`` measures
``~ x + (1 + x|donor)`` against categorical designs on the same data.
The compilation (first use in a new environment) takes ~25 s of CPU.

Why numba: one fit is a long chain of tiny dense operations (q x q with q = donors + batches) with data-dependent
iteration counts; numpy would spend its time in call overhead and a per-gene Python loop with scipy.optimize is two
orders of magnitude slower. ``cache=True`` keeps the compiled code on disk, so only the first import in a new
environment pays the compilation.
"""

from __future__ import annotations

import math

import numpy as np

from .._jit import jit

NB, POISSON, BINOMIAL, GAUSSIAN = 0, 1, 2, 3

KU = 6  # order of the Taylor surrogate of U_p
KV = 9  # derivatives stored per node of the V_p tables
HV = 0.2  # node spacing of the V_p tables
TRUST = 1.0  # radius (in v) where the U_p Taylor polynomial is used; quadratic continuation beyond
TAIL = 7.5  # |v + o| beyond which softplus is evaluated by its 5-term series
NSER = 5
LOG2PI = math.log(2.0 * math.pi)
DEC_TOL = 1e-7  # outer convergence: predicted gain of the Newton step (log-likelihood units)
SHIFT_TOL = 0.02  # modes this close to the Taylor centres: the surrogate is exact to ~1e-12 there
SNAP_SD = 0.01  # SDs below this (times the scale) are tried at exactly zero
MAX_ETA_STEP = 4.0  # largest change of a pattern's linear predictor in one inner Newton step (damping)

# status codes (see _glmm.STATUS)
ST_OK, ST_SINGULAR, ST_NOCONV, ST_FEW, ST_ZERO, ST_NONFINITE, ST_NOTPD, ST_NONINT, ST_BADY = range(9)
ST_SEPARATED = 9  # set after the kernel by _glmm.fit_glmm: some fixed effect has no finite estimate


def _sigmoid_polys(jmax: int) -> np.ndarray:
    """Coefficients, in ascending powers of ``s = sigmoid(x)``, of the ``j``-th derivative of the sigmoid."""
    polys = [np.array([0.0, 1.0])]
    for _ in range(jmax):
        c = polys[-1]
        dc = c[1:] * np.arange(1, c.size)
        nxt = np.zeros(dc.size + 2)
        nxt[1 : dc.size + 1] += dc
        nxt[2 : dc.size + 2] -= dc
        polys.append(nxt)
    out = np.zeros((jmax + 1, polys[-1].size))
    for j, c in enumerate(polys):
        out[j, : c.size] = c
    return out


SIGP = _sigmoid_polys(KV)
# runtime (non-literal) small integers: literal arguments would make numba compile one specialisation per value
LEVEL = np.arange(3, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# scalar helpers


@jit
def softplus_derivs(x, K, out):
    """``out[k] = d^k softplus(x) / dx^k`` for ``k = 0..K``, accurate in both tails.

    Evaluated at ``-|x|`` (``s = sigmoid`` small, no cancellation) and reflected: ``softplus(x) = x + softplus(-x)``,
    ``sigmoid(x) = 1 - sigmoid(-x)`` and the ``k``-th derivative (``k >= 2``) changes sign with ``(-1)^k``.
    """
    flip = x > 0.0
    xs = -x if flip else x
    ex = math.exp(xs)
    s = ex / (1.0 + ex)
    out[0] = math.log1p(ex) + (x if flip else 0.0)
    if K >= 1:
        out[1] = (1.0 - s) if flip else s
    if K >= 2:
        dd = s / (1.0 + ex)  # s (1 - s)
        a = 1.0 - 2.0 * s
        out[2] = dd
        if K >= 3:
            out[3] = dd * a
        if K >= 4:
            out[4] = dd * (1.0 - 6.0 * dd)
        if K >= 5:
            out[5] = dd * a * (1.0 - 12.0 * dd)
        if K >= 6:
            out[6] = dd * (1.0 - 30.0 * dd + 120.0 * dd * dd)
    for k in range(7, K + 1):
        c = SIGP[k - 1]
        acc = 0.0
        for d in range(k, -1, -1):
            acc = acc * s + c[d]
        out[k] = acc
    if flip:
        for k in range(3, K + 1, 2):
            out[k] = -out[k]


@jit
def _taylor(c, kmax, d, k):
    """``sum_{j=k}^{kmax} c[j] d^(j-k) / (j-k)!``."""
    acc = c[kmax]
    for j in range(kmax - 1, k - 1, -1):
        acc = c[j] + acc * d / (j - k + 1)
    return acc


@jit
def v_eval(p, v, K, out, work, dz):
    """``out[k] = V_p^(k)(v)`` for ``k = 0..K`` (K <= 3): table, tail series or direct sum over the cells."""
    vmode = dz[6][:, 0]
    vlo = dz[5][:, 2]
    vhi = dz[5][:, 3]
    tab_start = dz[6][:, 1]
    tab = dz[7]
    ser_lo = dz[5][:, 8:13]
    ser_hi = dz[5][:, 13:18]
    lin_c = dz[5][:, 4]
    lin_co = dz[5][:, 5]
    cell_ptr = dz[6][:, 2]
    cell_o = dz[8]
    cell_c = dz[9]
    for k in range(K + 1):
        out[k] = 0.0
    if vmode[p] >= 1:
        for ii in range(cell_ptr[p], cell_ptr[p + 1]):
            softplus_derivs(v + cell_o[ii], K, work)
            c = cell_c[ii]
            for k in range(K + 1):
                out[k] += c * work[k]
        return
    if v <= vlo[p]:
        for m in range(1, NSER + 1):
            t = math.exp(m * v) * ser_lo[p, m - 1]
            sgn = 1.0 if m % 2 == 1 else -1.0
            out[0] += sgn * t / m
            mk = 1.0
            for k in range(1, K + 1):
                out[k] += sgn * mk * t
                mk *= m
        return
    if v >= vhi[p]:
        out[0] = lin_c[p] * v + lin_co[p]
        if K >= 1:
            out[1] = lin_c[p]
        for m in range(1, NSER + 1):
            t = math.exp(-m * v) * ser_hi[p, m - 1]
            sgn = 1.0 if m % 2 == 1 else -1.0
            out[0] += sgn * t / m
            mk = -1.0
            for k in range(1, K + 1):
                out[k] += sgn * mk * t
                mk *= -m
        return
    g = int((v - vlo[p]) / HV + 0.5)
    d = v - (vlo[p] + g * HV)
    row = tab[tab_start[p] + g]
    for k in range(K + 1):
        out[k] = _taylor(row, KV, d, k)


@jit
def u_eval(p, v, out, ucen, ucoef):
    """``out[k] = U_p^(k)(v)``, ``k = 0..3``, from the Taylor surrogate (quadratic continuation past TRUST)."""
    d = v - ucen[p]
    c = ucoef[p]
    if abs(d) <= TRUST:
        for k in range(4):
            out[k] = _taylor(c, KU, d, k)
        return
    db = TRUST if d > 0 else -TRUST
    u0 = _taylor(c, KU, db, 0)
    u1 = _taylor(c, KU, db, 1)
    u2 = _taylor(c, KU, db, 2)
    dd = d - db
    out[0] = u0 + u1 * dd + 0.5 * u2 * dd * dd
    out[1] = u1 + u2 * dd
    out[2] = u2
    out[3] = 0.0


# ----------------------------------------------------------------------------------------------------------------
# pattern-level family evaluation


@jit
def fam_eval(fam, e, tau, level, Yp, ucen, ucoef, S1, S2, dz, FE, work):
    """Fill ``FE[p] = (F, F', F'', F''', dF/dtau, dF'/dtau, dF''/dtau)`` (derivatives in ``e``) and return sum F.

    ``level`` 0: value only; 1: up to F''; 2: everything.
    """
    npat = dz[5][:, 0]
    Mp = dz[5][:, 1]
    vmode = dz[6][:, 0]
    o1 = dz[5][:, 6]  # the offset of a single-cell pattern
    c1 = dz[5][:, 4]  # its weight (binomial trials)
    P = e.shape[0]
    vout = work[0]
    uout = work[1]
    tmp = work[2]
    K = 0 if level == 0 else (2 if level == 1 else 3)
    total = 0.0
    if fam == NB:
        r = math.exp(-tau)
        for p in range(P):
            v = e[p] + tau
            if vmode[p] == 2:
                # one cell: U_p = y softplus(v + o), V_p = softplus(v + o), exact
                softplus_derivs(v + o1[p], K, vout)
                y = Yp[p]
                a = y + r
                F = y * e[p] - a * vout[0]
                FE[p, 0] = F
                total += F
                if level >= 1:
                    FE[p, 1] = y - a * vout[1]
                    FE[p, 2] = -a * vout[2]
                if level >= 2:
                    FE[p, 3] = -a * vout[3]
                    FE[p, 4] = -y * vout[1] + r * (vout[0] - vout[1])
                    FE[p, 5] = -y * vout[2] + r * (vout[1] - vout[2])
                    FE[p, 6] = -y * vout[3] + r * (vout[2] - vout[3])
                continue
            v_eval(p, v, K, vout, tmp, dz)
            if Yp[p] > 0:
                u_eval(p, v, uout, ucen, ucoef)
            else:
                for k in range(4):
                    uout[k] = 0.0
            F = Yp[p] * e[p] - uout[0] - r * vout[0]
            FE[p, 0] = F
            total += F
            if level >= 1:
                FE[p, 1] = Yp[p] - uout[1] - r * vout[1]
                FE[p, 2] = -uout[2] - r * vout[2]
            if level >= 2:
                FE[p, 3] = -uout[3] - r * vout[3]
                FE[p, 4] = -uout[1] + r * (vout[0] - vout[1])
                FE[p, 5] = -uout[2] + r * (vout[1] - vout[2])
                FE[p, 6] = -uout[3] + r * (vout[2] - vout[3])
    elif fam == POISSON:
        for p in range(P):
            m = Mp[p] * math.exp(e[p])
            F = Yp[p] * e[p] - m
            FE[p, 0] = F
            total += F
            FE[p, 1] = Yp[p] - m
            FE[p, 2] = -m
            FE[p, 3] = -m
            FE[p, 4] = 0.0
            FE[p, 5] = 0.0
            FE[p, 6] = 0.0
    elif fam == BINOMIAL:
        for p in range(P):
            if vmode[p] == 2:
                softplus_derivs(e[p] + o1[p], K, vout)
                for k in range(K + 1):
                    vout[k] *= c1[p]
            else:
                v_eval(p, e[p], K, vout, tmp, dz)
            F = Yp[p] * e[p] - vout[0]
            FE[p, 0] = F
            total += F
            if level >= 1:
                FE[p, 1] = Yp[p] - vout[1]
                FE[p, 2] = -vout[2]
            if level >= 2:
                FE[p, 3] = -vout[3]
                FE[p, 4] = 0.0
                FE[p, 5] = 0.0
                FE[p, 6] = 0.0
    else:
        r = math.exp(-tau)
        for p in range(P):
            n = npat[p]
            ep = e[p]
            Q = S2[p] - 2.0 * ep * S1[p] + n * ep * ep
            F = -0.5 * n * (LOG2PI + tau) - 0.5 * r * Q
            FE[p, 0] = F
            total += F
            FE[p, 1] = r * (S1[p] - n * ep)
            FE[p, 2] = -r * n
            FE[p, 3] = 0.0
            FE[p, 4] = -0.5 * n + 0.5 * r * Q
            FE[p, 5] = -r * (S1[p] - n * ep)
            FE[p, 6] = r * n
    return total


@jit
def nb_D(cj, tau):
    """``D(tau) = sum_j c_j log1p(j phi)`` and its derivative in ``tau``."""
    phi = math.exp(tau)
    D = 0.0
    D1 = 0.0
    for j in range(1, cj.shape[0]):
        c = cj[j]
        if c == 0.0:
            break
        x = j * phi
        D += c * math.log1p(x)
        D1 += c * x / (1.0 + x)
    return D, D1


# ----------------------------------------------------------------------------------------------------------------
# small dense linear algebra


@jit
def chol(A, L, d):
    """Lower Cholesky factor of the leading ``d x d`` block of ``A`` into ``L``; False if not positive definite."""
    for j in range(d):
        s = A[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not (s > 0.0) or not np.isfinite(s):
            return False
        ljj = math.sqrt(s)
        L[j, j] = ljj
        for i in range(j + 1, d):
            s = A[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / ljj
        for i in range(j):
            L[i, j] = 0.0
    return True


@jit
def chol_solve(L, b, x, d):
    for i in range(d):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * x[k]
        x[i] = s / L[i, i]
    for i in range(d - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, d):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]


@jit
def chol_logdet(L, d):
    s = 0.0
    for i in range(d):
        s += math.log(L[i, i])
    return 2.0 * s


@jit
def chol_inverse(L, Ainv, d, work):
    """``Ainv = (L L')^{-1}``; ``work`` is a ``d x d`` scratch array (holds ``L^{-1}``)."""
    for j in range(d):
        for i in range(d):
            work[i, j] = 0.0
        work[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, d):
            s = 0.0
            for k in range(j, i):
                s -= L[i, k] * work[k, j]
            work[i, j] = s / L[i, i]
    for i in range(d):
        for j in range(i + 1):
            s = 0.0
            for k in range(i, d):
                s += work[k, i] * work[k, j]
            Ainv[i, j] = s
            Ainv[j, i] = s


# ----------------------------------------------------------------------------------------------------------------
# model pieces


@jit
def lam_values(theta, dz, av):
    """Values of ``Lambda' z_p`` at the slots of ``Z`` (``av``, P x m)."""
    Zv = dz[2]
    tk = dz[3][:, 0]
    tslot = dz[3][:, 1]
    tth = dz[3][:, 2]
    tcorr = dz[3][:, 3]
    P = Zv.shape[0]
    for t in range(tk.shape[0]):
        k = tk[t]
        s0 = tslot[t]
        h0 = tth[t]
        for p in range(P):
            if k == 1:
                av[p, s0] = theta[h0] * Zv[p, s0]
            elif tcorr[t] == 1:
                for i in range(k):
                    acc = 0.0
                    for j in range(i, k):
                        acc += theta[h0 + j * (j + 1) // 2 + i] * Zv[p, s0 + j]
                    av[p, s0 + i] = acc
            else:
                for i in range(k):
                    av[p, s0 + i] = theta[h0 + i] * Zv[p, s0 + i]


@jit
def lin_pred(gamma, av, dz, npar, e):
    Xp = dz[0]
    Zc = dz[1]
    P = Xp.shape[0]
    m = Zc.shape[1]
    for p in range(P):
        s = 0.0
        for c in range(npar):
            s += Xp[p, c] * gamma[c]
        for j in range(m):
            s += av[p, j] * gamma[npar + Zc[p, j]]
        e[p] = s


@jit
def assemble(FE, av, gamma, dz, npar, q, g, H):
    """Gradient ``g`` and negative Hessian ``H`` of ``h`` in ``gamma = (beta, u)``."""
    Xp = dz[0]
    Zc = dz[1]
    P = Xp.shape[0]
    m = Zc.shape[1]
    d = npar + q
    for i in range(d):
        g[i] = 0.0
        for j in range(d):
            H[i, j] = 0.0
    for i in range(npar, d):
        g[i] = -gamma[i]
        H[i, i] = 1.0
    na = npar + m
    for p in range(P):
        F1 = FE[p, 1]
        W = -FE[p, 2]
        for a in range(na):
            if a < npar:
                ia = a
                va = Xp[p, a]
            else:
                ia = npar + Zc[p, a - npar]
                va = av[p, a - npar]
            if va == 0.0:
                continue
            g[ia] += F1 * va
            wa = W * va
            for b in range(na):
                if b < npar:
                    ib = b
                    vb = Xp[p, b]
                else:
                    ib = npar + Zc[p, b - npar]
                    vb = av[p, b - npar]
                H[ia, ib] += wa * vb


# The fits below pass these around:
#   cf = [fam, reml, has_tau, nth, npar, q, la]   model configuration (int64 array). la = 1: Laplace-ML beta, i.e.
#        beta is an outer parameter with the variance parameters and only u is integrated (glmmTMB's ML); la = 0:
#        beta is found with u at the joint mode (REML, and the first stage of ML).
#   gd = (Yp, ucen, ucoef, S1, S2, cj, nzp, nzo, nzy)   the gene's data and its U_p surrogate.
# psi = (theta, [tau], [beta if la]).
# dz (built by _glmm.prepare_glmm): 0 Xp (P, p) pattern rows of X; 1 Zc (P, m) u column of each Z slot; 2 Zv (P, m)
#   covariate of each slot; 3 TI (terms, 6) [k, first slot, first theta, correlated, first column, levels];
#   4 THI (n_theta, 3) [term, row j, column i of the Cholesky factor]; 5 PF (P, 18) [n_p, M_p, vlo, vhi, sum c,
#   sum c o, sum o, sum o^2, sum c w^k (k = 1..5), sum c w^-k (k = 1..5)]; 6 PI (P + 1, 3) [V mode (0 table,
#   1 direct, 2 one cell: U_p and V_p exact, no surrogate), first table row, first cell]; 7 V tables; 8, 9 offsets
#   and weights of the cells sorted by pattern; 10 pattern of each cell; 11 offset of each cell; 12 binomial trials
#   (empty: 0/1 detection).


@jit
def penalised(cf, gd, gamma, psi, level, dz, ws):
    """``h(gamma)`` at the variance parameters in ``psi`` (without the gene constant); fills ws[0] at ``level``."""
    fam, nth, npar, q = cf[0], cf[3], cf[4], cf[5]
    FE, av, e, work = ws[0], ws[1], ws[4][0], ws[2]
    tau = psi[nth] if cf[2] else 0.0
    lam_values(psi[:nth], dz, av)
    lin_pred(gamma, av, dz, npar, e)
    h = fam_eval(fam, e, tau, level, gd[0], gd[1], gd[2], gd[3], gd[4], dz, FE, work)
    for i in range(npar, npar + q):
        h -= 0.5 * gamma[i] * gamma[i]
    if fam == NB:
        D, _ = nb_D(gd[5], tau)
        h += D
    return h


@jit
def max_eta_change(step, av, dz, npar):
    """Largest ``|change of e_p|`` over the patterns for a step in ``gamma`` (``av`` at the current ``psi``)."""
    Xp = dz[0]
    Zc = dz[1]
    P = Xp.shape[0]
    m = Zc.shape[1]
    out = 0.0
    for p in range(P):
        s = 0.0
        for c in range(npar):
            s += Xp[p, c] * step[c]
        for j in range(m):
            s += av[p, j] * step[npar + Zc[p, j]]
        if abs(s) > out:
            out = abs(s)
    return out


@jit
def inner_solve(cf, gd, gamma, psi, dz, ws, max_iter):
    """Newton iterations for the conditional modes (of ``(beta, u)``, or of ``u`` alone when ``la``).

    Returns (converged, iterations). ``h`` is concave, so a backtracking Newton method converges from anywhere.
    """
    npar, q, la = cf[4], cf[5], cf[6]
    g, H, L, step, gtry = ws[3][0], ws[5][0], ws[5][1], ws[3][1], ws[3][2]
    d = npar + q
    if la:
        b0 = cf[3] + cf[2]
        for i in range(npar):
            gamma[i] = psi[b0 + i]
    fresh = False  # ws[0] already holds F and its derivatives at gamma (the accepted full step), h its value
    h = 0.0
    for it in range(max_iter):
        if not fresh:
            h = penalised(cf, gd, gamma, psi, LEVEL[1], dz, ws)
        fresh = False
        if not np.isfinite(h):
            return False, it
        assemble(ws[0], ws[1], gamma, dz, npar, q, g, H)
        if la:
            for i in range(npar):
                g[i] = 0.0
                for j in range(d):
                    H[i, j] = 0.0
                    H[j, i] = 0.0
                H[i, i] = 1.0
        if not chol(H, L, d):
            return False, it
        chol_solve(L, g, step, d)
        dec = 0.0
        for i in range(d):
            dec += g[i] * step[i]
        if dec < 1e-12 * (1.0 + abs(h)):
            # the gain is below the rounding noise of h: the quadratic model is exact here, take the full step
            for i in range(d):
                gamma[i] += step[i]
            return True, it + 1
        # damping: a step that moves some linear predictor by more than MAX_ETA_STEP is shortened. Far from the
        # mode a logit fit can be saturated (all p near 0 or 1); the Newton step there is huge, and its halves land
        # on the other flat side, where the Hessian vanishes. The mode itself is unchanged.
        smax = max_eta_change(step, ws[1], dz, npar)
        if smax > MAX_ETA_STEP:
            sc = MAX_ETA_STEP / smax
            for i in range(d):
                step[i] *= sc
            dec *= sc
        alpha = 1.0
        ok = False
        for ls in range(40):
            for i in range(d):
                gtry[i] = gamma[i] + alpha * step[i]
            # the full step is usually accepted: evaluate it with the derivatives the next iteration needs
            ht = penalised(cf, gd, gtry, psi, LEVEL[1] if ls == 0 else LEVEL[0], dz, ws)
            if np.isfinite(ht) and ht >= h + 1e-4 * alpha * dec:
                ok = True
                fresh = ls == 0
                break
            alpha *= 0.5
        if not ok:
            return dec < 1e-9 * (1.0 + abs(h)), it + 1
        for i in range(d):
            gamma[i] = gtry[i]
        if fresh:
            h = ht
    return False, max_iter


@jit
def objective_grad(cf, gd, want_grad, gamma, psi, dz, ws, grad, out):
    """Laplace (ML) or restricted-Laplace (REML) criterion at the modes ``gamma`` and its gradient in ``psi``.

    ``out`` receives ``[h, logdet(H), logdet(H_uu), ok]``; when ``want_grad`` the inverses ``H^{-1}`` (ws[5][2]) and
    ``H_uu^{-1}`` (ws[6][1]) are left in the workspace. Derivatives of the modes come from the implicit function
    theorem (``d gamma = H^{-1} d grad h``); the log-determinant needs the third derivatives of ``F_p``.
    """
    fam, reml, has_tau, nth, npar, q, la = cf[0], cf[1], cf[2], cf[3], cf[4], cf[5], cf[6]
    FE, av, g = ws[0], ws[1], ws[3][0]
    H, L, Hinv, tmpd = ws[5][0], ws[5][1], ws[5][2], ws[5][3]
    Luu, Huinv = ws[6][0], ws[6][1]
    rvec, gdot, rho, ee = ws[3][3], ws[3][4], ws[4][1], ws[4][3]
    Xp = dz[0]
    Zc = dz[1]
    Zv = dz[2]
    tslot = dz[3][:, 1]
    th_term = dz[4][:, 0]
    th_j = dz[4][:, 1]
    th_i = dz[4][:, 2]
    P = Xp.shape[0]
    m = Zc.shape[1]
    d = npar + q
    tau = psi[nth] if has_tau else 0.0
    h = penalised(cf, gd, gamma, psi, LEVEL[2], dz, ws)
    assemble(FE, av, gamma, dz, npar, q, g, H)
    out[3] = 0.0
    if not np.isfinite(h) or not chol(H, L, d):
        return -np.inf
    ldH = chol_logdet(L, d)
    for i in range(q):
        for j in range(q):
            tmpd[i, j] = H[npar + i, npar + j]
    ldU = 0.0
    if q > 0:
        if not chol(tmpd, Luu, q):
            return -np.inf
        ldU = chol_logdet(Luu, q)
    out[0] = h
    out[1] = ldH
    out[2] = ldU
    out[3] = 1.0
    if reml:
        obj = h - 0.5 * ldH + 0.5 * npar * LOG2PI
    else:
        obj = h - 0.5 * ldU
    if not want_grad:
        return obj
    chol_inverse(L, Hinv, d, tmpd)
    if q > 0:
        chol_inverse(Luu, Huinv, q, tmpd)
    # rho_p = a_S' H_S^{-1} a_S with S = everything (REML) or the u block (ML)
    na = npar + m
    for p in range(P):
        s = 0.0
        for a in range(na):
            if a < npar:
                if not reml:
                    continue
                ia = a
                va = Xp[p, a]
            else:
                ia = npar + Zc[p, a - npar]
                va = av[p, a - npar]
            for b in range(na):
                if b < npar:
                    if not reml:
                        continue
                    ib = b
                    vb = Xp[p, b]
                else:
                    ib = npar + Zc[p, b - npar]
                    vb = av[p, b - npar]
                if reml:
                    s += va * vb * Hinv[ia, ib]
                else:
                    s += va * vb * Huinv[ia - npar, ib - npar]
        rho[p] = s
    nps = nth + has_tau
    ntot = nps + (npar if la else 0)
    D1 = 0.0
    if fam == NB:
        _, D1 = nb_D(gd[5], tau)
    for k in range(ntot):
        for i in range(d):
            rvec[i] = 0.0
        dh = 0.0
        kind = 0 if k < nth else (1 if k < nps else 2)
        jb = k - nps
        slot = 0
        jslot = 0
        if kind == 0:
            t = th_term[k]
            slot = tslot[t] + th_i[k]
            jslot = tslot[t] + th_j[k]
        for p in range(P):
            if kind == 0:
                cd = Zv[p, jslot]
                col = npar + Zc[p, slot]
                ee[p] = cd * gamma[col]
                f = FE[p, 2] * ee[p]
                dh += FE[p, 1] * ee[p]
                rvec[col] += FE[p, 1] * cd
            elif kind == 1:
                ee[p] = 0.0
                f = FE[p, 5]
                dh += FE[p, 4]
            else:
                ee[p] = Xp[p, jb]
                f = FE[p, 2] * ee[p]
                dh += FE[p, 1] * ee[p]
            for a in range(na):
                if a < npar:
                    rvec[a] += f * Xp[p, a]
                else:
                    rvec[npar + Zc[p, a - npar]] += f * av[p, a - npar]
        if kind == 1:
            dh += D1
        if la:
            for i in range(npar):
                gdot[i] = 0.0
            for i in range(q):
                s = 0.0
                for j in range(q):
                    s += Huinv[i, j] * rvec[npar + j]
                gdot[npar + i] = s
        else:
            for i in range(d):
                s = 0.0
                for j in range(d):
                    s += Hinv[i, j] * rvec[j]
                gdot[i] = s
        tr = 0.0
        for p in range(P):
            s = ee[p]
            for a in range(na):
                if a < npar:
                    s += Xp[p, a] * gdot[a]
                else:
                    s += av[p, a - npar] * gdot[npar + Zc[p, a - npar]]
            wd = -FE[p, 3] * s
            if kind == 1:
                wd -= FE[p, 6]
            tr += wd * rho[p]
        if kind == 0:
            for p in range(P):
                cd = Zv[p, jslot]
                if cd == 0.0:
                    continue
                col = Zc[p, slot]
                # (H_S^{-1} a_{p,S}) at the u column `col`
                s = 0.0
                for a in range(na):
                    if a < npar:
                        if reml:
                            s += Hinv[npar + col, a] * Xp[p, a]
                    else:
                        c2 = Zc[p, a - npar]
                        if reml:
                            s += Hinv[npar + col, npar + c2] * av[p, a - npar]
                        else:
                            s += Huinv[col, c2] * av[p, a - npar]
                tr += 2.0 * (-FE[p, 2]) * cd * s
        grad[k] = dh - 0.5 * tr
    return obj


@jit
def recentre(cf, gd, gamma, psi, dz, ws):
    """Move the Taylor centres of ``U_p`` to the current ``v_p = e_p + tau``; return the largest move."""
    nth, npar = cf[3], cf[4]
    Yp, ucen, ucoef, nzp, nzo, nzy = gd[0], gd[1], gd[2], gd[6], gd[7], gd[8]
    av, e, work = ws[1], ws[4][0], ws[2]
    vmode = dz[6][:, 0]
    tau = psi[nth] if cf[2] else 0.0
    lam_values(psi[:nth], dz, av)
    lin_pred(gamma, av, dz, npar, e)
    P = e.shape[0]
    shift = 0.0
    for p in range(P):
        if vmode[p] == 2:
            continue  # evaluated exactly
        c = e[p] + tau
        if Yp[p] > 0:
            dd = abs(c - ucen[p])
            if dd > shift:
                shift = dd
        ucen[p] = c
        for k in range(KU + 1):
            ucoef[p, k] = 0.0
    w = work[2]
    for i in range(nzp.shape[0]):
        p = nzp[i]
        if vmode[p] == 2:
            continue
        softplus_derivs(ucen[p] + nzo[i], KU, w)
        y = nzy[i]
        for k in range(KU + 1):
            ucoef[p, k] += y * w[k]
    return shift


@jit
def _modified_newton_step(Hs, grad, free, n, step):
    """Ascent step ``(-Hs)^{-1} grad`` on the free coordinates, with eigenvalues made positive."""
    nf = 0
    for i in range(n):
        if free[i]:
            nf += 1
    for i in range(n):
        step[i] = 0.0
    if nf == 0:
        return 0.0
    A = np.zeros((nf, nf))
    gf = np.zeros(nf)
    ii = 0
    for i in range(n):
        if not free[i]:
            continue
        jj = 0
        for j in range(n):
            if not free[j]:
                continue
            A[ii, jj] = -0.5 * (Hs[i, j] + Hs[j, i])
            jj += 1
        gf[ii] = grad[i]
        ii += 1
    for i in range(nf):
        for j in range(nf):
            if not np.isfinite(A[i, j]):
                return -1.0
    lam, V = np.linalg.eigh(A)
    lmax = 0.0
    for i in range(nf):
        if abs(lam[i]) > lmax:
            lmax = abs(lam[i])
    floor = max(1e-8 * lmax, 1e-10)
    sf = np.zeros(nf)
    for i in range(nf):
        li = abs(lam[i])
        if li < floor:
            li = floor
        c = 0.0
        for j in range(nf):
            c += V[j, i] * gf[j]
        c /= li
        for j in range(nf):
            sf[j] += c * V[j, i]
    dec = 0.0
    ii = 0
    for i in range(n):
        if free[i]:
            step[i] = sf[ii]
            dec += sf[ii] * gf[ii]
            ii += 1
    return dec


@jit
def snap_zero(cf, gd, gamma, psi, obj, dz, ws, gk, info, snap_sd, frozen):
    """Set near-zero SDs of intercept / uncorrelated terms to exactly zero when that does not lower the criterion.

    Marks them in ``frozen``; returns how many were set.
    """
    nth = cf[3]
    tk = dz[3][:, 0]
    tcorr = dz[3][:, 3]
    th_term = dz[4][:, 0]
    n = psi.shape[0]
    d = gamma.shape[0]
    psit = np.zeros(n)
    gamt = np.zeros(d)
    nsnap = 0
    for k in range(nth):
        t = th_term[k]
        if frozen[k] or (tk[t] > 1 and tcorr[t] == 1) or abs(psi[k]) >= snap_sd or psi[k] == 0.0:
            continue
        for i in range(n):
            psit[i] = psi[i]
        psit[k] = 0.0
        for i in range(d):
            gamt[i] = gamma[i]
        ok, _ = inner_solve(cf, gd, gamt, psit, dz, ws, 60)
        if not ok:
            continue
        ob = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, gk, info)
        if np.isfinite(ob) and ob >= obj - DEC_TOL:
            psi[k] = 0.0
            for i in range(d):
                gamma[i] = gamt[i]
            obj = ob
            frozen[k] = True
            nsnap += 1
    return nsnap


@jit
def settle(cf, gd, gamma, psi, dz, ws, inner_max):
    """Conditional modes at ``psi`` with the ``U_p`` surrogate centred at them (exact there). Returns success."""
    ok, _ = inner_solve(cf, gd, gamma, psi, dz, ws, inner_max)
    if cf[0] != NB or not ok:
        return ok
    nth, npar = cf[3], cf[4]
    Yp, ucen = gd[0], gd[1]
    tau = psi[nth] if cf[2] else 0.0
    e = ws[4][0]
    vmode = dz[6][:, 0]
    surrogate = False
    for p in range(e.shape[0]):
        if Yp[p] > 0 and vmode[p] != 2:
            surrogate = True
            break
    if not surrogate:
        return True  # every pattern with counts is a single cell, evaluated exactly: nothing to re-centre
    for _ in range(6):
        recentre(cf, gd, gamma, psi, dz, ws)
        ok, _ = inner_solve(cf, gd, gamma, psi, dz, ws, inner_max)
        if not ok:
            return False
        lam_values(psi[:nth], dz, ws[1])
        lin_pred(gamma, ws[1], dz, npar, e)
        gap = 0.0
        for p in range(e.shape[0]):
            if Yp[p] > 0 and vmode[p] != 2:
                gp = abs(e[p] + tau - ucen[p])
                if gp > gap:
                    gap = gp
        if gap < SHIFT_TOL:
            return True
    return True


@jit
def fit_gene(cf, gd, dz, psi, gamma, tau_lo, tau_hi, max_outer, ws, grad, info, snap_sd, Hs, dC, frozen):
    """Optimise the criterion over ``psi`` (in place, with ``gamma``). Returns (status, outer iterations).

    Each iteration: forward-difference Hessian ``Hs`` of the analytic gradient (surrogate fixed), a modified Newton
    step with backtracking on the surrogate, then re-centring of the surrogate at the new modes, where the criterion
    and its gradient are exact. Converged when the predicted gain of the next Newton step is below ``DEC_TOL``; ``Hs``
    then holds the Hessian at the estimate, ``dC[k]`` the derivative of ``[H^{-1}]_beta`` (the conditional covariance
    of beta) in ``psi[k]`` (for Satterthwaite's df) and ``frozen`` the SDs fixed at zero.
    """
    fam, has_tau, nth, npar, q = cf[0], cf[2], cf[3], cf[4], cf[5]
    n = psi.shape[0]
    d = npar + q
    gk = np.zeros(n)
    step = np.zeros(n)
    psik = np.zeros(n)
    psit = np.zeros(n)
    gam0 = np.zeros(d)
    gamt = np.zeros(d)
    free = np.ones(n, dtype=np.bool_)
    for i in range(n):
        frozen[i] = False
    C0 = np.zeros((npar, npar))
    inner_max = 60
    is_nb = fam == NB
    if is_nb:
        recentre(cf, gd, gamma, psi, dz, ws)
    if not settle(cf, gd, gamma, psi, dz, ws, inner_max):
        return ST_NOCONV, 0
    obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad, info)
    if not np.isfinite(obj):
        return ST_NOTPD, 0
    for it in range(max_outer):
        if n == 0:
            return ST_OK, it
        # forward-difference Hessian of the analytic gradient (and of the conditional covariance of beta)
        Hinv = ws[5][2]
        for a in range(npar):
            for b in range(npar):
                C0[a, b] = Hinv[a, b]
        for k in range(n):
            hk = 1e-4 * max(1.0, abs(psi[k]))
            for i in range(n):
                psik[i] = psi[i]
            psik[k] += hk
            for i in range(d):
                gam0[i] = gamma[i]
            okk, _ = inner_solve(cf, gd, gam0, psik, dz, ws, inner_max)
            ob = objective_grad(cf, gd, LEVEL[1] == 1, gam0, psik, dz, ws, gk, info)
            if not okk or not np.isfinite(ob):
                return ST_NOCONV, it
            for i in range(n):
                Hs[i, k] = (gk[i] - grad[i]) / hk
            for a in range(npar):
                for b in range(npar):
                    dC[k, a, b] = (Hinv[a, b] - C0[a, b]) / hk
        for i in range(n):
            for j in range(i):
                s = 0.5 * (Hs[i, j] + Hs[j, i])
                Hs[i, j] = s
                Hs[j, i] = s
        for i in range(n):
            free[i] = not frozen[i]
        if has_tau:
            if psi[nth] <= tau_lo + 1e-12 and grad[nth] < 0:
                free[nth] = False
            if psi[nth] >= tau_hi - 1e-12 and grad[nth] > 0:
                free[nth] = False
        dec = _modified_newton_step(Hs, grad, free, n, step)
        if dec < 0:
            return ST_NONFINITE, it
        if dec < DEC_TOL:
            # converged; the Newton step is tiny and its quadratic model exact: take it (error ~ dec^2)
            for i in range(n):
                psit[i] = psi[i] + step[i]
            if has_tau:
                psit[nth] = min(max(psit[nth], tau_lo), tau_hi)
            for i in range(d):
                gamt[i] = gamma[i]
            if settle(cf, gd, gamt, psit, dz, ws, inner_max):
                obt = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, gk, info)
                if np.isfinite(obt) and obt >= obj - 1e-12 * (1.0 + abs(obj)):
                    for i in range(n):
                        psi[i] = psit[i]
                    for i in range(d):
                        gamma[i] = gamt[i]
                    obj = obt
            if snap_zero(cf, gd, gamma, psi, obj, dz, ws, gk, info, snap_sd, frozen) == 0 or it == max_outer - 1:
                if is_nb:
                    settle(cf, gd, gamma, psi, dz, ws, inner_max)
                return ST_OK, it
            # an SD was set to zero: re-optimise the rest with it fixed
            if not settle(cf, gd, gamma, psi, dz, ws, inner_max):
                return ST_NOCONV, it
            obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad, info)
            continue
        smax = 0.0
        for i in range(n):
            lim = 3.0 if (has_tau and i == nth) else 1.0
            if abs(step[i]) / lim > smax:
                smax = abs(step[i]) / lim
        if smax > 1.0:
            for i in range(n):
                step[i] /= smax
        if is_nb and has_tau and step[nth] < -0.5 and psi[nth] < -4.6:
            # towards the Poisson limit the criterion is ~ -c phi: Newton steps of -1 in log(phi); go faster
            step[nth] *= 4.0
        slope = 0.0
        for i in range(n):
            slope += step[i] * grad[i]
        alpha = 1.0
        accepted = False
        for _ in range(12):
            for i in range(n):
                psit[i] = psi[i] + alpha * step[i]
            for i in range(nth):
                psit[i] = min(max(psit[i], -20.0), 20.0)
            if has_tau:
                psit[nth] = min(max(psit[nth], tau_lo), tau_hi)
            for i in range(d):
                gamt[i] = gamma[i]
            okt, _ = inner_solve(cf, gd, gamt, psit, dz, ws, inner_max)
            if okt:
                obt = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, gk, info)
                if np.isfinite(obt) and obt >= obj + 1e-4 * alpha * slope:
                    accepted = True
                    break
            alpha *= 0.5
        if not accepted:
            # no improvement along the step: converged if the predicted gain is negligible
            if dec < 100 * DEC_TOL:
                if snap_zero(cf, gd, gamma, psi, obj, dz, ws, gk, info, snap_sd, frozen) == 0 or it == max_outer - 1:
                    return ST_OK, it + 1
                if not settle(cf, gd, gamma, psi, dz, ws, inner_max):
                    return ST_NOCONV, it + 1
                obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad, info)
                continue
            return ST_NOCONV, it + 1
        for i in range(n):
            psi[i] = psit[i]
        for i in range(d):
            gamma[i] = gamt[i]
        if not settle(cf, gd, gamma, psi, dz, ws, inner_max):
            return ST_NOCONV, it + 1
        obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad, info)
        if not np.isfinite(obj):
            return ST_NOTPD, it + 1
    return ST_NOCONV, max_outer


@jit
def ml_cov_beta(Hs, nps, npar, out):
    """``[(-Hs)^{-1}]_beta`` for psi = (variance parameters, beta), via the Schur complement with a pseudo-inverse
    of the variance-parameter block (flat directions at a boundary carry no information). False if not PD."""
    n = nps + npar
    A = np.zeros((nps, nps))
    B = np.zeros((nps, npar))
    C = np.zeros((npar, npar))
    for i in range(n):
        for j in range(n):
            v = -Hs[i, j]
            if i < nps and j < nps:
                A[i, j] = v
            elif i < nps:
                B[i, j - nps] = v
            elif j >= nps:
                C[i - nps, j - nps] = v
    S = C.copy()
    if nps > 0:
        lam, V = np.linalg.eigh(A)
        lmax = 0.0
        for i in range(nps):
            lmax = max(lmax, abs(lam[i]))
        for k in range(nps):
            if lam[k] <= 1e-8 * lmax:
                continue
            for a in range(npar):
                ca = 0.0
                for i in range(nps):
                    ca += V[i, k] * B[i, a]
                for b in range(npar):
                    cb = 0.0
                    for i in range(nps):
                        cb += V[i, k] * B[i, b]
                    S[a, b] -= ca * cb / lam[k]
    Ls = np.zeros((npar, npar))
    if not chol(S, Ls, npar):
        return False
    tmp = np.zeros((npar, npar))
    chol_inverse(Ls, out, npar, tmp)
    return True


@jit
def make_workspace(P, m, npar, q):
    """Scratch arrays of one fit: (FE, av, work, d-vectors, P-vectors, d x d matrices, q x q matrices)."""
    d = npar + q
    qq = max(q, 1)
    return (
        np.zeros((P, 7)),  # 0 FE: F and derivatives per pattern
        np.zeros((P, max(m, 1))),  # 1 av: Lambda' z_p at the slots
        np.zeros((3, KV + 2)),  # 2 work
        np.zeros((5, d)),  # 3 g, step, gtry, rvec, gdot
        np.zeros((5, P)),  # 4 e, rho, (spare), ee, (spare)
        np.zeros((4, d, d)),  # 5 H, L, Hinv, scratch
        np.zeros((2, qq, qq)),  # 6 Luu, Huinv
    )


# ----------------------------------------------------------------------------------------------------------------
# design-level tables


@jit
def build_tables(cell_ptr, cell_o, cell_c, vmode, vlo, tab_start, tab_n, tab):
    """Taylor coefficients (derivatives 0..KV) of ``V_p`` at the grid nodes of every tabulated pattern."""
    w = np.zeros(KV + 2)
    for p in range(vmode.shape[0]):
        if vmode[p] != 0:
            continue
        for gidx in range(tab_n[p]):
            node = vlo[p] + gidx * HV
            row = tab_start[p] + gidx
            for k in range(KV + 1):
                tab[row, k] = 0.0
            for ii in range(cell_ptr[p], cell_ptr[p + 1]):
                softplus_derivs(node + cell_o[ii], KV, w)
                c = cell_c[ii]
                for k in range(KV + 1):
                    tab[row, k] += c * w[k]


# ----------------------------------------------------------------------------------------------------------------
# one chunk of genes


@jit
def _init_values(fam, has_tau, nth, npar, q, dz, Yp, S1, S2, nzp, nzo, nzy, psi, gamma):
    """Starting values: saturated pattern means, weighted least squares for beta, moment estimates for the rest.

    Returns the scale used for the variance parameters (1 for count families, the residual SD for Gaussian).
    """
    Xp = dz[0]
    Zc = dz[1]
    tk = dz[3][:, 0]
    tslot = dz[3][:, 1]
    tth = dz[3][:, 2]
    tcorr = dz[3][:, 3]
    npat = dz[5][:, 0]
    Mp = dz[5][:, 1]
    ser_lo = dz[5][:, 8:13]
    lin_c = dz[5][:, 4]
    tcol0 = dz[3][:, 4]
    tnlev = dz[3][:, 5]
    P = Xp.shape[0]
    e0 = np.zeros(P)
    om = np.zeros(P)
    if fam == NB or fam == POISSON:
        sy = 0.0
        sm = 0.0
        for p in range(P):
            sy += Yp[p]
            sm += Mp[p]
        rate0 = sy / sm
        for p in range(P):
            e0[p] = math.log((Yp[p] + 1.0) / (Mp[p] + 1.0 / rate0))
            om[p] = Yp[p] + 1.0
    elif fam == BINOMIAL:
        lin_co = dz[5][:, 5]
        for p in range(P):
            mp = lin_c[p]
            # logit of the pattern's success rate minus its mean offset: with offsets such as log library size
            # (~7) the rate alone would start every cell at p ~ 1
            e0[p] = math.log((Yp[p] + 0.5) / (mp - Yp[p] + 0.5)) - (lin_co[p] / mp if mp > 0 else 0.0)
            om[p] = (Yp[p] + 0.5) * (mp - Yp[p] + 0.5) / (mp + 1.0)
    else:
        for p in range(P):
            e0[p] = S1[p] / npat[p]
            om[p] = npat[p]
    A = np.zeros((npar, npar))
    rhs = np.zeros(npar)
    for p in range(P):
        for a in range(npar):
            rhs[a] += om[p] * Xp[p, a] * e0[p]
            for b in range(npar):
                A[a, b] += om[p] * Xp[p, a] * Xp[p, b]
    tr = 0.0
    for a in range(npar):
        tr += A[a, a]
    for a in range(npar):
        A[a, a] += 1e-10 * tr + 1e-12
    La = np.zeros((npar, npar))
    for i in range(gamma.shape[0]):
        gamma[i] = 0.0
    if npar > 0 and chol(A, La, npar):
        chol_solve(La, rhs, gamma, npar)
    res = np.zeros(P)
    for p in range(P):
        s = e0[p]
        for a in range(npar):
            s -= Xp[p, a] * gamma[a]
        res[p] = s
    scale = 1.0
    if fam == GAUSSIAN:
        ss = 0.0
        nn = 0.0
        for p in range(P):
            ep = e0[p] - res[p]
            ss += S2[p] - 2.0 * ep * S1[p] + npat[p] * ep * ep
            nn += npat[p]
        s2 = ss / nn
        if not (s2 > 0.0):
            s2 = 1e-12
        scale = math.sqrt(s2)
        if has_tau:
            psi[nth] = math.log(0.5 * s2)
    elif fam == NB and has_tau:
        num = 0.0
        den = 0.0
        for i in range(nzp.shape[0]):
            p = nzp[i]
            mu = math.exp(nzo[i] + e0[p])
            num += nzy[i] * nzy[i] - 2.0 * nzy[i] * mu
        for p in range(P):
            ee = math.exp(e0[p])
            num += ee * ee * ser_lo[p, 1] - ee * Mp[p]
            den += ee * ee * ser_lo[p, 1]
        phi0 = num / den if den > 0 else 0.1
        if not (phi0 > 0.01):
            phi0 = 0.01
        if phi0 > 10.0:
            phi0 = 10.0
        psi[nth] = math.log(phi0)
    # random-effect SDs from level means of the residuals
    for t in range(tk.shape[0]):
        k = tk[t]
        nl = tnlev[t]
        sw = np.zeros(nl)
        sr = np.zeros(nl)
        for p in range(P):
            lev = (Zc[p, tslot[t]] - tcol0[t]) // k
            sw[lev] += om[p]
            sr[lev] += om[p] * res[p]
        acc = 0.0
        cnt = 0.0
        for lv in range(nl):
            if sw[lv] > 0:
                mval = sr[lv] / sw[lv]
                acc += mval * mval
                cnt += 1.0
        sd = math.sqrt(acc / max(cnt, 1.0))
        if sd < 0.05 * scale:
            sd = 0.05 * scale
        if sd > 1.5 * scale:
            sd = 1.5 * scale
        h0 = tth[t]
        if k == 1:
            psi[h0] = sd
        elif tcorr[t] == 1:
            for j in range(k):
                for i in range(j + 1):
                    psi[h0 + j * (j + 1) // 2 + i] = (sd if j == 0 else 0.1 * scale) if i == j else 0.0
        else:
            for j in range(k):
                psi[h0 + j] = sd if j == 0 else 0.1 * scale
    return scale


@jit
def _config(fam, reml, has_tau, nth, npar, q, la):
    cf = np.zeros(7, dtype=np.int64)
    cf[0] = fam
    cf[1] = 1 if reml else 0
    cf[2] = 1 if has_tau else 0
    cf[3] = nth
    cf[4] = npar
    cf[5] = q
    cf[6] = 1 if la else 0
    return cf


@jit
def fit_chunk(
    fam,
    reml,
    has_tau,
    nth,
    npar,
    q,
    dz,
    indptr,
    indices,
    data,
    min_nz,
    max_outer,
    tau_bounds,
    out_beta,
    out_cov,
    out_theta,
    out_phi,
    out_ll,
    out_rll,
    out_b,
    out_bse,
    out_status,
    out_iter,
    out_hpsi,
    out_dcov,
    out_frozen,
):
    """Fit every gene of a chunk; ``indptr/indices/data`` hold the genes as columns (CSC of cells x genes)."""
    Xp = dz[0]
    Zc = dz[1]
    tk = dz[3][:, 0]
    tth = dz[3][:, 2]
    tcorr = dz[3][:, 3]
    tcol0 = dz[3][:, 4]
    tnlev = dz[3][:, 5]
    P = Xp.shape[0]
    m = Zc.shape[1]
    pat = dz[10]
    off = dz[11]
    sum_o = dz[5][:, 6]
    sum_o2 = dz[5][:, 7]
    trials = dz[12]
    detection = trials.shape[0] == 0
    ws = make_workspace(P, m, npar, q)
    d = npar + q
    n_psi = nth + (1 if has_tau else 0)
    G = indptr.shape[0] - 1
    Yp = np.zeros(P)
    S1 = np.zeros(P)
    S2 = np.zeros(P)
    ucen = np.zeros(P)
    ucoef = np.zeros((P, KU + 1))
    psi = np.zeros(n_psi)
    gamma = np.zeros(d)
    grad = np.zeros(n_psi)
    info = np.zeros(4)
    gaml = np.zeros(d)
    psil = np.zeros(n_psi + npar)
    covl = np.zeros((npar, npar))
    for gi in range(G):
        lo = indptr[gi]
        hi = indptr[gi + 1]
        out_iter[gi] = 0
        nnz = 0
        status = ST_OK
        maxy = 0.0
        for j in range(lo, hi):
            y = data[j]
            if y != 0.0:
                nnz += 1
                if not np.isfinite(y):
                    status = ST_NONFINITE
                if fam != GAUSSIAN:
                    if y < 0.0 or y != math.floor(y):
                        status = ST_NONINT
                    if fam == BINOMIAL and not detection and y > trials[indices[j]]:
                        status = ST_BADY
                if y > maxy:
                    maxy = y
        if status == ST_OK and nnz == 0:
            status = ST_ZERO
        if status == ST_OK and nnz < min_nz:
            status = ST_FEW
        if status != ST_OK:
            out_status[gi] = status
            continue
        nzp = np.empty(nnz, dtype=np.int64)
        nzo = np.empty(nnz)
        nzy = np.empty(nnz)
        kk = 0
        for j in range(lo, hi):
            y = data[j]
            if y != 0.0:
                c = indices[j]
                nzp[kk] = pat[c]
                nzo[kk] = off[c]
                nzy[kk] = 1.0 if (fam == BINOMIAL and detection) else y
                kk += 1
        for p in range(P):
            Yp[p] = 0.0
            S1[p] = -sum_o[p]
            S2[p] = sum_o2[p]
        const = 0.0
        for i in range(nnz):
            p = nzp[i]
            y = nzy[i]
            Yp[p] += y
            if fam == GAUSSIAN:
                S1[p] += y
                S2[p] += y * y - 2.0 * y * nzo[i]
            else:
                const += y * nzo[i] - math.lgamma(y + 1.0)
        if fam == BINOMIAL:
            const = 0.0
            kk = 0
            for j in range(lo, hi):
                if data[j] != 0.0:
                    mt = 1.0 if detection else trials[indices[j]]
                    y = nzy[kk]
                    const += y * nzo[kk] + math.lgamma(mt + 1.0) - math.lgamma(y + 1.0) - math.lgamma(mt - y + 1.0)
                    kk += 1
        cj = np.zeros(1)
        if fam == NB:
            my = int(maxy)
            hist = np.zeros(my + 1)
            for i in range(nnz):
                hist[int(nzy[i])] += 1.0
            cj = np.zeros(my)
            acc = 0.0
            for j in range(my, 0, -1):
                acc += hist[j]
                cj[j - 1] = acc
        for i in range(n_psi):
            psi[i] = 0.0
        scale = _init_values(fam, has_tau, nth, npar, q, dz, Yp, S1, S2, nzp, nzo, nzy, psi, gamma)
        if fam == NB:
            tau_lo = tau_bounds[0]
            tau_hi = tau_bounds[1]
        else:
            tau_lo = (psi[nth] - 40.0) if has_tau else 0.0
            tau_hi = (psi[nth] + 40.0) if has_tau else 0.0
        if has_tau:
            psi[nth] = min(max(psi[nth], tau_lo), tau_hi)
        # initial Taylor centres at the saturated fit (recentre() moves them to the modes)
        for p in range(P):
            ucen[p] = 0.0
        cf = _config(fam, reml, has_tau, nth, npar, q, False)
        gd = (Yp, ucen, ucoef, S1, S2, cj, nzp, nzo, nzy)
        # stage 0: joint modes of (beta, u); stage 1 (ML only): Laplace-ML beta, i.e. beta joins the outer
        # parameters and only u is integrated, as glmmTMB; its Hessian gives cov(beta) as glmmTMB's sdreport
        ml_cov = False
        status = ST_OK
        it = 0
        n_stage = 1 if reml else 2
        for stage in range(n_stage):
            if stage == 0:
                cfs = cf
                npsi_s = n_psi
                for i in range(n_psi):
                    psil[i] = psi[i]
            else:
                cfs = _config(fam, False, has_tau, nth, npar, q, True)
                npsi_s = n_psi + npar
                for i in range(npar):
                    psil[n_psi + i] = gamma[i]
            for i in range(d):
                gaml[i] = gamma[i]
            psis = psil[:npsi_s].copy()
            Hss = np.zeros((npsi_s, npsi_s))
            dCs = np.zeros((npsi_s, npar, npar))
            frz = np.zeros(npsi_s, dtype=np.bool_)
            st, its = fit_gene(
                cfs,
                gd,
                dz,
                psis,
                gaml,
                tau_lo,
                tau_hi,
                max_outer,
                ws,
                np.zeros(npsi_s),
                info,
                SNAP_SD * scale,
                Hss,
                dCs,
                frz,
            )
            it += its
            if stage == 0:
                status = st
                if st != ST_OK:
                    break
                # Hessian of the criterion in the variance parameters and d cov(beta) / d psi (Satterthwaite)
                for i in range(n_psi):
                    out_frozen[gi, i] = frz[i]
                    for j in range(n_psi):
                        out_hpsi[gi, i, j] = Hss[i, j]
                    for a in range(npar):
                        for b in range(npar):
                            out_dcov[gi, i, a, b] = dCs[i, a, b]
            elif st != ST_OK:
                # keep the joint-mode fit; move the surrogate back to it
                if fam == NB:
                    settle(cf, gd, gamma, psi, dz, ws, 60)
                break
            for i in range(n_psi):
                psi[i] = psis[i]
            for i in range(d):
                gamma[i] = gaml[i]
            if stage == 1:
                ml_cov = ml_cov_beta(Hss, n_psi, npar, covl)
        out_iter[gi] = it
        if status == ST_NONFINITE or status == ST_NOTPD:
            out_status[gi] = status
            continue
        # final quantities at the estimates (joint-mode Hessian, conditional variances)
        obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad, info)
        if not np.isfinite(obj) or info[3] == 0.0:
            out_status[gi] = ST_NOTPD
            continue
        Hinv = ws[5][2]
        Huinv = ws[6][1]
        for a in range(npar):
            out_beta[gi, a] = gamma[a]
            for b in range(npar):
                out_cov[gi, a, b] = covl[a, b] if ml_cov else Hinv[a, b]
        # conditional modes b = Lambda u and their conditional SDs
        for t in range(tk.shape[0]):
            k = tk[t]
            h0 = tth[t]
            c0 = tcol0[t]
            for lv in range(tnlev[t]):
                base = c0 + lv * k
                for j in range(k):
                    bj = 0.0
                    vj = 0.0
                    for i in range(k):
                        if k == 1:
                            lji = psi[h0]
                        elif tcorr[t] == 1:
                            lji = psi[h0 + j * (j + 1) // 2 + i] if i <= j else 0.0
                        else:
                            lji = psi[h0 + j] if i == j else 0.0
                        if lji == 0.0:
                            continue
                        bj += lji * gamma[npar + base + i]
                        for i2 in range(k):
                            if k == 1:
                                lji2 = psi[h0]
                            elif tcorr[t] == 1:
                                lji2 = psi[h0 + j * (j + 1) // 2 + i2] if i2 <= j else 0.0
                            else:
                                lji2 = psi[h0 + j] if i2 == j else 0.0
                            vj += lji * lji2 * Huinv[base + i, base + i2]
                    out_b[gi, base + j] = bj
                    out_bse[gi, base + j] = math.sqrt(max(vj, 0.0))
        # theta with a non-negative Cholesky diagonal; singular fit check
        singular = False
        for t in range(tk.shape[0]):
            k = tk[t]
            h0 = tth[t]
            if k == 1:
                psi[h0] = abs(psi[h0])
                if psi[h0] < 1e-4 * scale:
                    singular = True
            elif tcorr[t] == 1:
                for i in range(k):
                    if psi[h0 + i * (i + 1) // 2 + i] < 0:
                        for j in range(i, k):
                            psi[h0 + j * (j + 1) // 2 + i] = -psi[h0 + j * (j + 1) // 2 + i]
                    if psi[h0 + i * (i + 1) // 2 + i] < 1e-4 * scale:
                        singular = True
            else:
                for i in range(k):
                    psi[h0 + i] = abs(psi[h0 + i])
                    if psi[h0 + i] < 1e-4 * scale:
                        singular = True
        for i in range(nth):
            out_theta[gi, i] = psi[i]
        out_phi[gi] = math.exp(psi[nth]) if has_tau else np.nan
        out_ll[gi] = info[0] - 0.5 * info[2] + const
        out_rll[gi] = info[0] - 0.5 * info[1] + 0.5 * npar * LOG2PI + const
        finite = np.isfinite(out_ll[gi])
        for a in range(npar):
            if not np.isfinite(out_beta[gi, a]) or not np.isfinite(out_cov[gi, a, a]):
                finite = False
        if not finite:
            status = ST_NONFINITE
        elif status == ST_OK and singular:
            status = ST_SINGULAR
        out_status[gi] = status
