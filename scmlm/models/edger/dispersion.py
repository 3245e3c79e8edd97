"""edgeR's ``estimateDisp`` (GLM branch, ``trend.method = "locfit"``, ``robust = FALSE``) and ``aveLogCPM``.

Cox–Reid adjusted profile likelihood (APL) of every gene on a grid of 21 dispersions (``0.1 * 2^seq(-10, 10)``;
samples whose fitted value is zero are dropped from that gene's design); common dispersion maximises the summed APL;
the trend is a local-constant (tricube, nearest-neighbour span) locfit smooth of the APL curves against AveLogCPM,
evaluated as locfit does (fits at the vertices of its adaptive tree, linear interpolation in between); tagwise
dispersions maximise ``APL + prior.n * trend`` with ``prior.n`` from an empirical-Bayes squeeze of the deviances.
Curves are maximised through edgeR's cubic spline interpolant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import linalg, special

from ..ebayes import squeeze_var
from .glm import (
    GLMFit,
    _add_prior_count,
    _BlockState,
    _Design,
    _gene_blocks,
    _kernel_fit,
    _kernel_ok,
    _levenberg,
    _null_start,
    _per_gene,
    _xtwx,
    fit_nb_glm,
)
from .kernel import LOG_LOW_VALUE, LOW_VALUE, count_values, one_group_nb, table_row_sums

__all__ = ["DispersionResult", "ave_log_cpm", "estimate_disp"]


def _fit_one_group(Y: np.ndarray, lib: np.ndarray, phi: np.ndarray, maxit: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Batched one-parameter NB MLE ``log mu_gj = beta_g + log lib_j`` (edgeR's ``mglmOneGroup``: Newton from the
    mean count/library ratio, ``maxit`` 50, step tolerance 1e-10); -inf for all-zero rows. Compiled, gene by gene."""
    out = np.empty(Y.shape[0])
    one_group_nb(
        np.ascontiguousarray(Y, dtype=float),
        np.ascontiguousarray(lib, dtype=float),
        np.ascontiguousarray(phi, dtype=float),
        maxit,
        tol,
        out,
    )
    return out


def ave_log_cpm(
    counts: np.ndarray, lib_size: np.ndarray, *, dispersion: float | np.ndarray = 0.05, prior_count: float = 2.0
) -> np.ndarray:
    """edgeR's ``aveLogCPM``: log2 CPM of the one-group NB fit with library-size-scaled prior counts."""
    Y = np.asarray(counts, dtype=float)
    G, n = Y.shape
    lib = np.asarray(lib_size, dtype=float)
    Yp, off = _add_prior_count(Y, lib, prior_count)
    phi = _per_gene(dispersion, G, n)
    beta = _fit_one_group(Yp, np.exp(off), phi)
    return (beta + np.log(1e6)) / np.log(2)


def _lgamma_sums(Y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``sum_j lgamma(y_gj + r_k)`` for every gene ``g`` and every ``r_k`` (G × K), through a table of the count
    values: compiled passes over the counts for integer counts (the common case), else a sparse matrix with one entry
    per count (an unsorted CSR matrix; duplicates add up in the product)."""
    G, n = Y.shape
    r = np.asarray(r, dtype=float)
    Yc = np.ascontiguousarray(Y, dtype=float)
    present = count_values(Yc, float(1 << 22)) if Y.size else np.zeros(0, dtype=bool)
    if present.size:
        rowmap = np.cumsum(present) - 1
        table = special.gammaln(np.flatnonzero(present).astype(float)[:, None] + r[None, :])
        out = np.empty((G, r.size))
        table_row_sums(Yc, rowmap, table, out)
        return out
    uniq, inv = np.unique(Y, return_inverse=True)
    cols = np.asarray(inv).ravel()
    table = sp.csr_matrix((np.ones(G * n), cols, np.arange(0, G * n + 1, n)), shape=(G, uniq.size))
    return table @ special.gammaln(uniq[:, None] + r[None, :])


def _apl_block(
    Y, d: _Design, lib: np.ndarray, st: _BlockState, phi: float, lgamma_sum: np.ndarray, pre: tuple
) -> np.ndarray:
    """Cox–Reid adjusted profile log-likelihood of a fitted block (edgeR's ``compute_apl``, unit weights).

    With ``log(mu + r) = log r + log1p(phi mu)`` (``r = 1/phi``) the log-likelihood is
    ``sum y log mu - (sum y) log r - sum (y + r) log1p(phi mu) + sum lgamma(y + r) - sum lgamma(y + 1) - n lgamma(r)``,
    where ``sum y log mu = (YX) beta + y' log(lib)`` and the log1p sum is the fit's likelihood kernel;
    ``lgamma_sum`` holds ``sum lgamma(y + r) - sum lgamma(y + 1)`` per gene.
    """
    n = Y.shape[1]
    r = 1.0 / phi
    YX, y_loglib, y_sum = pre  # Y @ X, Y @ log(lib), row sums: fixed over the grid
    sum_ylogmu = np.einsum("gi,gi->g", YX, st.beta) + y_loglib
    loglik = sum_ylogmu - y_sum * np.log(r) - st.kern + lgamma_sum - n * special.gammaln(r)
    wt = st.mu / (1 + st.phimu)
    if d.p == 1:
        with np.errstate(divide="ignore"):
            adj = np.log(np.abs(wt @ (d.X[:, 0] ** 2))) / 2
    else:
        adj = _half_logdet_ldl(_xtwx(wt, d.XX, d.p))
    return loglik - adj


def _grid_kernel(
    Y: np.ndarray,
    d: _Design,
    lib: np.ndarray,
    disp: np.ndarray,
    lgamma_sum: np.ndarray,
    l0: np.ndarray,
    grid_coef: np.ndarray | None,
    rows: np.ndarray,
) -> np.ndarray:
    """APL of genes ``rows`` (counts ``Y``) on the dispersion grid with the compiled kernel, into ``l0[rows]`` (and
    the coefficients into ``grid_coef[rows]``), each fit starting from the previous one as in edgeR. Returns the
    (local) indices of genes left to the numpy path."""
    G, n = Y.shape
    beta0 = np.full((G, d.p), np.nan)  # edgeR's null start at the first dispersion
    ko = _kernel_fit(Y, d, lib, np.tile(disp, (G, 1)), beta0, chain=True, tol=1e-6, maxit=250, want_hld=True)
    ok = ~ko.bad
    hld = ko.hld
    redo = np.argwhere(np.isnan(hld) & ok[:, None])
    for g, k in redo:  # X'WX not positive definite: edgeR's LDL' pivots
        mu = lib * np.exp(d.X @ ko.beta[g, k])
        hld[g, k] = _half_logdet_ldl(_xtwx((mu / (1 + disp[k] * mu))[None, :], d.XX, d.p))[0]
    YX, y_loglib, y_sum = Y @ d.X, Y @ np.log(lib), Y.sum(axis=1)
    r = 1.0 / disp
    sum_ylogmu = np.einsum("gkp,gp->gk", ko.beta, YX) + y_loglib[:, None]
    loglik = sum_ylogmu - y_sum[:, None] * np.log(r) - ko.kern + lgamma_sum - n * special.gammaln(r)
    l0[rows[ok]] = (loglik - hld)[ok]
    if grid_coef is not None:
        grid_coef[rows[ok]] = ko.beta[ok]
    return np.flatnonzero(ko.bad)


def _half_logdet_ldl(A: np.ndarray) -> np.ndarray:
    """Half the log-determinant of stacked SPD matrices as edgeR computes it (LDL' pivots, floored at 1e-10).

    The diagonal of ``D`` in ``A = U D U'`` (no pivoting) is found by a batched Cholesky: ``D_kk = L_kk²``. For
    the positive-definite ``X'WX`` of full-rank designs this equals edgeR's Bunch–Kaufman ``dsytrf`` pivots up to
    pivoting order, hence the same determinant.
    """
    try:
        C = np.linalg.cholesky(A)
        d = np.diagonal(C, axis1=1, axis2=2) ** 2
    except np.linalg.LinAlgError:
        d = np.empty(A.shape[:2])
        for i in range(A.shape[0]):
            lu, dd, _ = linalg.ldl(A[i], lower=False)
            d[i] = np.diag(dd)
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.where((d < LOW_VALUE) | ~np.isfinite(d), LOG_LOW_VALUE, np.log(np.where(d > 0, d, 1.0)))
    return 0.5 * logd.sum(axis=1)


def _fmm_spline(x: np.ndarray, Y: np.ndarray):
    """Forsythe–Malcolm–Moler cubic spline coefficients (R's ``spline(method = "fmm")``) for each row of ``Y``.

    Returns ``b, c, d`` (rows × npts) with ``S(t) = y_i + b_i h + c_i h² + d_i h³`` on segment ``i``.
    """
    n = x.size
    G = Y.shape[0]
    b = np.zeros((G, n))
    c = np.zeros((G, n))
    d = np.zeros((G, n))
    if n < 3:
        t = (Y[:, 1] - Y[:, 0]) / (x[1] - x[0])
        b[:, 0] = b[:, 1] = t
        return b, c, d
    dx = np.diff(x)  # d[i] = x[i+1]-x[i], i = 0..n-2
    diag = np.empty(n)
    off = np.empty(n)  # off-diagonal d[i]
    off[: n - 1] = dx
    rhs = np.zeros((G, n))
    slope = np.diff(Y, axis=1) / dx  # (G, n-1): slope[i] = (y[i+1]-y[i])/dx[i]
    diag[1 : n - 1] = 2 * (dx[:-1] + dx[1:])
    rhs[:, 1 : n - 1] = slope[:, 1:] - slope[:, :-1]
    diag[0] = -dx[0]
    diag[n - 1] = -dx[n - 2]
    if n > 3:
        c1 = rhs[:, 2] / (x[3] - x[1]) - rhs[:, 1] / (x[2] - x[0])
        cn = rhs[:, n - 2] / (x[n - 1] - x[n - 3]) - rhs[:, n - 3] / (x[n - 2] - x[n - 4])
        rhs[:, 0] = c1 * dx[0] * dx[0] / (x[3] - x[0])
        rhs[:, n - 1] = -cn * dx[n - 2] * dx[n - 2] / (x[n - 1] - x[n - 4])
    else:
        rhs[:, 0] = rhs[:, n - 1] = 0.0
    bd = diag.copy()
    for i in range(1, n):
        t = off[i - 1] / bd[i - 1]
        bd[i] = bd[i] - t * off[i - 1]
        rhs[:, i] = rhs[:, i] - t * rhs[:, i - 1]
    sig = np.empty((G, n))
    sig[:, n - 1] = rhs[:, n - 1] / bd[n - 1]
    for i in range(n - 2, -1, -1):
        sig[:, i] = (rhs[:, i] - off[i] * sig[:, i + 1]) / bd[i]
    b[:, n - 1] = slope[:, n - 2] + dx[n - 2] * (sig[:, n - 2] + 2 * sig[:, n - 1])
    b[:, : n - 1] = slope - dx * (sig[:, 1:] + 2 * sig[:, :-1])
    d[:, : n - 1] = (sig[:, 1:] - sig[:, :-1]) / dx
    c = 3 * sig
    d[:, n - 1] = d[:, n - 2]
    return b, c, d


def _maximize_interpolant(x: np.ndarray, L: np.ndarray) -> np.ndarray:
    """edgeR's ``maximizeInterpolant``: argmax of the FMM spline through each row, searched next to the grid max."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    G, n = L.shape
    imax = np.argmax(L, axis=1)
    best = L[np.arange(G), imax]
    xmax = x[imax].astype(float)
    b, c, d = _fmm_spline(x, L)
    for side in (-1, 0):  # left segment (imax-1) then right segment (imax)
        seg = imax + side
        ok = (seg >= 0) & (seg <= n - 2)
        segc = np.clip(seg, 0, n - 2)
        rows = np.arange(G)
        ld, lc, lb = d[rows, segc], c[rows, segc], b[rows, segc]
        delta = lc * lc - 3 * ld * lb
        with np.errstate(invalid="ignore", divide="ignore"):
            sol = (-lc - np.sqrt(delta)) / (3 * ld)
            width = x[segc + 1] - x[segc]
            good = ok & (delta >= 0) & (sol > 0) & (sol < width)
            val = ((ld * sol + lc) * sol + lb) * sol + L[rows, segc]
        upd = good & (val > best)
        best = np.where(upd, val, best)
        xmax = np.where(upd, sol + x[segc], xmax)
    return xmax


def _nn_bandwidth(x: np.ndarray, at: np.ndarray, nn: int) -> np.ndarray:
    """locfit's nearest-neighbour bandwidth at points ``at``: distance to the ``nn``-th nearest value of ``x``."""
    dist = np.abs(x[None, :] - np.asarray(at, dtype=float)[:, None])
    if nn < x.size:
        return np.partition(dist, nn - 1, axis=1)[:, nn - 1]
    return dist.max(axis=1) * (nn / x.size)


def _atree_vertices(x: np.ndarray, nn: int, cut: float = 0.8) -> np.ndarray:
    """Vertices of locfit's default adaptive tree (``ev = rbox(cut = 0.8)``, 1-d).

    Starting from the data range, a cell is bisected while its width exceeds ``cut`` times the smaller
    nearest-neighbour bandwidth at its two ends.
    """
    lo, hi = float(x.min()), float(x.max())
    h = {lo: _nn_bandwidth(x, [lo], nn)[0], hi: _nn_bandwidth(x, [hi], nn)[0]}
    stack = [(lo, hi)]
    max_vertices = 10_000
    while stack and len(h) < max_vertices:
        a, b = stack.pop()
        ha, hb = h[a], h[b]
        hmin = min(v for v in (ha, hb) if v > 0) if (ha > 0 or hb > 0) else 0.0
        score = (b - a) / hmin if hmin > 0 else 2 * (b - a) / (hi - lo)
        if not cut < score:
            continue
        m = (a + b) / 2
        if m not in h:
            h[m] = _nn_bandwidth(x, [m], nn)[0]
        stack.append((a, m))
        stack.append((m, b))
    return np.array(sorted(h))


def _locfit_deg0(x: np.ndarray, Ymat: np.ndarray, span: float) -> np.ndarray:
    """``fitted(locfit(y ~ x, alpha = span, deg = 0))`` for every column of ``Ymat`` (edgeR's ``locfitByCol``).

    Local-constant tricube smoother with nearest-neighbour bandwidth (``floor(n * span)`` points), fitted at the
    vertices of locfit's adaptive tree and linearly interpolated to the data, as locfit's default evaluation does.
    """
    n = x.size
    if span * n < 2 or n <= 1:
        return Ymat.copy()
    nn = int(np.floor(n * span + 1e-10))
    verts = _atree_vertices(x, nn)
    dist = np.abs(x[None, :] - verts[:, None])  # V × n
    h = _nn_bandwidth(x, verts, nn)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = dist / h[:, None]
        wts = np.where(u < 1, (1 - u**3) ** 3, 0.0)
    vals = (wts @ Ymat) / wts.sum(axis=1)[:, None]  # V × K
    out = np.empty((n, Ymat.shape[1]))
    for k in range(Ymat.shape[1]):
        out[:, k] = np.interp(x, verts, vals[:, k])
    return out


def _wleb_span(n_tags: int) -> float:
    return 1.0 if n_tags <= 50 else 0.25 + 0.75 * (50 / n_tags) ** 0.5


def _combo_groups(mask: np.ndarray) -> list[np.ndarray]:
    """Genes grouped by identical rows of a boolean matrix (edgeR's ``.comboGroups``)."""
    G = mask.shape[0]
    if G == 0:
        return []
    if not mask.any() or mask.all():
        return [np.arange(G)]
    packed = np.ascontiguousarray(np.packbits(mask, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, inv = np.unique(keys, return_inverse=True)
    inv = np.asarray(inv).ravel()
    order = np.argsort(inv, kind="stable")
    bounds = np.flatnonzero(np.diff(inv[order])) + 1
    return np.split(order, bounds)


def _independent_columns(X: np.ndarray) -> np.ndarray:
    """Indices of a maximal set of linearly independent columns, kept in their original order (R's ``qr`` pivot)."""
    cols: list[int] = []
    for j in range(X.shape[1]):
        trial = X[:, [*cols, j]]
        if np.linalg.matrix_rank(trial, tol=1e-7 * max(1.0, np.abs(trial).max())) == len(cols) + 1:
            cols.append(j)
    return np.array(cols, dtype=int)


def _residual_df(zero: np.ndarray, X: np.ndarray) -> np.ndarray:
    """edgeR's ``.residDF``: residual df reduced by samples with zero fitted values."""
    G, n = zero.shape
    p = X.shape[1]
    nzero = zero.sum(axis=1)
    df = np.full(G, float(n - p))
    df[nzero == n] = 0
    some = (nzero > 0) & (nzero < n)
    if some.any():
        idx = np.flatnonzero(some)
        for grp in _combo_groups(zero[idx]):
            rows = idx[grp]
            z = zero[rows[0]]
            df[rows] = max(n - nzero[rows[0]] - np.linalg.matrix_rank(X[~z]), 0)
    return df


@dataclass(frozen=True)
class DispersionResult:
    """What :func:`estimate_disp` estimates: common, trended and tagwise dispersions and the empirical-Bayes prior."""

    common: float
    trended: np.ndarray
    tagwise: np.ndarray
    prior_df: float
    prior_n: float
    span: float
    ave_log_cpm: np.ndarray
    apl: np.ndarray
    """Genes × grid adjusted profile log-likelihoods (genes with row sum < ``min_row_sum`` have NaN)."""
    trended_fit: GLMFit | None = None
    """The NB GLM at the trended dispersions (all genes), when every gene passed ``min_row_sum``."""


def estimate_disp(
    counts: np.ndarray,
    X: np.ndarray,
    lib_size: np.ndarray,
    *,
    min_row_sum: float = 5,
    grid_length: int = 21,
    grid_range: tuple[float, float] = (-10, 10),
) -> DispersionResult:
    """edgeR's ``estimateDisp`` (GLM branch, ``trend.method = "locfit"``, ``robust = FALSE``).

    ``lib_size`` are the effective library sizes (``lib.size * norm.factors``); the offsets are their logs.
    """
    Y = np.asarray(counts, dtype=float)
    G, n = Y.shape
    X = np.asarray(X, dtype=float)
    p = X.shape[1]
    lib = np.asarray(lib_size, dtype=float)
    offset = np.log(lib)
    if p >= n:
        nan = np.full(G, np.nan)
        return DispersionResult(np.nan, nan, nan, np.nan, np.nan, np.nan, nan, np.full((G, grid_length), np.nan), None)
    sel = Y.sum(axis=1) >= min_row_sum
    Ys = Y if sel.all() else Y[sel]
    Gs = Ys.shape[0]
    spline_pts = np.linspace(grid_range[0], grid_range[1], grid_length)
    spline_disp = 0.1 * 2.0**spline_pts
    l0 = np.zeros((Gs, grid_length))

    # samples whose fitted value is zero (edgeR fits at dispersion 0.05); only genes with a zero count can have them
    grid_coef = np.zeros((Gs, grid_length, p))
    has_grid_coef = np.zeros(Gs, dtype=bool)
    zerofit = np.zeros(Ys.shape, dtype=bool)
    has_zero = np.flatnonzero(np.any(Ys < 1e-4, axis=1))
    if has_zero.size:
        fit0 = fit_nb_glm(Ys[has_zero], X, offset, 0.05, deviance=False)
        zerofit[has_zero] = (Ys[has_zero] < 1e-4) & (fit0.mu < 1e-4)
    for grp in _combo_groups(zerofit):
        nz = ~zerofit[grp[0]]
        if not nz.any():
            continue
        full = bool(nz.all())
        if full:
            Xr = X
        else:
            Xr = X[nz][:, _independent_columns(X[nz])]
            if Xr.shape[0] == Xr.shape[1]:
                continue
        d = _Design(Xr)
        lib_r = lib[nz]
        ones = np.ones((1, 1))
        ygrp = Ys if (full and grp.size == Gs) else Ys[np.ix_(grp, np.flatnonzero(nz))]
        lg = _lgamma_sums(ygrp, np.concatenate([1.0 / spline_disp, [1.0]]))
        lg = lg[:, :-1] - lg[:, -1:]
        numpy_rows = np.arange(grp.size)
        if _kernel_ok(d, None, None, ones):
            numpy_rows = _grid_kernel(ygrp, d, lib_r, spline_disp, lg, l0, grid_coef if full else None, grp)
        for blk in _gene_blocks(numpy_rows.size, int(nz.sum())):
            rows = grp[numpy_rows[blk]]
            yb = ygrp[numpy_rows[blk]]
            beta = _null_start(yb, d, lib_r, None, spline_disp[0] * ones, None)
            mu0 = None
            pre = (yb @ d.X, yb @ np.log(lib_r), yb.sum(axis=1))
            for i, disp in enumerate(spline_disp):
                st = _levenberg(
                    yb, d, lib_r, None, np.full((rows.size, 1), disp), None, beta.copy(), tol=1e-6, maxit=250,
                    mu0=mu0, YX=pre[0],
                )  # fmt: skip
                l0[rows, i] = _apl_block(yb, d, lib_r, st, disp, lg[numpy_rows[blk], i], pre)
                beta, mu0 = st.beta, st.mu
                if full:
                    grid_coef[rows, i] = st.beta
        if full:
            has_grid_coef[grp] = True

    overall = _maximize_interpolant(spline_pts, l0.sum(axis=0)[None, :])[0]
    common = float(0.1 * 2.0**overall)

    alc = ave_log_cpm(Y, lib, dispersion=common)
    span = _wleb_span(Gs)
    m0 = _locfit_deg0(alc[sel], l0, span)
    disp_trend = 0.1 * 2.0 ** _maximize_interpolant(spline_pts, m0)
    trended = np.full(G, disp_trend[np.argmin(alc[sel])] if Gs else np.nan)
    trended[sel] = disp_trend

    # start from the grid fit at the nearest dispersion (the deviance converges quadratically, so this matches
    # edgeR's null-start fit to far below its tolerance)
    nearest = np.argmin(np.abs(np.log(disp_trend)[:, None] - np.log(spline_disp)[None, :]), axis=1)
    start = np.where(has_grid_coef[:, None], grid_coef[np.arange(Gs), nearest], np.nan)
    fit = fit_nb_glm(Ys, X, offset, disp_trend, start=start)
    zf = (Ys < 1e-4) & (fit.mu < 1e-4)
    df_res = _residual_df(zf, X)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = fit.deviance / df_res
    s2[df_res == 0] = 0
    s2 = np.maximum(s2, 0)
    df_prior_v, _, _ = squeeze_var(s2, df_res, covariate=alc[sel])
    prior_df = float(df_prior_v[0])
    prior_n = prior_df / (n - p)

    tagwise = trended.copy()
    if prior_n <= 1e6:
        indiv = _maximize_interpolant(spline_pts, l0 + prior_n * m0)
        tagwise[sel] = 0.1 * 2.0**indiv
    apl = np.full((G, grid_length), np.nan)
    apl[sel] = l0
    return DispersionResult(common, trended, tagwise, prior_df, prior_n, span, alc, apl, fit if sel.all() else None)
