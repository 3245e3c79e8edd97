"""Multi-donor negative-binomial single-cell counts with known truth."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import InputError


def simulate(
    n_donors: int = 10,
    n_cells: int = 400,
    n_genes: int = 2000,
    n_batches: int = 3,
    design: Literal["between", "within"] = "between",
    frac_de: float = 0.1,
    n_cell_types: int = 1,
    null: bool = False,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate multi-donor single-cell counts from a negative-binomial GLMM with known truth.

    For gene ``g``, cell ``i`` of donor ``d`` in batch ``k``::

        y_ig ~ NB(mu_ig, phi_g)        Var = mu + phi * mu**2 (NB2)
        log mu_ig = log s_i + log_mu_g + logfc_g * [condition_i == case] + ct_{c(i) g} + u_dg + v_kg
        u_dg ~ N(0, sd_donor_g**2),   v_kg ~ N(0, sd_batch_g**2),   log s_i ~ N(0, 0.25**2)

    Donor ``d`` belongs to batch ``d % n_batches``. With ``design="between"`` the condition is a donor-level trait
    (donor ``d`` is ``case`` when ``d`` is odd); with ``design="within"`` every donor has cells of both conditions
    (half each). ``ct`` are per-gene cell-type shifts (zero for the first cell type).

    Parameters
    ----------
    n_donors
        Number of donors (at least 2).
    n_cells
        Cells per donor.
    n_genes
        Number of genes.
    n_batches
        Number of batches (donors are assigned round-robin).
    design
        ``"between"`` (case–control across donors) or ``"within"`` (every donor has both conditions).
    frac_de
        Fraction of genes with a condition effect; ignored when ``null=True``.
    n_cell_types
        Number of cell types; cells are assigned uniformly at random.
    null
        No differential expression at all.
    seed
        Seed of the random generator; the same seed gives the same data.

    Returns
    -------
    AnnData with integer counts in ``.X`` and ``layers["counts"]`` (CSR, float32); obs ``donor``, ``batch``,
    ``condition`` (categorical, ``ctrl`` first), ``cell_type``, ``sample_id`` and ``size_factor``; var holds the truth:
    ``is_de``, ``logfc`` (natural log), ``log_mu``, ``dispersion``, ``sd_donor``, ``sd_batch``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=6, n_cells=50, n_genes=100, seed=1)
    >>> adata.shape
    (300, 100)
    """
    if n_donors < 2:
        raise InputError(f"simulate: n_donors={n_donors} is too small; use at least 2 donors.")
    if n_cells < 1 or n_genes < 1 or n_batches < 1 or n_cell_types < 1:
        raise InputError("simulate: n_cells, n_genes, n_batches and n_cell_types must all be at least 1.")
    if design not in ("between", "within"):
        raise InputError(f"simulate: design={design!r} is not known; use 'between' or 'within'.")
    if not 0 <= frac_de <= 1:
        raise InputError(f"simulate: frac_de={frac_de} must lie in [0, 1].")
    rng = np.random.default_rng(seed)

    # --- genes: truth
    log_mu = np.clip(rng.normal(-2.0, 1.4, n_genes), -6.0, 3.0)
    dispersion = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    sd_donor = np.exp(rng.normal(np.log(0.35), 0.35, n_genes))
    sd_batch = np.exp(rng.normal(np.log(0.2), 0.35, n_genes)) if n_batches > 1 else np.zeros(n_genes)
    is_de = np.zeros(n_genes, dtype=bool)
    logfc = np.zeros(n_genes)
    if not null and frac_de > 0:
        n_de = int(round(frac_de * n_genes))
        de_idx = rng.choice(n_genes, n_de, replace=False)
        is_de[de_idx] = True
        logfc[de_idx] = rng.choice([-1.0, 1.0], n_de) * rng.uniform(0.4, 1.2, n_de)
    ct_shift = rng.normal(0.0, 0.5, (n_cell_types, n_genes))
    ct_shift[0] = 0.0

    # --- cells
    n = n_donors * n_cells
    donor = np.repeat(np.arange(n_donors), n_cells)
    batch = donor % n_batches
    if design == "between":
        case = (donor % 2 == 1).astype(float)
    else:
        within = np.tile(np.arange(n_cells), n_donors)
        case = (within >= n_cells // 2).astype(float)
    cell_type = rng.integers(0, n_cell_types, n) if n_cell_types > 1 else np.zeros(n, dtype=int)
    log_s = rng.normal(0.0, 0.25, n)
    u = rng.normal(size=(n_donors, n_genes)) * sd_donor
    v = rng.normal(size=(n_batches, n_genes)) * sd_batch

    # --- counts, in row blocks to bound memory
    rows = []
    block = max(1, 2_000_000 // n_genes)
    for start in range(0, n, block):
        sl = slice(start, min(n, start + block))
        eta = (
            log_s[sl, None]
            + log_mu[None, :]
            + case[sl, None] * logfc[None, :]
            + ct_shift[cell_type[sl]]
            + u[donor[sl]]
            + v[batch[sl]]
        )
        mu = np.exp(eta)
        shape = 1.0 / dispersion
        lam = rng.gamma(shape[None, :], (mu * dispersion[None, :]))
        rows.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(rows, format="csr")
    X.eliminate_zeros()

    donor_names = np.array([f"donor{d:02d}" for d in range(n_donors)])
    cond = pd.Categorical(np.where(case == 1, "case", "ctrl"), categories=["ctrl", "case"])
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical(donor_names[donor], categories=donor_names),
            "batch": pd.Categorical([f"batch{k}" for k in batch], categories=[f"batch{k}" for k in range(n_batches)]),
            "condition": cond,
            "cell_type": pd.Categorical(
                [f"type{c}" for c in cell_type], categories=[f"type{c}" for c in range(n_cell_types)]
            ),
            "size_factor": np.exp(log_s),
        },
        index=[f"cell{i:07d}" for i in range(n)],
    )
    obs["sample_id"] = pd.Categorical(obs["donor"].astype(str) + "_" + obs["condition"].astype(str))
    var = pd.DataFrame(
        {
            "is_de": is_de,
            "logfc": logfc,
            "log_mu": log_mu,
            "dispersion": dispersion,
            "sd_donor": sd_donor,
            "sd_batch": sd_batch,
        },
        index=[f"g{j:05d}" for j in range(n_genes)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.uns["simulate"] = {
        "n_donors": n_donors,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "design": design,
        "frac_de": frac_de,
        "n_cell_types": n_cell_types,
        "null": null,
        "seed": seed,
    }
    return adata
