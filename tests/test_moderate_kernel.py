"""The numba unit scores (``scmlm.models.moderate_kernel``) against the numpy ones they replace in ``gene_tau2``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scmlm.models import CellModel, RandomTerm, intercept_term
from scmlm.models.moderate import unit_scores
from scmlm.models.moderate_kernel import unit_scores_kernel


def _model(family: str, *, slope: bool, offset: bool, trials: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_donors, per = 7, 40
    donor = np.repeat(np.arange(n_donors), per)
    n = donor.size
    batch = donor % 3
    cond = (donor % 2).astype(float)
    X = np.column_stack([np.ones(n), cond, rng.normal(size=n) if slope else (batch == 1).astype(float)])
    terms = [intercept_term("donor", donor), intercept_term("batch", batch)]
    if slope:
        x = rng.normal(size=n)
        terms.append(RandomTerm("donor:x", donor, n_donors, np.column_stack([np.ones(n), x]), ("(Intercept)", "x")))
    off = rng.normal(1.0, 0.5, n) if offset else None
    m = rng.integers(1, 6, n).astype(float) if trials else None
    return CellModel(X, tuple(terms), off, family, m), donor


def _data(model: CellModel, family: str, G: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    n, p = model.X.shape
    q = sum(t.q for t in model.terms)
    beta = rng.normal(0, 0.4, (G, p))
    beta[:, 0] += -1.0 if family != "gaussian" else 2.0
    b = rng.normal(0, 0.3, (G, q))
    phi = rng.uniform(0.05, 2.0, G)
    if family == "binomial":
        Y = rng.binomial(1 if model.trials is None else model.trials.astype(int), 0.3, (G, n)).astype(float)
    elif family == "gaussian":
        Y = rng.normal(1.0, 1.0, (G, n)) * (rng.random((G, n)) < 0.6)
    else:
        Y = rng.poisson(1.0, (G, n)).astype(float)
    return Y, beta, b, phi


CASES = [
    ("nb", False, True, False),
    ("nb", True, True, False),
    ("nb", False, False, False),
    ("poisson", False, True, False),
    ("binomial", False, False, False),
    ("binomial", False, True, True),
    ("gaussian", True, False, False),
]


@pytest.mark.parametrize(("family", "slope", "offset", "trials"), CASES)
def test_unit_scores_kernel_matches_numpy(family, slope, offset, trials):
    model, donor = _model(family, slope=slope, offset=offset, trials=trials)
    Y, beta, b, phi = _data(model, family, 9)
    S0, I0 = unit_scores(Y, model, beta, b, phi, donor)
    for Yin in (Y, sp.csc_matrix(Y.T), Y.T.copy()):
        S1, I1 = unit_scores_kernel(Yin, model, beta, b, phi, donor)
        assert S1.shape == S0.shape and I1.shape == I0.shape
        # S is a difference of sums over a unit's cells: compare on the scale of those sums
        scale = np.abs(I0).max(axis=0) + np.abs(S0).max(axis=0)
        assert np.all(np.abs(S1 - S0) <= 1e-12 * scale), np.max(np.abs(S1 - S0) / scale)
        np.testing.assert_allclose(I1, I0, rtol=1e-12)


def test_unit_scores_kernel_cells_in_any_order():
    """Cells of a unit need not be contiguous; units of different sizes."""
    model, donor = _model("nb", slope=False, offset=True, trials=False, seed=3)
    rng = np.random.default_rng(5)
    perm = rng.permutation(donor.size)[: donor.size - 37]
    sub = CellModel(
        model.X[perm],
        tuple(RandomTerm(t.name, t.codes[perm], t.n_levels, t.covariates[perm], t.col_names) for t in model.terms),
        model.offset[perm],
        "nb",
        None,
    )
    Y, beta, b, phi = _data(sub, "nb", 4)
    S0, I0 = unit_scores(Y, sub, beta, b, phi, donor[perm])
    S1, I1 = unit_scores_kernel(sp.csr_matrix(Y.T), sub, beta, b, phi, donor[perm])
    np.testing.assert_allclose(S1, S0, rtol=1e-10, atol=1e-12 * np.abs(I0).max())
    np.testing.assert_allclose(I1, I0, rtol=1e-12)
    # a unit's scores depend only on its own cells: changing the counts of unit 0 leaves the others
    Y2 = Y.copy()
    Y2[:, donor[perm] == 0] += 3
    S2, _ = unit_scores_kernel(Y2, sub, beta, b, phi, donor[perm])
    assert not np.allclose(S2[0], S1[0])
    np.testing.assert_array_equal(S2[1:], S1[1:])


def test_unit_scores_kernel_reads_a_subset_of_genes():
    """``genes=`` gives the scores of those columns, as if they had been sliced out first."""
    model, donor = _model("nb", slope=False, offset=True, trials=False, seed=4)
    Y, beta, b, phi = _data(model, "nb", 10)
    genes = np.array([7, 2, 5])
    S0, I0 = unit_scores_kernel(sp.csc_matrix(Y[genes].T), model, beta[genes], b[genes], phi[genes], donor)
    for Yin in (sp.csc_matrix(Y.T), Y):
        S1, I1 = unit_scores_kernel(Yin, model, beta[genes], b[genes], phi[genes], donor, genes=genes)
        np.testing.assert_array_equal(S1, S0)
        np.testing.assert_array_equal(I1, I0)
    # the columns are really those genes: other columns give other scores
    S2, _ = unit_scores_kernel(Y, model, beta[genes], b[genes], phi[genes], donor, genes=np.array([0, 1, 3]))
    assert not np.allclose(S2, S0)
