"""Precision-weighted linear mixed models (REML) with Satterthwaite degrees of freedom, and dream.

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

``dream`` follows variancePartition: ``voomWithDreamWeights`` (voom, with the mean–variance trend taken from
unweighted LMM fits: residual SD and fitted values including the BLUPs), then a precision-weighted LMM per gene
(REML) with Satterthwaite df. variancePartition's ``ddf = "adaptive"`` default would use Kenward–Roger below 20
samples; that is not implemented here. No empirical-Bayes moderation is applied (``dream`` without ``eBayes``).

A gene never raises: numerical failures are reported in ``status`` with NaN statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, optimize, stats

from scmlm.models._random import RandomTerm, build_Z, n_theta, term_slices

__all__ = ["LMMResult", "dream", "fit_weighted_lmm"]

LN2 = float(np.log(2.0))


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


def _satterthwaite(y, X, Z, w, terms, sigma2, Sigmas, Lm):
    """Satterthwaite df for each column of ``Lm`` (after rotation for F tests) and ``C = Var(beta)``."""
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


def _fit_gene(y, X, Z, w, terms, lmap: _LambdaMap, Lm):
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
    C, A, dC, _ = _satterthwaite(y, X, Z, w, terms, sigma2, Sigmas, Lm)
    est, se, stat, df, pval = _contrast_tests(beta, C, A, dC, Lm)
    return {
        "beta": beta, "C": C, "sigma2": sigma2, "Sigmas": Sigmas, "theta": theta, "dev": dev, "fitted": fitted,
        "est": est, "se": se, "stat": stat, "df": df, "pval": pval, "ok": ok,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------


def fit_weighted_lmm(
    y: np.ndarray,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...],
    weights: np.ndarray | None,
    L: np.ndarray,
) -> LMMResult:
    """Precision-weighted LMM (REML) per gene, with a Satterthwaite test of ``L'beta``.

    Parameters
    ----------
    y
        One gene (length n) or genes × n responses.
    X
        n × p fixed-effect design (full column rank).
    terms
        Random-effect terms (:class:`~scmlm.models._random.RandomTerm`).
    weights
        Precision weights ``w`` (``Var(e_i) = sigma² / w_i``): None (all 1), length n, or genes × n.
    L
        Contrast: length-p vector or p × m matrix.

    Returns
    -------
    LMMResult (gene axis first even for one gene).

    Examples
    --------
    >>> from scmlm.models._random import intercept_term
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(np.arange(6), 4)
    >>> X = np.column_stack([np.ones(24), groups % 2])
    >>> y = X @ [1.0, 0.5] + rng.normal(0, 1, 6)[groups] + rng.normal(0, 0.5, 24)
    >>> res = fit_weighted_lmm(y, X, (intercept_term("donor", groups),), None, np.array([0.0, 1.0]))
    >>> float(np.round(res.df[0], 3))
    4.0
    """
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
    for i in range(G):
        wi = W[i]
        if not (np.all(np.isfinite(Y[i])) and np.all(np.isfinite(wi)) and np.all(wi > 0)):
            status[i] = "non-finite response or non-positive weight"
            continue
        try:
            with np.errstate(all="ignore"):
                r = _fit_gene(Y[i], X, Z, wi, terms, lmap, Lm)
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
        ok = r["ok"] and np.isfinite(r["df"]) and np.isfinite(r["pval"])
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
):
    """variancePartition's ``voomWithDreamWeights`` + ``dream`` (REML, Satterthwaite df, no eBayes).

    Returns a :class:`scmlm.models._limma.LimmaResult` with coefficients and SEs on the natural-log scale.
    """
    from scmlm.models._limma import LimmaResult, _approx_rule2, lowess

    counts = np.asarray(counts, dtype=float)
    n_genes, n = counts.shape
    E = np.log2((counts + 0.5) / (lib_size + 1.0)[None, :] * 1e6)
    Lm = np.asarray(L, dtype=float)
    Lm = Lm[:, None] if Lm.ndim == 1 else Lm
    # voomWithDreamWeights: the trend from unweighted LMM fits (residual SD, fitted values with BLUPs)
    first = fit_weighted_lmm(E, X, terms, None, Lm[:, 0])
    amean = E.mean(axis=1)
    sx = amean + np.mean(np.log2(lib_size + 1.0)) - np.log2(1e6)
    sy = np.sqrt(np.sqrt(first.sigma2))
    use = (counts.sum(axis=1) > 0) & np.isfinite(sy)
    xs, ys = lowess(sx[use], sy[use], f=span, iterations=3)
    fitted = np.where(np.isfinite(first.fitted), first.fitted, E)
    fitted_logcount = np.log2(1e-6 * 2.0**fitted * (lib_size + 1.0)[None, :])
    W = 1.0 / _approx_rule2(xs, ys, fitted_logcount.ravel()).reshape(fitted_logcount.shape) ** 4
    res = fit_weighted_lmm(E, X, terms, W, Lm)
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
