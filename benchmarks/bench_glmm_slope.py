"""Cost of a cell-level continuous covariate with a random slope against categorical designs on the same data.

Usage::

    .venv/bin/python benchmarks/bench_glmm_slope.py                      # 2,000 genes x 4,000 cells
    .venv/bin/python benchmarks/bench_glmm_slope.py --genes 200 --method ML

Simulated NB counts: 8 donors x 2 conditions x 250 cells, a cell-level covariate ``x ~ N(0, 1)`` (e.g. a pathway
score) with donor-specific slopes, offsets ``log`` library size. Three models are fitted to the same genes on one
core (BLAS pinned to one thread), in chunks of 128 genes, after a warm-up call (compilation excluded):

* ``~ condition + (1|donor)``              (16 covariate patterns)
* ``~ condition + (1 + condition|donor)``  (16 covariate patterns)
* ``~ x + (1 + x|donor)``                  (one pattern per cell)

It prints the seconds per gene of each and the ratio of the continuous random-slope model to the categorical ones.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp


def simulate(n_donors: int, n_cells: int, n_genes: int, seed: int):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), 2 * n_cells)
    case = np.tile(np.repeat([0.0, 1.0], n_cells), n_donors)
    n = donor.size
    x = rng.normal(size=n)
    lib = np.exp(rng.normal(np.log(2000), 0.4, n))
    log_mu = rng.uniform(-8.5, -4.0, n_genes)  # 0.4 to 37 counts per cell at the median library size
    phi = rng.uniform(0.1, 0.8, n_genes)
    b0 = rng.normal(0, 0.3, (n_genes, n_donors))
    b1 = rng.normal(0, 0.15, (n_genes, n_donors))
    eta = log_mu[:, None] + b0[:, donor] + b1[:, donor] * x[None, :] + 0.1 * case[None, :] + np.log(lib)[None, :]
    mu = np.exp(eta)
    Y = rng.poisson(rng.gamma(1.0 / phi[:, None], mu * phi[:, None]))
    Yc = sp.csc_matrix(Y.T.astype(np.float64))
    return Yc, donor, case, x, np.log(lib)


def main() -> None:
    from threadpoolctl import threadpool_limits

    from scmlm.models._glmm import fit_glmm, prepare_glmm
    from scmlm.models._random import RandomTerm, intercept_term

    ap = argparse.ArgumentParser()
    ap.add_argument("--donors", type=int, default=8)
    ap.add_argument("--cells", type=int, default=250, help="cells per donor x condition")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--method", default="REML")
    ap.add_argument("--models", default="intercept,slope_cond,slope_x", help="comma-separated subset")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    Y, donor, case, x, off = simulate(args.donors, args.cells, args.genes, args.seed)
    n = Y.shape[0]
    one = np.ones(n)
    nd = args.donors
    models = {
        "intercept": ("~ condition + (1|donor)", np.column_stack([one, case]), [intercept_term("donor", donor)]),
        "slope_cond": (
            "~ condition + (1 + condition|donor)",
            np.column_stack([one, case]),
            [RandomTerm("donor", donor, nd, np.column_stack([one, case]), ("(Intercept)", "condition"))],
        ),
        "slope_x": (
            "~ x + (1 + x|donor)",
            np.column_stack([one, x]),
            [RandomTerm("donor", donor, nd, np.column_stack([one, x]), ("(Intercept)", "x"))],
        ),
    }
    print(f"data: {n} cells x {Y.shape[1]} genes, {Y.nnz / np.prod(Y.shape):.3f} non-zero; {args.method}, 1 core")
    per_gene = {}
    with threadpool_limits(1):
        for name in args.models.split(","):
            label, X, terms = models[name]
            t0 = time.perf_counter()
            design = prepare_glmm(X, terms, off, family="nb")
            t_prep = time.perf_counter() - t0
            fit_glmm(Y[:, :2], design, method=args.method)  # warm-up (numba cache / compilation)
            t0 = time.perf_counter()
            status = []
            for start in range(0, Y.shape[1], args.chunk):
                status.append(fit_glmm(Y[:, start : start + args.chunk], design, method=args.method).status)
            t_fit = time.perf_counter() - t0
            status = np.concatenate(status)
            u, c = np.unique(status, return_counts=True)
            per_gene[name] = t_fit / Y.shape[1]
            print(
                f"{label:38s} {design.n_patterns:5d} patterns  prepare {t_prep:5.2f} s  fit {t_fit:7.2f} s = "
                f"{1e3 * per_gene[name]:7.2f} ms/gene  {dict(zip(u.tolist(), c.tolist(), strict=True))}"
            )
    if "slope_x" in per_gene:
        for ref in ("intercept", "slope_cond"):
            if ref in per_gene:
                print(f"ratio ~ x + (1 + x|donor) / {models[ref][0]}: {per_gene['slope_x'] / per_gene[ref]:.2f}")


if __name__ == "__main__":
    main()
