"""Calibration of the cell-level NB GLMM tests on simulated null data (REML + small-sample degrees of freedom)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from scmlm.datasets import simulate
from scmlm.models import contrast_df, fit_glmm, glmm_contrast, intercept_term, prepare_glmm, satterthwaite_df

N_GENES = 2000
L = np.array([0.0, 1.0])


def _fit(design: str, n_donors: int, n_cells: int, method: str = "REML", null: bool = True, seed: int = 0):
    adata = simulate(
        n_donors=n_donors,
        n_cells=n_cells,
        n_genes=N_GENES,
        n_batches=3 if design == "between" else 2,
        design=design,
        null=null,
        seed=seed,
        # donors that respond alike: the (1|donor) model fitted here is then the true model, and its cell-level df
        # are right (donor-specific responses need a sample-level term: tests/test_replication.py)
        sd_response=0.0,
    )
    counts = sp.csc_matrix(adata.X, dtype=np.float64)
    obs = adata.obs
    n = counts.shape[0]
    X = np.column_stack([np.ones(n), (obs["condition"] == "case").to_numpy(float)])
    terms = [intercept_term("donor", obs["donor"].cat.codes.to_numpy())]
    if design == "between":
        terms.append(intercept_term("batch", obs["batch"].cat.codes.to_numpy()))
    offset = np.log(np.asarray(counts.sum(axis=1)).ravel())
    with threadpool_limits(1):
        res = fit_glmm(counts, prepare_glmm(X, terms, offset, family="nb"), method=method)
    return adata, X, terms, res


@pytest.fixture(scope="module")
def between_null():
    return _fit("between", n_donors=10, n_cells=100)


@pytest.fixture(scope="module")
def within_null():
    return _fit("within", n_donors=8, n_cells=100)


def _fraction(res, df, alpha=0.05):
    con = glmm_contrast(res, L, df=df)
    ok = res.converged & np.isfinite(con.pvalue)
    assert ok.sum() >= 0.95 * N_GENES
    return float(np.mean(con.pvalue[ok] < alpha))


def test_between_donor_contrast_is_calibrated(between_null):
    _, X, terms, res = between_null
    df = contrast_df(X, terms, L)
    assert df == 8  # 10 donors - (intercept, condition)
    assert 0.035 <= _fraction(res, df) <= 0.06
    # Satterthwaite on the REML criterion, capped by the containment df (the recommended combination)
    df_s = satterthwaite_df(res, L)
    assert np.nanmedian(df_s) < df
    assert 0.035 <= _fraction(res, np.minimum(df, df_s)) <= 0.06
    # the z test ignores that the donor variance is estimated from 10 donors: clearly liberal
    assert _fraction(res, None) > 0.07


@pytest.mark.slow
def test_between_donor_contrast_is_calibrated_with_400_cells_per_donor():
    """The default simulation size; more cells make the donor-level variance components matter more."""
    _, X, terms, res = _fit("between", n_donors=10, n_cells=400)
    df = np.minimum(contrast_df(X, terms, L), satterthwaite_df(res, L))
    assert 0.035 <= _fraction(res, df) <= 0.06


def test_within_donor_contrast_is_calibrated(within_null):
    _, X, terms, res = within_null
    df = contrast_df(X, terms, L)
    assert df > 500  # cell-level contrast: residual df, nearly a z test
    assert 0.035 <= _fraction(res, df) <= 0.06
    assert 0.035 <= _fraction(res, np.minimum(df, satterthwaite_df(res, L))) <= 0.06


def test_within_donor_power_and_effect_recovery():
    adata, X, terms, res = _fit("within", n_donors=8, n_cells=100, null=False, seed=1)
    con = glmm_contrast(res, L, df=contrast_df(X, terms, L))
    truth = adata.var
    expressed = res.converged & (truth["log_mu"].to_numpy() > -1.0)
    de = truth["is_de"].to_numpy() & expressed
    assert de.sum() >= 30
    null = expressed & ~truth["is_de"].to_numpy()
    # most expressed DE genes are found
    assert np.mean(con.pvalue[de] < 0.05) > 0.8
    # effects are recovered up to the common shift that total-count offsets give all genes (the DE genes change the
    # library sizes of case cells, so with this much power even null genes test positive for the shift)
    shift = np.median(con.coef[null])
    err = con.coef[de] - shift - truth["logfc"].to_numpy()[de]
    assert abs(np.median(err)) < 0.05
    assert np.corrcoef(con.coef[de], truth["logfc"].to_numpy()[de])[0, 1] > 0.95
    assert abs(shift) < 0.2
