"""Null data for the GEE calibration tests and ``benchmarks/calib_gee.py``: donor-level designs the simulator lacks.

``scmlm.datasets.simulate`` draws a two-group condition; the GEE's small-sample rules must also hold for a
three-level dose, a blocking factor next to the condition and paired samples, with donors of unequal size. Every
design here is a null: no column of the design moves the mean. For gene ``g``, cell ``i`` of sample ``s`` (a donor,
or a donor × condition in the paired design)::

    y_ig ~ NB(mu_ig, phi_g)      log mu_ig = log s_i + log_mu_g + b_{k(s) g} + u_{s g}
    u_sg ~ N(0, sd_g**2),        sd_g log-normal around sd_sample (gene-to-gene spread)
    b_kg ~ N(0, sd_batch_g**2)   batch effects (``"batch"`` design only; the model adjusts for them)

In the paired design every donor has a donor effect and each of its two samples its own effect (donor-specific
responses to the condition, whose mean is zero).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

DESIGNS = ("two", "dose", "batch", "paired")


def donor_table(kind: str, n_per_level: int) -> pd.DataFrame:
    """One row per sample: ``donor``, ``condition`` (or ``dose``), ``batch``."""
    if kind == "two":
        k = 2 * n_per_level
        return pd.DataFrame({"donor": np.arange(k), "level": np.arange(k) % 2, "batch": 0})
    if kind == "dose":
        k = 3 * n_per_level
        return pd.DataFrame({"donor": np.arange(k), "level": np.arange(k) % 3, "batch": 0})
    if kind == "batch":  # 3 batches, each holding both conditions
        k = 2 * n_per_level
        d = np.arange(k)
        return pd.DataFrame({"donor": d, "level": d % 2, "batch": d % 3})
    if kind == "paired":
        d = np.repeat(np.arange(n_per_level), 2)
        return pd.DataFrame({"donor": d, "level": np.tile([0, 1], n_per_level), "batch": 0})
    raise ValueError(kind)


def null_cells(
    kind: str,
    n_per_level: int,
    n_cells: int | tuple[int, int],
    n_genes: int,
    seed: int,
    sd_sample: float = 0.35,
) -> ad.AnnData:
    """Null cells × genes counts (CSR) for one design; ``n_cells`` per sample, or a log-uniform range of sizes.

    obs: ``donor``, ``sample``, ``condition`` (``ctrl``/``case``; the dose levels ``d0``/``d1``/``d2`` in ``dose``),
    ``batch``.
    """
    rng = np.random.default_rng(seed)
    tab = donor_table(kind, n_per_level)
    n_s = len(tab)
    if isinstance(n_cells, tuple):
        lo, hi = np.log(n_cells[0]), np.log(n_cells[1] + 1)
        sizes = np.floor(np.exp(rng.uniform(lo, hi, n_s))).astype(int).clip(*n_cells)
    else:
        sizes = np.full(n_s, int(n_cells))
    s_of_cell = np.repeat(np.arange(n_s), sizes)
    n = s_of_cell.size
    log_mu = np.clip(rng.normal(-1.8, 1.3, n_genes), -5.0, 2.5)
    phi = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    sd = np.exp(rng.normal(np.log(sd_sample), 0.5, n_genes))
    u = rng.normal(size=(n_s, n_genes)) * sd
    if kind == "paired":  # a donor effect shared by the donor's two samples, on top of the sample effects
        n_d = int(tab["donor"].max()) + 1
        u += (rng.normal(size=(n_d, n_genes)) * sd)[tab["donor"].to_numpy()]
    if kind == "batch":
        sd_b = np.exp(rng.normal(np.log(0.25), 0.35, n_genes))
        u += (rng.normal(size=(3, n_genes)) * sd_b)[tab["batch"].to_numpy()]
    log_s = rng.normal(0.0, 0.25, n)
    rows = []
    block = max(1, 2_000_000 // n_genes)
    for start in range(0, n, block):
        sl = slice(start, min(n, start + block))
        mu = np.exp(log_s[sl, None] + log_mu[None, :] + u[s_of_cell[sl]])
        lam = rng.gamma(1.0 / phi[None, :], mu * phi[None, :])
        rows.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(rows, format="csr")
    level = tab["level"].to_numpy()[s_of_cell]
    if kind == "dose":
        cond = pd.Categorical([f"d{v}" for v in level], categories=["d0", "d1", "d2"])
    else:
        cond = pd.Categorical(np.where(level == 1, "case", "ctrl"), categories=["ctrl", "case"])
    donor = tab["donor"].to_numpy()[s_of_cell]
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"donor{d:02d}" for d in donor]),
            "sample": pd.Categorical([f"s{s:02d}" for s in s_of_cell]),
            "condition": cond,
            "batch": pd.Categorical([f"b{b}" for b in tab["batch"].to_numpy()[s_of_cell]]),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j:05d}" for j in range(n_genes)]))
    return adata[np.asarray(X.sum(axis=1)).ravel() > 0].copy()
