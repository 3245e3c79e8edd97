"""Outer optimisation of the GLMM kernel (numba): Newton's method on the variance parameters (and, for Laplace-ML
``beta``, the fixed effects) with the analytic gradient and a forward-difference Hessian of it.

Each iteration: forward-difference Hessian ``Hs`` of the analytic gradient (surrogate fixed), a modified Newton
step with backtracking on the surrogate, then re-centring of the surrogate at the new modes, where the criterion
and its gradient are exact. Converged when the predicted gain of the next Newton step is below ``DEC_TOL``. SDs that
reach zero are fixed there (:func:`snap_zero`).
"""

from __future__ import annotations

import numpy as np

from ..._jit import jit
from .._families import NB
from .gradient import objective_grad
from .laplace import inner_solve, recentre, surrogate_gap
from .linalg import chol, chol_inverse, modified_newton_step
from .special import LEVEL
from .status import ST_NOCONV, ST_NONFINITE, ST_NOTPD, ST_OK

DEC_TOL = 1e-7  # outer convergence: predicted gain of the Newton step (log-likelihood units)
SHIFT_TOL = 0.02  # modes this close to the Taylor centres: the surrogate is exact to ~1e-12 there
INNER_MAX = 60  # Newton iterations of the inner problem


@jit(inline="always")
def snap_zero(cf, gd, dz, ws, gamma, psi, obj, ow):
    """Set near-zero SDs of intercept / uncorrelated terms to exactly zero when that does not lower the criterion.

    Marks them in ``ow.frozen``; returns how many were set.
    """
    tm = dz.terms
    frozen = ow.frozen
    n = psi.shape[0]
    d = gamma.shape[0]
    psit = np.zeros(n)
    gamt = np.zeros(d)
    nsnap = 0
    for k in range(cf.n_theta):
        t = tm.th_term[k]
        if frozen[k] or (tm.k[t] > 1 and tm.corr[t] == 1) or abs(psi[k]) >= ow.snap_sd or psi[k] == 0.0:
            continue
        for i in range(n):
            psit[i] = psi[i]
        psit[k] = 0.0
        for i in range(d):
            gamt[i] = gamma[i]
        ok, _ = inner_solve(cf, gd, gamt, psit, dz, ws, INNER_MAX)
        if not ok:
            continue
        ob = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, ow.gk)
        if np.isfinite(ob) and ob >= obj - DEC_TOL:
            psi[k] = 0.0
            for i in range(d):
                gamma[i] = gamt[i]
            obj = ob
            frozen[k] = True
            nsnap += 1
    return nsnap


@jit(_nrt=False, no_cpython_wrapper=True)
def settle(cf, gd, gamma, psi, dz, ws):
    """Conditional modes at ``psi`` with the ``U_p`` surrogate centred at them (exact there). Returns success."""
    ok, _ = inner_solve(cf, gd, gamma, psi, dz, ws, INNER_MAX)
    if cf.family != NB or not ok:
        return ok
    grp = dz.grp_tmax.shape[0] > 0
    surrogate = grp
    vmode = dz.vtabs.vmode
    for p in range(ws.e.shape[0]):
        if gd.y_pat[p] > 0 and vmode[p] != 2:
            surrogate = True
            break
    if not surrogate:
        return True  # every pattern with counts is a single cell, evaluated exactly: nothing to re-centre
    if grp and surrogate_gap(cf, gd, gamma, psi, dz, ws) < SHIFT_TOL:
        return True  # the modes are at the centres already (the surrogates are exact to rounding there)
    for _ in range(6):
        recentre(cf, gd, gamma, psi, dz, ws)
        ok, _ = inner_solve(cf, gd, gamma, psi, dz, ws, INNER_MAX)
        if not ok:
            return False
        if surrogate_gap(cf, gd, gamma, psi, dz, ws) < SHIFT_TOL:
            return True
    return True


@jit(inline="always")
def _fd_hessian(cf, gd, dz, ws, psi, gamma, ow):
    """Forward-difference Hessian ``ow.hess`` of the analytic gradient ``ow.grad`` and derivative ``ow.dcov`` of the
    conditional covariance of beta. False if a perturbed fit fails."""
    npar = cf.n_fixed
    n = psi.shape[0]
    d = gamma.shape[0]
    Hinv, C0, psik, gam0, gk = ws.Hinv, ow.C0, ow.psik, ow.gam0, ow.gk
    Hs, dC, grad = ow.hess, ow.dcov, ow.grad
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
        okk, _ = inner_solve(cf, gd, gam0, psik, dz, ws, INNER_MAX)
        ob = objective_grad(cf, gd, LEVEL[1] == 1, gam0, psik, dz, ws, gk)
        if not okk or not np.isfinite(ob):
            return False
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
    return True


@jit(no_cpython_wrapper=True)
def _newton_direction(cf, psi, ow):
    """Modified Newton step ``ow.step`` on the parameters not fixed (frozen SDs, ``tau`` at a bound it is pushed
    against); returns its predicted gain."""
    n = psi.shape[0]
    nth = cf.n_theta
    free, grad = ow.free, ow.grad
    for i in range(n):
        free[i] = not ow.frozen[i]
    if cf.has_tau:
        if psi[nth] <= ow.tau_lo + 1e-12 and grad[nth] < 0:
            free[nth] = False
        if psi[nth] >= ow.tau_hi - 1e-12 and grad[nth] > 0:
            free[nth] = False
    return modified_newton_step(ow.hess, grad, free, n, ow.step)


@jit(inline="always")
def _final_step(cf, gd, dz, ws, psi, gamma, ow, obj):
    """At convergence the Newton step is tiny and its quadratic model exact: take it (error ~ dec^2) if it does not
    lower the criterion. Returns the criterion."""
    n = psi.shape[0]
    d = gamma.shape[0]
    psit, gamt, step = ow.psit, ow.gamt, ow.step
    for i in range(n):
        psit[i] = psi[i] + step[i]
    if cf.has_tau:
        psit[cf.n_theta] = min(max(psit[cf.n_theta], ow.tau_lo), ow.tau_hi)
    for i in range(d):
        gamt[i] = gamma[i]
    if settle(cf, gd, gamt, psit, dz, ws):
        obt = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, ow.gk)
        if np.isfinite(obt) and obt >= obj - 1e-12 * (1.0 + abs(obj)):
            for i in range(n):
                psi[i] = psit[i]
            for i in range(d):
                gamma[i] = gamt[i]
            obj = obt
    return obj


@jit(_nrt=False, no_cpython_wrapper=True)
def _limit_step(cf, psi, ow):
    """Shorten the step to at most 1 in the SDs and 3 in ``tau``; speed up the approach to the Poisson limit."""
    n = psi.shape[0]
    nth = cf.n_theta
    has_tau = cf.has_tau
    step = ow.step
    smax = 0.0
    for i in range(n):
        lim = 3.0 if (has_tau and i == nth) else 1.0
        if abs(step[i]) / lim > smax:
            smax = abs(step[i]) / lim
    if smax > 1.0:
        for i in range(n):
            step[i] /= smax
    if cf.family == NB and has_tau and step[nth] < -0.5 and psi[nth] < -4.6:
        # towards the Poisson limit the criterion is ~ -c phi: Newton steps of -1 in log(phi); go faster
        step[nth] *= 4.0


@jit(inline="always")
def _line_search(cf, gd, dz, ws, psi, gamma, ow, obj):
    """Backtracking along ``ow.step`` from ``psi``; the accepted point is left in ``ow.psit``/``ow.gamt``."""
    n = psi.shape[0]
    d = gamma.shape[0]
    nth = cf.n_theta
    psit, gamt, step = ow.psit, ow.gamt, ow.step
    slope = 0.0
    for i in range(n):
        slope += step[i] * ow.grad[i]
    alpha = 1.0
    for _ in range(12):
        for i in range(n):
            psit[i] = psi[i] + alpha * step[i]
        for i in range(nth):
            psit[i] = min(max(psit[i], -20.0), 20.0)
        if cf.has_tau:
            psit[nth] = min(max(psit[nth], ow.tau_lo), ow.tau_hi)
        for i in range(d):
            gamt[i] = gamma[i]
        okt, _ = inner_solve(cf, gd, gamt, psit, dz, ws, INNER_MAX)
        if okt:
            obt = objective_grad(cf, gd, LEVEL[0] == 1, gamt, psit, dz, ws, ow.gk)
            if np.isfinite(obt) and obt >= obj + 1e-4 * alpha * slope:
                return True
        alpha *= 0.5
    return False


@jit(no_cpython_wrapper=True)
def fit_gene(cf, gd, dz, ws, psi, gamma, ow):
    """Optimise the criterion over ``psi`` (in place, with ``gamma``). Returns (status, outer iterations).

    Converged when the predicted gain of the next Newton step is below ``DEC_TOL``; ``ow.hess`` then holds the
    Hessian at the estimate, ``ow.dcov[k]`` the derivative of ``[H^{-1}]_beta`` (the conditional covariance of beta)
    in ``psi[k]`` (for Satterthwaite's df) and ``ow.frozen`` the SDs fixed at zero.
    """
    n = psi.shape[0]
    d = gamma.shape[0]
    grad = ow.grad
    for i in range(n):
        ow.frozen[i] = False
    is_nb = cf.family == NB
    if is_nb:
        recentre(cf, gd, gamma, psi, dz, ws)
    if not settle(cf, gd, gamma, psi, dz, ws):
        return ST_NOCONV, 0
    obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad)
    if not np.isfinite(obj):
        return ST_NOTPD, 0
    last = ow.max_outer - 1
    for it in range(ow.max_outer):
        if n == 0:
            return ST_OK, it
        if not _fd_hessian(cf, gd, dz, ws, psi, gamma, ow):
            return ST_NOCONV, it
        dec = _newton_direction(cf, psi, ow)
        if dec < 0:
            return ST_NONFINITE, it
        if dec < DEC_TOL:
            obj = _final_step(cf, gd, dz, ws, psi, gamma, ow, obj)
            if snap_zero(cf, gd, dz, ws, gamma, psi, obj, ow) == 0 or it == last:
                if is_nb:
                    settle(cf, gd, gamma, psi, dz, ws)
                return ST_OK, it
            # an SD was set to zero: re-optimise the rest with it fixed
            if not settle(cf, gd, gamma, psi, dz, ws):
                return ST_NOCONV, it
            obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad)
            continue
        _limit_step(cf, psi, ow)
        if not _line_search(cf, gd, dz, ws, psi, gamma, ow, obj):
            # no improvement along the step: converged if the predicted gain is negligible
            if dec < 100 * DEC_TOL:
                if snap_zero(cf, gd, dz, ws, gamma, psi, obj, ow) == 0 or it == last:
                    return ST_OK, it + 1
                if not settle(cf, gd, gamma, psi, dz, ws):
                    return ST_NOCONV, it + 1
                obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad)
                continue
            return ST_NOCONV, it + 1
        for i in range(n):
            psi[i] = ow.psit[i]
        for i in range(d):
            gamma[i] = ow.gamt[i]
        if not settle(cf, gd, gamma, psi, dz, ws):
            return ST_NOCONV, it + 1
        obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, grad)
        if not np.isfinite(obj):
            return ST_NOTPD, it + 1
    return ST_NOCONV, ow.max_outer


@jit(no_cpython_wrapper=True)
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
