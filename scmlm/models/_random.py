"""Random-effect structure shared by the mixed-model kernels (numpy only; no pandas, no AnnData).

A model's random part is a tuple of :class:`RandomTerm`. Term ``t`` has ``n_levels`` levels (the grouping factor's
codes per observation), and ``k`` columns (``1`` for a random intercept, ``[1, x]`` for a correlated random slope).
Its effects ``b_t`` form an ``n_levels × k`` array whose rows are i.i.d. ``N(0, Σ_t)``, with ``Σ_t`` a full ``k × k``
covariance when ``correlated`` and diagonal otherwise. ``Z`` stacks the terms' columns in order; within a term the
column of level ``l`` and covariate ``j`` is ``offset_t + l * k + j``.

Variance parameters are stored as ``theta``: per term, the lower-triangular Cholesky factor of ``Σ_t`` by rows
(``k (k + 1) / 2`` numbers) when correlated, or the ``k`` standard deviations otherwise. This is lme4's
parameterisation without the residual scaling, which count families do not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term such as ``(1|donor)`` or ``(1 + x|donor)``."""

    name: str
    """Label used in output columns (``var_<name>``), e.g. ``"donor"`` or ``"batch:donor"``."""
    codes: np.ndarray
    """Integer level of each observation, ``0 … n_levels - 1``."""
    n_levels: int
    covariates: np.ndarray
    """``(n_obs, k)`` covariate values; a column of ones for an intercept."""
    col_names: tuple[str, ...] = ("(Intercept)",)
    correlated: bool = True
    level_names: tuple[str, ...] = field(default=())

    @property
    def k(self) -> int:
        return self.covariates.shape[1]

    @property
    def q(self) -> int:
        return self.n_levels * self.k

    @property
    def n_theta(self) -> int:
        return self.k * (self.k + 1) // 2 if self.correlated else self.k

    def component_names(self) -> list[str]:
        """Names of the variance parameters, as used in result columns (``var_<name>`` …)."""
        return [self.name if c == "(Intercept)" else f"{self.name}:{c}" for c in self.col_names]

    def cov_from_theta(self, theta: np.ndarray) -> np.ndarray:
        """``Σ_t`` from this term's slice of ``theta``."""
        k = self.k
        if not self.correlated:
            return np.diag(np.asarray(theta, dtype=float) ** 2)
        L = np.zeros((k, k))
        L[np.tril_indices(k)] = theta
        return L @ L.T

    def theta_from_cov(self, cov: np.ndarray) -> np.ndarray:
        cov = np.atleast_2d(np.asarray(cov, dtype=float))
        if not self.correlated:
            return np.sqrt(np.clip(np.diag(cov), 0, None))
        try:
            L = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            L = np.linalg.cholesky(cov + 1e-10 * np.eye(self.k))
        return L[np.tril_indices(self.k)]


def n_theta(terms: tuple[RandomTerm, ...]) -> int:
    return int(sum(t.n_theta for t in terms))


def q_total(terms: tuple[RandomTerm, ...]) -> int:
    return int(sum(t.q for t in terms))


def term_slices(terms: tuple[RandomTerm, ...]) -> list[tuple[slice, slice]]:
    """For each term, its slice of the columns of ``Z`` and its slice of ``theta``."""
    out = []
    qz = qt = 0
    for t in terms:
        out.append((slice(qz, qz + t.q), slice(qt, qt + t.n_theta)))
        qz += t.q
        qt += t.n_theta
    return out


def build_Z(terms: tuple[RandomTerm, ...], n_obs: int) -> sp.csr_matrix:
    """The ``n_obs × q`` random-effect design matrix."""
    blocks = []
    for t in terms:
        rows = np.repeat(np.arange(n_obs), t.k)
        cols = (t.codes[:, None] * t.k + np.arange(t.k)[None, :]).ravel()
        vals = np.asarray(t.covariates, dtype=float).ravel()
        blocks.append(sp.csr_matrix((vals, (rows, cols)), shape=(n_obs, t.q)))
    if not blocks:
        return sp.csr_matrix((n_obs, 0))
    return sp.hstack(blocks, format="csr")


def cov_b(terms: tuple[RandomTerm, ...], theta: np.ndarray) -> np.ndarray:
    """Dense ``q × q`` covariance of all random effects, ``blockdiag(I_L ⊗ Σ_t)``."""
    q = q_total(terms)
    out = np.zeros((q, q))
    for t, (zs, ts) in zip(terms, term_slices(terms), strict=True):
        S = t.cov_from_theta(theta[ts])
        out[zs, zs] = np.kron(np.eye(t.n_levels), S)
    return out


def variance_components(terms: tuple[RandomTerm, ...], theta: np.ndarray) -> dict[str, float]:
    """Variances of each term's columns (diagonal of ``Σ_t``), keyed by component name."""
    out = {}
    for t, (_, ts) in zip(terms, term_slices(terms), strict=True):
        S = t.cov_from_theta(theta[ts])
        for name, v in zip(t.component_names(), np.diag(S), strict=True):
            out[name] = float(v)
    return out


def intercept_term(name: str, codes: np.ndarray, level_names=()) -> RandomTerm:
    """Convenience constructor for ``(1|name)`` from integer codes."""
    codes = np.asarray(codes, dtype=np.int64)
    n_levels = int(codes.max()) + 1 if codes.size else 0
    return RandomTerm(
        name=name,
        codes=codes,
        n_levels=n_levels,
        covariates=np.ones((codes.size, 1)),
        col_names=("(Intercept)",),
        correlated=True,
        level_names=tuple(level_names),
    )
