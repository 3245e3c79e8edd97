"""``scmlm.tl.gee_de`` against ``scmlm.tl.glmm_de`` on the same data.

Prints the time of gee_de (NB, exchangeable working correlation, default small-sample correction) and of glmm_de
``~ condition + (1|donor)`` for 2,000 genes of a simulated case-control set (10 donors, ``--cells`` per donor),
n_jobs=1, one BLAS thread, and their ratio. Bar (issue): gee_de ≤ 3 × glmm_de.

    python benchmarks/bench_gee.py [--genes 2000] [--cells 300] [--donors 10]

Timings exclude simulating the data and numba's one-off compilation (a warm-up fit of each tool runs first).
"""

from __future__ import annotations

import argparse
import time
import warnings

CONTRAST = ("condition", "case", "ctrl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--donors", type=int, default=10)
    args = ap.parse_args()

    import numpy as np
    from threadpoolctl import threadpool_limits

    import scmlm

    def data(n_donors, n_cells, n_genes, seed):
        a = scmlm.datasets.simulate(n_donors=n_donors, n_cells=n_cells, n_genes=n_genes, seed=seed)
        return a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()

    warm = data(6, 40, 20, 99)
    adata = data(args.donors, args.cells, args.genes, 0)
    print(f"data: {adata.n_obs} cells ({args.donors} donors x {args.cells}), {adata.n_vars} genes")
    times = {}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, run in (
            ("gee_de", lambda a: scmlm.tl.gee_de(a, "~ condition", CONTRAST, n_jobs=1, inplace=False)),
            ("glmm_de", lambda a: scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST, n_jobs=1, inplace=False)),
        ):
            run(warm)
            t = time.perf_counter()
            res = run(adata)
            times[name] = time.perf_counter() - t
            st = res.table["status"].value_counts().to_dict()
            print(f"{name:8s} {times[name]:7.2f} s   status: {st}")
    print(f"gee_de / glmm_de = {times['gee_de'] / times['glmm_de']:.2f} (bar: <= 3)")


if __name__ == "__main__":
    main()
