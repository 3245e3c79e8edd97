"""A cell-level continuous covariate in an NB GLMM: the grouped evaluation (cells of a group on one line of the design,
bivariate Taylor surrogates re-centred at the modes) gives the fit of the exact per-cell evaluation.

The per-cell path (every cell its own covariate pattern, evaluated exactly) is the same likelihood computed cell by
cell; it is what ``prepare_glmm`` builds when grouping is switched off (``GROUP_MIN_PATTERNS``).
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from scmlm.models import RandomTerm, fit_glmm, prepare_glmm
from scmlm.models.glmm import design as _glmm


def _data(seed: int = 3, n_genes: int = 16):
    rng = np.random.default_rng(seed)
    nd, nc = 6, 50
    donor = np.repeat(np.arange(nd), 2 * nc)
    cond = np.tile(np.repeat([0.0, 1.0], nc), nd)
    n = donor.size
    x = rng.normal(size=n) + rng.normal(0, 0.3, nd)[donor]
    off = rng.normal(np.log(2000), 0.4, n)
    log_mu = rng.uniform(-9.0, -4.0, n_genes)  # from mostly zeros to ~40 counts per cell
    phi = rng.uniform(0.1, 0.8, n_genes)
    b0 = rng.normal(0, 0.3, (n_genes, nd))
    b1 = rng.normal(0, 0.2, (n_genes, nd))
    eta = log_mu[:, None] + b0[:, donor] + (0.1 + b1[:, donor]) * x[None, :] + 0.2 * cond[None, :] + off[None, :]
    mu = np.exp(eta)
    Y = rng.poisson(rng.gamma(1.0 / phi[:, None], mu * phi[:, None])).astype(np.float64)
    return Y, donor, cond, x, off


def _designs(donor, cond, x):
    n, nd = donor.size, int(donor.max()) + 1
    one = np.ones(n)
    X1 = np.column_stack([one, x])
    X2 = np.column_stack([one, cond, x])
    return {
        "x_slope": (X1, [RandomTerm("donor", donor, nd, X1.copy(), ("(Intercept)", "x"))], 2 * nd),
        "cond_x_slope": (X2, [RandomTerm("donor", donor, nd, X1.copy(), ("(Intercept)", "x"))], 4 * nd),
        "x_intercept": (X1, [RandomTerm("donor", donor, nd, one[:, None])], 2 * nd),
    }


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("model", ["x_slope", "cond_x_slope", "x_intercept"])
def test_grouped_fit_equals_per_cell_fit(model, method, monkeypatch):
    Y, donor, cond, x, off = _data()
    X, terms, n_rows = _designs(donor, cond, x)[model]
    with threadpool_limits(1):
        grouped = prepare_glmm(X, terms, off, family="nb")
        monkeypatch.setattr(_glmm, "GROUP_MIN_PATTERNS", 10**9)
        per_cell = prepare_glmm(X, terms, off, family="nb")
        a = fit_glmm(Y, grouped, method=method)
        b = fit_glmm(Y, per_cell, method=method)
    # two rows per group (donor, or donor x condition); every cell its own pattern otherwise
    assert grouped.n_patterns == n_rows
    assert per_cell.n_patterns == Y.shape[1]
    assert (a.status == b.status).all()
    ok = a.converged & b.converged
    assert ok.sum() >= Y.shape[0] - 1
    crit_a = a.restricted_loglik if method == "REML" else a.loglik
    crit_b = b.restricted_loglik if method == "REML" else b.loglik
    assert np.abs(crit_a - crit_b)[ok].max() <= 1e-6
    assert np.abs(a.beta - b.beta)[ok].max() <= 1e-5
    assert np.abs(np.sqrt(a.cov_beta[:, -1, -1] / b.cov_beta[:, -1, -1]) - 1)[ok].max() <= 1e-3
    assert np.abs(a.theta - b.theta)[ok].max() <= 1e-4
    assert np.abs(np.log(a.phi / b.phi))[ok].max() <= 1e-5
    assert np.abs(a.b - b.b)[ok].max() <= 1e-4


def test_two_continuous_directions_stay_per_cell():
    """Grouping needs the design rows of a group on one line; a second continuous covariate keeps the per-cell
    evaluation."""
    Y, donor, cond, x, off = _data(n_genes=2)
    x2 = np.random.default_rng(9).normal(size=x.size)
    X = np.column_stack([np.ones(x.size), x, x2])
    d = prepare_glmm(X, [RandomTerm("donor", donor, 6, np.ones((x.size, 1)))], off, family="nb")
    assert d.n_patterns == x.size
