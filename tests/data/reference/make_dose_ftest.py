"""Simulate the pseudobulk counts of ``dose_ftest/`` (three doses, 4 samples each; seed 20261130).

NB2 counts, 400 genes: log-mean ~ N(3, 1.5²), dispersion 0.08–0.3, library factors 0.5–2; 40 genes respond to the
doses (log fold changes mid and high vs low drawn from N(0, 0.8²)). Run from the repository root:
``python tests/data/reference/make_dose_ftest.py``; then ``Rscript tests/data/reference/R/run_dose_ftest.R
tests/data/reference/dose_ftest``.
"""

from pathlib import Path

import numpy as np
import pandas as pd

rng = np.random.default_rng(20261130)
n_genes, doses = 400, np.repeat(["low", "mid", "high"], 4)
log_mu = rng.normal(3.0, 1.5, n_genes)
phi = rng.uniform(0.08, 0.3, n_genes)
lib = rng.uniform(0.5, 2.0, doses.size)
effect = np.zeros((n_genes, 3))
effect[:40, 1:] = rng.normal(0.0, 0.8, (40, 2))
level = pd.Series(doses).map({"low": 0, "mid": 1, "high": 2}).to_numpy()
mu = np.exp(log_mu[:, None] + effect[:, level]) * lib[None, :]
counts = rng.negative_binomial(1 / phi[:, None], 1 / (1 + phi[:, None] * mu))
genes = [f"g{i:05d}" for i in range(n_genes)]
samples = [f"s{i:02d}" for i in range(doses.size)]
out = Path(__file__).parent / "dose_ftest"
out.mkdir(exist_ok=True)
pd.DataFrame(counts, index=genes, columns=samples).to_csv(out / "counts.csv")
pd.DataFrame({"sample": samples, "dose": doses}).to_csv(out / "samples.csv", index=False)
