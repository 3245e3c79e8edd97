"""The Laplace (ML) or restricted-Laplace (REML) criterion at the conditional modes and its gradient in the outer
parameters ``psi = (theta, [tau], [beta if laplace_beta])`` (numba).

Derivatives of the modes come from the implicit function theorem (``d gamma = H^{-1} d grad h``); the derivative of
the log-determinant needs the third derivatives of ``F_p``. Patterns and groups share every piece but the sum over
their rows (a group has two, base and slope, and 2 x 2 blocks of derivatives).
"""

from __future__ import annotations

import numpy as np

from ..._jit import jit
from .._families import NB
from .laplace import assemble, penalised, rows_of
from .likelihood import nb_D
from .linalg import chol, chol_inverse, chol_logdet
from .records import OuterParam
from .special import LEVEL, LOG2PI


@jit(_nrt=False, no_cpython_wrapper=True)
def _criterion(cf, gd, gamma, psi, dz, ws):
    """The criterion at the modes ``gamma`` (``-inf`` if a Hessian is not PD); ``ws.crit`` gets
    ``[h, logdet(H), logdet(H_uu), ok]`` and ``ws.L``, ``ws.Luu`` the Cholesky factors."""
    npar, q = cf.n_fixed, cf.q
    H, L, tmpd, Luu, out = ws.H, ws.L, ws.dd_scratch, ws.Luu, ws.crit
    d = npar + q
    h = penalised(cf, gd, gamma, psi, LEVEL[2], dz, ws)
    assemble(gamma, dz, ws, npar, q)
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
    if cf.reml:
        return h - 0.5 * ldH + 0.5 * npar * LOG2PI
    return h - 0.5 * ldU


@jit(_nrt=False, no_cpython_wrapper=True)
def objective_grad(cf, gd, want_grad, gamma, psi, dz, ws, grad):
    """Laplace (ML) or restricted-Laplace (REML) criterion at the modes ``gamma`` and its gradient in ``psi``.

    ``ws.crit`` receives ``[h, logdet(H), logdet(H_uu), ok]``; when ``want_grad`` the inverses ``H^{-1}``
    (``ws.Hinv``) and ``H_uu^{-1}`` (``ws.Huinv``) are left in the workspace.
    """
    obj = _criterion(cf, gd, gamma, psi, dz, ws)
    if not np.isfinite(obj) or not want_grad:
        return obj
    d = cf.n_fixed + cf.q
    chol_inverse(ws.L, ws.Hinv, d, ws.dd_scratch)
    if cf.q > 0:
        chol_inverse(ws.Luu, ws.Huinv, cf.q, ws.dd_scratch)
    if dz.grp_tmax.shape[0] > 0:
        _grad_groups(cf, gd, gamma, psi, dz, ws, grad)
    else:
        _grad_patterns(cf, gd, gamma, psi, dz, ws, grad)
    return obj


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def _add_row(vec, f, p, ro, npar):
    """``vec += f a_p`` (the design vector of pattern ``p`` in ``gamma`` coordinates)."""
    Xp = ro.x_rows
    Zc = ro.z_col
    av = ro.av
    for c in range(npar):
        vec[c] += f * Xp[p, c]
    for j in range(Zc.shape[1]):
        vec[npar + Zc[p, j]] += f * av[p, j]


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def _dot_row(vec, p, s0, ro, npar):
    """``s0 + a_p' vec``, summed from ``s0`` on."""
    Xp = ro.x_rows
    Zc = ro.z_col
    av = ro.av
    s = s0
    for c in range(npar):
        s += Xp[p, c] * vec[c]
    for j in range(Zc.shape[1]):
        s += av[p, j] * vec[npar + Zc[p, j]]
    return s


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def _quad_rows(p1, p2, reml, ro, npar):
    """``a_p1' S a_p2`` with ``S = H^{-1}`` (REML) or ``H_uu^{-1}`` on the u entries (ML)."""
    Xp = ro.x_rows
    Zc = ro.z_col
    av = ro.av
    Hinv = ro.Hinv
    Huinv = ro.Huinv
    na = npar + Zc.shape[1]
    s = 0.0
    for a in range(na):
        if a < npar:
            if not reml:
                continue
            ia = a
            va = Xp[p1, a]
        else:
            ia = npar + Zc[p1, a - npar]
            va = av[p1, a - npar]
        if va == 0.0:
            continue
        for b in range(na):
            if b < npar:
                if not reml:
                    continue
                ib = b
                vb = Xp[p2, b]
            else:
                ib = npar + Zc[p2, b - npar]
                vb = av[p2, b - npar]
            if reml:
                s += va * vb * Hinv[ia, ib]
            else:
                s += va * vb * Huinv[ia - npar, ib - npar]
    return s


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def _hinv_dot(col, p, reml, ro, npar):
    """``(H_S^{-1} a_{p,S})`` at the u column ``col`` (S: everything for REML, the u block for ML)."""
    Xp = ro.x_rows
    Zc = ro.z_col
    av = ro.av
    Hinv = ro.Hinv
    s = 0.0
    for a in range(npar + Zc.shape[1]):
        if a < npar:
            if reml:
                s += Hinv[npar + col, a] * Xp[p, a]
        else:
            c2 = Zc[p, a - npar]
            if reml:
                s += Hinv[npar + col, npar + c2] * av[p, a - npar]
            else:
                s += ro.Huinv[col, c2] * av[p, a - npar]
    return s


@jit(_nrt=False, no_cpython_wrapper=True)
def _param_kind(k, cf, dz):
    """Outer parameter ``k`` (see :class:`~scmlm.models.glmm.records.OuterParam`)."""
    nth = cf.n_theta
    nps = nth + cf.has_tau
    kind = 0 if k < nth else (1 if k < nps else 2)
    slot = 0
    jslot = 0
    if kind == 0:
        tm = dz.terms
        t = tm.th_term[k]
        slot = tm.slot[t] + tm.th_i[k]
        jslot = tm.slot[t] + tm.th_j[k]
    return OuterParam(kind, k - nps, slot, jslot)


@jit(_nrt=False, no_cpython_wrapper=True)
def _fill_ee(op, gamma, ro, npar):
    """Direct derivative of every row's linear predictor in the outer parameter (modes held fixed)."""
    Xp = ro.x_rows
    Zc = ro.z_col
    Zv = ro.z_val
    ee = ro.ee
    kind, slot, jslot = op.kind, op.slot, op.jslot
    for p in range(Xp.shape[0]):
        if kind == 0:
            ee[p] = Zv[p, jslot] * gamma[npar + Zc[p, slot]]
        elif kind == 1:
            ee[p] = 0.0
        else:
            ee[p] = Xp[p, op.col]


@jit(_nrt=False, no_cpython_wrapper=True)
def _mode_derivative(cf, ro):
    """``gdot = H_S^{-1} rvec``: the derivative of the modes (only ``u`` when ``beta`` is an outer parameter)."""
    npar, q = cf.n_fixed, cf.q
    rvec, gdot = ro.rvec, ro.gdot
    if cf.laplace_beta:
        Huinv = ro.Huinv
        for i in range(npar):
            gdot[i] = 0.0
        for i in range(q):
            s = 0.0
            for j in range(q):
                s += Huinv[i, j] * rvec[npar + j]
            gdot[npar + i] = s
    else:
        Hinv = ro.Hinv
        d = npar + q
        for i in range(d):
            s = 0.0
            for j in range(d):
                s += Hinv[i, j] * rvec[j]
            gdot[i] = s


@jit(_nrt=False, no_cpython_wrapper=True)
def _n_outer(cf, gd, psi):
    """Number of outer parameters and ``dD/dtau`` (NB)."""
    nps = cf.n_theta + cf.has_tau
    ntot = nps + (cf.n_fixed if cf.laplace_beta else 0)
    D1 = 0.0
    if cf.family == NB:
        tau = psi[cf.n_theta] if cf.has_tau else 0.0
        _, D1 = nb_D(gd.cj, tau)
    return ntot, D1


@jit(_nrt=False, no_cpython_wrapper=True)
def _pattern_rhs(op, ro, npar):
    """``rvec`` (derivative of the gradient of ``h`` at fixed modes) and the direct derivative of ``h`` (patterns)."""
    FE, rvec, ee = ro.FE, ro.rvec, ro.ee
    Zc = ro.z_col
    Zv = ro.z_val
    kind, slot, jslot = op.kind, op.slot, op.jslot
    for i in range(rvec.shape[0]):
        rvec[i] = 0.0
    dh = 0.0
    for p in range(ro.x_rows.shape[0]):
        if kind == 0:
            f = FE[p, 2] * ee[p]
            dh += FE[p, 1] * ee[p]
            rvec[npar + Zc[p, slot]] += FE[p, 1] * Zv[p, jslot]
        elif kind == 1:
            f = FE[p, 5]
            dh += FE[p, 4]
        else:
            f = FE[p, 2] * ee[p]
            dh += FE[p, 1] * ee[p]
        _add_row(rvec, f, p, ro, npar)
    return dh


@jit(_nrt=False, no_cpython_wrapper=True)
def _grad_patterns(cf, gd, gamma, psi, dz, ws, grad):
    """Gradient of the criterion in ``psi`` on covariate patterns."""
    npar, reml = cf.n_fixed, cf.reml
    ro = rows_of(dz, ws)
    FE, rho, ee, gdot = ro.FE, ro.rho, ro.ee, ro.gdot
    Zc = ro.z_col
    Zv = ro.z_val
    P = ro.x_rows.shape[0]
    # rho_p = a_S' H_S^{-1} a_S with S = everything (REML) or the u block (ML)
    for p in range(P):
        rho[p] = _quad_rows(p, p, reml, ro, npar)
    ntot, D1 = _n_outer(cf, gd, psi)
    for k in range(ntot):
        op = _param_kind(k, cf, dz)
        _fill_ee(op, gamma, ro, npar)
        dh = _pattern_rhs(op, ro, npar)
        if op.kind == 1:
            dh += D1
        _mode_derivative(cf, ro)
        tr = 0.0
        for p in range(P):
            wd = -FE[p, 3] * _dot_row(gdot, p, ee[p], ro, npar)
            if op.kind == 1:
                wd -= FE[p, 6]
            tr += wd * rho[p]
        if op.kind == 0:
            for p in range(P):
                cd = Zv[p, op.jslot]
                if cd == 0.0:
                    continue
                tr += 2.0 * (-FE[p, 2]) * cd * _hinv_dot(Zc[p, op.slot], p, reml, ro, npar)
        grad[k] = dh - 0.5 * tr


@jit(_nrt=False, no_cpython_wrapper=True)
def _group_rhs(op, ro, G, npar):
    """``rvec`` and the direct derivative of ``h`` on the ``G`` groups (as :func:`_pattern_rhs`)."""
    FG, rvec, ee = ro.FG, ro.rvec, ro.ee
    Zc = ro.z_col
    Zv = ro.z_val
    kind, slot, jslot = op.kind, op.slot, op.jslot
    for i in range(rvec.shape[0]):
        rvec[i] = 0.0
    dh = 0.0
    for gg in range(G):
        p0 = 2 * gg
        if kind == 1:
            dh += FG[gg, 10]
            for s in range(2):
                _add_row(rvec, FG[gg, 11 + s], p0 + s, ro, npar)
        else:
            dh += FG[gg, 1] * ee[p0] + FG[gg, 2] * ee[p0 + 1]
            for s in range(2):
                f = FG[gg, 3 + s] * ee[p0] + FG[gg, 4 + s] * ee[p0 + 1]
                _add_row(rvec, f, p0 + s, ro, npar)
            if kind == 0:
                for r in range(2):
                    p = p0 + r
                    rvec[npar + Zc[p, slot]] += FG[gg, 1 + r] * Zv[p, jslot]
    return dh


@jit(_nrt=False, no_cpython_wrapper=True)
def _group_trace(tr, gg, op, reml, ro, npar):
    """Add group ``gg``'s terms of the derivative of the log-determinant to ``tr``."""
    FG, ee, gdot = ro.FG, ro.ee, ro.gdot
    Zc = ro.z_col
    Zv = ro.z_val
    kind, slot, jslot = op.kind, op.slot, op.jslot
    p0 = 2 * gg
    t0 = ee[p0] + _dot_row(gdot, p0, 0.0, ro, npar)
    t1 = ee[p0 + 1] + _dot_row(gdot, p0 + 1, 0.0, ro, npar)
    R00 = FG[gg, 16]
    R01 = FG[gg, 17]
    R11 = FG[gg, 18]
    Q0 = FG[gg, 6] * R00 + 2.0 * FG[gg, 7] * R01 + FG[gg, 8] * R11
    Q1 = FG[gg, 7] * R00 + 2.0 * FG[gg, 8] * R01 + FG[gg, 9] * R11
    tr -= t0 * Q0 + t1 * Q1
    if kind == 1:
        tr -= FG[gg, 13] * R00 + 2.0 * FG[gg, 14] * R01 + FG[gg, 15] * R11
    if kind == 0:
        for s in range(2):
            cd = Zv[p0 + s, jslot]
            if cd == 0.0:
                continue
            col = Zc[p0 + s, slot]
            for r in range(2):
                tr += 2.0 * (-FG[gg, 3 + r + s]) * cd * _hinv_dot(col, p0 + r, reml, ro, npar)
    return tr


@jit(_nrt=False, no_cpython_wrapper=True)
def _grad_groups(cf, gd, gamma, psi, dz, ws, grad):
    """Gradient of the criterion in ``psi`` on groups (as on patterns, with 2 x 2 blocks per group)."""
    npar, reml = cf.n_fixed, cf.reml
    ro = rows_of(dz, ws)
    FG = ro.FG
    G = dz.grp_tmax.shape[0]
    for gg in range(G):
        p0 = 2 * gg
        FG[gg, 16] = _quad_rows(p0, p0, reml, ro, npar)
        FG[gg, 17] = _quad_rows(p0, p0 + 1, reml, ro, npar)
        FG[gg, 18] = _quad_rows(p0 + 1, p0 + 1, reml, ro, npar)
    ntot, D1 = _n_outer(cf, gd, psi)
    for k in range(ntot):
        op = _param_kind(k, cf, dz)
        _fill_ee(op, gamma, ro, npar)
        dh = _group_rhs(op, ro, G, npar)
        if op.kind == 1:
            dh += D1
        _mode_derivative(cf, ro)
        tr = 0.0
        for gg in range(G):
            tr = _group_trace(tr, gg, op, reml, ro, npar)
        grad[k] = dh - 0.5 * tr
