"""dream (``pseudobulk_de(method="voom")`` with a random term) on 2,000 genes × 12 pseudobulk samples.

Prints the time of ``scmlm.tl.pseudobulk_de(pb, "~ condition + (1|batch)", method="voom")`` on a simulated
case-control set (12 donors in 3 batches, summed per donor by ``scmlm.pp.pseudobulk``: 12 samples), one BLAS
thread, with the default df (Kenward–Roger below 20 samples) and with Satterthwaite; and ``method="nb_ql"`` for scale.
Bar (issue): ≤ 5 s for 2,000 genes × 12 samples.

    python benchmarks/bench_dream.py [--genes 2000]
"""

from __future__ import annotations

import argparse
import time
import warnings

CONTRAST = ("condition", "case", "ctrl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=2400, help="simulated genes (about 2,000 pass filterByExpr)")
    args = ap.parse_args()

    import numpy as np
    from threadpoolctl import threadpool_limits

    import scmlm
    from scmlm.models import voom

    adata = scmlm.datasets.simulate(n_donors=12, n_cells=400, n_genes=args.genes, n_batches=3, seed=0)
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    pb = scmlm.pp.pseudobulk(adata, "donor")
    print(f"data: {adata.n_obs} cells -> {pb.n_obs} pseudobulk samples (12 donors in 3 batches), {pb.n_vars} genes")
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [
            ("voom + (1|batch), default df", "~ condition + (1|batch)", "voom", None),
            ("voom + (1|batch), Satterthwaite", "~ condition + (1|batch)", "voom", "satterthwaite"),
            ("nb_ql ~ batch + condition", "~ batch + condition", "nb_ql", None),
        ]
        for label, design, method, ddf in runs:
            original = voom.dream  # the dream that voom_limma_multi calls
            if ddf is not None:
                voom.dream = lambda *a, _f=original, _d=ddf, **k: _f(*a, **{**k, "ddf": _d})
            try:
                t = time.perf_counter()
                res = scmlm.tl.pseudobulk_de(pb, design, CONTRAST, method=method, inplace=False)
                secs = time.perf_counter() - t
            finally:
                voom.dream = original
            tab = res.table
            tested = tab["pvalue"].notna().sum()
            print(f"{label:34s} {secs:6.2f} s  ({tested} genes tested, median df {tab['df'].median():.2f})")


if __name__ == "__main__":
    main()
