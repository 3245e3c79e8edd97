"""Cell-level NB GLMM through the public API (``scmlm.tl.glmm_de``), against statsmodels' mixed GLM.

Prints, in one run (each measurement in its own process, so peak memory is its own):
  (a) ``~ condition + (1|donor)``              NB GLMM, 2,000 genes, 10 donors × 400 cells, n_jobs=1
  (b) ``~ condition + (1|donor) + (1|batch)``  same data and settings
  (c) statsmodels ``PoissonBayesMixedGLM.fit_map`` (donor + batch variance components) on 20 genes, × 100
  and (b) at 40,000 and 400,000 cells (10 donors × 4,000 / 40,000 cells) with peak memory.
Bars (issue): (b) ≤ 6 s on one core; time at most linear in cells; peak memory at 400,000 cells ≤ 4 GB.

    python benchmarks/bench_glmm.py [--genes 2000] [--skip-large]

Timings exclude simulating the data and numba's one-off compilation (a warm-up fit runs first; the compile is
cached on disk and printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

DESIGNS = {
    "a": "~ condition + (1|donor)",
    "b": "~ condition + (1|donor) + (1|batch)",
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _data(cells_per_donor: int, genes: int, seed: int = 0):
    import numpy as np

    import scmlm

    adata = scmlm.datasets.simulate(n_donors=10, n_cells=cells_per_donor, n_genes=genes, n_batches=3, seed=seed)
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    return adata[keep].copy()


def _data_file(args) -> str:
    """Simulated data for this size, written once by a separate process (so its memory is not counted)."""
    from pathlib import Path

    path = Path(args.workdir) / f"cells_{args.cells}x10_{args.genes}.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        here = str(Path(__file__).parent)
        code = (
            f"import sys; sys.path.insert(0, {here!r}); import bench_glmm as b; a = b._data({args.cells}, "
            f"{args.genes}); del a.layers['counts']; a.write_h5ad({str(path)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return str(path)


def run_scmlm(args) -> dict:
    from threadpoolctl import threadpool_limits

    import scmlm

    warm = _data(40, 20, seed=99)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scmlm.tl.glmm_de(warm, DESIGNS[args.which], ("condition", "case", "ctrl"), inplace=False)
    warm_s = time.perf_counter() - t
    import anndata as ad

    adata = ad.read_h5ad(args.data)
    base = _peak_gb()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        res = scmlm.tl.glmm_de(adata, DESIGNS[args.which], ("condition", "case", "ctrl"), n_jobs=1, inplace=False)
        secs = time.perf_counter() - t
    st = res.table["status"].value_counts().to_dict()
    return {
        "seconds": secs,
        "warmup_seconds": warm_s,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "status": {k: int(v) for k, v in st.items()},
        "peak_gb": _peak_gb(),
        "before_fit_gb": base,
    }


def run_statsmodels(args) -> dict:
    import numpy as np
    from statsmodels.genmod.bayes_mixed_glm import PoissonBayesMixedGLM
    from threadpoolctl import threadpool_limits

    adata = _data(args.cells, args.genes)
    obs = adata.obs
    X = adata.X.tocsc()
    total = np.asarray(X.sum(axis=1)).ravel()
    exog = np.column_stack([np.ones(adata.n_obs), (obs["condition"] == "case").to_numpy(float)])
    donor = obs["donor"].cat.codes.to_numpy()
    batch = obs["batch"].cat.codes.to_numpy()
    exog_vc = np.hstack([np.eye(donor.max() + 1)[donor], np.eye(batch.max() + 1)[batch]])
    ident = np.r_[np.zeros(donor.max() + 1, int), np.ones(batch.max() + 1, int)]
    # the model has no offset argument: put log total counts in as a covariate (the cost is what is measured)
    exog = np.column_stack([exog, np.log(total)])
    expressed = np.flatnonzero(np.diff(X.indptr) >= 10)[: args.sm_genes]
    n_ok = 0
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        for g in expressed:
            y = X[:, g].toarray().ravel()
            m = PoissonBayesMixedGLM(y, exog, exog_vc, ident, vcp_p=1.0)
            r = m.fit_map()
            n_ok += bool(np.all(np.isfinite(r.params)))
        secs = time.perf_counter() - t
    return {"seconds": secs, "n_genes": int(len(expressed)), "n_ok": n_ok, "peak_gb": _peak_gb()}


def _sub(extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise SystemExit(f"benchmark step {extra} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--sm-genes", type=int, default=20)
    p.add_argument("--skip-large", action="store_true", help="skip the 400,000-cell run")
    p.add_argument("--step", choices=["scmlm", "statsmodels"], help=argparse.SUPPRESS)
    p.add_argument("--which", choices=["a", "b"], default="b", help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, default=400, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/scmlm_bench_glmm", help="where the simulated h5ad files are cached")
    args = p.parse_args()
    if args.step == "scmlm":
        args.data = args.data or _data_file(args)
        print(json.dumps(run_scmlm(args)))
        return
    if args.step == "statsmodels":
        print(json.dumps(run_statsmodels(args)))
        return
    g = ["--genes", str(args.genes)]
    print(f"GLMM benchmark: scmlm.datasets.simulate() 10 donors × 400 cells, {args.genes} genes, 3 batches; n_jobs=1")
    ra = _sub(["--step", "scmlm", "--which", "a", *g])
    rb = _sub(["--step", "scmlm", "--which", "b", *g])
    rs = _sub(["--step", "statsmodels", "--sm-genes", str(args.sm_genes), *g])
    extrap = rs["seconds"] / max(rs["n_genes"], 1) * args.genes
    print(f"  (a) {DESIGNS['a']:<40s} {ra['seconds']:7.2f} s  status {ra['status']}")
    print(
        f"  (b) {DESIGNS['b']:<40s} {rb['seconds']:7.2f} s  status {rb['status']}   bar ≤ 6 s: "
        f"{'PASS' if rb['seconds'] <= 6 else 'FAIL'}"
    )
    print(
        f"  (c) statsmodels PoissonBayesMixedGLM.fit_map: {rs['seconds']:.2f} s for {rs['n_genes']} genes → "
        f"{extrap:.0f} s extrapolated to {args.genes} genes ({extrap / rb['seconds']:.0f}× (b))"
    )
    print(f"      (numba warm-up of the first fit in a process: {rb['warmup_seconds']:.1f} s; 0.1 s once cached)")
    rows = [(4000, rb)]
    sizes = [4000] + ([40000] if args.skip_large else [40000, 400000])
    for n in sizes[1:]:
        rows.append((n, _sub(["--step", "scmlm", "--which", "b", "--cells", str(n // 10), *g])))
    print("  scaling of (b):")
    base_s = rows[0][1]["seconds"]
    for n, r in rows:
        print(
            f"    {r['n_cells']:>8,} cells: {r['seconds']:7.2f} s ({r['seconds'] / base_s:5.1f}× for "
            f"{n / 4000:.0f}× cells), peak memory {r['peak_gb']:.2f} GB (data loaded {r['before_fit_gb']:.2f} GB)"
        )
    if len(rows) == 3:
        r = rows[2][1]
        lin = r["seconds"] / base_s <= 100 * 1.2
        print(
            f"  bars: linear in cells {'PASS' if lin else 'FAIL'}; 400k-cell peak ≤ 4 GB: "
            f"{'PASS' if r['peak_gb'] <= 4 else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
