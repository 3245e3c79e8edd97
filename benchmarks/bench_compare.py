"""CPU time of the main fits in two checkouts of scmlm, measured alternately (for "no slowdown" claims).

A restructuring must not slow the numerics down. Wall time on a shared machine moves by tens of per cent with the
load; CPU time of a single-threaded fit (BLAS pinned to one thread, ``n_jobs=1``) moves far less, and running the two
checkouts alternately, each call in a fresh process, spreads what noise remains evenly over both. Every call is
timed after one warm-up call in the same process (numba kernels loaded from the cache, imports done).

    python benchmarks/bench_compare.py --before /path/to/old/checkout [--after .] [--rounds 5]

Prints, per case, the median and minimum CPU seconds of each checkout and the ratio of medians (after / before).
Cases: ``glmm_de`` with ``(1|donor)`` and with ``(1|donor) + (1|batch)`` (2,000 genes × 4,000 cells, the default
call), ``pseudobulk_de`` nb_ql and voom (2,000 genes × 10 samples and 20,000 × 200), ``gee_de`` (500 genes ×
3,000 cells).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = ("glmm_a", "glmm_b", "nb_ql_small", "voom_small", "nb_ql_large", "voom_large", "gee")

_CHILD = r"""
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from threadpoolctl import threadpool_limits
import scmlm

case, reps = sys.argv[1], int(sys.argv[2])
c = ("condition", "case", "ctrl")
if case.startswith("glmm"):
    a = scmlm.datasets.simulate(n_donors=10, n_cells=400, n_genes=2000, n_batches=3, seed=0)
    design = "~ condition + (1|donor)" if case == "glmm_a" else "~ condition + (1|donor) + (1|batch)"
    run = lambda: scmlm.tl.glmm_de(a, design, c, n_jobs=1, inplace=False)
elif case == "gee":
    a = scmlm.datasets.simulate(n_donors=10, n_cells=300, n_genes=500, n_batches=3, seed=0)
    run = lambda: scmlm.tl.gee_de(a, "~ condition", c, n_jobs=1, inplace=False)
else:
    method = case.split("_")[0] if case.startswith("voom") else "nb_ql"
    small = case.endswith("small")
    rng = np.random.default_rng(0)
    genes, samples = (2000, 10) if small else (20000, 200)
    mu = np.exp(rng.normal(3, 1.5, genes))[:, None] * rng.uniform(0.7, 1.3, samples)
    counts = rng.negative_binomial(5, 5 / (5 + mu)).T.astype(float)
    import anndata as ad, pandas as pd
    cond = pd.Categorical(np.repeat(["ctrl", "case"], samples // 2), categories=["ctrl", "case"])
    obs = pd.DataFrame({"condition": cond}, index=[f"s{i}" for i in range(samples)])
    pb = ad.AnnData(counts, obs=obs)
    run = lambda: scmlm.tl.pseudobulk_de(pb, "~ condition", c, method=method, inplace=False, rows_are_samples=True)
with threadpool_limits(1):
    run()
    times = []
    for _ in range(reps):
        t = time.process_time()
        run()
        times.append(time.process_time() - t)
print(json.dumps(times))
"""


def _measure(checkout: Path, case: str, reps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, case, str(reps)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", default=Path(__file__).resolve().parents[1], type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1, help="timed calls per process")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    print(f"before: {args.before}\nafter:  {args.after}\nCPU seconds per call, {args.rounds} alternating rounds")
    print(f"{'case':<13} {'before med':>10} {'min':>7} {'after med':>10} {'min':>7} {'after/before':>13}")
    for case in args.cases.split(","):
        before, after = [], []
        for r in range(args.rounds):
            order = [(args.before, before), (args.after, after)]
            for checkout, acc in order if r % 2 == 0 else order[::-1]:
                acc.extend(_measure(checkout, case, args.reps))
        mb, ma = statistics.median(before), statistics.median(after)
        print(f"{case:<13} {mb:>10.3f} {min(before):>7.3f} {ma:>10.3f} {min(after):>7.3f} {ma / mb:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
