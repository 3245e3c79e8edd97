"""Inner problem of the GLMM kernel (numba): the conditional modes of ``gamma = (beta, u)`` at given variance
parameters, by Newton's method on the penalised log-likelihood ``h = sum_p F_p - |u|^2 / 2``.

One interface serves covariate patterns and groups of cells on a line (a cell-level continuous covariate): a
pattern contributes ``F_p(e_p)`` with the design row ``a_p``; group ``g`` contributes ``F_g(e_2g, e_2g+1)`` with
the two rows ``a_2g`` (base) and ``a_2g+1`` (slope), so its gradient and Hessian are 2 x 2 blocks of the same
row products (:func:`assemble`).
"""

from __future__ import annotations

import numpy as np

from ..._jit import jit
from .._families import NB
from .likelihood import KV, fam_eval, fam_eval_grp, grp_centre, nb_D, softplus_derivs
from .linalg import chol, chol_solve
from .records import Rows, Workspace
from .special import KU, LEVEL, ORDER

MAX_ETA_STEP = 4.0  # largest change of a pattern's linear predictor in one inner Newton step (damping)


@jit(_nrt=False, no_cpython_wrapper=True)
def rows_of(dz, ws):
    """The :class:`Rows` view of a design and a workspace."""
    return Rows(
        dz.x_rows, dz.z_col, dz.z_val, ws.av, ws.FE, ws.FG, ws.g, ws.H, ws.Hinv, ws.Huinv, ws.rho, ws.ee, ws.gdot,
        ws.rvec,
    )  # fmt: skip


@jit(no_cpython_wrapper=True)
def make_workspace(P, m, npar, q, G):
    """Scratch arrays of one fit (see :class:`~scmlm.models.glmm.records.Workspace`)."""
    d = npar + q
    qq = max(q, 1)
    return Workspace(
        np.zeros((P, 7)),
        np.zeros((P, max(m, 1))),
        np.zeros(KV + 2),
        np.zeros(KV + 2),
        np.zeros(KV + 2),
        np.zeros(d),
        np.zeros(d),
        np.zeros(d),
        np.zeros(d),
        np.zeros(d),
        np.zeros(P),
        np.zeros(P),
        np.zeros(P),
        np.zeros((d, d)),
        np.zeros((d, d)),
        np.zeros((d, d)),
        np.zeros((d, d)),
        np.zeros((qq, qq)),
        np.zeros((qq, qq)),
        np.zeros((max(G, 1), 40)),
        np.zeros(4),
    )


@jit(_nrt=False, no_cpython_wrapper=True)
def lam_values(theta, tm, Zv, av):
    """Values of ``Lambda' z_p`` at the slots of ``Z`` (``av``, P x m; ``tm`` the :class:`TermMap`)."""
    P = Zv.shape[0]
    for t in range(tm.k.shape[0]):
        k = tm.k[t]
        s0 = tm.slot[t]
        h0 = tm.theta0[t]
        for p in range(P):
            if k == 1:
                av[p, s0] = theta[h0] * Zv[p, s0]
            elif tm.corr[t] == 1:
                for i in range(k):
                    acc = 0.0
                    for j in range(i, k):
                        acc += theta[h0 + j * (j + 1) // 2 + i] * Zv[p, s0 + j]
                    av[p, s0 + i] = acc
            else:
                for i in range(k):
                    av[p, s0 + i] = theta[h0 + i] * Zv[p, s0 + i]


@jit(_nrt=False, no_cpython_wrapper=True)
def lin_pred(gamma, av, Xp, Zc, npar, e):
    """Linear predictor ``e_p = a_p' gamma`` of every pattern (without offsets)."""
    P = Xp.shape[0]
    m = Zc.shape[1]
    for p in range(P):
        s = 0.0
        for c in range(npar):
            s += Xp[p, c] * gamma[c]
        for j in range(m):
            s += av[p, j] * gamma[npar + Zc[p, j]]
        e[p] = s


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def _accumulate(p, p2, F1, W, with_g, ro, npar):
    """``g += F1 a_p`` (when ``with_g``) and ``H += W a_p a_p2'`` in ``gamma`` coordinates."""
    Xp = ro.x_rows
    Zc = ro.z_col
    av = ro.av
    g = ro.g
    H = ro.H
    na = npar + Zc.shape[1]
    for a in range(na):
        if a < npar:
            ia = a
            va = Xp[p, a]
        else:
            ia = npar + Zc[p, a - npar]
            va = av[p, a - npar]
        if va == 0.0:
            continue
        if with_g:
            g[ia] += F1 * va
        wa = W * va
        for b in range(na):
            if b < npar:
                ib = b
                vb = Xp[p2, b]
            else:
                ib = npar + Zc[p2, b - npar]
                vb = av[p2, b - npar]
            H[ia, ib] += wa * vb


@jit(_nrt=False, no_cpython_wrapper=True)
def assemble(gamma, dz, ws, npar, q):
    """Gradient ``ws.g`` and negative Hessian ``ws.H`` of ``h`` in ``gamma = (beta, u)`` (from ``ws.FE``, or from
    ``ws.FG`` on groups: 2 x 2 blocks of the rows ``2g, 2g + 1``)."""
    g = ws.g
    H = ws.H
    d = npar + q
    for i in range(d):
        g[i] = 0.0
        for j in range(d):
            H[i, j] = 0.0
    for i in range(npar, d):
        g[i] = -gamma[i]
        H[i, i] = 1.0
    ro = rows_of(dz, ws)
    G = dz.grp_tmax.shape[0]
    if G > 0:
        FG = ws.FG
        for gg in range(G):
            for r in range(2):
                for s in range(2):
                    _accumulate(2 * gg + r, 2 * gg + s, FG[gg, 1 + r], -FG[gg, 3 + r + s], s == 0, ro, npar)
        return
    FE = ws.FE
    for p in range(dz.x_rows.shape[0]):
        _accumulate(p, p, FE[p, 1], -FE[p, 2], True, ro, npar)


@jit(_nrt=False, no_cpython_wrapper=True)
def penalised(cf, gd, gamma, psi, level, dz, ws):
    """``h(gamma)`` at the variance parameters in ``psi`` (without the gene constant); fills ``ws.FE`` (or ``ws.FG``)
    at ``level``."""
    nth, npar = cf.n_theta, cf.n_fixed
    tau = psi[nth] if cf.has_tau else 0.0
    lam_values(psi[:nth], dz.terms, dz.z_val, ws.av)
    lin_pred(gamma, ws.av, dz.x_rows, dz.z_col, npar, ws.e)
    if dz.grp_tmax.shape[0] > 0:
        h = fam_eval_grp(ws.e, tau, level, gd, dz, ws)
    else:
        h = fam_eval(cf.family, ws.e, tau, level, gd, dz, ws)
    for i in range(npar, npar + cf.q):
        h -= 0.5 * gamma[i] * gamma[i]
    if cf.family == NB:
        D, _ = nb_D(gd.cj, tau)
        h += D
    return h


@jit(_nrt=False, no_cpython_wrapper=True)
def max_eta_change(step, av, Xp, Zc, tabs, npar):
    """Largest ``|change of e_p|`` over the patterns for a step in ``gamma`` (``av`` at the current ``psi``; ``tabs``
    the largest ``|t|`` of each group, empty without groups)."""
    P = Xp.shape[0]
    m = Zc.shape[1]
    grp = tabs.shape[0] > 0
    out = 0.0
    s0 = 0.0
    for p in range(P):
        s = 0.0
        for c in range(npar):
            s += Xp[p, c] * step[c]
        for j in range(m):
            s += av[p, j] * step[npar + Zc[p, j]]
        if grp:
            # a group: cells move by s0 + t s1 with |t| <= tabs
            if p % 2 == 0:
                s0 = s
                continue
            s = abs(s0) + abs(s) * tabs[p // 2]
        if abs(s) > out:
            out = abs(s)
    return out


@jit(_nrt=False, no_cpython_wrapper=True)
def _fix_beta(cf, H, g, d):
    """Laplace-ML ``beta`` (an outer parameter): no Newton step in ``beta``."""
    for i in range(cf.n_fixed):
        g[i] = 0.0
        for j in range(d):
            H[i, j] = 0.0
            H[j, i] = 0.0
        H[i, i] = 1.0


@jit(_nrt=False, no_cpython_wrapper=True)
def inner_solve(cf, gd, gamma, psi, dz, ws, max_iter):
    """Newton iterations for the conditional modes (of ``(beta, u)``, or of ``u`` alone when ``laplace_beta``).

    Returns (converged, iterations). ``h`` is concave, so a backtracking Newton method converges from anywhere.
    """
    npar, q, la = cf.n_fixed, cf.q, cf.laplace_beta
    g, H, L, step, gtry = ws.g, ws.H, ws.L, ws.step, ws.gtry
    d = npar + q
    if la:
        b0 = cf.n_theta + cf.has_tau
        for i in range(npar):
            gamma[i] = psi[b0 + i]
    fresh = False  # ws.FE already holds F and its derivatives at gamma (the accepted full step), h its value
    h = 0.0
    grp = dz.grp_tmax.shape[0] > 0
    n_rec = 0
    for it in range(max_iter):
        if not fresh:
            h = penalised(cf, gd, gamma, psi, LEVEL[1], dz, ws)
        fresh = False
        if not np.isfinite(h):
            return False, it
        assemble(gamma, dz, ws, npar, q)
        if la:
            _fix_beta(cf, H, g, d)
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
        smax = max_eta_change(step, ws.av, dz.x_rows, dz.z_col, dz.grp_tmax, npar)
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
            if grp and n_rec < 3:
                # across the trust boundary of a group surrogate (exact on one side, polynomial on the other) the
                # small mismatch can stall the line search near the mode: centre the surrogates here and go on
                recentre_grp(cf, gd, gamma, psi, dz, ws)
                n_rec += 1
                continue
            return dec < 1e-9 * (1.0 + abs(h)), it + 1
        for i in range(d):
            gamma[i] = gtry[i]
        if fresh:
            h = ht
    return False, max_iter


@jit(_nrt=False, inline="always", no_cpython_wrapper=True)
def mode_predictors(cf, gamma, psi, dz, ws):
    """The linear predictors of the patterns (``ws.e``) at the modes ``gamma``, with ``Lambda`` from ``psi``; returns
    ``tau`` (0 without a dispersion): what every surrogate re-centring and gap check starts from."""
    nth = cf.n_theta
    lam_values(psi[:nth], dz.terms, dz.z_val, ws.av)
    lin_pred(gamma, ws.av, dz.x_rows, dz.z_col, cf.n_fixed, ws.e)
    return psi[nth] if cf.has_tau else 0.0


@jit(_nrt=False, no_cpython_wrapper=True)
def recentre(cf, gd, gamma, psi, dz, ws):
    """Move the Taylor centres of ``U_p`` to the current ``v_p = e_p + tau``; return the largest move."""
    if dz.grp_tmax.shape[0] > 0:
        return recentre_grp(cf, gd, gamma, psi, dz, ws)
    Yp, ucen, ucoef = gd.y_pat, gd.ucen, gd.ucoef
    nzp, nzy = gd.nz_pat, gd.nz_y
    e = ws.e
    vmode = dz.vtabs.vmode
    tau = mode_predictors(cf, gamma, psi, dz, ws)
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
    # softplus(v_p + o) once per offset class of the non-zero cells (a slot), then summed in the cells' order: the
    # same numbers and sums as evaluating it at every cell
    w = ws.wbuf
    nzs, sl_pat, sl_off, W = gd.nz_slot, gd.sl_pat, gd.sl_off, gd.sl_w
    for s in range(sl_pat.shape[0]):
        p = sl_pat[s]
        if vmode[p] == 2:
            continue
        softplus_derivs(ucen[p] + sl_off[s], ORDER[0], w)
        for k in range(KU + 1):
            W[s, k] = w[k]
    for i in range(nzp.shape[0]):
        p = nzp[i]
        if vmode[p] == 2:
            continue
        y = nzy[i]
        s = nzs[i]
        for k in range(KU + 1):
            ucoef[p, k] += y * W[s, k]
    return shift


@jit(_nrt=False, no_cpython_wrapper=True)
def grp_gap(cf, gd, gamma, psi, dz, ws):
    """Largest change of a cell's ``v`` between the group surrogates' centres and the current modes."""
    ucen = gd.ucen
    e = ws.e
    tabs = dz.grp_tmax
    tau = mode_predictors(cf, gamma, psi, dz, ws)
    gap = 0.0
    for g in range(tabs.shape[0]):
        p0 = 2 * g
        dd = abs(e[p0] + tau - ucen[p0]) + abs(e[p0 + 1] - ucen[p0 + 1]) * tabs[g]
        if dd > gap:
            gap = dd
    return gap


@jit(_nrt=False, no_cpython_wrapper=True)
def recentre_grp(cf, gd, gamma, psi, dz, ws):
    """Move the centres of the group surrogates to the current modes (one pass over the cells)."""
    ucen = gd.ucen
    e = ws.e
    tabs = dz.grp_tmax
    tau = mode_predictors(cf, gamma, psi, dz, ws)
    shift = 0.0
    for g in range(tabs.shape[0]):
        p0 = 2 * g
        s = e[p0] + tau
        c = e[p0 + 1]
        dd = abs(s - ucen[p0]) + abs(c - ucen[p0 + 1]) * tabs[g]
        if dd > shift:
            shift = dd
        grp_centre(g, s, c, gd, dz, ws.wbuf)
    return shift


@jit(_nrt=False, no_cpython_wrapper=True)
def surrogate_gap(cf, gd, gamma, psi, dz, ws):
    """Largest distance between the modes' ``v_p`` and the ``U_p`` centres over the patterns with a surrogate."""
    if dz.grp_tmax.shape[0] > 0:
        return grp_gap(cf, gd, gamma, psi, dz, ws)
    Yp, ucen = gd.y_pat, gd.ucen
    e = ws.e
    vmode = dz.vtabs.vmode
    tau = mode_predictors(cf, gamma, psi, dz, ws)
    gap = 0.0
    for p in range(e.shape[0]):
        if Yp[p] > 0 and vmode[p] != 2:
            gp = abs(e[p] + tau - ucen[p])
            if gp > gap:
                gap = gp
    return gap
