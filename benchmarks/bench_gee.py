"""``scmlm.tl.gee_de`` against ``scmlm.tl.glmm_de`` on the same data.

Prints the CPU time (``time.process_time``: this process, all threads) of gee_de (NB, exchangeable working
correlation, default options) and of glmm_de ``~ condition + (1|donor)`` (default options) on the same simulated
case-control set of 40,000 cells (10 donors × 4,000 cells) and ``--genes`` genes, n_jobs=1, one BLAS thread, and
their ratio. Bar (issue 20): gee_de ≤ 2 × glmm_de.

    python benchmarks/bench_gee.py [--genes 500] [--cells 4000] [--donors 10]

Timings exclude simulating the data and numba's one-off compilation (a warm-up fit of each tool runs first).
Measured (2-core machine shared with other jobs; 300 genes): before the numba kernel gee_de 9.87 s, glmm_de
1.92 s (5.1 ×); after, see ``docs/gee_vs_glmm.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings

CONTRAST = ("condition", "case", "ctrl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--cells", type=int, default=4000)
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
            t = time.process_time()
            res = run(adata)
            times[name] = time.process_time() - t
            st = res.table["status"].value_counts().to_dict()
            print(f"{name:8s} {times[name]:7.2f} s CPU   status: {st}")
    print(f"gee_de / glmm_de = {times['gee_de'] / times['glmm_de']:.2f} (bar: <= 2)")


if __name__ == "__main__":
    main()
