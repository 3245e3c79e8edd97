"""Response families of the cell-level GLMM (numpy only).

A :class:`Family` holds what the API and the tests need at the cell level (inverse link, variance, log-likelihood,
deviance); the GLMM kernel (``scmlm.models.glmm``) evaluates the same log-likelihoods on covariate patterns and knows a
family by its ``code``.

===========  =========  =================================  ==========================================
family       link       variance                           ``phi``
===========  =========  =================================  ==========================================
``nb``       log        ``mu + phi * mu**2`` (NB2)         dispersion, estimated per gene
``poisson``  log        ``mu``                             none (NaN)
``binomial`` logit      ``m * p * (1 - p)`` (``m`` trials) none (NaN); 0/1 detection when no trials
``gaussian`` identity   ``phi``                            residual variance, estimated per gene
===========  =========  =================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, gammaln

NB, POISSON, BINOMIAL, GAUSSIAN = 0, 1, 2, 3


@dataclass(frozen=True)
class Family:
    """A GLM response family with its canonical-for-scmlm link.

    Examples
    --------
    >>> import numpy as np
    >>> fam = get_family("nb")
    >>> float(fam.variance(np.array([2.0]), phi=0.5)[0])
    4.0
    """

    name: str
    code: int
    link: str
    has_dispersion: bool
    integer_response: bool

    def linkinv(self, eta: np.ndarray) -> np.ndarray:
        """Mean from the linear predictor."""
        eta = np.asarray(eta, dtype=float)
        if self.link == "log":
            return np.exp(eta)
        if self.link == "logit":
            return expit(eta)
        return eta

    def variance(self, mu: np.ndarray, phi: float = np.nan, trials: np.ndarray | float = 1.0) -> np.ndarray:
        """Variance of one observation with mean ``mu`` (for binomial, ``mu`` is the success probability)."""
        mu = np.asarray(mu, dtype=float)
        if self.code == NB:
            return mu + phi * mu**2
        if self.code == POISSON:
            return mu.copy()
        if self.code == BINOMIAL:
            return np.asarray(trials, dtype=float) * mu * (1.0 - mu)
        return np.full_like(mu, phi)

    def loglik(
        self, y: np.ndarray, mu: np.ndarray, phi: float = np.nan, trials: np.ndarray | float = 1.0
    ) -> np.ndarray:
        """Log-likelihood of each observation (full, with all constants)."""
        y = np.asarray(y, dtype=float)
        mu = np.asarray(mu, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.code == NB:
                r = 1.0 / phi
                return (
                    gammaln(y + r)
                    - gammaln(r)
                    - gammaln(y + 1.0)
                    + r * np.log(r / (r + mu))
                    + np.where(y > 0, y * np.log(mu / (r + mu)), 0.0)
                )
            if self.code == POISSON:
                return np.where(y > 0, y * np.log(mu), 0.0) - mu - gammaln(y + 1.0)
            if self.code == BINOMIAL:
                m = np.broadcast_to(np.asarray(trials, dtype=float), y.shape)
                lc = gammaln(m + 1.0) - gammaln(y + 1.0) - gammaln(m - y + 1.0)
                return lc + np.where(y > 0, y * np.log(mu), 0.0) + np.where(m - y > 0, (m - y) * np.log1p(-mu), 0.0)
            return -0.5 * (np.log(2.0 * np.pi * phi) + (y - mu) ** 2 / phi)

    def deviance(self, y: np.ndarray, mu: np.ndarray, phi: float = np.nan, trials: np.ndarray | float = 1.0) -> float:
        """Deviance ``2 * (loglik(saturated) - loglik(mu))`` summed over observations (Gaussian: residual SS)."""
        y = np.asarray(y, dtype=float)
        if self.code == GAUSSIAN:
            return float(np.sum((y - np.asarray(mu, dtype=float)) ** 2))
        if self.code == BINOMIAL:
            m = np.broadcast_to(np.asarray(trials, dtype=float), y.shape)
            sat = np.divide(y, m, out=np.zeros_like(y), where=m > 0)
        else:
            sat = y
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = self.loglik(y, np.where(sat > 0, sat, 0.0), phi, trials)
        ls = np.where(np.isfinite(ls), ls, 0.0)
        return float(2.0 * np.sum(ls - self.loglik(y, mu, phi, trials)))


FAMILIES: dict[str, Family] = {
    "nb": Family("nb", NB, "log", has_dispersion=True, integer_response=True),
    "poisson": Family("poisson", POISSON, "log", has_dispersion=False, integer_response=True),
    "binomial": Family("binomial", BINOMIAL, "logit", has_dispersion=False, integer_response=True),
    "gaussian": Family("gaussian", GAUSSIAN, "identity", has_dispersion=True, integer_response=False),
}


def get_family(family: str | Family) -> Family:
    """Look up a family by name (``"nb"``, ``"poisson"``, ``"binomial"``, ``"gaussian"``)."""
    if isinstance(family, Family):
        return family
    key = str(family).lower()
    aliases = {"negative_binomial": "nb", "nbinom2": "nb", "negbin": "nb", "normal": "gaussian", "logistic": "binomial"}
    key = aliases.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"family={family!r} is not known; use one of {sorted(FAMILIES)}.")
    return FAMILIES[key]
