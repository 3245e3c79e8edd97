"""Precision-weighted linear mixed models (REML) with Satterthwaite or Kenward–Roger df, and dream.

Model, for one gene with observations ``y`` (n), fixed design ``X`` (n × p) and random terms ``Z`` (n × q)::

    y = X beta + Z b + e,    b ~ N(0, sigma² Λ Λ'),    e_i ~ N(0, sigma² / w_i)

``Λ = blockdiag(I_L ⊗ T_t)`` holds each term's relative Cholesky factor ``T_t`` (lme4's parametrisation: ``θ`` are
the lower-triangular entries of ``T_t`` by rows, or its diagonal when the term is uncorrelated). The REML criterion is
profiled over ``beta`` and ``sigma²`` exactly as lme4 does (penalised least squares on cross-products, so one
evaluation costs O(q³), not O(n³)), and minimised over ``θ`` (diagonal entries ≥ 0) with L-BFGS-B.

Tests of ``L'beta`` use Satterthwaite's approximation as lmerTest: with variance parameters ``ψ`` (``sigma²`` and the
entries of each ``Σ_t = sigma² T_t T_t'``), ``C(ψ) = Var(beta_hat) = (X'V⁻¹X)⁻¹``, ``A`` the inverse of the observed
REML information of ``ψ`` (analytic second derivatives) and ``g = ∂(L'CL)/∂ψ``: ``df = 2 (L'CL)² / (g'Ag)``.
Parameters on the boundary (a variance estimated at zero) are held fixed. Multi-column contrasts give lmerTest's
F test (``contestMD``: eigen-decomposition of ``L'CL`` and the Satterthwaite df of each direction).

Kenward–Roger (``ddf="kenward-roger"``, one contrast column) follows pbkrtest as lmerTest calls it: the adjusted
covariance ``Phi_A`` of ``beta`` (``vcovAdj``, expected REML information of the variance parameters) and the df of
``Lb_ddf``; the residual part of ``V`` is ``sigma² diag(1/w)``. (pbkrtest 0.5.2 leaves the weights out there, so its
output on a weighted ``lmer`` fit is not the weighted model's; the stored reference fits the same model in its
unweighted form, ``y``, ``X`` and ``Z`` scaled by ``sqrt(w)``.)

``dream`` follows variancePartition: ``voomWithDreamWeights`` (voom, with the mean–variance trend taken from
unweighted LMM fits: residual SD and fitted values including the BLUPs), then a precision-weighted LMM per gene
(REML), with ``ddf = "adaptive"`` as variancePartition: Kenward–Roger below 20 samples, Satterthwaite otherwise.
No empirical-Bayes moderation is applied (``dream`` without ``eBayes``). On a null with 12 samples in 3 random
batches (condition unbalanced within batch, ~2,000 genes) the fraction of p < 0.05 was 0.0485 with Kenward–Roger
and 0.0585 with Satterthwaite.

With one random intercept (dream's usual ``(1|batch)`` or ``(1|donor)``) ``Z'WZ`` is diagonal and all genes are
fitted at once: the REML criterion from per-level weighted sums, ``θ`` by a vectorised golden-section search, the
Kenward–Roger terms as batched n × n algebra.

A gene never raises: numerical failures are reported in ``status`` with NaN statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import linalg, optimize, stats
from threadpoolctl import threadpool_limits

from ._random import RandomTerm, build_Z, n_theta, term_slices
from .ebayes import approx_rule2, lowess
from .limma import LN2, LimmaResult

__all__ = ["LMMResult", "dream", "fit_weighted_lmm"]


@dataclass(frozen=True)
class LMMResult:
    """Per-gene results of :func:`fit_weighted_lmm` (first axis: genes).

    ``coef``/``se``/``stat``/``df``/``pvalue`` describe ``L'beta`` (t test; F test with one column per contrast in
    ``coef`` when ``L`` has several columns, ``se`` then NaN). ``var_components`` maps each component name (see
    :meth:`RandomTerm.component_names`) to its variance; ``sigma2`` is the residual variance (for unit weight).
    """

    coef: np.ndarray
    se: np.ndarray
    stat: np.ndarray
    df: np.ndarray
    pvalue: np.ndarray
    beta: np.ndarray
    vcov_beta: np.ndarray
    sigma2: np.ndarray
    var_components: dict[str, np.ndarray]
    theta: np.ndarray
    reml_deviance: np.ndarray
    fitted: np.ndarray
    """Fitted values ``X beta + Z b`` (BLUPs included), genes × n."""
    converged: np.ndarray
    status: np.ndarray
    df1: int = 1


# ---------------------------------------------------------------------------------------------------------------------
# single-gene machinery
# ---------------------------------------------------------------------------------------------------------------------


class _LambdaMap:
    """Scatter map ``θ → Λ(θ)`` (q × q block lower triangular), built once per design."""

    def __init__(self, terms: tuple[RandomTerm, ...]):
        rows, cols, idx = [], [], []
        qoff = 0
        for t, (_, ts) in zip(terms, term_slices(terms), strict=True):
            k = t.k
            if t.correlated:
                r, c = np.tril_indices(k)
            else:
                r = c = np.arange(k)
            for lev in range(t.n_levels):
                rows.append(qoff + lev * k + r)
                cols.append(qoff + lev * k + c)
                idx.append(ts.start + np.arange(r.size))
            qoff += t.q
        self.q = qoff
        self.rows = np.concatenate(rows) if rows else np.zeros(0, dtype=int)
        self.cols = np.concatenate(cols) if cols else np.zeros(0, dtype=int)
        self.idx = np.concatenate(idx) if idx else np.zeros(0, dtype=int)
        self.diagonal = bool(np.all(self.rows == self.cols)) and self.rows.size == self.q

    def dense(self, theta: np.ndarray) -> np.ndarray:
        out = np.zeros((self.q, self.q))
        out[self.rows, self.cols] = theta[self.idx]
        return out

    def diag(self, theta: np.ndarray) -> np.ndarray:
        out = np.zeros(self.q)
        out[self.rows] = theta[self.idx]
        return out


def _lambda(terms: tuple[RandomTerm, ...], theta: np.ndarray) -> np.ndarray:
    """Dense ``Λ(θ)`` (q × q, block lower triangular)."""
    return _LambdaMap(terms).dense(theta)


def _theta_bounds(terms: tuple[RandomTerm, ...]) -> list[tuple[float | None, float | None]]:
    bounds: list[tuple[float | None, float | None]] = []
    for t in terms:
        if t.correlated:
            r, c = np.tril_indices(t.k)
            bounds += [(0.0, None) if i == j else (None, None) for i, j in zip(r, c, strict=True)]
        else:
            bounds += [(0.0, None)] * t.k
    return bounds


class _GeneModel(NamedTuple):
    """One gene's weighted LMM: response ``y`` (n), fixed and random designs ``X`` (n × p) and ``Z`` (n × q),
    precision weights ``w`` (n) and the random terms."""

    y: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    w: np.ndarray
    terms: tuple[RandomTerm, ...]


class _Estimates(NamedTuple):
    """REML estimates of one gene: residual variance, each term's covariance ``Σ_t`` and the fixed effects."""

    sigma2: float
    Sigmas: list[np.ndarray]
    beta: np.ndarray


class _GeneData:
    """Weighted cross-products of one gene (what the profiled REML criterion needs)."""

    def __init__(self, y, X, Z, w):
        sw = np.sqrt(w)
        self.Xw = X * sw[:, None]
        self.Zw = Z * sw[:, None]
        self.yw = y * sw
        self.XtX = self.Xw.T @ self.Xw
        self.Xty = self.Xw.T @ self.yw
        self.ZtZ = self.Zw.T @ self.Zw
        self.ZtX = self.Zw.T @ self.Xw
        self.Zty = self.Zw.T @ self.yw
        self.yty = float(self.yw @ self.yw)
        self.n, self.p = X.shape
        self.q = Z.shape[1]


def _pls(theta, lmap: _LambdaMap, g: _GeneData):
    """Penalised least squares at ``θ`` (lme4): returns ``(deviance, beta, Λu, r2)``."""
    trsolve = linalg.solve_triangular
    if lmap.diagonal:
        lam = lmap.diag(theta)
        M = g.ZtZ * np.outer(lam, lam)
        M[np.diag_indices_from(M)] += 1.0
        LZty, LZtX = lam * g.Zty, lam[:, None] * g.ZtX
    else:
        Lam = lmap.dense(theta)
        M = Lam.T @ g.ZtZ @ Lam + np.eye(g.q)
        LZty, LZtX = Lam.T @ g.Zty, Lam.T @ g.ZtX
    Lz = np.linalg.cholesky(M)
    cu = trsolve(Lz, LZty, lower=True, check_finite=False)
    RZX = trsolve(Lz, LZtX, lower=True, check_finite=False)
    Rx = np.linalg.cholesky(g.XtX - RZX.T @ RZX)  # lower: Rx Rx' = X'V⁻¹X (relative)
    cb = trsolve(Rx, g.Xty - RZX.T @ cu, lower=True, check_finite=False)
    beta = trsolve(Rx, cb, lower=True, trans="T", check_finite=False)
    u = trsolve(Lz, cu - RZX @ beta, lower=True, trans="T", check_finite=False)
    r2 = g.yty - cu @ cu - cb @ cb
    dfr = g.n - g.p
    if r2 <= 0:
        r2 = 1e-300
    dev = 2 * np.sum(np.log(np.diag(Lz))) + 2 * np.sum(np.log(np.diag(Rx))) + dfr * (1 + np.log(2 * np.pi * r2 / dfr))
    lam_u = lam * u if lmap.diagonal else Lam @ u
    return dev, beta, lam_u, r2


def _reml_deviance(theta, lmap: _LambdaMap, g: _GeneData) -> float:
    try:
        return float(_pls(theta, lmap, g)[0])
    except (np.linalg.LinAlgError, linalg.LinAlgError, ValueError, FloatingPointError):
        return np.inf


def _optimise_theta(terms, lmap: _LambdaMap, g: _GeneData) -> tuple[np.ndarray, bool]:
    """Minimise the profiled REML deviance over ``θ``.

    One parameter: bounded Brent on ``log θ`` over [1e-5, 1e4], compared with the boundary ``θ = 0``. Several:
    L-BFGS-B from lme4's start (identity factors) and two rescaled starts, keeping the best, then snapping values
    within 1e-4 of a bound onto it when that does not increase the deviance.
    """
    nt = n_theta(terms)
    if nt == 1:
        with np.errstate(all="ignore"):
            res = optimize.minimize_scalar(
                lambda s: _reml_deviance(np.array([np.exp(s)]), lmap, g),
                bounds=(np.log(1e-5), np.log(1e4)), method="bounded", options={"xatol": 1e-9},
            )  # fmt: skip
        theta = np.array([np.exp(res.x)])
        best = float(res.fun)
        d0 = _reml_deviance(np.zeros(1), lmap, g)
        if d0 <= best:
            theta, best = np.zeros(1), d0
        return theta, bool(np.isfinite(best))
    theta0 = np.concatenate(
        [(np.eye(t.k)[np.tril_indices(t.k)] if t.correlated else np.ones(t.k)).astype(float) for t in terms]
    )
    bounds = _theta_bounds(terms)
    best = None
    for start in (theta0, theta0 * 0.1, theta0 * 3.0):
        with np.errstate(all="ignore"):
            res = optimize.minimize(
                _reml_deviance, start, args=(lmap, g), method="L-BFGS-B", bounds=bounds,
                options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 500},
            )  # fmt: skip
        if best is None or res.fun < best.fun - 1e-10:
            best = res
    theta = np.asarray(best.x, dtype=float)
    lower = np.array([b[0] if b[0] is not None else -np.inf for b in bounds])
    near = (theta - lower < 1e-4) & np.isfinite(lower)
    if near.any():
        trial = theta.copy()
        trial[near] = lower[near]
        if _reml_deviance(trial, lmap, g) <= best.fun + 1e-12:
            theta = trial
    return theta, bool(np.isfinite(_reml_deviance(theta, lmap, g)))


def _psi_structure(terms: tuple[RandomTerm, ...], Z: np.ndarray, Sigmas: list[np.ndarray]):
    """Derivatives ``∂V/∂ψ`` for ψ = (sigma², entries of each Σ_t) and which entries are free (not on a boundary)."""
    derivs, names, free = [], [], []
    offset = 0
    for t, S in zip(terms, Sigmas, strict=True):
        k = t.k
        cols = [Z[:, offset + j : offset + t.q : k] for j in range(k)]  # n × L per covariate
        pairs = [(a, b) for a in range(k) for b in range(a + 1)] if t.correlated else [(a, a) for a in range(k)]
        for a, b in pairs:
            if a == b:
                D = cols[a] @ cols[a].T
                is_free = S[a, a] > 1e-10 * max(1.0, float(np.max(np.abs(np.diag(S)))))
            else:
                D = cols[a] @ cols[b].T
                D = D + D.T
                is_free = S[a, a] > 1e-12 and S[b, b] > 1e-12
            derivs.append(D)
            names.append((t.name, a, b))
            free.append(bool(is_free))
        offset += t.q
    return derivs, names, free


def _satterthwaite(model: _GeneModel, sigma2: float, Sigmas: list[np.ndarray]):
    """What Satterthwaite's df of any contrast needs: ``C = Var(beta)``, the inverse REML information ``A`` of the
    free variance parameters and the derivatives ``dC`` of ``C`` with respect to them."""
    y, X, Z, w, terms = model
    n = X.shape[0]
    derivs, _, free = _psi_structure(terms, Z, Sigmas)
    Vw = np.diag(1.0 / w)
    V = sigma2 * Vw
    offset = 0
    for t, S in zip(terms, Sigmas, strict=True):
        Zt = Z[:, offset : offset + t.q]
        V = V + Zt @ np.kron(np.eye(t.n_levels), S) @ Zt.T
        offset += t.q
    Vinv = np.linalg.inv(V)
    XtVi = X.T @ Vinv
    C = np.linalg.inv(XtVi @ X)
    P = Vinv - XtVi.T @ C @ XtVi
    dV = [Vw] + [D for D, f in zip(derivs, free, strict=True) if f]
    k = len(dV)
    Py = P @ y
    PdV = [P @ D for D in dV]
    H = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            val = -0.5 * np.sum(PdV[i] * PdV[j].T) + Py @ dV[i] @ PdV[j] @ Py
            H[i, j] = H[j, i] = val
    A = np.linalg.inv(H)
    dC = [C @ XtVi @ D @ XtVi.T @ C for D in dV]
    return C, A, dC, n


def _contrast_tests(beta, C, A, dC, Lm):
    """t test (one column) or lmerTest ``contestMD`` F test of ``L'beta = 0``."""
    m = Lm.shape[1]
    est = Lm.T @ beta
    LCL = Lm.T @ C @ Lm

    def sat_df(l):
        v = float(l @ C @ l)
        g = np.array([l @ D @ l for D in dC])
        denom = float(g @ A @ g)
        return 2 * v * v / denom if denom > 0 else np.inf, v

    if m == 1:
        df, v = sat_df(Lm[:, 0])
        se = np.sqrt(v)
        t = est[0] / se
        return est, np.array([se]), t, df, 2 * stats.t.sf(abs(t), df)
    evals, evecs = np.linalg.eigh(LCL)
    keep = evals > 1e-10 * max(evals.max(), 1e-300)
    P = evecs[:, keep]
    q = int(keep.sum())
    rot = Lm @ P
    tvals = (P.T @ est) / np.sqrt(evals[keep])
    F = float(np.sum(tvals**2) / q)
    dfs = np.array([sat_df(rot[:, i])[0] for i in range(q)])
    E = float(np.sum(dfs[dfs > 2] / (dfs[dfs > 2] - 2)))
    df2 = 2 * E / (E - q) if E > q else np.nan
    return est, np.full(m, np.nan), F, df2, stats.f.sf(F, q, df2)


def _fit_gene(y, X, Z, w, terms, lmap: _LambdaMap, Lm, ddf: str = "satterthwaite"):
    g = _GeneData(y, X, Z, w)
    theta, ok = _optimise_theta(terms, lmap, g)
    dev, beta, lam_u, r2 = _pls(theta, lmap, g)
    sigma2 = r2 / (g.n - g.p)
    Sigmas = []
    for t, (_, ts) in zip(terms, term_slices(terms), strict=True):
        T = np.zeros((t.k, t.k))
        if t.correlated:
            T[np.tril_indices(t.k)] = theta[ts]
        else:
            T[np.diag_indices(t.k)] = theta[ts]
        Sigmas.append(sigma2 * T @ T.T)
    fitted = X @ beta + Z @ lam_u
    r = {"beta": beta, "sigma2": sigma2, "Sigmas": Sigmas, "theta": theta, "dev": dev, "fitted": fitted, "ok": ok}
    r.update(_tests(_GeneModel(y, X, Z, w, terms), _Estimates(sigma2, Sigmas, beta), Lm, ddf))
    return r


_GOLDEN = (3.0 - np.sqrt(5.0)) / 2.0


class _OneWaySums:
    """Weighted sums of one gene batch for a single random intercept (``Z`` an indicator: one level per sample).

    ``Z'WZ`` is then diagonal, so ``V⁻¹ = W - W Z diag(c) Z'W`` with ``c_l = θ² / (1 + θ² s_l)``,
    ``s_l = sum of w in level l``, and ``log|V| = -sum log w + sum_l log(1 + θ² s_l)``: each REML evaluation costs
    O(levels × p²) per gene, from sums formed once.
    """

    def __init__(self, Y: np.ndarray, X: np.ndarray, Z: np.ndarray, W: np.ndarray):
        self.X, self.Z = X, Z
        self.n, self.p = X.shape
        WX = W[:, :, None] * X[None]  # G × n × p
        self.XtWX = np.einsum("gna,nb->gab", WX, X)
        self.XtWy = np.einsum("gna,gn->ga", WX, Y)
        self.ytWy = np.einsum("gn,gn->g", W * Y, Y)
        self.s = W @ Z  # G × q
        self.A = np.einsum("gna,nl->gla", WX, Z)  # X'W z_l
        self.b = (W * Y) @ Z  # y'W z_l
        self.sum_log_w = np.sum(np.log(W), axis=1)
        self.W, self.Y = W, Y

    def solve(self, theta: np.ndarray):
        t2 = (theta**2)[:, None]
        c = t2 / (1.0 + t2 * self.s)  # G × q
        XtViX = self.XtWX - np.einsum("gl,gla,glb->gab", c, self.A, self.A)
        XtViy = self.XtWy - np.einsum("gl,gla,gl->ga", c, self.A, self.b)
        yViy = self.ytWy - np.einsum("gl,gl,gl->g", c, self.b, self.b)
        beta = np.linalg.solve(XtViX, XtViy[:, :, None])[:, :, 0]
        r2 = np.maximum(yViy - np.einsum("ga,ga->g", beta, XtViy), 1e-300)
        logdet_v = -self.sum_log_w + np.sum(np.log1p(t2 * self.s), axis=1)
        dfr = self.n - self.p
        dev = logdet_v + np.linalg.slogdet(XtViX)[1] + dfr * (1 + np.log(2 * np.pi * r2 / dfr))
        return dev, beta, r2

    def dev(self, theta: np.ndarray) -> np.ndarray:
        return self.solve(theta)[0]

    def blups(self, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """``b = θ² Z'V⁻¹(y - Xβ)`` (relative to sigma²; level l: ``θ² (Z'W r)_l / (1 + θ² s_l)``)."""
        resid = self.Y - beta @ self.X.T
        t2 = (theta**2)[:, None]
        return t2 * ((self.W * resid) @ self.Z) / (1.0 + t2 * self.s)


def _is_indicator(Z: np.ndarray) -> bool:
    return bool(np.all((Z == 0) | (Z == 1)) and np.all(Z.sum(axis=1) == 1))


def _optimise_theta_batch(sums: _OneWaySums, G: int, lo: float = np.log(1e-5), hi: float = np.log(1e4), tol=1e-9):
    """Minimise the profiled REML deviance over ``log θ`` in ``[lo, hi]`` by golden-section search for every gene at
    once, then compare with the boundary ``θ = 0`` (as :func:`_optimise_theta` does with bounded Brent per gene)."""

    def dev(s):
        with np.errstate(all="ignore"):
            out = sums.dev(np.exp(s))
        return np.where(np.isfinite(out), out, np.inf)

    a = np.full(G, lo)
    b = np.full(G, hi)
    c = a + _GOLDEN * (b - a)
    d = b - _GOLDEN * (b - a)
    fc, fd = dev(c), dev(d)
    while np.max(b - a) > tol:
        left = fc <= fd  # minimum in [a, d]
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        new_c = np.where(left, a + _GOLDEN * (b - a), d)
        new_d = np.where(left, c, b - _GOLDEN * (b - a))
        x_new = np.where(left, new_c, new_d)
        f_new = dev(x_new)
        fd, fc = np.where(left, fc, f_new), np.where(left, f_new, fd)
        c, d = new_c, new_d
    s = np.where(fc <= fd, c, d)
    best = np.minimum(fc, fd)
    theta = np.exp(s)
    d0 = dev(np.full(G, -np.inf))
    at0 = d0 <= best
    theta[at0] = 0.0
    best = np.where(at0, d0, best)
    return theta, np.isfinite(best)


def _kenward_roger(X, Gmats, psi, l):
    """Kenward–Roger test of ``l'beta`` (pbkrtest's ``vcovAdj`` and ``Lb_ddf``, as lmerTest's ``ddf="Kenward-Roger"``).

    ``V = sum_i psi_i G_i`` with ``G_i = ∂V/∂psi_i`` (random-effect variances and, last, the residual variance with
    ``G = diag(1/w)``). Returns ``(var_adj, df)``: the adjusted variance ``l' Phi_A l`` and the KR df.
    """
    V = sum(ps * Gi for ps, Gi in zip(psi, Gmats, strict=True))
    Vinv = np.linalg.inv(V)
    k = len(Gmats)
    TT = Vinv @ X
    Phi = np.linalg.inv(X.T @ TT)
    HH = [Gi @ Vinv for Gi in Gmats]
    OO = [H @ X for H in HH]
    PP = [-(O.T @ TT) for O in OO]
    PP = [0.5 * (P + P.T) for P in PP]
    IE2 = np.empty((k, k))
    UU = np.zeros_like(Phi)
    QQ = {}
    for i in range(k):
        for j in range(i, k):
            Q = OO[i].T @ Vinv @ OO[j]
            QQ[i, j] = Q
            IE2[i, j] = IE2[j, i] = (
                np.sum(HH[i].T * HH[j]) - 2 * np.sum(Phi * Q) + np.sum((Phi @ PP[i]) * (PP[j] @ Phi))
            )
    if np.min(np.abs(np.linalg.eigvalsh(IE2))) > 1e-10:
        WW = 2 * np.linalg.inv(IE2)
    else:
        WW = 2 * np.linalg.pinv(IE2)
    for i in range(k):
        for j in range(i, k):
            term = WW[i, j] * (QQ[i, j] - PP[i] @ Phi @ PP[j])
            UU = UU + (term if i == j else term + term.T)
    PhiA = Phi + 2 * Phi @ UU @ Phi
    # Lb_ddf for one contrast row (q = 1)
    Theta = np.outer(l, l) / float(l @ Phi @ l)
    ThetaV0 = Theta @ Phi
    u = [ThetaV0 @ P @ Phi for P in PP]
    tr = np.array([np.trace(ui) for ui in u])
    A1 = float(tr @ WW @ tr)
    A2 = float(sum(WW[i, j] * np.sum(u[i] * u[j].T) for i in range(k) for j in range(k)))
    q = 1.0
    B = (A1 + 6 * A2) / (2 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    den = 3 * q + 2 * (1 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    v0 = 1 + c1 * B
    v0 = 0.0 if abs(v0) < 1e-10 else v0
    v1, v2 = 1 - c2 * B, 1 - c3 * B
    num = 1 - A2 / q
    ratio = 1.0 if (abs(num) < 1e-14 and abs(v1) < 1e-14) else num / v1
    rho = (1 / q) * ratio**2 * v0 / v2
    df = 4 + (q + 2) / (q * rho - 1)
    return float(l @ PhiA @ l), float(df)


def _kenward_roger_batch(X, ZZ, Winv, s2b, s2, l):
    """:func:`_kenward_roger` for one random intercept, all genes at once: ``V = s2b ZZ' + s2 diag(1/w)``.

    Returns ``(Phi, var_adj, df)`` with ``Phi = (X'V^-1X)^-1`` per gene."""
    G, n = Winv.shape
    Gm = [np.broadcast_to(ZZ, (G, n, n)), Winv[:, :, None] * np.eye(n)[None]]
    V = s2b[:, None, None] * Gm[0] + s2[:, None, None] * Gm[1]
    Vinv = np.linalg.inv(V)
    TT = Vinv @ X
    Phi = np.linalg.inv(np.einsum("na,gnb->gab", X, TT))
    HH = [Gi @ Vinv for Gi in Gm]
    OO = [H @ X for H in HH]
    PP = []
    for O in OO:
        P = -np.einsum("gna,gnb->gab", O, TT)
        PP.append(0.5 * (P + np.swapaxes(P, 1, 2)))
    k = 2
    IE2 = np.empty((G, k, k))
    QQ = {}
    for i in range(k):
        for j in range(i, k):
            Q = np.einsum("gna,gnm,gmb->gab", OO[i], Vinv, OO[j])
            QQ[i, j] = Q
            val = (
                np.einsum("gnm,gnm->g", np.swapaxes(HH[i], 1, 2), HH[j])
                - 2 * np.einsum("gab,gab->g", Phi, Q)
                + np.einsum("gab,gab->g", Phi @ PP[i], PP[j] @ Phi)
            )
            IE2[:, i, j] = IE2[:, j, i] = val
    WW = 2 * np.linalg.pinv(IE2, hermitian=True)
    UU = np.zeros_like(Phi)
    for i in range(k):
        for j in range(i, k):
            term = WW[:, i, j, None, None] * (QQ[i, j] - PP[i] @ Phi @ PP[j])
            UU = UU + (term if i == j else term + np.swapaxes(term, 1, 2))
    PhiA = Phi + 2 * Phi @ UU @ Phi
    lPl = np.einsum("a,gab,b->g", l, Phi, l)
    Theta = np.outer(l, l)[None] / lPl[:, None, None]
    ThetaV0 = Theta @ Phi
    u = [ThetaV0 @ P @ Phi for P in PP]
    tr = np.stack([np.trace(ui, axis1=1, axis2=2) for ui in u], axis=1)
    A1 = np.einsum("gi,gij,gj->g", tr, WW, tr)
    A2 = sum(WW[:, i, j] * np.einsum("gab,gba->g", u[i], u[j]) for i in range(k) for j in range(k))
    q = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        B = (A1 + 6 * A2) / (2 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        v0 = 1 + c1 * B
        v0 = np.where(np.abs(v0) < 1e-10, 0.0, v0)
        v1, v2 = 1 - c2 * B, 1 - c3 * B
        num = 1 - A2 / q
        ratio = np.where((np.abs(num) < 1e-14) & (np.abs(v1) < 1e-14), 1.0, num / v1)
        rho = (1 / q) * ratio**2 * v0 / v2
        df = 4 + (q + 2) / (q * rho - 1)
    return Phi, np.einsum("a,gab,b->g", l, PhiA, l), df


def _fit_batch_one_term(Y, X, Z, W, term: RandomTerm, lmap: _LambdaMap, Lm, ddf: str):
    """One random-intercept term: θ for all genes by a vectorised golden-section search, then per gene the exact
    penalised least squares solution and the tests (Satterthwaite or Kenward–Roger)."""
    G, n = Y.shape
    ZZ = Z @ Z.T
    Winv = 1.0 / W
    sums = _OneWaySums(Y, X, Z, W)
    theta, ok = _optimise_theta_batch(sums, G)
    kr = ddf == "kenward-roger" and Lm.shape[1] == 1
    out = []
    dev, beta_all, r2 = sums.solve(theta)
    dev = dev + sums.sum_log_w  # lme4's weighted deviance, as _pls reports it
    sigma2_all = r2 / (n - X.shape[1])
    fitted_all = beta_all @ X.T + sums.blups(theta, beta_all) @ Z.T
    fits = [(theta[i : i + 1], dev[i], beta_all[i], None, sigma2_all[i]) for i in range(G)]
    if kr:
        s2 = sigma2_all
        s2b = s2 * theta**2
        Phi, var_adj, kr_df = _kenward_roger_batch(X, ZZ, Winv, s2b, s2, Lm[:, 0])
    for i, (th, dev_i, beta, _, sigma2) in enumerate(fits):
        Sigmas = [np.array([[sigma2 * th[0] ** 2]])]
        r = {"beta": beta, "sigma2": sigma2, "Sigmas": Sigmas, "theta": th.copy(), "dev": dev_i,
             "fitted": fitted_all[i]}  # fmt: skip
        r["ok"] = bool(ok[i])
        if kr:
            est = Lm.T @ beta
            se = np.sqrt(var_adj[i])
            t = est[0] / se
            r.update({"C": Phi[i], "est": est, "se": np.array([se]), "stat": t, "df": kr_df[i],
                      "pval": 2 * stats.t.sf(abs(t), kr_df[i])})  # fmt: skip
        else:
            r.update(_tests(_GeneModel(Y[i], X, Z, W[i], (term,)), _Estimates(sigma2, Sigmas, beta), Lm, ddf))
        out.append(r)
    return out


def _tests(model: _GeneModel, est: _Estimates, Lm: np.ndarray, ddf: str) -> dict:
    """``C = Var(beta)`` and the test of ``L'beta``: Satterthwaite, Kenward–Roger (one contrast column) or none."""
    _, X, Z, w, terms = model
    sigma2, Sigmas, beta = est
    if ddf == "none":
        nanv = np.full(Lm.shape[1], np.nan)
        return {"C": np.full((X.shape[1],) * 2, np.nan), "est": Lm.T @ beta, "se": nanv, "stat": np.nan,
                "df": np.nan, "pval": np.nan}  # fmt: skip
    C, A, dC, _ = _satterthwaite(model, sigma2, Sigmas)
    if ddf == "kenward-roger" and Lm.shape[1] == 1:
        derivs, _, _ = _psi_structure(terms, Z, Sigmas)
        psi = [S[a, b] for S, t in zip(Sigmas, terms, strict=True) for a, b in _pairs(t)]
        var_adj, df = _kenward_roger(X, [*derivs, np.diag(1.0 / w)], [*psi, sigma2], Lm[:, 0])
        est = Lm.T @ beta
        se = np.sqrt(var_adj)
        t = est[0] / se
        return {"C": C, "est": est, "se": np.array([se]), "stat": t, "df": df, "pval": 2 * stats.t.sf(abs(t), df)}
    est, se, stat, df, pval = _contrast_tests(beta, C, A, dC, Lm)
    return {"C": C, "est": est, "se": se, "stat": stat, "df": df, "pval": pval}


def _pairs(t: RandomTerm):
    k = t.k
    return [(a, b) for a in range(k) for b in range(a + 1)] if t.correlated else [(a, a) for a in range(k)]


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------


def fit_weighted_lmm(
    y: np.ndarray,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...],
    weights: np.ndarray | None,
    L: np.ndarray,
    *,
    ddf: str = "satterthwaite",
) -> LMMResult:
    """Precision-weighted LMM (REML) per gene, with a Satterthwaite or Kenward–Roger test of ``L'beta``.

    Parameters
    ----------
    y
        One gene (length n) or genes × n responses.
    X
        n × p fixed-effect design (full column rank).
    terms
        Random-effect terms (:class:`~scmlm.models.RandomTerm`).
    weights
        Precision weights ``w`` (``Var(e_i) = sigma² / w_i``): None (all 1), length n, or genes × n.
    L
        Contrast: length-p vector or p × m matrix.
    ddf
        ``"satterthwaite"`` (lmerTest's default), ``"kenward-roger"`` (pbkrtest's adjusted covariance and df, as
        lmerTest's ``ddf = "Kenward-Roger"``; F tests of several contrast columns keep Satterthwaite) or ``"none"``
        (no test: ``coef`` only, for fits whose residuals and fitted values are all that is needed).

    With a single random-intercept term, ``θ`` of all genes is found at once by golden-section search on
    ``log θ`` (vectorised over genes); otherwise each gene is optimised on its own.

    Returns
    -------
    LMMResult (gene axis first even for one gene).

    Examples
    --------
    >>> from scmlm.models import intercept_term
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(np.arange(6), 4)
    >>> X = np.column_stack([np.ones(24), groups % 2])
    >>> y = X @ [1.0, 0.5] + rng.normal(0, 1, 6)[groups] + rng.normal(0, 0.5, 24)
    >>> res = fit_weighted_lmm(y, X, (intercept_term("donor", groups),), None, np.array([0.0, 1.0]))
    >>> float(np.round(res.df[0], 3))
    4.0
    """
    with threadpool_limits(1):  # many tiny matrices: threads only add overhead
        return _fit_weighted_lmm(y, X, terms, weights, L, ddf=ddf)


def _fit_weighted_lmm(
    y: np.ndarray,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...],
    weights: np.ndarray | None,
    L: np.ndarray,
    *,
    ddf: str = "satterthwaite",
) -> LMMResult:
    """Body of :func:`fit_weighted_lmm` (BLAS already limited to one thread)."""
    X = np.asarray(X, dtype=float)
    Y = np.atleast_2d(np.asarray(y, dtype=float))
    G, n = Y.shape
    p = X.shape[1]
    Lm = np.asarray(L, dtype=float)
    Lm = Lm[:, None] if Lm.ndim == 1 else Lm
    m = Lm.shape[1]
    W = np.ones((G, n)) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), (G, n))
    Z = build_Z(terms, n).toarray()
    lmap = _LambdaMap(terms)
    comp_names = [c for t in terms for c in t.component_names()]
    nt = n_theta(terms)

    coef = np.full((G, m), np.nan)
    se = np.full((G, m), np.nan)
    stat = np.full(G, np.nan)
    df = np.full(G, np.nan)
    pval = np.full(G, np.nan)
    beta = np.full((G, p), np.nan)
    vcov = np.full((G, p, p), np.nan)
    sigma2 = np.full(G, np.nan)
    theta = np.full((G, nt), np.nan)
    dev = np.full(G, np.nan)
    fitted = np.full((G, n), np.nan)
    comps = {c: np.full(G, np.nan) for c in comp_names}
    converged = np.zeros(G, dtype=bool)
    status = np.empty(G, dtype=object)
    if ddf not in ("satterthwaite", "kenward-roger", "none"):
        raise ValueError(f"ddf={ddf!r}: use 'satterthwaite', 'kenward-roger' or 'none'")
    valid = np.array([np.all(np.isfinite(Y[i])) and np.all(np.isfinite(W[i])) and np.all(W[i] > 0) for i in range(G)])
    batch = {}
    if len(terms) == 1 and nt == 1 and valid.any() and _is_indicator(Z):
        idx = np.flatnonzero(valid)
        try:
            with np.errstate(all="ignore"):
                fits = _fit_batch_one_term(Y[idx], X, Z, np.ascontiguousarray(W[idx]), terms[0], lmap, Lm, ddf)
            batch = dict(zip(idx.tolist(), fits, strict=True))
        except (np.linalg.LinAlgError, linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError):
            batch = {}  # fall back to gene-by-gene fits, which report their own failures
    for i in range(G):
        wi = W[i]
        if not valid[i]:
            status[i] = "non-finite response or non-positive weight"
            continue
        try:
            with np.errstate(all="ignore"):
                r = batch[i] if i in batch else _fit_gene(Y[i], X, Z, wi, terms, lmap, Lm, ddf)
        except (np.linalg.LinAlgError, linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError) as e:
            status[i] = f"failed: {type(e).__name__}: {e}"
            continue
        coef[i], se[i], stat[i], df[i], pval[i] = r["est"], r["se"], r["stat"], r["df"], r["pval"]
        beta[i], vcov[i], sigma2[i], theta[i], dev[i], fitted[i] = (
            r["beta"], r["C"], r["sigma2"], r["theta"], r["dev"], r["fitted"]
        )  # fmt: skip
        j = 0
        for S in r["Sigmas"]:
            for v in np.diag(S):
                comps[comp_names[j]][i] = v
                j += 1
        ok = r["ok"] and (ddf == "none" or (np.isfinite(r["df"]) and np.isfinite(r["pval"])))
        converged[i] = ok
        status[i] = "ok" if ok else "optimizer or Satterthwaite df did not converge"
    if m == 1:
        coef, se = coef[:, 0], se[:, 0]
    return LMMResult(
        coef=coef, se=se, stat=stat, df=df, pvalue=pval, beta=beta, vcov_beta=vcov, sigma2=sigma2,
        var_components=comps, theta=theta, reml_deviance=dev, fitted=fitted, converged=converged, status=status,
        df1=m,
    )  # fmt: skip


def dream(
    counts: np.ndarray,
    X: np.ndarray,
    L: np.ndarray,
    terms: tuple[RandomTerm, ...],
    lib_size: np.ndarray,
    *,
    span: float = 0.5,
    ddf: str = "adaptive",
):
    """variancePartition's ``voomWithDreamWeights`` + ``dream`` (REML, no eBayes).

    ``ddf="adaptive"`` (variancePartition's default) uses Kenward–Roger df below 20 samples and Satterthwaite from
    20 on; ``"kenward-roger"`` or ``"satterthwaite"`` force one.

    Returns a :class:`~scmlm.models.limma.LimmaResult` with coefficients and SEs on the natural-log scale.
    """
    counts = np.asarray(counts, dtype=float)
    n_genes, n = counts.shape
    E = np.log2((counts + 0.5) / (lib_size + 1.0)[None, :] * 1e6)
    Lm = np.asarray(L, dtype=float)
    Lm = Lm[:, None] if Lm.ndim == 1 else Lm
    # voomWithDreamWeights: the trend from unweighted LMM fits (residual SD, fitted values with BLUPs)
    if ddf == "adaptive":
        ddf = "kenward-roger" if n < 20 else "satterthwaite"
    first = fit_weighted_lmm(E, X, terms, None, Lm[:, 0], ddf="none")
    amean = E.mean(axis=1)
    sx = amean + np.mean(np.log2(lib_size + 1.0)) - np.log2(1e6)
    sy = np.sqrt(np.sqrt(first.sigma2))
    use = (counts.sum(axis=1) > 0) & np.isfinite(sy)
    xs, ys = lowess(sx[use], sy[use], f=span, iterations=3)
    fitted = np.where(np.isfinite(first.fitted), first.fitted, E)
    fitted_logcount = np.log2(1e-6 * 2.0**fitted * (lib_size + 1.0)[None, :])
    W = 1.0 / approx_rule2(xs, ys, fitted_logcount.ravel()).reshape(fitted_logcount.shape) ** 4
    res = fit_weighted_lmm(E, X, terms, W, Lm, ddf=ddf)
    m = Lm.shape[1]
    return LimmaResult(
        coef=res.coef * LN2,
        se=res.se * LN2,
        stat=res.stat,
        df=res.df,
        pvalue=res.pvalue,
        weights=W,
        s2_post=res.sigma2,
        df_prior=np.zeros(n_genes),
        ave_expr=amean,
        converged=res.converged & first.converged,
        df1=m,
        status=np.where(first.converged, res.status, "unweighted trend fit: " + first.status.astype(str)),
        var_components=res.var_components,
    )
