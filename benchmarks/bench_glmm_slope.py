"""Cost of a cell-level continuous covariate with a random slope against categorical designs on the same data.

Usage::

    .venv/bin/python benchmarks/bench_glmm_slope.py                      # 2,000 genes x 4,000 cells
    .venv/bin/python benchmarks/bench_glmm_slope.py --genes 200 --method ML
    .venv/bin/python benchmarks/bench_glmm_slope.py --log-mu=-13,-9             # sparse genes (~7 % non-zero)

Simulated NB counts: 8 donors x 2 conditions x 250 cells, a cell-level covariate ``x ~ N(0, 1)`` (e.g. a pathway
score) with donor-specific slopes, offsets ``log`` library size. Three models are fitted to the same genes on one
core (BLAS pinned to one thread), in chunks of 128 genes, each chunk by every model in turn (so that the load of a
shared machine affects all models alike), after a warm-up call (compilation excluded):

* ``~ condition + (1|donor)``              (16 covariate patterns)
* ``~ condition + (1 + condition|donor)``  (16 covariate patterns)
* ``~ x + (1 + x|donor)``                  (every cell its own pattern; the NB kernel groups the cells of a donor,
  whose design rows lie on one line, into two rows)

It prints the seconds per gene of each and the ratio of the continuous random-slope model to the categorical ones.

``--calibration G`` also fits ``~ x + (1 + x|donor)`` to ``G`` null genes (no effect of ``x``, donor-specific slopes
with SD 0.2, 8 donors x 40 cells) and prints the fraction of p < 0.05 and < 0.01 of the REML t test on
``min(containment, Satterthwaite)`` df, as ``tl.glmm_de`` computes it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp


def simulate(n_donors: int, n_cells: int, n_genes: int, seed: int, log_mu_range=(-10.0, -5.0)):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), 2 * n_cells)
    case = np.tile(np.repeat([0.0, 1.0], n_cells), n_donors)
    n = donor.size
    x = rng.normal(size=n)
    lib = np.exp(rng.normal(np.log(2000), 0.4, n))
    log_mu = rng.uniform(*log_mu_range, n_genes)  # default: 0.09 to 13 counts per cell at the median library size
    phi = rng.uniform(0.1, 0.8, n_genes)
    b0 = rng.normal(0, 0.3, (n_genes, n_donors))
    b1 = rng.normal(0, 0.15, (n_genes, n_donors))
    eta = log_mu[:, None] + b0[:, donor] + b1[:, donor] * x[None, :] + 0.1 * case[None, :] + np.log(lib)[None, :]
    mu = np.exp(eta)
    Y = rng.poisson(rng.gamma(1.0 / phi[:, None], mu * phi[:, None]))
    Yc = sp.csc_matrix(Y.T.astype(np.float64))
    return Yc, donor, case, x, np.log(lib)


def calibration(n_genes: int, seed: int) -> None:
    from threadpoolctl import threadpool_limits

    from scmlm.models import RandomTerm, contrast_df, fit_glmm, glmm_contrast, prepare_glmm, satterthwaite_df

    rng = np.random.default_rng(seed)
    nd, nc = 8, 40
    donor = np.repeat(np.arange(nd), nc)
    n = donor.size
    x = rng.normal(size=n) + rng.normal(0, 0.3, nd)[donor]
    lib = np.exp(rng.normal(np.log(2000), 0.4, n))
    log_mu = rng.uniform(-8.5, -5.0, n_genes)
    phi = rng.uniform(0.1, 0.8, n_genes)
    b0 = rng.normal(0, 0.3, (n_genes, nd))
    b1 = rng.normal(0, 0.2, (n_genes, nd))
    mu = np.exp(log_mu[:, None] + b0[:, donor] + b1[:, donor] * x[None, :] + np.log(lib)[None, :])
    Y = rng.poisson(rng.gamma(1.0 / phi[:, None], mu * phi[:, None])).astype(np.float64)
    X = np.column_stack([np.ones(n), x])
    terms = [RandomTerm("donor", donor, nd, X.copy(), ("(Intercept)", "x"))]
    L = np.array([0.0, 1.0])
    with threadpool_limits(1):
        t0 = time.perf_counter()
        res = fit_glmm(Y, prepare_glmm(X, terms, np.log(lib), family="nb"), method="REML")
        secs = time.perf_counter() - t0
    df = np.minimum(contrast_df(X, terms, L), satterthwaite_df(res, L))
    p = glmm_contrast(res, L, df=df).pvalue
    ok = np.isfinite(p)
    print(
        f"calibration ~ x + (1 + x|donor), null with donor-specific slopes, {n_genes} genes x {n} cells: "
        f"p < 0.05 {np.mean(p[ok] < 0.05):.4f}, p < 0.01 {np.mean(p[ok] < 0.01):.4f} ({ok.sum()} fitted, "
        f"median df {np.median(df[ok]):.2f}, {1e3 * secs / n_genes:.1f} ms/gene)"
    )


def main() -> None:
    from threadpoolctl import threadpool_limits

    from scmlm.models import RandomTerm, fit_glmm, intercept_term, prepare_glmm

    ap = argparse.ArgumentParser()
    ap.add_argument("--donors", type=int, default=8)
    ap.add_argument("--cells", type=int, default=250, help="cells per donor x condition")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--method", default="REML")
    ap.add_argument("--models", default="intercept,slope_cond,slope_x", help="comma-separated subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-mu", default="-10,-5", help="range of the genes' log mean per unit library size")
    ap.add_argument("--calibration", type=int, default=0, metavar="G", help="also run a null calibration on G genes")
    args = ap.parse_args()
    if args.calibration:
        calibration(args.calibration, args.seed + 1)
    if not args.models:
        return

    lo, hi = (float(v) for v in args.log_mu.split(","))
    Y, donor, case, x, off = simulate(args.donors, args.cells, args.genes, args.seed, (lo, hi))
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
    names = args.models.split(",")
    designs, fit_s, status = {}, dict.fromkeys(names, 0.0), {k: [] for k in names}
    with threadpool_limits(1):
        for name in names:
            label, X, terms = models[name]
            t0 = time.perf_counter()
            designs[name] = prepare_glmm(X, terms, off, family="nb")
            prep = time.perf_counter() - t0
            fit_glmm(Y[:, :2], designs[name], method=args.method)  # warm-up (numba cache / compilation)
            print(f"{label:38s} {designs[name].n_patterns:5d} covariate patterns, prepare_glmm {prep:.2f} s")
        # chunks of genes, each fitted by every model in turn: a shared machine's load hits all models alike
        for start in range(0, Y.shape[1], args.chunk):
            Yc = Y[:, start : start + args.chunk]
            for name in names:
                t0 = time.perf_counter()
                status[name].append(fit_glmm(Yc, designs[name], method=args.method).status)
                fit_s[name] += time.perf_counter() - t0
    per_gene = {}
    for name in names:
        st = np.concatenate(status[name])
        u, c = np.unique(st, return_counts=True)
        per_gene[name] = fit_s[name] / Y.shape[1]
        print(
            f"{models[name][0]:38s} fit {fit_s[name]:7.2f} s = {1e3 * per_gene[name]:7.2f} ms/gene  "
            f"{dict(zip(u.tolist(), c.tolist(), strict=True))}"
        )
    if "slope_x" in per_gene:
        for ref in ("intercept", "slope_cond"):
            if ref in per_gene:
                print(f"ratio ~ x + (1 + x|donor) / {models[ref][0]}: {per_gene['slope_x'] / per_gene[ref]:.2f}")


if __name__ == "__main__":
    main()
