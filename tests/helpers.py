"""Test helpers: reference fixtures copied from the R runs (see tests/data/reference/README.md)."""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"


def load_reference(name: str) -> ad.AnnData:
    """A reference fixture (``sim_between_small`` / ``sim_within_small``) as cells × genes AnnData."""
    base = REFERENCE / name
    with gzip.open(base / "counts.mtx.gz") as fh:
        X = sp.csr_matrix(scipy.io.mmread(fh), dtype=np.float64)
    obs = pd.read_csv(base / "obs.csv", index_col="cell")
    obs.index = obs.index.astype(str)
    for col in ("donor", "batch"):
        obs[col] = pd.Categorical(obs[col])
    obs["condition"] = pd.Categorical(obs["condition"], categories=["ctrl", "case"])
    var = pd.read_csv(base / "truth.csv", index_col="gene")
    var.index = var.index.astype(str)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    return adata


def read_reference_table(name: str, method: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE / name / f"{method}.csv", index_col="gene")


def reference_pseudobulk(adata, scenario: str):
    """Genes × samples summed counts, design matrix, its column names and the samples' donors, as
    ``run_pseudobulk.R`` builds them (numpy only, independent of scmlm.pp.pseudobulk)."""
    obs = adata.obs
    donor = obs["donor"].astype(str).to_numpy(dtype=str)
    cond = obs["condition"].astype(str).to_numpy(dtype=str)
    key = np.char.add(np.char.add(donor, ":"), cond) if scenario == "within" else donor
    levels, codes = np.unique(key, return_inverse=True)
    agg = sp.csr_matrix((np.ones(key.size), (codes, np.arange(key.size))), shape=(levels.size, key.size))
    counts = np.asarray((agg @ adata.X).T.todense())
    first = np.array([np.flatnonzero(codes == k)[0] for k in range(levels.size)])
    s_donor, s_batch, s_cond = donor[first], obs["batch"].astype(str).to_numpy()[first], cond[first]
    cols, names = [np.ones(levels.size)], ["(Intercept)"]
    factor, prefix = (s_donor, "donor") if scenario == "within" else (s_batch, "batch")
    for lev in np.unique(factor)[1:]:
        cols.append((factor == lev).astype(float))
        names.append(f"{prefix}{lev}")
    cols.append((s_cond == "case").astype(float))
    names.append("conditioncase")
    return counts, np.column_stack(cols), names, s_donor


def unit_contrast(names, name="conditioncase"):
    L = np.zeros(len(names))
    L[names.index(name)] = 1.0
    return L


def null_pseudobulk(design: str, seed: int):
    """Null NB pseudobulk from scmlm.datasets.simulate (10 donors case-control in 3 batches, or 8 donors with both
    conditions), summed per donor (× condition)."""
    from scmlm.datasets import simulate

    if design == "between":
        adata = simulate(n_donors=10, n_cells=200, n_genes=3000, n_batches=3, design="between", null=True, seed=seed)
    else:
        adata = simulate(n_donors=8, n_cells=200, n_genes=3000, n_batches=2, design="within", null=True, seed=seed)
    return reference_pseudobulk(adata, design)
