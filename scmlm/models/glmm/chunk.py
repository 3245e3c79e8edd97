"""One chunk of genes through the GLMM kernel (numba): per-gene sufficient statistics, starting values, the
REML / two-stage ML fit, and the final quantities written to :class:`~scmlm.models.glmm.records.KernelOut`.

Stage 0 finds the joint modes of ``(beta, u)`` with the variance parameters; stage 1 (ML only) moves ``beta`` into
the outer parameters so that only ``u`` is integrated (glmmTMB's Laplace-ML ``beta``), and the Hessian in all fixed
parameters gives ``cov(beta)`` as glmmTMB's ``sdreport``.
"""

from __future__ import annotations

import math

import numpy as np

from ..._jit import jit
from .._families import BINOMIAL, GAUSSIAN, NB, POISSON
from .gradient import objective_grad
from .laplace import make_workspace
from .likelihood import NCG
from .linalg import chol, chol_solve
from .outer import fit_gene, ml_cov_beta, settle
from .records import Estimates, GeneData, GeneScratch, KernelConfig, OuterWork
from .special import KU, LEVEL, LOG2PI
from .status import ST_BADY, ST_FEW, ST_NONFINITE, ST_NONINT, ST_NOTPD, ST_OK, ST_SINGULAR, ST_ZERO

SNAP_SD = 0.01  # SDs below this (times the scale) are tried at exactly zero
LGAMMA_TABLE = 4096  # counts below this take lgamma(y + 1) from a table made once per chunk (same values)


@jit(no_cpython_wrapper=True)
def _lgamma_table(n):
    """``lgamma(k + 1)`` for ``k = 0..n-1``: ``math.lgamma`` costs ~20 ns, as much as a re-centring pass per
    non-zero."""
    out = np.empty(n)
    for k in range(n):
        out[k] = math.lgamma(k + 1.0)
    return out


@jit(no_cpython_wrapper=True)
def _scan_gene(cf, dz, chunk, gi, min_nz):
    """Status of gene ``gi`` before fitting (bad values, too few non-zero cells), its non-zero count and max."""
    fam = cf.family
    trials = dz.trials
    detection = trials.shape[0] == 0
    nnz = 0
    status = ST_OK
    maxy = 0.0
    for j in range(chunk.indptr[gi], chunk.indptr[gi + 1]):
        y = chunk.data[j]
        if y != 0.0:
            nnz += 1
            if not np.isfinite(y):
                status = ST_NONFINITE
            if fam != GAUSSIAN:
                if y < 0.0 or y != math.floor(y):
                    status = ST_NONINT
                if fam == BINOMIAL and not detection and y > trials[chunk.indices[j]]:
                    status = ST_BADY
            if y > maxy:
                maxy = y
    if status == ST_OK and nnz == 0:
        status = ST_ZERO
    if status == ST_OK and nnz < min_nz:
        status = ST_FEW
    return status, nnz, maxy


@jit(no_cpython_wrapper=True)
def _nonzero_cells(cf, dz, chunk, gi, nnz, gs):
    """Pattern, offset, response (and groups: ``t``) of the gene's non-zero cells, and their slots (offset classes
    numbered as first met; ``gs``: :class:`GeneScratch`). Returns them and the number of slots."""
    detection = dz.trials.shape[0] == 0
    grp = dz.grp_tmax.shape[0] > 0
    nzp = np.empty(nnz, dtype=np.int64)
    nzo = np.empty(nnz)
    nzy = np.empty(nnz)
    nzx = np.empty(nnz if grp else 0)
    nzs = np.empty(nnz, dtype=np.int64)
    cls_slot, sl_cls = gs.cls_slot, gs.sl_cls
    nsl = 0
    kk = 0
    for j in range(chunk.indptr[gi], chunk.indptr[gi + 1]):
        y = chunk.data[j]
        if y != 0.0:
            c = chunk.indices[j]
            nzp[kk] = dz.cell_pat[c]
            nzo[kk] = dz.cell_off[c]
            nzy[kk] = 1.0 if (cf.family == BINOMIAL and detection) else y
            if grp:
                nzx[kk] = dz.cell_t[c]
            k = dz.cell_cls[c]
            s = cls_slot[k]
            if s < 0:
                s = nsl
                cls_slot[k] = s
                sl_cls[s] = k
                gs.sl_pat[s] = dz.cls_pat[k]
                gs.sl_off[s] = dz.cls_off[k]
                nsl += 1
            nzs[kk] = s
            kk += 1
    for s in range(nsl):
        cls_slot[sl_cls[s]] = -1
    return nzp, nzo, nzy, nzx, nzs, nsl


@jit(no_cpython_wrapper=True)
def _count_tail(nzy, maxy):
    """``c_j`` = number of cells with ``y > j`` (NB's ``D(tau)``)."""
    my = int(maxy)
    hist = np.zeros(my + 1)
    for i in range(nzy.shape[0]):
        hist[int(nzy[i])] += 1.0
    cj = np.zeros(my)
    acc = 0.0
    for j in range(my, 0, -1):
        acc += hist[j]
        cj[j - 1] = acc
    return cj


@jit(no_cpython_wrapper=True)
def _binomial_const(dz, chunk, gi, nzy, nzo):
    """Constant of the binomial log-likelihood (binomial coefficients and offsets of the successes)."""
    detection = dz.trials.shape[0] == 0
    const = 0.0
    kk = 0
    for j in range(chunk.indptr[gi], chunk.indptr[gi + 1]):
        if chunk.data[j] != 0.0:
            mt = 1.0 if detection else dz.trials[chunk.indices[j]]
            y = nzy[kk]
            const += y * nzo[kk] + math.lgamma(mt + 1.0) - math.lgamma(y + 1.0) - math.lgamma(mt - y + 1.0)
            kk += 1
    return const


@jit(no_cpython_wrapper=True)
def _gene_data(cf, dz, chunk, gi, nnz, maxy, base, gs):
    """The gene's :class:`GeneData` (reusing the pattern arrays of ``base`` and the buffers of ``gs``,
    :class:`GeneScratch`)."""
    fam = cf.family
    grp = dz.grp_tmax.shape[0] > 0
    lgam = gs.lgam
    nzp, nzo, nzy, nzx, nzs, nsl = _nonzero_cells(cf, dz, chunk, gi, nnz, gs)
    ysort = base.y_sorted
    if grp:
        for i in range(ysort.shape[0]):
            ysort[i] = 0.0
        for j in range(chunk.indptr[gi], chunk.indptr[gi + 1]):
            ysort[dz.cell_rank[chunk.indices[j]]] = chunk.data[j]
    Yp, S1, S2 = base.y_pat, base.s1, base.s2
    for p in range(Yp.shape[0]):
        Yp[p] = 0.0
        S1[p] = -dz.pat_sum_o[p]
        S2[p] = dz.pat_sum_o2[p]
    const = 0.0
    for i in range(nnz):
        p = nzp[i]
        y = nzy[i]
        Yp[p] += y
        if grp:
            Yp[p + 1] += y * nzx[i]  # the group's slope row: sum y t
        if fam == GAUSSIAN:
            S1[p] += y
            S2[p] += y * y - 2.0 * y * nzo[i]
        else:
            # y is a positive integer here (_scan_gene)
            const += y * nzo[i] - (lgam[int(y)] if y < lgam.shape[0] else math.lgamma(y + 1.0))
    cj = _count_tail(nzy, maxy) if fam == NB else np.zeros(1)
    if fam == BINOMIAL:
        const = _binomial_const(dz, chunk, gi, nzy, nzo)
    return GeneData(
        Yp, base.ucen, base.ucoef, S1, S2, cj, nzp, nzo, nzy, nzx, ysort, const,
        nzs, gs.sl_pat[:nsl], gs.sl_off[:nsl], gs.sl_w[:nsl],
    )  # fmt: skip


@jit(no_cpython_wrapper=True)
def _start_eta(cf, dz, gd, e0, om):
    """Saturated linear predictor ``e0`` of every pattern and its IRLS weight ``om``."""
    fam = cf.family
    Yp = gd.y_pat
    Mp = dz.pat_m
    P = e0.shape[0]
    grp = dz.grp_tmax.shape[0] > 0  # rows 2g + 1 are the slopes of the groups: start them at zero
    if fam == NB or fam == POISSON:
        sy = 0.0
        sm = 0.0
        for p in range(P):
            if grp and p % 2 == 1:
                continue
            sy += Yp[p]
            sm += Mp[p]
        rate0 = sy / sm
        for p in range(P):
            if grp and p % 2 == 1:
                e0[p] = 0.0
                om[p] = Yp[p - 1] + 1.0
                continue
            e0[p] = math.log((Yp[p] + 1.0) / (Mp[p] + 1.0 / rate0))
            om[p] = Yp[p] + 1.0
    elif fam == BINOMIAL:
        lin_c = dz.vtabs.sum_c
        lin_co = dz.vtabs.sum_co
        for p in range(P):
            mp = lin_c[p]
            # logit of the pattern's success rate minus its mean offset: with offsets such as log library size
            # (~7) the rate alone would start every cell at p ~ 1
            e0[p] = math.log((Yp[p] + 0.5) / (mp - Yp[p] + 0.5)) - (lin_co[p] / mp if mp > 0 else 0.0)
            om[p] = (Yp[p] + 0.5) * (mp - Yp[p] + 0.5) / (mp + 1.0)
    else:
        for p in range(P):
            e0[p] = gd.s1[p] / dz.pat_n[p]
            om[p] = dz.pat_n[p]


@jit(no_cpython_wrapper=True)
def _wls_beta(dz, e0, om, gamma, npar):
    """Weighted least squares of ``e0`` on the fixed design (ridge 1e-10 of the trace) into ``gamma``; returns the
    residuals."""
    Xp = dz.x_rows
    P = e0.shape[0]
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
    return res


@jit(no_cpython_wrapper=True)
def _start_tau(cf, dz, gd, e0, res, psi):
    """Starting dispersion (Gaussian: residual variance; NB: moment estimate); returns the scale of the SDs."""
    fam = cf.family
    nth = cf.n_theta
    scale = 1.0
    P = e0.shape[0]
    if fam == GAUSSIAN:
        npat = dz.pat_n
        ss = 0.0
        nn = 0.0
        for p in range(P):
            ep = e0[p] - res[p]
            ss += gd.s2[p] - 2.0 * ep * gd.s1[p] + npat[p] * ep * ep
            nn += npat[p]
        s2 = ss / nn
        if not (s2 > 0.0):
            s2 = 1e-12
        scale = math.sqrt(s2)
        if cf.has_tau:
            psi[nth] = math.log(0.5 * s2)
    elif fam == NB and cf.has_tau:
        ser_lo = dz.vtabs.ser_lo
        num = 0.0
        den = 0.0
        emu = gd.sl_w  # column 0: exp(o + e0) of each slot, the same number for every cell of the slot
        for s in range(emu.shape[0]):
            emu[s, 0] = math.exp(gd.sl_off[s] + e0[gd.sl_pat[s]])
        for i in range(gd.nz_pat.shape[0]):
            mu = emu[gd.nz_slot[i], 0]
            num += gd.nz_y[i] * gd.nz_y[i] - 2.0 * gd.nz_y[i] * mu
        for p in range(P):
            ee = math.exp(e0[p])
            num += ee * ee * ser_lo[p, 1] - ee * dz.pat_m[p]
            den += ee * ee * ser_lo[p, 1]
        phi0 = num / den if den > 0 else 0.1
        if not (phi0 > 0.01):
            phi0 = 0.01
        if phi0 > 10.0:
            phi0 = 10.0
        psi[nth] = math.log(phi0)
    return scale


@jit(no_cpython_wrapper=True)
def _start_sds(dz, om, res, scale, psi):
    """Random-effect SDs from the level means of the residuals (slopes start at 0.1 times the scale)."""
    tm = dz.terms
    Zc = dz.z_col
    P = res.shape[0]
    for t in range(tm.k.shape[0]):
        k = tm.k[t]
        nl = tm.n_levels[t]
        sw = np.zeros(nl)
        sr = np.zeros(nl)
        for p in range(P):
            lev = (Zc[p, tm.slot[t]] - tm.col0[t]) // k
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
        h0 = tm.theta0[t]
        if k == 1:
            psi[h0] = sd
        elif tm.corr[t] == 1:
            for j in range(k):
                for i in range(j + 1):
                    psi[h0 + j * (j + 1) // 2 + i] = (sd if j == 0 else 0.1 * scale) if i == j else 0.0
        else:
            for j in range(k):
                psi[h0 + j] = sd if j == 0 else 0.1 * scale


@jit(no_cpython_wrapper=True)
def init_values(cf, dz, gd, psi, gamma):
    """Starting values: saturated pattern means, weighted least squares for beta, moment estimates for the rest.

    Returns the scale used for the variance parameters (1 for count families, the residual SD for Gaussian).
    """
    P = dz.x_rows.shape[0]
    e0 = np.zeros(P)
    om = np.zeros(P)
    _start_eta(cf, dz, gd, e0, om)
    res = _wls_beta(dz, e0, om, gamma, cf.n_fixed)
    scale = _start_tau(cf, dz, gd, e0, res, psi)
    _start_sds(dz, om, res, scale, psi)
    return scale


@jit(no_cpython_wrapper=True)
def _outer_work(n, d, npar, tau_lo, tau_hi, snap_sd, max_outer):
    """Arrays of one stage of the outer loop over ``n`` parameters (``d`` modes, ``npar`` fixed effects)."""
    return OuterWork(
        tau_lo,
        tau_hi,
        snap_sd,
        max_outer,
        np.zeros(n),
        np.zeros((n, n)),
        np.zeros((n, npar, npar)),
        np.zeros(n, dtype=np.bool_),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(d),
        np.zeros(d),
        np.ones(n, dtype=np.bool_),
        np.zeros((npar, npar)),
    )


@jit(no_cpython_wrapper=True)
def _tau_bounds(cf, psi, control):
    """Bounds of ``tau``: fixed for NB (``control``), 40 around the start otherwise; clips the start."""
    nth = cf.n_theta
    if cf.family == NB:
        tau_lo = control.tau_lo
        tau_hi = control.tau_hi
    else:
        tau_lo = (psi[nth] - 40.0) if cf.has_tau else 0.0
        tau_hi = (psi[nth] + 40.0) if cf.has_tau else 0.0
    if cf.has_tau:
        psi[nth] = min(max(psi[nth], tau_lo), tau_hi)
    return tau_lo, tau_hi


@jit(no_cpython_wrapper=True)
def _keep_stage0(out, gi, ow, n_psi, npar):
    """Hessian of the criterion in the variance parameters and d cov(beta) / d psi (Satterthwaite)."""
    for i in range(n_psi):
        out.frozen[gi, i] = ow.frozen[i]
        for j in range(n_psi):
            out.hess_psi[gi, i, j] = ow.hess[i, j]
        for a in range(npar):
            for b in range(npar):
                out.dcov[gi, i, a, b] = ow.dcov[i, a, b]


@jit(inline="always")
def _fit_stages(cf, gd, dz, ws, est, ow0):
    """Stage 0 (joint modes) and, for ML, stage 1 (Laplace-ML beta) from the starting values in ``est``.

    Returns (status of stage 0, outer iterations, whether ``est.covl`` holds the Laplace-ML ``cov(beta)``); ``est.psi``
    and ``est.gamma`` hold the estimates. A failed stage 1 keeps the joint-mode fit.
    """
    psi, gamma, psil, gaml = est.psi, est.gamma, est.psil, est.gaml
    n_psi = psi.shape[0]
    npar = cf.n_fixed
    d = gamma.shape[0]
    for i in range(n_psi):
        psil[i] = psi[i]
    for i in range(d):
        gaml[i] = gamma[i]
    psis = psil[:n_psi].copy()
    st, it = fit_gene(cf, gd, dz, ws, psis, gaml, ow0)
    if st != ST_OK:
        return st, it, False
    for i in range(n_psi):
        psi[i] = psis[i]
    for i in range(d):
        gamma[i] = gaml[i]
    if cf.reml:
        return st, it, False
    cf1 = KernelConfig(cf.family, LEVEL[0], cf.has_tau, cf.n_theta, npar, cf.q, LEVEL[1])
    for i in range(npar):
        psil[n_psi + i] = gamma[i]
    for i in range(d):
        gaml[i] = gamma[i]
    psis = psil[: n_psi + npar].copy()
    ow1 = _outer_work(n_psi + npar, d, npar, ow0.tau_lo, ow0.tau_hi, ow0.snap_sd, ow0.max_outer)
    st1, its = fit_gene(cf1, gd, dz, ws, psis, gaml, ow1)
    it += its
    if st1 != ST_OK:
        # keep the joint-mode fit; move the surrogate back to it
        if cf.family == NB:
            settle(cf, gd, gamma, psi, dz, ws)
        return st, it, False
    for i in range(n_psi):
        psi[i] = psis[i]
    for i in range(d):
        gamma[i] = gaml[i]
    return st, it, ml_cov_beta(ow1.hess, n_psi, npar, est.covl)


@jit(no_cpython_wrapper=True)
def _lambda_entry(psi, tm, t, j, i):
    """Entry ``(j, i)`` of the term's ``Lambda`` block from ``theta``."""
    k = tm.k[t]
    h0 = tm.theta0[t]
    if k == 1:
        return psi[h0]
    if tm.corr[t] == 1:
        return psi[h0 + j * (j + 1) // 2 + i] if i <= j else 0.0
    return psi[h0 + j] if i == j else 0.0


@jit(no_cpython_wrapper=True)
def _write_modes(dz, ws, est, out, gi, npar):
    """Conditional modes ``b = Lambda u`` and their conditional SDs."""
    tm = dz.terms
    psi, gamma, Huinv = est.psi, est.gamma, ws.Huinv
    for t in range(tm.k.shape[0]):
        k = tm.k[t]
        c0 = tm.col0[t]
        for lv in range(tm.n_levels[t]):
            base = c0 + lv * k
            for j in range(k):
                bj = 0.0
                vj = 0.0
                for i in range(k):
                    lji = _lambda_entry(psi, tm, t, j, i)
                    if lji == 0.0:
                        continue
                    bj += lji * gamma[npar + base + i]
                    for i2 in range(k):
                        vj += lji * _lambda_entry(psi, tm, t, j, i2) * Huinv[base + i, base + i2]
                out.b[gi, base + j] = bj
                out.b_se[gi, base + j] = math.sqrt(max(vj, 0.0))


@jit(no_cpython_wrapper=True)
def _normalise_theta(dz, psi, scale):
    """``theta`` with a non-negative Cholesky diagonal; True if some SD is (numerically) zero."""
    tm = dz.terms
    singular = False
    for t in range(tm.k.shape[0]):
        k = tm.k[t]
        h0 = tm.theta0[t]
        if k == 1:
            psi[h0] = abs(psi[h0])
            if psi[h0] < 1e-4 * scale:
                singular = True
        elif tm.corr[t] == 1:
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
    return singular


@jit(no_cpython_wrapper=True)
def _write_fit(cf, gd, dz, ws, est, out, gi, scale):
    """Estimates, covariance, modes, variance parameters and log-likelihoods of gene ``gi``; returns (all finite,
    singular)."""
    npar = cf.n_fixed
    nth = cf.n_theta
    psi = est.psi
    info = ws.crit
    _write_modes(dz, ws, est, out, gi, npar)
    singular = _normalise_theta(dz, psi, scale)
    for i in range(nth):
        out.theta[gi, i] = psi[i]
    out.phi[gi] = math.exp(psi[nth]) if cf.has_tau else np.nan
    out.loglik[gi] = info[0] - 0.5 * info[2] + gd.const
    out.rloglik[gi] = info[0] - 0.5 * info[1] + 0.5 * npar * LOG2PI + gd.const
    finite = np.isfinite(out.loglik[gi])
    for a in range(npar):
        if not np.isfinite(out.beta[gi, a]) or not np.isfinite(out.cov[gi, a, a]):
            finite = False
    return finite, singular


@jit(no_cpython_wrapper=True)
def _write_beta(ws, est, out, gi, npar, ml_cov):
    """``beta`` and its covariance (Laplace-ML from stage 1, else the ``beta`` block of ``H^{-1}``)."""
    for a in range(npar):
        out.beta[gi, a] = est.gamma[a]
        for b in range(npar):
            out.cov[gi, a, b] = est.covl[a, b] if ml_cov else ws.Hinv[a, b]


@jit(inline="always")
def _fit_one(cf, gd, dz, ws, est, control, out, gi):
    """Fit gene ``gi`` (its :class:`GeneData` built) and write its results; returns its status."""
    P = dz.x_rows.shape[0]
    npar = cf.n_fixed
    psi, gamma = est.psi, est.gamma
    n_psi = psi.shape[0]
    for i in range(n_psi):
        psi[i] = 0.0
    scale = init_values(cf, dz, gd, psi, gamma)
    tau_lo, tau_hi = _tau_bounds(cf, psi, control)
    # initial Taylor centres at the saturated fit (recentre() moves them to the modes)
    for p in range(P):
        gd.ucen[p] = 0.0
    ow0 = _outer_work(n_psi, gamma.shape[0], npar, tau_lo, tau_hi, SNAP_SD * scale, control.max_outer)
    status, it, ml_cov = _fit_stages(cf, gd, dz, ws, est, ow0)
    if status == ST_OK:
        _keep_stage0(out, gi, ow0, n_psi, npar)
    out.n_iter[gi] = it
    if status == ST_NONFINITE or status == ST_NOTPD:
        return status
    # final quantities at the estimates (joint-mode Hessian, conditional variances)
    obj = objective_grad(cf, gd, LEVEL[1] == 1, gamma, psi, dz, ws, est.grad)
    if not np.isfinite(obj) or ws.crit[3] == 0.0:
        return ST_NOTPD
    _write_beta(ws, est, out, gi, npar, ml_cov)
    finite, singular = _write_fit(cf, gd, dz, ws, est, out, gi, scale)
    if not finite:
        return ST_NONFINITE
    if status == ST_OK and singular:
        return ST_SINGULAR
    return status


@jit
def fit_chunk(cf, dz, chunk, control, out):
    """Fit every gene of a chunk (:class:`ChunkInput`: genes as the columns of a CSC cells x genes matrix) with the
    model ``cf`` (``laplace_beta`` 0) and the design ``dz``; results go to ``out`` (:class:`KernelOut`)."""
    P = dz.x_rows.shape[0]
    m = dz.z_col.shape[1]
    npar = cf.n_fixed
    n_grp = dz.grp_tmax.shape[0]
    ws = make_workspace(P, m, npar, cf.q, n_grp)
    d = npar + cf.q
    n_psi = cf.n_theta + cf.has_tau
    empty = np.zeros(0)
    base = GeneData(
        np.zeros(P),
        np.zeros(P),
        np.zeros((P, max(KU + 1, NCG))),
        np.zeros(P),
        np.zeros(P),
        empty,
        np.zeros(0, dtype=np.int64),
        empty,
        empty,
        empty,
        np.zeros(dz.cell_rank.shape[0]),
        0.0,
        np.zeros(0, dtype=np.int64),
        empty,
        empty,
        np.zeros((0, KU + 1)),
    )
    n_slots = 0
    for gi in range(chunk.indptr.shape[0] - 1):
        n_slots = max(n_slots, chunk.indptr[gi + 1] - chunk.indptr[gi])
    n_slots = min(n_slots, dz.cls_pat.shape[0])
    gs = GeneScratch(
        _lgamma_table(LGAMMA_TABLE if cf.family != GAUSSIAN else 0),
        np.full(dz.cls_pat.shape[0], -1, dtype=np.int64),
        np.zeros(n_slots, dtype=np.int64),
        np.zeros(n_slots, dtype=np.int64),
        np.zeros(n_slots),
        np.zeros((n_slots, KU + 1)),
    )
    est = Estimates(
        np.zeros(n_psi), np.zeros(d), np.zeros(n_psi + npar), np.zeros(d), np.zeros((npar, npar)), np.zeros(n_psi)
    )
    for gi in range(chunk.indptr.shape[0] - 1):
        out.n_iter[gi] = 0
        status, nnz, maxy = _scan_gene(cf, dz, chunk, gi, control.min_nonzero)
        if status != ST_OK:
            out.status[gi] = status
            continue
        gd = _gene_data(cf, dz, chunk, gi, nnz, maxy, base, gs)
        out.status[gi] = _fit_one(cf, gd, dz, ws, est, control, out, gi)
