"""limma's empirical-Bayes pieces, shared by edgeR's QL fit, limma-voom, dream and the moderated GLMM tests.

Defined here once, on ndarrays:

* :func:`lowess` — R's ``stats::lowess`` (Cleveland's algorithm as in R's ``clowess``: ``delta`` skipping, tricube
  weights, three bisquare robustness iterations), and :func:`approx_rule2`, R's ``approx(rule = 2)`` (voom's trend
  lookup, the robust scale of genes left out of a fit).
* :func:`trigamma_inverse`, :func:`fit_f_dist` (limma's ``fitFDist``: moment estimation of a scaled F prior on the
  log scale, optionally with a natural-spline trend in a covariate) and :func:`fit_f_dist_robustly`
  (``fitFDistRobustly``: Winsorized moments, by 128-point Gauss–Legendre quadrature, and per-gene outlier-shrunken
  prior degrees of freedom).
* :func:`squeeze_var` — limma's ``squeezeVar``: empirical-Bayes posterior variances.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "approx_rule2",
    "fit_f_dist",
    "fit_f_dist_robustly",
    "lowess",
    "squeeze_var",
    "trigamma_inverse",
]

# ---------------------------------------------------------------------------------------------------------------------
# lowess (R's clowess)
# ---------------------------------------------------------------------------------------------------------------------


def _lowest(x, y, n, xs, nleft, nright, userw, rw):
    """One local linear fit at ``xs`` from the window ``nleft..nright`` (0-based, inclusive); R's ``lowest``."""
    rng = x[n - 1] - x[0]
    h = max(xs - x[nleft], x[nright] - xs)
    h9 = 0.999 * h
    h1 = 0.001 * h
    # weights from nleft rightwards: all points within h9, ties on the right included (R loops until
    # |x - xs| > h9 with x > xs; x is sorted, so that is the first x beyond xs + h9)
    j_end = max(nleft, int(np.searchsorted(x, xs + h9, side="right")))
    xx = x[nleft:j_end]
    r = np.abs(xx - xs)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(r <= h1, 1.0, (1.0 - (r / h) ** 3) ** 3) if h > 0 else np.ones_like(r)
    w = np.where(r <= h9, w, 0.0)
    if userw:
        w = w * rw[nleft:j_end]
    a = w.sum()
    if a <= 0.0:
        return 0.0, False
    w = w / a
    if h > 0.0:
        a = np.sum(w * xx)
        b = xs - a
        c = np.sum(w * (xx - a) ** 2)
        if np.sqrt(c) > 0.001 * rng:
            b = b / c
            w = w * (b * (xx - a) + 1.0)
    return float(np.sum(w * y[nleft:j_end])), True


def _clowess(x: np.ndarray, y: np.ndarray, f: float, nsteps: int, delta: float) -> np.ndarray:
    n = x.size
    ys = np.empty(n)
    if n < 2:
        ys[:] = y
        return ys
    ns = max(2, min(n, int(f * n + 1e-7)))
    rw = np.ones(n)
    it = 1
    while it <= nsteps + 1:
        nleft = 0
        nright = ns - 1
        last = -1
        i = 0
        while True:
            if nright < n - 1:
                d1 = x[i] - x[nleft]
                d2 = x[nright + 1] - x[i]
                if d1 > d2:
                    nleft += 1
                    nright += 1
                    continue
            val, ok = _lowest(x, y, n, x[i], nleft, nright, it > 1, rw)
            ys[i] = val if ok else y[i]
            if last < i - 1:
                if last < 0:  # cannot happen: the first point is always fitted
                    ys[:i] = ys[i]
                else:
                    denom = x[i] - x[last]
                    alpha = (x[last + 1 : i] - x[last]) / denom
                    ys[last + 1 : i] = alpha * ys[i] + (1.0 - alpha) * ys[last]
            last = i
            cut = x[last] + delta
            i = last + 1
            while i < n:
                if x[i] > cut:
                    break
                if x[i] == x[last]:
                    ys[i] = ys[last]
                    last = i
                i += 1
            i = max(last + 1, i - 1)
            if last >= n - 1:
                break
        res = y - ys
        sc = np.mean(np.abs(res))
        if it > nsteps:
            break
        ar = np.abs(res)
        m1 = n // 2
        srt = np.partition(ar, [m1, n - m1 - 1]) if n % 2 == 0 else np.partition(ar, m1)
        cmad = 3.0 * (srt[m1] + srt[n - m1 - 1]) if n % 2 == 0 else 6.0 * srt[m1]
        if cmad < 1e-7 * sc:
            break
        c9 = 0.999 * cmad
        c1 = 0.001 * cmad
        rw = np.where(ar <= c1, 1.0, np.where(ar <= c9, (1.0 - (ar / cmad) ** 2) ** 2, 0.0))
        it += 1
    return ys


def lowess(x: np.ndarray, y: np.ndarray, f: float = 2 / 3, iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """R's ``lowess(x, y, f, iter)``: returns ``(x sorted, fitted values in that order)``.

    ``delta`` is R's default, 1% of the range of ``x``.

    Examples
    --------
    >>> xs, fit = lowess(np.arange(10.0), np.arange(10.0) ** 2, f=0.5)
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    delta = 0.01 * (x.max() - x.min()) if x.size else 0.0
    o = np.argsort(x, kind="stable")
    xs = x[o]
    return xs, _clowess(xs, y[o], f, iterations, delta)


def _loess_fit_unweighted(y: np.ndarray, x: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
    """limma's ``loessFit(y, x, span)`` without weights (lowess with 3 robustness iterations); fitted, residuals."""
    n = y.size
    if span < 1.0 / n:
        return y.copy(), np.zeros(n)
    o = np.argsort(x, kind="stable")
    _, fit_sorted = lowess(x, y, f=span, iterations=3)
    fitted = np.empty(n)
    fitted[o] = fit_sorted
    return fitted, y - fitted


def approx_rule2(x: np.ndarray, y: np.ndarray, xout: np.ndarray) -> np.ndarray:
    """R's ``approx(x, y, xout, rule = 2, ties = mean)``: linear interpolation, constant outside."""
    ux, inv = np.unique(x, return_inverse=True)
    uy = np.bincount(inv, weights=y) / np.bincount(inv)
    if ux.size == 1:
        return np.full(np.shape(xout), uy[0])
    return np.interp(xout, ux, uy)


# ---------------------------------------------------------------------------------------------------------------------
# Empirical Bayes: fitFDist, fitFDistRobustly, squeezeVar
# ---------------------------------------------------------------------------------------------------------------------


def trigamma_inverse(x: np.ndarray) -> np.ndarray:
    """limma's ``trigammaInverse``: solve ``trigamma(y) = x`` by Newton's method (Smyth 2004)."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    out = np.full_like(x, np.nan)
    big = x > 1e7
    small = x < 1e-6
    out[big] = 1.0 / np.sqrt(x[big])
    out[small] = 1.0 / x[small]
    mid = ~big & ~small & (x >= 0)
    if mid.any():
        xm = x[mid]
        yv = 0.5 + 1.0 / xm
        for _ in range(51):
            tri = special.polygamma(1, yv)
            dif = tri * (1.0 - tri / xm) / special.polygamma(2, yv)
            yv = yv + dif
            if np.max(-dif / yv) < 1e-8:
                break
        out[mid] = yv
    return out


def _ns_basis(x: np.ndarray, df: int) -> tuple[np.ndarray, callable]:
    """A basis of the natural cubic splines that ``splines::ns(x, df, intercept = TRUE)`` spans.

    Boundary knots at the range of ``x``, ``df - 2`` interior knots at equally spaced quantiles (R type 7). Returns
    the basis at ``x`` and a function evaluating it elsewhere (linear beyond the boundary knots, as ``ns`` does).
    Fitted values of a least-squares fit do not depend on which basis of the space is used.
    """
    lo, hi = float(np.min(x)), float(np.max(x))
    scale = hi - lo if hi > lo else 1.0
    n_int = df - 2
    probs = np.linspace(0.0, 1.0, n_int + 2)[1:-1]
    interior = np.quantile(x, probs) if n_int > 0 else np.empty(0)
    knots = (np.concatenate([[lo], interior, [hi]]) - lo) / scale

    def basis(xn: np.ndarray) -> np.ndarray:
        t = (np.asarray(xn, dtype=float) - lo) / scale
        cols = [np.ones_like(t), t]
        kk = knots.size
        if kk > 2:

            def dk(k):
                return (np.clip(t - knots[k], 0, None) ** 3 - np.clip(t - knots[-1], 0, None) ** 3) / (
                    knots[-1] - knots[k]
                )

            dlast = dk(kk - 2)
            for k in range(kk - 2):
                cols.append(dk(k) - dlast)
        return np.column_stack(cols)

    return basis(x), basis


def fit_f_dist(x: np.ndarray, df1: np.ndarray | float, covariate: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """limma's ``fitFDist``: moment estimates of the scale and denominator df of a scaled F distribution.

    ``x`` are variances on ``df1`` degrees of freedom; with ``covariate`` the log-scale prior follows a natural
    spline in it. Returns ``(scale, df2)``; ``scale`` is a scalar without covariate, else one value per gene.
    """
    x = np.asarray(x, dtype=float)
    n = x.size
    if n == 0:
        return np.nan, np.nan
    if n == 1:
        return x.copy() if covariate is not None else float(x[0]), 0.0
    df1 = np.broadcast_to(np.asarray(df1, dtype=float), (n,)).copy()
    ok = np.isfinite(df1) & (df1 > 1e-15)
    if covariate is not None:
        covariate = np.asarray(covariate, dtype=float).copy()
        isfin = np.isfinite(covariate)
        if not isfin.all():
            if isfin.any():
                r0, r1 = covariate[isfin].min(), covariate[isfin].max()
                covariate[covariate == -np.inf] = r0 - 1
                covariate[covariate == np.inf] = r1 + 1
            else:
                covariate = np.sign(covariate)
    ok = ok & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok == 1:
        return x[ok][0], 0.0
    notallok = nok < n
    xo, d1 = x[ok], df1[ok]
    splinedf = 1
    if covariate is not None:
        cov_ok = covariate[ok]
        splinedf = 1 + (nok >= 3) + (nok >= 6) + (nok >= 30)
        splinedf = min(splinedf, np.unique(cov_ok).size)
        if splinedf < 2:
            scale, df2 = fit_f_dist(xo, d1)
            return np.full(n, scale), df2
    xo = np.maximum(xo, 0.0)
    m = np.median(xo)
    if m == 0:
        m = 1.0
    xo = np.maximum(xo, 1e-5 * m)
    z = np.log(xo)
    e = z - special.digamma(d1 / 2) + np.log(d1 / 2)
    if covariate is None:
        emean = float(np.mean(e))
        evar = float(np.sum((e - emean) ** 2) / (nok - 1))
    else:
        B, basis = _ns_basis(cov_ok, splinedf)
        coef, _, rank, _ = np.linalg.lstsq(B, e, rcond=None)
        fitted = B @ coef
        evar = float(np.sum((e - fitted) ** 2) / (nok - rank))
        if notallok:
            emean = np.empty(n)
            emean[ok] = fitted
            emean[~ok] = basis(covariate[~ok]) @ coef
        else:
            emean = fitted
    evar = evar - float(np.mean(special.polygamma(1, d1 / 2)))
    if evar > 0:
        df2 = float(2 * trigamma_inverse(np.array([evar]))[0])
        s20 = np.exp(emean + special.digamma(df2 / 2) - np.log(df2 / 2))
    else:
        df2 = np.inf
        s20 = float(np.mean(xo)) if covariate is None else np.exp(emean)
    return s20, df2


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(128)
_GL_NODES = (_GL_NODES + 1.0) / 2.0  # Gauss-Legendre on [0, 1], as statmod::gauss.quad.prob(128, "uniform")
_GL_WEIGHTS = _GL_WEIGHTS / 2.0


def _winsorized_moments(df1: float, df2: float, winsor_tail_p: np.ndarray) -> tuple[float, float]:
    """Mean and variance of the Winsorized log F(df1, df2) distribution (limma's ``winsorizedMoments``)."""
    fq = (
        stats.f.ppf([winsor_tail_p[0], 1 - winsor_tail_p[1]], df1, df2)
        if np.isfinite(df2)
        else (stats.chi2.ppf([winsor_tail_p[0], 1 - winsor_tail_p[1]], df1) / df1)
    )
    zq = np.log(fq)
    q = fq / (1 + fq)
    nodes = q[0] + (q[1] - q[0]) * _GL_NODES
    fnodes = nodes / (1 - nodes)
    znodes = np.log(fnodes)
    dens = stats.f.pdf(fnodes, df1, df2) if np.isfinite(df2) else stats.chi2.pdf(fnodes * df1, df1) * df1
    f = dens / (1 - nodes) ** 2
    q21 = q[1] - q[0]
    m = q21 * np.sum(_GL_WEIGHTS * f * znodes) + np.sum(zq * winsor_tail_p)
    v = q21 * np.sum(_GL_WEIGHTS * f * (znodes - m) ** 2) + np.sum((zq - m) ** 2 * winsor_tail_p)
    return float(m), float(v)


def _rank_average(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


class _f_dist:
    """F(df1, df2) tail functions that also take ``df2 = inf`` (the chi-square limit ``chi2(df1) / df1``, as R's
    ``pf``/``qf`` do; scipy's F distribution returns NaN there)."""

    def __init__(self, df2: float):
        self.df2 = float(df2)
        self.inf = not np.isfinite(self.df2)

    def logsf(self, x, df1):
        return stats.chi2.logsf(x * df1, df1) if self.inf else stats.f.logsf(x, df1, self.df2)

    def logcdf(self, x, df1):
        return stats.chi2.logcdf(x * df1, df1) if self.inf else stats.f.logcdf(x, df1, self.df2)

    def isf(self, q, df1):
        return stats.chi2.isf(q, df1) / df1 if self.inf else stats.f.isf(q, df1, self.df2)

    def ppf(self, q, df1):
        return stats.chi2.ppf(q, df1) / df1 if self.inf else stats.f.ppf(q, df1, self.df2)


def fit_f_dist_robustly(
    x: np.ndarray,
    df1: np.ndarray | float,
    covariate: np.ndarray | None = None,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
) -> tuple[np.ndarray, float, np.ndarray]:
    """limma's ``fitFDistRobustly`` (Phipson et al. 2016). Returns ``(scale, df2, df2_shrunk)``."""
    x = np.asarray(x, dtype=float)
    n = x.size
    if n < 2:
        return np.full(n, np.nan), np.nan, np.full(n, np.nan)
    if n == 2:
        scale, df2 = fit_f_dist(x, df1, covariate)
        return scale, df2, np.full(n, df2)
    df1 = np.broadcast_to(np.asarray(df1, dtype=float), (n,)).copy()
    cov = None if covariate is None else np.asarray(covariate, dtype=float)
    ok = ~np.isnan(x) & np.isfinite(df1) & (df1 > 1e-6)
    if not ok.all():
        scale_ok, df2, shrunk_ok = fit_f_dist_robustly(x[ok], df1[ok], None if cov is None else cov[ok], winsor_tail_p)
        shrunk = x.copy()
        shrunk[ok] = shrunk_ok
        shrunk[~ok] = df2
        if cov is None:
            scale = scale_ok
        else:
            scale = x.copy()
            scale[ok] = scale_ok
            scale[~ok] = np.exp(approx_rule2(cov[ok], np.log(scale_ok), cov[~ok]))
        return scale, df2, shrunk
    m = np.median(x)
    if m <= 0:
        raise ValueError("Variances are mostly <= 0")
    x = np.where(x < m * 1e-12, m * 1e-12, x)
    nr_scale, nr_df2 = fit_f_dist(x, df1, cov)
    wtp = np.resize(np.asarray(winsor_tail_p, dtype=float), 2)
    prob = np.array([wtp[0], 1 - wtp[1]])
    if np.all(wtp < 1.0 / n):
        return nr_scale, nr_df2, np.full(n, nr_df2)
    df1max = df1.max()
    i = df1 < df1max - 1e-14
    if i.any():
        s = nr_scale if cov is None else np.asarray(nr_scale)[i]
        fv = x[i] / s
        pupper = _f_dist(nr_df2).logsf(fv, df1[i])
        plower = _f_dist(nr_df2).logcdf(fv, df1[i])
        up = pupper < plower
        fnew = np.empty_like(fv)
        fnew[up] = _f_dist(nr_df2).isf(np.exp(pupper[up]), df1max)
        fnew[~up] = _f_dist(nr_df2).ppf(np.exp(plower[~up]), df1max)
        x = x.copy()
        x[i] = fnew * s
    d1 = float(df1max)
    z = np.log(x)
    if cov is None:
        ztrend = stats.trim_mean(z, wtp[1])
        zresid = z - ztrend
    else:
        ztrend, zresid = _loess_fit_unweighted(z, cov, span=0.4)
    zrq = np.quantile(zresid, prob)
    zwins = np.clip(zresid, zrq[0], zrq[1])
    zwmean = np.mean(zwins)
    zwvar = np.mean((zwins - zwmean) ** 2) * n / (n - 1)

    mom_inf = _winsorized_moments(d1, np.inf, wtp)
    funval_inf = np.log(zwvar / mom_inf[1])
    if funval_inf <= 0:
        df2 = np.inf
        ztc = ztrend + zwmean - mom_inf[0]
        s20 = np.exp(ztc)
        fstat = np.exp(z - ztc)
        tail_p = stats.chi2.sf(fstat * d1, d1)
        r = _rank_average(fstat)
        emp = (n - r + 0.5) / n
        prob_not_outlier = np.minimum(tail_p / emp, 1.0)
        shrunk = np.full(n, df2)
        o_mask = prob_not_outlier < 1
        if o_mask.any():
            shrunk[o_mask] = prob_not_outlier[o_mask] * n * d1
            o = np.argsort(tail_p, kind="stable")
            shrunk[o] = np.maximum.accumulate(shrunk[o])
        return s20, df2, shrunk

    def fun(xx):
        if xx >= 1.0:
            return funval_inf
        return np.log(zwvar / _winsorized_moments(d1, xx / (1 - xx), wtp)[1])

    if nr_df2 == np.inf:
        return nr_scale, nr_df2, np.full(n, nr_df2)
    rbx = nr_df2 / (1 + nr_df2)
    funval_low = fun(rbx)
    if funval_low >= 0:
        df2 = nr_df2
    else:
        root = optimize.brentq(fun, rbx, 1.0, xtol=1e-12)
        df2 = root / (1 - root) if root < 1.0 else np.inf
    mom = _winsorized_moments(d1, df2, wtp)
    ztc = ztrend + zwmean - mom[0]
    s20 = np.exp(ztc)
    fstat = np.exp(z - ztc)
    log_tail_p = stats.f.logsf(fstat, d1, df2)
    r = _rank_average(fstat)
    log_emp = np.log(n - r + 0.5) - np.log(n)
    log_pno = np.minimum(log_tail_p - log_emp, 0.0)
    pno = np.exp(log_pno)
    pout = -np.expm1(log_pno)
    if np.any(log_pno < 0):
        min_ltp = log_tail_p.min()
        if min_ltp == -np.inf:
            shrunk = pno * df2
        else:
            df2_out = np.log(0.5) / min_ltp * df2
            new_ltp = stats.f.logsf(fstat.max(), d1, df2_out)
            df2_out = np.log(0.5) / new_ltp * df2_out
            shrunk = pno * df2 + pout * df2_out
        o = np.argsort(log_tail_p, kind="stable")
        ordered = shrunk[o]
        mm = np.cumsum(ordered) / np.arange(1, n + 1)
        imin = int(np.argmin(mm))
        ordered[: imin + 1] = mm[imin]
        shrunk = np.empty(n)
        shrunk[o] = np.maximum.accumulate(ordered)
    else:
        shrunk = np.full(n, df2)
    return s20, df2, shrunk


def squeeze_var(
    var: np.ndarray,
    df: np.ndarray | float,
    covariate: np.ndarray | None = None,
    *,
    robust: bool = False,
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """limma's ``squeezeVar``: empirical-Bayes posterior variances.

    Returns ``(df_prior, var_prior, var_post)``, each broadcast to one value per gene.
    """
    var = np.asarray(var, dtype=float).copy()
    n = var.size
    df_arr = np.broadcast_to(np.asarray(df, dtype=float), (n,))
    if n == 1:
        return np.zeros(1), var.copy(), var.copy()
    if np.ndim(df) > 0:
        var[df_arr == 0] = 0
    if robust:
        scale, _, df_prior = fit_f_dist_robustly(var, df_arr, covariate, winsor_tail_p)
    else:
        scale, df2 = fit_f_dist(var, df_arr, covariate)
        df_prior = np.full(n, df2)
    df_prior = np.broadcast_to(np.asarray(df_prior, dtype=float), (n,)).copy()
    var_prior = np.broadcast_to(np.asarray(scale, dtype=float), (n,)).copy()
    if np.any(np.isnan(df_prior)):
        raise ValueError("Could not estimate prior df")
    var_post = var_prior.copy()
    fin = np.isfinite(df_prior)
    var_post[fin] = (df_arr[fin] * var[fin] + df_prior[fin] * var_prior[fin]) / (df_arr[fin] + df_prior[fin])
    return df_prior, var_prior, var_post
