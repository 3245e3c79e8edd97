"""edgeR's TMM normalisation factors (``calcNormFactors(method = "TMM")``).

The reference column is chosen by upper quartile; each factor is the trimmed, precision-weighted mean of the M values
against it; factors are scaled to geometric mean 1, as edgeR 3.40.
"""

from __future__ import annotations

import numpy as np

__all__ = ["tmm_factors"]


def _average_rank(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (R's ``rank``, scipy's ``rankdata(method="average")``), for a 1-d array."""
    n = a.size
    o = np.argsort(a)
    srt = a[o]
    flag = np.empty(n + 1, dtype=bool)
    flag[0] = flag[-1] = True
    np.not_equal(srt[1:], srt[:-1], out=flag[1:-1])
    idx = np.flatnonzero(flag)
    out = np.empty(n)
    out[o] = np.repeat((idx[:-1] + idx[1:] + 1) / 2, np.diff(idx))
    return out


def _tmm_one(obs, ref, n_obs, n_ref, logratio_trim, sum_trim, do_weighting, a_cutoff) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.log2((obs / n_obs) / (ref / n_ref))
        abs_e = (np.log2(obs / n_obs) + np.log2(ref / n_ref)) / 2
        v = (n_obs - obs) / n_obs / obs + (n_ref - ref) / n_ref / ref
    fin = np.isfinite(log_r) & np.isfinite(abs_e) & (abs_e > a_cutoff)
    log_r, abs_e, v = log_r[fin], abs_e[fin], v[fin]
    if log_r.size == 0 or np.max(np.abs(log_r)) < 1e-6:
        return 1.0
    n = log_r.size
    lo_l = np.floor(n * logratio_trim) + 1
    hi_l = n + 1 - lo_l
    lo_s = np.floor(n * sum_trim) + 1
    hi_s = n + 1 - lo_s
    rk_r = _average_rank(log_r)
    rk_e = _average_rank(abs_e)
    keep = (rk_r >= lo_l) & (rk_r <= hi_l) & (rk_e >= lo_s) & (rk_e <= hi_s)
    if do_weighting:
        f = np.nansum(log_r[keep] / v[keep]) / np.nansum(1 / v[keep])
    else:
        f = np.nanmean(log_r[keep]) if keep.any() else np.nan
    if np.isnan(f):
        f = 0.0
    return float(2.0**f)


def tmm_factors(
    counts: np.ndarray,
    lib_size: np.ndarray | None = None,
    *,
    ref_column: int | None = None,
    logratio_trim: float = 0.3,
    sum_trim: float = 0.05,
    do_weighting: bool = True,
    a_cutoff: float = -1e10,
) -> np.ndarray:
    """TMM normalisation factors, as edgeR's ``calcNormFactors(method = "TMM")``.

    The effective library size of sample ``j`` is ``lib_size[j] * factor[j]``; factors have geometric mean 1.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> f = tmm_factors(rng.poisson(20, size=(200, 4)))
    >>> bool(np.isclose(np.exp(np.mean(np.log(f))), 1.0))
    True
    """
    x = np.asarray(counts, dtype=float)
    n_samples = x.shape[1]
    lib = x.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=float)
    x = x[np.sum(x > 0, axis=1) > 0]
    if x.shape[0] == 0 or n_samples == 1:
        return np.ones(n_samples)
    if ref_column is None:
        f75 = np.quantile(x, 0.75, axis=0) / lib
        if np.median(f75) < 1e-20:
            ref_column = int(np.argmax(np.sum(np.sqrt(x), axis=0)))
        else:
            ref_column = int(np.argmin(np.abs(f75 - np.mean(f75))))
    f = np.array(
        [
            _tmm_one(
                x[:, i], x[:, ref_column], lib[i], lib[ref_column], logratio_trim, sum_trim, do_weighting, a_cutoff
            )
            for i in range(n_samples)
        ]
    )
    return f / np.exp(np.mean(np.log(f)))
