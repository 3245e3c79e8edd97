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
