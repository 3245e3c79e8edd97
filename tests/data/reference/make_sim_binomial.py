"""Write the ``sim_binomial_detection`` fixture: 80 genes spanning detection rates 1-60 % (run once; see README).

10 donors x 250 cells (case-control across donors, 3 batches) simulated with 3,000 genes by
``scmlm.datasets.simulate``; ``total`` in obs.csv is each cell's total count over all 3,000 genes (the library size
that ``offset="log_total"`` would use), while ``counts.mtx.gz`` keeps only the 80 chosen genes.

Usage: python tests/data/reference/make_sim_binomial.py
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from scmlm.datasets import simulate

OUT = Path(__file__).parent / "sim_binomial_detection"
N_GENES = 80


def main() -> None:
    adata = simulate(n_donors=10, n_cells=250, n_genes=3000, n_batches=3, design="between", frac_de=0.2, seed=10)
    X = sp.csc_matrix(adata.X)
    total = np.asarray(X.sum(axis=1)).ravel()
    det = np.asarray((X > 0).mean(axis=0)).ravel()
    # equally spaced in log detection rate between 1 % and 60 %: the closest unused gene to each target
    targets = np.exp(np.linspace(np.log(0.01), np.log(0.6), N_GENES))
    chosen: list[int] = []
    for t in targets:
        order = np.argsort(np.abs(np.log(np.maximum(det, 1e-9)) - np.log(t)))
        chosen.append(int(next(j for j in order if j not in chosen)))
    idx = np.sort(np.asarray(chosen))
    OUT.mkdir(exist_ok=True)
    counts = sp.coo_matrix(X[:, idx].astype(np.int64))
    with gzip.open(OUT / "counts.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, counts, field="integer")
    obs = adata.obs[["donor", "batch", "condition"]].copy()
    obs["total"] = total.astype(np.int64)
    obs.index.name = "cell"
    obs.to_csv(OUT / "obs.csv")
    var = adata.var.iloc[idx][["is_de", "logfc", "log_mu", "dispersion", "sd_donor", "sd_batch"]].copy()
    var.index = [f"g{j:02d}" for j in range(idx.size)]
    var.index.name = "gene"
    var["source_gene"] = adata.var_names[idx]
    var["detection"] = det[idx]
    var.to_csv(OUT / "truth.csv")


if __name__ == "__main__":
    main()
