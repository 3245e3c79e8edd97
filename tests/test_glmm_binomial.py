"""Binomial (detection) GLMM with a log-library-size offset against glmmTMB, and separated genes flagged."""

from __future__ import annotations

import gzip
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from helpers import REFERENCE
from threadpoolctl import threadpool_limits

import scmlm
from scmlm.design import build_design
from scmlm.models import fit_glmm, prepare_glmm

FIXTURE = REFERENCE / "sim_binomial_detection"
DESIGN = "~ condition + (1|donor) + (1|batch)"
CONTRAST = ("condition", "case", "ctrl")


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def detection() -> ad.AnnData:
    """80 genes detected in 1-60 % of 2,500 cells; obs ``log_library`` is the log library size over all 3,000 genes."""
    with gzip.open(FIXTURE / "counts.mtx.gz") as fh:
        X = sp.csr_matrix(scipy.io.mmread(fh), dtype=np.float64)
    obs = pd.read_csv(FIXTURE / "obs.csv", index_col="cell")
    obs.index = obs.index.astype(str)
    for col in ("donor", "batch"):
        obs[col] = pd.Categorical(obs[col])
    obs["condition"] = pd.Categorical(obs["condition"], categories=["ctrl", "case"])
    obs["log_library"] = np.log(obs["total"].to_numpy(float))
    var = pd.read_csv(FIXTURE / "truth.csv", index_col="gene")
    var.index = var.index.astype(str)
    return ad.AnnData(X=X, obs=obs, var=var)


def _reference(method: str) -> pd.DataFrame:
    ref = pd.read_csv(FIXTURE / f"glmmTMB_binomial_{method}.csv", index_col="gene")
    ref.index = ref.index.astype(str)
    return ref


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_binomial_with_library_offset_matches_glmmtmb(detection, method):
    """Converges wherever glmmTMB fits cleanly (>= 99 %) and agrees on coefficients, SEs and log-likelihoods.

    Rare genes used to stop at the starting values (logit of the detection rate, ignoring an offset of ~7): every
    cell started at p ~ 1 and the first Newton step overshot into the flat region at p ~ 0.
    """
    ref = _reference(method)
    good = (ref["ok"] & ~ref["warned"]).to_numpy()
    assert good.sum() >= 75
    d = build_design(detection.obs, DESIGN)
    gdesign = prepare_glmm(d.X, d.terms, detection.obs["log_library"].to_numpy(), family="binomial")
    res = fit_glmm(detection.X, gdesign, method=method)
    conv = res.converged
    assert conv[good].mean() >= 0.99
    m = good & conv
    dcoef = np.abs(res.beta[m, 1] - ref["coef"].to_numpy()[m])
    dint = np.abs(res.beta[m, 0] - ref["coef_intercept"].to_numpy()[m])
    assert np.median(dcoef) <= 0.005
    assert np.quantile(dcoef, 0.95) <= 1e-3
    assert np.median(dint) <= 0.005
    ll = res.loglik if method == "ML" else res.restricted_loglik
    dll = ll[m] - ref["loglik"].to_numpy()[m]
    # scmlm's maximum is at least glmmTMB's, and never far above it
    assert dll.min() >= -1e-4
    assert np.median(np.abs(dll)) <= 1e-4
    ratio = np.sqrt(res.cov_beta[m, 1, 1]) / ref["se"].to_numpy()[m]
    if method == "ML":
        # both are the beta block of the inverse Hessian of the Laplace likelihood in all fixed parameters
        np.testing.assert_allclose(ratio, 1.0, atol=2e-3)
    else:
        # REML: scmlm uses the beta block of the inverse (beta, b) Hessian at the estimated variances; glmmTMB's
        # sdreport adds the uncertainty of the variance parameters, so its SEs are equal or slightly larger
        assert np.median(ratio) > 0.99
        assert ratio.min() > 0.9
        assert ratio.max() < 1.0 + 1e-3
    np.testing.assert_allclose(res.var["donor"][m], ref["var_donor"].to_numpy()[m], atol=1e-3)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_fit_does_not_depend_on_the_offset_level(detection, family):
    """Shifting every offset by a constant only shifts the intercept: the same genes converge to the same
    estimates whether the offset is a log library size (~7), ~0 or ~19."""
    d = build_design(detection.obs, DESIGN)
    off = detection.obs["log_library"].to_numpy()
    fits = [
        fit_glmm(detection.X, prepare_glmm(d.X, d.terms, off + shift, family=family), method="ML")
        for shift in (0.0, -7.0, 12.0)
    ]
    base = fits[0]
    assert base.converged.all()
    for shift, res in zip((-7.0, 12.0), fits[1:], strict=True):
        assert res.converged.all()
        np.testing.assert_allclose(res.beta[:, 1], base.beta[:, 1], atol=1e-5)
        np.testing.assert_allclose(res.beta[:, 0], base.beta[:, 0] - shift, atol=1e-5)
        # ML SEs come from a forward-difference Hessian whose steps scale with |intercept|: equal to ~1e-3
        np.testing.assert_allclose(np.sqrt(res.cov_beta[:, 1, 1]), np.sqrt(base.cov_beta[:, 1, 1]), rtol=2e-3)


def test_binomial_through_api_uses_the_offset(detection):
    """glmm_de with an obs offset column (log library size) reproduces glmmTMB's ML contrast for every gene."""
    ref = _reference("ML")
    good = (ref["ok"] & ~ref["warned"]).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # glmmTMB's model: batch random (the default fits the 3 batches as a fixed effect)
        t = scmlm.tl.glmm_de(
            detection, DESIGN, CONTRAST, family="binomial", offset="log_library", estimation="ML", inplace=False,
            replication="as_written",
        )  # fmt: skip
        t = t.table.set_index("gene")
    t = t.loc[ref.index]
    assert set(t["status"]) <= {"ok", "singular"}
    dcoef = np.abs(t["coef"].to_numpy() - ref["coef"].to_numpy())[good]
    assert np.median(dcoef) <= 0.005
    np.testing.assert_allclose(t["se"].to_numpy()[good], ref["se"].to_numpy()[good], rtol=2e-3)


# ---------------------------------------------------------------------------------------------------- separation


@pytest.fixture(scope="module")
def separated_data() -> tuple[ad.AnnData, dict[str, str]]:
    """8 donors, case-control; constructed genes with no counts (or full detection) in one condition."""
    a = scmlm.datasets.simulate(n_donors=8, n_cells=100, n_genes=40, seed=3)
    X = a.X.toarray()
    case = (a.obs["condition"] == "case").to_numpy()
    rng = np.random.default_rng(0)
    for g in range(4):  # no counts in case
        X[case, g] = 0
        X[~case, g] = rng.poisson(0.5 + g, (~case).sum())
    for g in (4, 5):  # no counts in ctrl
        X[~case, g] = 0
        X[case, g] = rng.poisson(1.0, case.sum())
    # one count in case: a large (about -5) but finite log fold change, not separation
    X[:, 6] = 0
    X[~case, 6] = rng.poisson(0.5, (~case).sum())
    X[np.flatnonzero(case)[0], 6] = 1
    X[:, 7] = rng.poisson(3.0, X.shape[0]) + 1  # detected in every cell: separated for the binomial family only
    a.X = sp.csr_matrix(X)
    return a, {"separated": ["g00000", "g00001", "g00002", "g00003", "g00004", "g00005"], "finite": ["g00006"]}


@pytest.mark.parametrize("family", ["nb", "poisson", "binomial"])
def test_separated_genes_are_flagged_and_tested(separated_data, family):
    """Separated genes keep the status ``separated`` (no finite estimate, ``converged`` False, no SE) and get a
    finite prior-count fold change of the right sign and a test (tests/test_separation.py checks its calibration)."""
    adata, genes = separated_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = scmlm.tl.glmm_de(
            adata, "~ condition + (1|donor)", CONTRAST, family=family, min_cells_expressing=3, inplace=False
        ).table.set_index("gene")
    sep = t.loc[genes["separated"]]
    assert (sep["status"] == "separated").all()
    assert not sep["converged"].any()
    assert sep["se_raw"].isna().all()
    assert np.isfinite(sep[["coef", "log2fc", "stat", "pvalue", "padj"]].to_numpy()).all()
    # genes 0-3 have no counts in case (down), 4-5 none in ctrl (up)
    assert (sep["coef"].iloc[:4] < 0).all() and (sep["coef"].iloc[4:] > 0).all()
    # induced in 4 of 4 case donors at ~1 count per cell, against 4 zero donors: a discovery
    assert (sep["pvalue"].iloc[4:] < 0.05).all()
    # detected in every cell: separated for the binomial; a valid fit (its donor variance may be zero) otherwise
    expected = {"separated"} if family == "binomial" else {"ok", "singular"}
    assert t.loc["g00007", "status"] in expected
    finite = t.loc[genes["finite"]]
    assert finite["status"].isin(["ok", "singular"]).all()
    assert (finite["coef"] < -3).all() and (finite["se"] < 2).all()
    # the bar: no valid-looking fit with a coefficient or SE the data cannot carry
    valid = t[t["status"].isin(["ok", "singular"])]
    assert (valid["coef"].abs() <= 15).all() and (valid["se"] <= 1e3).all()
    assert (t["status"] == "separated").sum() == 6 + (family == "binomial")


def test_separation_check_needs_a_separating_direction():
    """The linear program flags a combination of columns (two levels without counts), not a single all-zero cell of
    an additive two-factor design, which has finite estimates."""
    from scmlm.models.glmm.fit import _separating_direction

    # rows: intercept, B, C (a three-level factor)
    Xf = np.array([[1.0, 0, 0], [1, 1, 0], [1, 0, 1]])
    zero = np.array([False, True, True])
    assert _separating_direction(Xf, ~zero, zero, np.zeros(3, dtype=bool))
    # additive 2 x 2 (intercept, a, b): only the (a=1, b=1) cell is all zero -> finite MLE
    Xf = np.array([[1.0, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]])
    zero = np.array([False, False, False, True])
    assert not _separating_direction(Xf, ~zero, zero, np.zeros(4, dtype=bool))
    # ... but with (a=1, b=0) also all zero, a -> -inf
    zero = np.array([False, True, False, True])
    assert _separating_direction(Xf, ~zero, zero, np.zeros(4, dtype=bool))


def test_no_valid_fit_beyond_what_the_data_carry():
    """Rare genes of a simulated case-control set at min_cells_expressing=3: no ok/singular gene with |coef| > 15 or
    SE > 1e3, for any count family."""
    a = scmlm.datasets.simulate(n_donors=6, n_cells=80, n_genes=300, seed=7)
    for family in ("nb", "poisson", "binomial"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = scmlm.tl.glmm_de(a, DESIGN, CONTRAST, family=family, min_cells_expressing=3, inplace=False).table
        valid = t[t["status"].isin(["ok", "singular"])]
        assert len(valid) > 150
        assert (valid["coef"].abs() <= 15).all() and (valid["se"] <= 1e3).all()
        assert (t["status"] == "separated").sum() >= 1
