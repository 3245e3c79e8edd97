"""Speed and memory of the cell-level NB GLMM kernel (``y ~ condition + (1|donor) + (1|batch) + offset``).

Usage::

    .venv/bin/python benchmarks/bench_glmm_kernel.py                  # 10 donors x 400 cells = 4,000 cells
    .venv/bin/python benchmarks/bench_glmm_kernel.py --cells 4000     # 40,000 cells
    .venv/bin/python benchmarks/bench_glmm_kernel.py --cells 40000    # 400,000 cells
    .venv/bin/python benchmarks/bench_glmm_kernel.py --method ML --genes 500

The data come from ``scmlm.datasets.simulate`` (2,000 genes by default) and are written to a temporary ``.npz``;
a fresh process then loads them and fits every gene on one core (BLAS pinned to one thread) in chunks of 128 genes,
as the engine sends them. It prints the seconds of ``prepare_glmm`` and of the fits (numba's first call, which loads
the on-disk cache or compiles, is timed separately), the statuses, the peak resident memory of the fitting process
(data included) and its peak before the fits started (data and design loaded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def simulate_to_disk(args, path: Path) -> dict:
    from scmlm.datasets import simulate

    t0 = time.perf_counter()
    adata = simulate(n_donors=args.donors, n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    X = sp.csr_matrix(adata.X)
    keep = np.diff(X.indptr) > 0  # cells without counts have no offset; drop them while the matrix is CSR
    obs = adata.obs[keep]
    Y = sp.csc_matrix(X[keep], dtype=np.float32)
    del adata, X
    sp.save_npz(path / "Y.npz", Y, compressed=False)
    np.savez(
        path / "obs.npz",
        donor=obs["donor"].cat.codes.to_numpy(),
        batch=obs["batch"].cat.codes.to_numpy(),
        case=(obs["condition"] == "case").to_numpy(),
    )
    return {
        "n_cells": Y.shape[0],
        "n_genes": Y.shape[1],
        "density": Y.nnz / np.prod(Y.shape),
        "simulate_s": time.perf_counter() - t0,
    }


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def fit_from_disk(path: Path, chunk: int, method: str) -> dict:
    from threadpoolctl import threadpool_limits

    from scmlm.models import fit_glmm, intercept_term, prepare_glmm

    Y = sp.load_npz(path / "Y.npz").tocsc()
    o = np.load(path / "obs.npz")
    n = Y.shape[0]
    total = np.zeros(n)
    for start in range(0, Y.shape[1], chunk):  # column blocks: no float64 copy of the whole matrix
        blk = Y[:, start : start + chunk]
        total += np.bincount(blk.indices, weights=blk.data.astype(np.float64), minlength=n)
    X = np.column_stack([np.ones(n), o["case"].astype(float)])
    terms = [intercept_term("donor", o["donor"]), intercept_term("batch", o["batch"])]
    offset = np.log(total)
    out: dict = {}
    with threadpool_limits(1):
        t0 = time.perf_counter()
        design = prepare_glmm(X, terms, offset, family="nb")
        out["prepare_s"] = time.perf_counter() - t0
        out["patterns"] = design.n_patterns
        t0 = time.perf_counter()
        fit_glmm(Y[:, :2], design, method=method)
        out["first_call_s"] = time.perf_counter() - t0
        out["rss_before_fit_gb"] = peak_rss_gb()
        t0 = time.perf_counter()
        status, n_iter = [], []
        for start in range(0, Y.shape[1], chunk):
            res = fit_glmm(Y[:, start : start + chunk], design, method=method)
            status.append(res.status)
            n_iter.append(res.n_iter)
        out["fit_s"] = time.perf_counter() - t0
    status = np.concatenate(status)
    u, c = np.unique(status, return_counts=True)
    out["status"] = {str(k): int(v) for k, v in zip(u, c, strict=True)}
    out["median_outer_iter"] = float(np.median(np.concatenate(n_iter)))
    out["data_gb"] = (Y.data.nbytes + Y.indices.nbytes + Y.indptr.nbytes) / 1024**3
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--donors", type=int, default=10)
    ap.add_argument("--cells", type=int, default=400, help="cells per donor")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--method", default="REML")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit_dir:
        print(json.dumps(fit_from_disk(Path(args.fit_dir), args.chunk, args.method)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        info = simulate_to_disk(args, Path(tmp))
        print(
            f"data: {info['n_cells']} cells x {info['n_genes']} genes, {info['density']:.3f} non-zero "
            f"(simulated in {info['simulate_s']:.1f} s)"
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--fit-dir", tmp, "--chunk", str(args.chunk), "--method", args.method],
            check=True,
            capture_output=True,
            text=True,
        )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    g = info["n_genes"]
    print(f"prepare_glmm: {r['prepare_s']:.2f} s ({r['patterns']} patterns); first call: {r['first_call_s']:.1f} s")
    print(f"fit {g} genes ({args.method}, 1 core): {r['fit_s']:.2f} s = {1e3 * r['fit_s'] / g:.2f} ms/gene")
    print(f"status: {r['status']}; median outer iterations {r['median_outer_iter']:.0f}")
    print(
        f"memory: counts (float32 CSC) {r['data_gb']:.2f} GB; peak RSS of the fitting process "
        f"{r['peak_rss_gb']:.2f} GB ({r['rss_before_fit_gb']:.2f} GB with the data and design loaded, before fitting)"
    )


if __name__ == "__main__":
    main()
