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
    n_cells: int | tuple[int, int] = 400,
    n_genes: int = 2000,
    n_batches: int = 3,
    design: Literal["between", "within", "longitudinal"] = "between",
    frac_de: float = 0.1,
    n_cell_types: int = 1,
    null: bool = False,
    sd_response: float = 0.25,
    seed: int = 0,
    *,
    sd_slope: float | None = None,
    n_timepoints: int = 3,
    donor_batch=None,
) -> ad.AnnData:
    """Simulate multi-donor single-cell counts from a negative-binomial GLMM with known truth.

    For gene ``g``, cell ``i`` of donor ``d`` in batch ``k``::

        y_ig ~ NB(mu_ig, phi_g)        Var = mu + phi * mu**2 (NB2)
        log mu_ig = log s_i + log_mu_g + logfc_g * [condition_i == case] + ct_{c(i) g} + u_dg + v_kg + e_{s(i) g}
        u_dg ~ N(0, sd_donor_g**2),   v_kg ~ N(0, sd_batch_g**2),   log s_i ~ N(0, 0.25**2)
        e_sg ~ N(0, sd_response_g**2 / 2)        (design="within" or "longitudinal")
        + x_i * w_dg,  w_dg ~ N(0, sd_slope_g**2)   (sd_slope given: a cell-level covariate x)

    Donor ``d`` belongs to batch ``d % n_batches``. With ``design="between"`` the condition is a donor-level trait
    (donor ``d`` is ``case`` when ``d`` is odd) and each donor is one sample; with ``design="within"`` every donor
    gives two samples, one per condition. ``ct`` are per-gene cell-type shifts (zero for the first cell type).

    ``e_sg`` is the sample effect of a donor × condition sample: whatever the cells of one sample share beyond their
    donor (the donor's own response to the treatment, the sample's dissociation and library). With it the condition
    effect of gene ``g`` differs between donors with standard deviation ``sd_response_g`` (half of it in each of the
    two samples' effects), which is what paired experiments show; a model without a term at the sample level (a
    ``(1|sample)`` term or a random slope of the condition over donors) then tests the condition against
    cell-to-cell noise. In the between design a donor is one sample, so the donor effect already holds it and no
    sample effect is added. ``sd_response_g`` is drawn per gene around ``sd_response`` (log-normal, as
    ``sd_donor``); ``sd_response=0`` gives donors that all respond alike (the behaviour before this term existed:
    the same counts for the same seed).

    ``design="longitudinal"`` gives every donor ``n_timepoints`` samples (obs ``time``: ``t0``, ``t1``, …; the
    condition is ``ctrl`` at ``t0`` and ``case`` after, and DE genes shift by ``logfc`` after ``t0``), each with its
    own sample effect ``e_sg``: a factor that varies within donors and is constant within samples (time points, doses).

    ``sd_slope`` adds a cell-level covariate, obs ``x`` (standard normal, independent from cell to cell), with no
    average effect on any gene but an effect that differs between donors: donor ``d``'s slope of gene ``g`` is
    ``w_dg ~ N(0, sd_slope_g**2)``, ``sd_slope_g`` drawn per gene around ``sd_slope`` as ``sd_response``. The average
    effect of ``x`` over donors is then a donor-level quantity that a model without a random slope of ``x`` over donors
    tests against cell-to-cell noise. ``x`` and the slopes come from their own random stream: every other draw is the
    same as without ``sd_slope`` (``sd_slope=None``, the default, adds nothing; ``0`` adds ``x`` with no slopes).

    Parameters
    ----------
    n_donors
        Number of donors (at least 2).
    n_cells
        Cells per donor (split evenly between its two samples in the within design), or a range ``(low, high)``:
        the number of cells of each sample is then drawn log-uniformly in it (unbalanced samples, e.g. ``(20, 2000)``).
    n_genes
        Number of genes.
    n_batches
        Number of batches (donors are assigned round-robin).
    design
        ``"between"`` (case–control across donors), ``"within"`` (every donor has both conditions) or
        ``"longitudinal"`` (every donor has ``n_timepoints`` samples).
    frac_de
        Fraction of genes with a condition effect; ignored when ``null=True``.
    n_cell_types
        Number of cell types; cells are assigned uniformly at random.
    null
        No differential expression at all.
    sd_response
        Typical standard deviation (natural-log scale) of the condition effect between donors, i.e. of the donor ×
        condition sample effects (within design only); ``0`` switches them off.
    seed
        Seed of the random generator; the same seed gives the same data.
    sd_slope
        Typical standard deviation between donors of the effect of the cell-level covariate ``x`` (natural log per
        unit of ``x``); ``None`` (default): no ``x``.
    n_timepoints
        Samples per donor of the longitudinal design (at least 2).
    donor_batch
        Batch (``0 … n_batches - 1``) of every donor, e.g. to make batches unbalanced for the condition; ``None``
        (default): round-robin, donor ``d`` in batch ``d % n_batches``.

    Returns
    -------
    AnnData with integer counts in ``.X`` and ``layers["counts"]`` (CSR, float32); obs ``donor``, ``batch``,
    ``condition`` (categorical, ``ctrl`` first), ``cell_type``, ``sample`` (donor × condition, e.g. ``donor03_case``;
    ``sample_id`` is the same column under its older name) and ``size_factor``; var holds the truth: ``is_de``,
    ``logfc`` (natural log), ``log_mu``, ``dispersion``, ``sd_donor``, ``sd_batch``, ``sd_response`` (zero in the
    between design); with ``sd_slope``: obs ``x`` and var ``sd_slope``; longitudinal: obs ``time`` (categorical,
    ``t0`` first) and samples named ``donor03_t1``.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=6, n_cells=50, n_genes=100, seed=1)
    >>> adata.shape
    (300, 100)
    """
    if n_donors < 2:
        raise InputError(f"simulate: n_donors={n_donors} is too small; use at least 2 donors.")
    cell_range = None
    if isinstance(n_cells, tuple | list):
        if len(n_cells) != 2 or not 1 <= int(n_cells[0]) <= int(n_cells[1]):
            raise InputError(
                f"simulate: n_cells={n_cells!r} must be a number of cells or a range (low, high) with 1 <= low <= high."
            )
        cell_range = (int(n_cells[0]), int(n_cells[1]))
        n_cells = cell_range[0]
    if sd_response < 0:
        raise InputError(f"simulate: sd_response={sd_response} must be >= 0.")
    if n_cells < 1 or n_genes < 1 or n_batches < 1 or n_cell_types < 1:
        raise InputError("simulate: n_cells, n_genes, n_batches and n_cell_types must all be at least 1.")
    per_donor, donor_batch = _check_layout(design, n_donors, n_batches, sd_slope, n_timepoints, donor_batch)
    longitudinal = design == "longitudinal"
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

    # sample effects and unbalanced sizes come from their own stream, so that the other draws do not move
    rng_sample = np.random.default_rng([seed, 1])
    within_design = design in ("within", "longitudinal")
    sd_resp = np.exp(rng_sample.normal(np.log(max(sd_response, 1e-300)), 0.35, n_genes)) if sd_response > 0 else None
    if sd_resp is None or not within_design:
        sd_resp = np.zeros(n_genes)

    # --- cells
    if cell_range is None:
        n = n_donors * n_cells
        donor = np.repeat(np.arange(n_donors), n_cells)
        if design == "between":
            case = (donor % 2 == 1).astype(float)
            time = np.zeros(n, dtype=int)
        else:
            within = np.tile(np.arange(n_cells), n_donors)
            time = within * per_donor // n_cells
            case = (time >= 1).astype(float) if longitudinal else (within >= n_cells // 2).astype(float)
    else:
        n_samples = n_donors * per_donor
        lo, hi = np.log(cell_range[0]), np.log(cell_range[1] + 1)
        sizes = np.floor(np.exp(rng_sample.uniform(lo, hi, n_samples))).astype(int).clip(*cell_range)
        s_donor = np.arange(n_samples) // per_donor
        s_time = np.arange(n_samples) % per_donor
        s_case = (s_time >= 1 if within_design else s_donor % 2).astype(float)
        donor = np.repeat(s_donor, sizes)
        case = np.repeat(s_case, sizes)
        time = np.repeat(s_time, sizes)
        n = donor.size
    batch = donor % n_batches if donor_batch is None else donor_batch[donor]
    # the sample (donor × condition, or donor × time point) of each cell
    sample = per_donor * donor + time if longitudinal else 2 * donor + case.astype(int)
    e = rng_sample.normal(size=(max(2, per_donor) * n_donors, n_genes)) * (sd_resp / np.sqrt(2.0))
    cell_type = rng.integers(0, n_cell_types, n) if n_cell_types > 1 else np.zeros(n, dtype=int)
    log_s = rng.normal(0.0, 0.25, n)
    u = rng.normal(size=(n_donors, n_genes)) * sd_donor
    v = rng.normal(size=(n_batches, n_genes)) * sd_batch
    # the cell-level covariate and its donor slopes: a stream of their own, so that every other draw stays the same
    x = w = sd_slope_g = None
    if sd_slope is not None:
        rng_x = np.random.default_rng([seed, 2])
        x = rng_x.normal(size=n)
        sd_slope_g = np.exp(rng_x.normal(np.log(sd_slope), 0.35, n_genes)) if sd_slope > 0 else np.zeros(n_genes)
        w = rng_x.normal(size=(n_donors, n_genes)) * sd_slope_g

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
        if within_design and sd_response > 0:
            eta += e[sample[sl]]
        if x is not None:
            eta += x[sl, None] * w[donor[sl]]
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
    if longitudinal:
        times = [f"t{k}" for k in range(per_donor)]
        obs["time"] = pd.Categorical(np.asarray(times)[time], categories=times)
        obs["sample"] = pd.Categorical(obs["donor"].astype(str) + "_" + obs["time"].astype(str))
    else:
        obs["sample"] = pd.Categorical(obs["donor"].astype(str) + "_" + obs["condition"].astype(str))
    if x is not None:
        obs["x"] = x
    obs["sample_id"] = obs["sample"]
    var = pd.DataFrame(
        {
            "is_de": is_de,
            "logfc": logfc,
            "log_mu": log_mu,
            "dispersion": dispersion,
            "sd_donor": sd_donor,
            "sd_batch": sd_batch,
            "sd_response": sd_resp,
        },
        index=[f"g{j:05d}" for j in range(n_genes)],
    )
    if sd_slope_g is not None:
        var["sd_slope"] = sd_slope_g
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.uns["simulate"] = {
        "n_donors": n_donors,
        "n_cells": list(cell_range) if cell_range is not None else n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "design": design,
        "frac_de": frac_de,
        "n_cell_types": n_cell_types,
        "null": null,
        "sd_response": float(sd_response),
        "seed": seed,
    }
    if sd_slope is not None:
        adata.uns["simulate"]["sd_slope"] = float(sd_slope)
    if longitudinal:
        adata.uns["simulate"]["n_timepoints"] = per_donor
    if donor_batch is not None:
        adata.uns["simulate"]["donor_batch"] = donor_batch.tolist()
    return adata


def _check_layout(design: str, n_donors: int, n_batches: int, sd_slope, n_timepoints: int, donor_batch):
    """Check the sample layout arguments of :func:`simulate`; ``(samples per donor, donor_batch as an array)``."""
    if design not in ("between", "within", "longitudinal"):
        raise InputError(f"simulate: design={design!r} is not known; use 'between', 'within' or 'longitudinal'.")
    if sd_slope is not None and sd_slope < 0:
        raise InputError(f"simulate: sd_slope={sd_slope} must be >= 0 (or None).")
    if design == "longitudinal" and int(n_timepoints) < 2:
        raise InputError(f"simulate: n_timepoints={n_timepoints} must be at least 2.")
    if donor_batch is not None:
        donor_batch = np.asarray(donor_batch, dtype=np.int64)
        if donor_batch.shape != (n_donors,) or donor_batch.min() < 0 or donor_batch.max() >= n_batches:
            raise InputError(
                f"simulate: donor_batch must give a batch in 0..{n_batches - 1} for each of {n_donors} donors."
            )
    return (int(n_timepoints) if design == "longitudinal" else 2 if design == "within" else 1), donor_batch


def simulate_composition(
    n_donors: int = 6,
    n_cell_types: int = 8,
    design: Literal["paired", "between"] = "paired",
    n_cells: int | tuple[int, int] = (200, 2000),
    n_changed: int = 2,
    logfc: float = 1.0,
    null: bool = False,
    sd_donor: float = 0.3,
    sd_sample: float = 0.2,
    n_genes: int = 20,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate cell-type composition of multi-donor samples with known abundance changes.

    For sample ``s`` of donor ``d`` and cell type ``t``::

        eta_st = a_t + logfc_t * [condition_s == case] + u_dt + e_st
        u_dt ~ N(0, sd_donor**2),   e_st ~ N(0, sd_sample**2)
        pi_s = softmax(eta_s)                 (proportions of the types in sample s)
        (cells of each type in s) ~ Multinomial(N_s, pi_s)

    ``a_t`` are baseline log abundances (proportions from about 0.3 down to 0.02, in a random order of the types),
    ``u_dt`` the donor's own composition (shared by all its samples) and ``e_st`` what differs between two samples of
    one donor (dissociation, sampling of the tissue). ``logfc_t`` is the change of type ``t``'s abundance, natural
    log, before the proportions are renormalised: composition is relative, so a type that expands lowers the
    proportions of all the others a little. ``uns["simulate_composition"]`` holds both the abundance changes
    (``logfc``, ``changed``) and their consequence for each type's proportion at zero random effects (``prop_ctrl``,
    ``prop_case``, ``log_odds_ratio``): with ``n_changed > 0`` every type's proportion moves, only ``changed``
    types' abundance does.

    Each cell gets a small count vector (Poisson, type-specific means over ``n_genes`` genes) so that the object
    looks like single-cell data; only its ``obs`` matters for composition.

    Parameters
    ----------
    n_donors
        Donors per condition (at least 2): ``"paired"`` has ``n_donors`` donors, each with one sample per condition;
        ``"between"`` has ``2 * n_donors`` donors, each one sample (half ``ctrl``, half ``case``).
    n_cell_types
        Number of cell types (at least 2).
    design
        ``"paired"`` or ``"between"`` (see ``n_donors``).
    n_cells
        Cells per sample, or a range ``(low, high)`` drawn log-uniformly per sample (unbalanced samples).
    n_changed
        Number of cell types whose abundance changes (half up, half down); ignored with ``null=True``.
    logfc
        Size of the abundance change (natural log) of the changed types.
    null
        No composition change at all.
    sd_donor
        Standard deviation of the donor effect of each type (log-abundance scale).
    sd_sample
        Standard deviation of the sample effect of each type within a donor (log-abundance scale).
    n_genes
        Genes of the small counts matrix.
    seed
        Seed of the random generator; the same seed gives the same data.

    Returns
    -------
    AnnData (cells × genes) with integer counts in ``.X`` and ``layers["counts"]``; obs ``donor``, ``condition``
    (``ctrl`` first), ``sample`` (``donor03_case``), ``sample_id`` (the same) and ``cell_type``; the truth in
    ``uns["simulate_composition"]``: ``cell_types``, ``logfc``, ``changed``, ``base_log_abundance``, ``prop_ctrl``,
    ``prop_case``, ``log_odds_ratio`` (per type, in the order of ``cell_types``) and the parameters.

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate_composition(n_donors=4, n_cell_types=5, seed=1)
    >>> adata.obs["sample"].nunique(), adata.obs["cell_type"].nunique()
    (8, 5)
    """
    if n_donors < 2:
        raise InputError(
            f"simulate_composition: n_donors={n_donors} is too small; use at least 2 donors per condition."
        )
    if n_cell_types < 2:
        raise InputError(f"simulate_composition: n_cell_types={n_cell_types}; composition needs at least 2 types.")
    if design not in ("paired", "between"):
        raise InputError(f"simulate_composition: design={design!r} is not known; use 'paired' or 'between'.")
    if isinstance(n_cells, tuple | list):
        if len(n_cells) != 2 or not 1 <= int(n_cells[0]) <= int(n_cells[1]):
            raise InputError(f"simulate_composition: n_cells={n_cells!r} must be a number or a range (low, high).")
        cell_range = (int(n_cells[0]), int(n_cells[1]))
    else:
        if int(n_cells) < 1:
            raise InputError(f"simulate_composition: n_cells={n_cells} must be at least 1.")
        cell_range = (int(n_cells), int(n_cells))
    if not 0 <= n_changed <= n_cell_types:
        raise InputError(f"simulate_composition: n_changed={n_changed} must lie in [0, n_cell_types].")
    if sd_donor < 0 or sd_sample < 0:
        raise InputError("simulate_composition: sd_donor and sd_sample must be >= 0.")
    rng = np.random.default_rng([seed, 22])
    T = n_cell_types
    base = np.log(np.geomspace(0.3, 0.02, T))
    base = base[rng.permutation(T)]
    effect = np.zeros(T)
    changed = np.zeros(T, dtype=bool)
    if not null and n_changed > 0:
        idx = rng.choice(T, n_changed, replace=False)
        changed[idx] = True
        effect[idx] = logfc * np.where(np.arange(n_changed) % 2 == 0, 1.0, -1.0)
    paired = design == "paired"
    n_d = n_donors if paired else 2 * n_donors
    n_s = 2 * n_donors
    s_donor = np.arange(n_s) // 2 if paired else np.arange(n_s)
    s_case = np.arange(n_s) % 2 if paired else (np.arange(n_s) >= n_donors).astype(int)
    u = rng.normal(0.0, 1.0, (n_d, T)) * sd_donor
    e = rng.normal(0.0, 1.0, (n_s, T)) * sd_sample
    lo, hi = np.log(cell_range[0]), np.log(cell_range[1] + 1)
    sizes = np.floor(np.exp(rng.uniform(lo, hi, n_s))).astype(int).clip(*cell_range)
    eta = base[None, :] + s_case[:, None] * effect[None, :] + u[s_donor] + e
    props = np.exp(eta - eta.max(axis=1, keepdims=True))
    props /= props.sum(axis=1, keepdims=True)
    counts = np.vstack([rng.multinomial(sizes[s], props[s]) for s in range(n_s)])  # samples × types
    sample_of_cell = np.repeat(np.repeat(np.arange(n_s), T), counts.ravel())
    type_of_cell = np.repeat(np.tile(np.arange(T), n_s), counts.ravel())
    n = type_of_cell.size
    type_mu = np.exp(rng.normal(0.0, 1.0, (T, n_genes)))
    X = sp.csr_matrix(rng.poisson(type_mu[type_of_cell]).astype(np.float32))
    X.eliminate_zeros()

    donor_names = np.array([f"donor{d:02d}" for d in range(n_d)])
    type_names = [f"type{t}" for t in range(T)]
    cond = np.where(s_case == 1, "case", "ctrl")
    sample_names = np.array([f"{donor_names[s_donor[s]]}_{cond[s]}" for s in range(n_s)])
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical(donor_names[s_donor[sample_of_cell]], categories=donor_names),
            "condition": pd.Categorical(cond[sample_of_cell], categories=["ctrl", "case"]),
            "sample": pd.Categorical(sample_names[sample_of_cell], categories=sample_names),
            "cell_type": pd.Categorical(np.asarray(type_names)[type_of_cell], categories=type_names),
        },
        index=[f"cell{i:07d}" for i in range(n)],
    )
    obs["sample_id"] = obs["sample"]
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j:03d}" for j in range(n_genes)]))
    adata.layers["counts"] = X.copy()
    p0 = np.exp(base) / np.exp(base).sum()
    p1 = np.exp(base + effect) / np.exp(base + effect).sum()
    adata.uns["simulate_composition"] = {
        "cell_types": type_names,
        "logfc": effect,
        "changed": changed,
        "base_log_abundance": base,
        "prop_ctrl": p0,
        "prop_case": p1,
        "log_odds_ratio": np.log(p1 / (1 - p1)) - np.log(p0 / (1 - p0)),
        "n_donors": n_donors,
        "n_cell_types": T,
        "design": design,
        "n_cells": list(cell_range),
        "n_changed": 0 if null else n_changed,
        "logfc_size": float(logfc),
        "null": bool(null),
        "sd_donor": float(sd_donor),
        "sd_sample": float(sd_sample),
        "seed": seed,
    }
    return adata
