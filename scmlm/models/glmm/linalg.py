"""Small dense linear algebra of the GLMM kernel (numba): Cholesky factor, solve, inverse, log-determinant, and the
modified Newton step of the outer optimisation. Matrices are the leading ``d x d`` blocks of preallocated arrays."""

from __future__ import annotations

import math

import numpy as np

from ..._jit import jit


@jit(_nrt=False, no_cpython_wrapper=True)
def chol(A, L, d):
    """Lower Cholesky factor of the leading ``d x d`` block of ``A`` into ``L``; False if not positive definite."""
    for j in range(d):
        s = A[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not (s > 0.0) or not np.isfinite(s):
            return False
        ljj = math.sqrt(s)
        L[j, j] = ljj
        for i in range(j + 1, d):
            s = A[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / ljj
        for i in range(j):
            L[i, j] = 0.0
    return True


@jit(_nrt=False, no_cpython_wrapper=True)
def chol_solve(L, b, x, d):
    """``x = (L L')^{-1} b`` on the leading ``d`` entries."""
    for i in range(d):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * x[k]
        x[i] = s / L[i, i]
    for i in range(d - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, d):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]


@jit(_nrt=False, no_cpython_wrapper=True)
def chol_logdet(L, d):
    """``log det(L L')``."""
    s = 0.0
    for i in range(d):
        s += math.log(L[i, i])
    return 2.0 * s


@jit(_nrt=False, no_cpython_wrapper=True)
def chol_inverse(L, Ainv, d, work):
    """``Ainv = (L L')^{-1}``; ``work`` is a ``d x d`` scratch array (holds ``L^{-1}``)."""
    for j in range(d):
        for i in range(d):
            work[i, j] = 0.0
        work[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, d):
            s = 0.0
            for k in range(j, i):
                s -= L[i, k] * work[k, j]
            work[i, j] = s / L[i, i]
    for i in range(d):
        for j in range(i + 1):
            s = 0.0
            for k in range(i, d):
                s += work[k, i] * work[k, j]
            Ainv[i, j] = s
            Ainv[j, i] = s


@jit(no_cpython_wrapper=True)
def modified_newton_step(Hs, grad, free, n, step):
    """Ascent step ``(-Hs)^{-1} grad`` on the free coordinates, with eigenvalues made positive.

    Returns the predicted gain ``step' grad`` (``-1`` when ``Hs`` is not finite).
    """
    nf = 0
    for i in range(n):
        if free[i]:
            nf += 1
    for i in range(n):
        step[i] = 0.0
    if nf == 0:
        return 0.0
    A = np.zeros((nf, nf))
    gf = np.zeros(nf)
    ii = 0
    for i in range(n):
        if not free[i]:
            continue
        jj = 0
        for j in range(n):
            if not free[j]:
                continue
            A[ii, jj] = -0.5 * (Hs[i, j] + Hs[j, i])
            jj += 1
        gf[ii] = grad[i]
        ii += 1
    for i in range(nf):
        for j in range(nf):
            if not np.isfinite(A[i, j]):
                return -1.0
    lam, V = np.linalg.eigh(A)
    lmax = 0.0
    for i in range(nf):
        if abs(lam[i]) > lmax:
            lmax = abs(lam[i])
    floor = max(1e-8 * lmax, 1e-10)
    sf = np.zeros(nf)
    for i in range(nf):
        li = abs(lam[i])
        if li < floor:
            li = floor
        c = 0.0
        for j in range(nf):
            c += V[j, i] * gf[j]
        c /= li
        for j in range(nf):
            sf[j] += c * V[j, i]
    dec = 0.0
    ii = 0
    for i in range(n):
        if free[i]:
            step[i] = sf[ii]
            dec += sf[ii] * gf[ii]
            ii += 1
    return dec
