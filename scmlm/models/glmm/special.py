"""Softplus derivatives and Taylor sums of the GLMM kernel, with the constants of its ``U_p``/``V_p`` surrogates."""

from __future__ import annotations

import math

import numpy as np

from ..._jit import jit

KU = 6  # order of the Taylor surrogate of U_p
KV = 9  # derivatives stored per node of the V_p tables
HV = 0.2  # node spacing of the V_p tables
TRUST = 1.0  # radius (in v) where the U_p Taylor polynomial is used; quadratic continuation beyond
TAIL = 7.5  # |v + o| beyond which softplus is evaluated by its 5-term series
NSER = 5
LOG2PI = math.log(2.0 * math.pi)


def _sigmoid_polys(jmax: int) -> np.ndarray:
    """Coefficients, in ascending powers of ``s = sigmoid(x)``, of the ``j``-th derivative of the sigmoid."""
    polys = [np.array([0.0, 1.0])]
    for _ in range(jmax):
        c = polys[-1]
        dc = c[1:] * np.arange(1, c.size)
        nxt = np.zeros(dc.size + 2)
        nxt[1 : dc.size + 1] += dc
        nxt[2 : dc.size + 2] -= dc
        polys.append(nxt)
    out = np.zeros((jmax + 1, polys[-1].size))
    for j, c in enumerate(polys):
        out[j, : c.size] = c
    return out


SIGP = _sigmoid_polys(KV)
# runtime (non-literal) small integers: literal arguments would make numba compile one specialisation per value
LEVEL = np.arange(3, dtype=np.int64)
ORDER = np.array([KU, KV], dtype=np.int64)  # KU and KV as runtime values (one specialisation of taylor/softplus)


@jit(_nrt=False, no_cpython_wrapper=True)
def softplus_derivs(x, K, out):
    """``out[k] = d^k softplus(x) / dx^k`` for ``k = 0..K``, accurate in both tails.

    Evaluated at ``-|x|`` (``s = sigmoid`` small, no cancellation) and reflected: ``softplus(x) = x + softplus(-x)``,
    ``sigmoid(x) = 1 - sigmoid(-x)`` and the ``k``-th derivative (``k >= 2``) changes sign with ``(-1)^k``.
    """
    flip = x > 0.0
    xs = -x if flip else x
    ex = math.exp(xs)
    s = ex / (1.0 + ex)
    out[0] = math.log1p(ex) + (x if flip else 0.0)
    if K >= 1:
        out[1] = (1.0 - s) if flip else s
    if K >= 2:
        dd = s / (1.0 + ex)  # s (1 - s)
        a = 1.0 - 2.0 * s
        out[2] = dd
        if K >= 3:
            out[3] = dd * a
        if K >= 4:
            out[4] = dd * (1.0 - 6.0 * dd)
        if K >= 5:
            out[5] = dd * a * (1.0 - 12.0 * dd)
        if K >= 6:
            out[6] = dd * (1.0 - 30.0 * dd + 120.0 * dd * dd)
    for k in range(7, K + 1):
        c = SIGP[k - 1]
        acc = 0.0
        for d in range(k, -1, -1):
            acc = acc * s + c[d]
        out[k] = acc
    if flip:
        for k in range(3, K + 1, 2):
            out[k] = -out[k]


@jit(_nrt=False, no_cpython_wrapper=True)
def taylor(c, kmax, d, k):
    """``sum_{j=k}^{kmax} c[j] d^(j-k) / (j-k)!``."""
    acc = c[kmax]
    for j in range(kmax - 1, k - 1, -1):
        acc = c[j] + acc * d / (j - k + 1)
    return acc
