"""Pattern-level log-likelihoods ``F_p`` of the GLMM families and their derivatives (numba).

For pattern ``p`` with linear predictor ``e`` (see the package docstring): NB2 ``F_p = Y_p e - U_p(v) - r V_p(v)``
with ``v = e + tau``, ``r = exp(-tau)``; Poisson ``Y_p e - M_p exp(e)``; binomial ``Y_p e - V_p(e)``; Gaussian from
exact sufficient statistics. ``V_p`` comes from per-design tables (or a direct sum over the pattern's cells) and
``U_p`` from the gene's Taylor surrogate. Groups of cells on a line (a cell-level continuous covariate, NB) use
bivariate surrogates instead (:func:`fam_eval_grp`).
"""

from __future__ import annotations

import math

import numpy as np

from ..._jit import jit
from .._families import BINOMIAL, NB, POISSON
from .records import Scratch
from .special import HV, KV, LEVEL, LOG2PI, NSER, ORDER, TRUST, softplus_derivs, taylor

KS = 6  # total order of the bivariate Taylor surrogates of a group (cell-level continuous covariate)
NCG = (KS + 1) * (KS + 2) // 2  # their moments per group
TRUSTG = 1.0  # largest change of a cell's linear predictor where a group's surrogate is used; re-centred beyond
# runtime (non-literal) integers: columns of a group's U and V moments in FG, and KS (fam_eval_grp)
GOFF = np.array([0, 19, 29, KS], dtype=np.int64)


@jit(_nrt=False, no_cpython_wrapper=True)
def v_eval(p, v, K, out, work, vt):
    """``out[k] = V_p^(k)(v)`` for ``k = 0..K`` (K <= 3): table, tail series or direct sum over the cells."""
    for k in range(K + 1):
        out[k] = 0.0
    if vt.vmode[p] >= 1:
        for ii in range(vt.cell_ptr[p], vt.cell_ptr[p + 1]):
            softplus_derivs(v + vt.cell_o[ii], K, work)
            c = vt.cell_c[ii]
            for k in range(K + 1):
                out[k] += c * work[k]
        return
    if v <= vt.vlo[p]:
        for m in range(1, NSER + 1):
            t = math.exp(m * v) * vt.ser_lo[p, m - 1]
            sgn = 1.0 if m % 2 == 1 else -1.0
            out[0] += sgn * t / m
            mk = 1.0
            for k in range(1, K + 1):
                out[k] += sgn * mk * t
                mk *= m
        return
    if v >= vt.vhi[p]:
        lin_c = vt.sum_c[p]
        out[0] = lin_c * v + vt.sum_co[p]
        if K >= 1:
            out[1] = lin_c
        for m in range(1, NSER + 1):
            t = math.exp(-m * v) * vt.ser_hi[p, m - 1]
            sgn = 1.0 if m % 2 == 1 else -1.0
            out[0] += sgn * t / m
            mk = -1.0
            for k in range(1, K + 1):
                out[k] += sgn * mk * t
                mk *= -m
        return
    g = int((v - vt.vlo[p]) / HV + 0.5)
    d = v - (vt.vlo[p] + g * HV)
    row = vt.tab[vt.tab_start[p] + g]
    for k in range(K + 1):
        out[k] = taylor(row, ORDER[1], d, k)


@jit(_nrt=False, no_cpython_wrapper=True)
def u_eval(p, v, out, ucen, ucoef):
    """``out[k] = U_p^(k)(v)``, ``k = 0..3``, from the Taylor surrogate (quadratic continuation past TRUST)."""
    d = v - ucen[p]
    c = ucoef[p]
    ku = ORDER[0]
    if abs(d) <= TRUST:
        for k in range(4):
            out[k] = taylor(c, ku, d, k)
        return
    db = TRUST if d > 0 else -TRUST
    u0 = taylor(c, ku, db, LEVEL[0])
    u1 = taylor(c, ku, db, LEVEL[1])
    u2 = taylor(c, ku, db, LEVEL[2])
    dd = d - db
    out[0] = u0 + u1 * dd + 0.5 * u2 * dd * dd
    out[1] = u1 + u2 * dd
    out[2] = u2
    out[3] = 0.0


@jit(_nrt=False, no_cpython_wrapper=True)
def _fam_nb(e, tau, level, gd, vt, o1, FE, bufs):
    vout = bufs.vbuf
    uout = bufs.ubuf
    Yp = gd.y_pat
    vmode = vt.vmode
    K = 0 if level == 0 else (2 if level == 1 else 3)
    total = 0.0
    r = math.exp(-tau)
    for p in range(e.shape[0]):
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
        v_eval(p, v, K, vout, bufs.wbuf, vt)
        if Yp[p] > 0:
            u_eval(p, v, uout, gd.ucen, gd.ucoef)
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
    return total


@jit(_nrt=False, no_cpython_wrapper=True)
def _fam_poisson(e, Yp, Mp, FE):
    total = 0.0
    for p in range(e.shape[0]):
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
    return total


@jit(_nrt=False, no_cpython_wrapper=True)
def _fam_binomial(e, level, Yp, vt, o1, FE, bufs):
    vout = bufs.vbuf
    K = 0 if level == 0 else (2 if level == 1 else 3)
    total = 0.0
    for p in range(e.shape[0]):
        if vt.vmode[p] == 2:
            softplus_derivs(e[p] + o1[p], K, vout)
            for k in range(K + 1):
                vout[k] *= vt.sum_c[p]
        else:
            v_eval(p, e[p], K, vout, bufs.wbuf, vt)
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
    return total


@jit(_nrt=False, no_cpython_wrapper=True)
def _fam_gaussian(e, tau, S1, S2, npat, FE):
    total = 0.0
    r = math.exp(-tau)
    for p in range(e.shape[0]):
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


@jit(_nrt=False, no_cpython_wrapper=True)
def fam_eval(fam, e, tau, level, gd, dz, ws):
    """Fill ``ws.FE[p] = (F, F', F'', F''', dF/dtau, dF'/dtau, dF''/dtau)`` (derivatives in ``e``); return sum F.

    ``level`` 0: value only; 1: up to F''; 2: everything.
    """
    if fam == NB:
        return _fam_nb(e, tau, level, gd, dz.vtabs, dz.pat_sum_o, ws.FE, Scratch(ws.vbuf, ws.ubuf, ws.wbuf))
    if fam == POISSON:
        return _fam_poisson(e, gd.y_pat, dz.pat_m, ws.FE)
    if fam == BINOMIAL:
        return _fam_binomial(e, level, gd.y_pat, dz.vtabs, dz.pat_sum_o, ws.FE, Scratch(ws.vbuf, ws.ubuf, ws.wbuf))
    return _fam_gaussian(e, tau, gd.s1, gd.s2, dz.pat_n, ws.FE)


@jit(_nrt=False, no_cpython_wrapper=True)
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
# groups: a cell-level continuous covariate (e.g. ``~ x + (1 + x|donor)``)
#
# Cells whose design rows lie on one line, ``row_i = B0_g + t_i B1_g`` (same random-term levels and categorical
# columns, ``t`` the standardised continuous covariate), form a group ``g`` represented by two rows: pattern ``2g``
# (``B0``) and ``2g + 1`` (``B1``). Their linear predictors ``theta_g = (e_2g, e_2g+1)`` give every cell's
# ``e_i = theta_g0 + t_i theta_g1``, so the NB log-likelihood of the group is a function of ``(s, c) = (theta_g0 + tau,
# theta_g1)``: ``F_g = theta_g0 Y_g + theta_g1 sum y t - U_g(s, c) - r V_g(s, c)`` with ``U_g = sum_{y > 0} y
# softplus(s + c t + o)`` and ``V_g = sum softplus(s + c t + o)`` over all the group's cells. Both are replaced by
# their bivariate Taylor polynomials of total order KS (6) around the centre ``(s, c)`` at the current modes (moments
# ``sum w softplus^(a) t^b`` from one O(cells) pass per re-centring), so every other pass costs O(groups). A group
# asked for a point beyond TRUSTG (in units of the largest change of a cell's linear predictor) is re-centred there
# (one pass over its cells). At convergence the centre is the mode, where the polynomial's value and derivatives up
# to order 3 are the exact sums.
# ws.FG per group: 0 F, 1-2 dF/dtheta_r, 3-5 d2F (j = number of theta_1 derivatives), 6-9 d3F, 10 dF/dtau,
# 11-12 d2F/dtau dtheta_r, 13-15 d3F/dtau dtheta dtheta, 16-18 (R00, R01, R11) = a_r' H_S^{-1} a_s, 19-28 U moments,
# 29-38 V moments (index k (k + 1) / 2 + j for derivative k <= 3 and power j <= k), 39 spare.


@jit(_nrt=False, no_cpython_wrapper=True)
def _grp_poly(C, ds, dc, K, out, o0, ps, pc):
    """``out[o0 + k(k+1)/2 + j] = d^k/ds^(k-j) dc^j`` of the bivariate Taylor polynomial with moments ``C``."""
    ps[0] = 1.0
    pc[0] = 1.0
    for a in range(1, KS + 1):
        ps[a] = ps[a - 1] * ds / a
        pc[a] = pc[a - 1] * dc / a
    for k in range(K + 1):
        for j in range(k + 1):
            acc = 0.0
            for n in range(KS - k + 1):
                base = (k + n) * (k + n + 1) // 2 + j
                for ll in range(n + 1):
                    acc += ps[n - ll] * pc[ll] * C[base + ll]
            out[o0 + k * (k + 1) // 2 + j] = acc


@jit(_nrt=False, no_cpython_wrapper=True)
def grp_centre(g, s, c, gd, dz, w):
    """Centre group ``g``'s surrogates at ``(s, c)``: ``ucoef[2g]`` gets the U moments ``sum y softplus^(k)(s + c t
    + o) t^j`` and ``ucoef[2g + 1]`` the V moments (weight 1), ``k + j <= KS``, over the group's cells."""
    p0 = 2 * g
    ucen = gd.ucen
    U = gd.ucoef[p0]
    V = gd.ucoef[p0 + 1]
    ucen[p0] = s
    ucen[p0 + 1] = c
    for k in range(NCG):
        U[k] = 0.0
        V[k] = 0.0
    K = GOFF[3]
    ysort = gd.y_sorted
    vt = dz.vtabs
    tsort = dz.cell_t_sorted
    for ii in range(vt.cell_ptr[p0], vt.cell_ptr[p0 + 1]):
        t = tsort[ii]
        softplus_derivs(s + c * t + vt.cell_o[ii], K, w)
        y = ysort[ii]
        idx = 0
        if y > 0.0:
            for k in range(K + 1):
                a = w[k]
                for _j in range(k + 1):
                    V[idx] += a
                    U[idx] += y * a
                    a *= t
                    idx += 1
        else:
            for k in range(K + 1):
                a = w[k]
                for _j in range(k + 1):
                    V[idx] += a
                    a *= t
                    idx += 1


@jit(_nrt=False, no_cpython_wrapper=True)
def fam_eval_grp(e, tau, level, gd, dz, ws):
    """NB family on groups: fill ``ws.FG`` (columns 0-15 up to the derivatives of ``level``) and return sum F."""
    Yp, ucen, ucoef = gd.y_pat, gd.ucen, gd.ucoef
    FG = ws.FG
    tabs = dz.grp_tmax
    G = tabs.shape[0]
    K = 0 if level == 0 else (2 if level == 1 else 3)
    r = math.exp(-tau)
    ps, pc, w = ws.vbuf, ws.ubuf, ws.wbuf
    for g in range(G):
        p0 = 2 * g
        ds = e[p0] + tau - ucen[p0]
        dc = e[p0 + 1] - ucen[p0 + 1]
        for k in range(19, 39):
            FG[g, k] = 0.0
        if abs(ds) + abs(dc) * tabs[g] > TRUSTG:
            # beyond the trust region: re-centre this group's surrogates here (one pass over its cells)
            grp_centre(g, e[p0] + tau, e[p0 + 1], gd, dz, w)
            ds = 0.0
            dc = 0.0
        if Yp[p0] > 0:
            _grp_poly(ucoef[p0], ds, dc, K, FG[g], GOFF[1], ps, pc)
        _grp_poly(ucoef[p0 + 1], ds, dc, K, FG[g], GOFF[2], ps, pc)
    total = 0.0
    for g in range(G):
        p0 = 2 * g
        U = FG[g, 19:29]
        V = FG[g, 29:39]
        F = e[p0] * Yp[p0] + e[p0 + 1] * Yp[p0 + 1] - U[0] - r * V[0]
        FG[g, 0] = F
        total += F
        if level >= 1:
            FG[g, 1] = Yp[p0] - U[1] - r * V[1]
            FG[g, 2] = Yp[p0 + 1] - U[2] - r * V[2]
            for j in range(3):
                FG[g, 3 + j] = -U[3 + j] - r * V[3 + j]
        if level >= 2:
            for j in range(4):
                FG[g, 6 + j] = -U[6 + j] - r * V[6 + j]
            FG[g, 10] = -U[1] + r * (V[0] - V[1])
            for j in range(2):
                FG[g, 11 + j] = -U[3 + j] + r * (V[1 + j] - V[3 + j])
            for j in range(3):
                FG[g, 13 + j] = -U[6 + j] + r * (V[3 + j] - V[6 + j])
    return total


@jit
def build_tables(vt, tab_n, classes):
    """Taylor coefficients (derivatives 0..KV) of ``V_p`` at the grid nodes of every tabulated pattern (into
    ``vt.tab``).

    ``classes = (cls, cls_ptr, cls_off)``: the offset class of each cell in the order of ``vt.cell_o``, the classes
    of each pattern (``cls_ptr[p]`` to ``cls_ptr[p + 1]``) and their offsets. Where a pattern has far fewer classes
    than cells, softplus is evaluated once per class and node and then summed over the cells in their order (the
    same numbers as evaluating it at every cell).
    """
    cls, cls_ptr, cls_off = classes
    w = np.zeros(KV + 2)
    tab = vt.tab
    W = np.zeros((0, KV + 1))
    for p in range(vt.vmode.shape[0]):
        if vt.vmode[p] != 0:
            continue
        c0 = cls_ptr[p]
        nc = cls_ptr[p + 1] - c0
        shared = 2 * nc < vt.cell_ptr[p + 1] - vt.cell_ptr[p]
        if shared and W.shape[0] < nc:
            W = np.zeros((nc, KV + 1))
        for gidx in range(tab_n[p]):
            node = vt.vlo[p] + gidx * HV
            row = vt.tab_start[p] + gidx
            for k in range(KV + 1):
                tab[row, k] = 0.0
            if shared:
                for j in range(nc):
                    softplus_derivs(node + cls_off[c0 + j], ORDER[1], w)
                    for k in range(KV + 1):
                        W[j, k] = w[k]
                for ii in range(vt.cell_ptr[p], vt.cell_ptr[p + 1]):
                    j = cls[ii] - c0
                    c = vt.cell_c[ii]
                    for k in range(KV + 1):
                        tab[row, k] += c * W[j, k]
                continue
            for ii in range(vt.cell_ptr[p], vt.cell_ptr[p + 1]):
                softplus_derivs(node + vt.cell_o[ii], ORDER[1], w)
                c = vt.cell_c[ii]
                for k in range(KV + 1):
                    tab[row, k] += c * w[k]
