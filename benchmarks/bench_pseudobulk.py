"""Pseudobulk aggregation at atlas scale: in memory and streamed from a backed h5ad.

Default: 1,000,000 cells × 20,000 genes, ~5 % non-zero (1e9 stored counts), 100 donors × 8 cell types.
Bars (issue): ≤ 10 s in memory on a 2-core machine; backed peak memory ≤ 1.5 GB above the output.

    python benchmarks/bench_pseudobulk.py [--n-cells 1000000] [--n-genes 20000] [--workdir /tmp/scmlm_bench]

Each measurement runs in its own process so that peak resident memory (ru_maxrss) belongs to it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_data(n_cells: int, n_genes: int, density: float, n_donors: int, n_types: int, seed: int = 0):
    """A CSR count matrix with ~density non-zeros per row at random columns, plus obs."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    stride = max(1, round(1 / density))
    per_row = n_genes // stride
    nnz = n_cells * per_row
    indptr = np.arange(0, nnz + 1, per_row, dtype=np.int64)
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float32)
    base = (np.arange(per_row, dtype=np.int32) * stride)[None, :]
    chunk = 20_000
    for start in range(0, n_cells, chunk):
        stop = min(n_cells, start + chunk)
        rows = stop - start
        cols = base + rng.integers(0, stride, size=(rows, per_row), dtype=np.int32)
        indices[start * per_row : stop * per_row] = cols.ravel()
        data[start * per_row : stop * per_row] = rng.geometric(0.5, size=rows * per_row).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    donor = rng.integers(0, n_donors, n_cells)
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"d{d:03d}" for d in donor]),
            "cell_type": pd.Categorical([f"t{t}" for t in rng.integers(0, n_types, n_cells)]),
            "condition": pd.Categorical(np.where(donor % 2 == 0, "ctrl", "case"), categories=["ctrl", "case"]),
            "batch": pd.Categorical([f"b{d % 4}" for d in donor]),
        },
        index=pd.RangeIndex(n_cells).astype(str),
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)


def run_inmem(args) -> dict:
    import scmlm

    warm = make_data(2000, 100, 0.05, 10, 2)
    t = time.perf_counter()
    scmlm.pp.pseudobulk(warm, "donor", groups_key="cell_type")  # compile (or load) the numba kernel
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    adata = make_data(args.n_cells, args.n_genes, args.density, args.n_donors, args.n_types)
    gen_s = time.perf_counter() - t
    rss_before = _peak_rss_gb()
    t = time.perf_counter()
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type")
    secs = time.perf_counter() - t
    out = {
        "mode": "in memory",
        "nnz": int(adata.X.nnz),
        "seconds": secs,
        "compile_seconds": compile_s,
        "generate_seconds": gen_s,
        "n_rows_out": int(pb.n_obs),
        "peak_rss_gb": _peak_rss_gb(),
        "peak_rss_before_gb": rss_before,
    }
    if args.write:
        path = Path(args.workdir) / "cells.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        adata.write_h5ad(path)
        out["write_seconds"] = time.perf_counter() - t
        pb.write_h5ad(Path(args.workdir) / "pb_inmem.h5ad")
    return out


def run_backed(args) -> dict:
    import anndata as ad
    import numpy as np

    import scmlm

    warm = make_data(2000, 100, 0.05, 10, 2)
    scmlm.pp.pseudobulk(warm, "donor", groups_key="cell_type")
    del warm
    base = _peak_rss_gb()
    path = Path(args.workdir) / "cells.h5ad"
    t = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type", chunk_size=args.chunk_rows)
    secs = time.perf_counter() - t
    adata.file.close()
    out_gb = (pb.X.nbytes + pb.layers["counts"].nbytes + pb.layers["n_expressing"].nbytes) / 1024**3
    ref = ad.read_h5ad(Path(args.workdir) / "pb_inmem.h5ad")
    same = bool(np.array_equal(ref.X, pb.X) and np.array_equal(ref.layers["n_expressing"], pb.layers["n_expressing"]))
    peak = _peak_rss_gb()
    return {
        "mode": "backed",
        "seconds": secs,
        "output_gb": out_gb,
        "peak_rss_gb": peak,
        "baseline_rss_gb": base,
        "peak_above_output_gb": peak - base - out_gb,
        "equal_to_in_memory": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-genes", type=int, default=20_000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--n-donors", type=int, default=100)
    p.add_argument("--n-types", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=50_000)
    p.add_argument("--workdir", default="/tmp/scmlm_bench_pseudobulk")
    p.add_argument("--step", choices=["all", "inmem", "backed"], default="all")
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step != "all":
        res = run_inmem(args) if args.step == "inmem" else run_backed(args)
        print(json.dumps(res))
        return
    env = dict(os.environ)
    common = [sys.executable, __file__] + sys.argv[1:]
    print(
        f"pseudobulk benchmark: {args.n_cells:,} cells × {args.n_genes:,} genes, density {args.density}, "
        f"{args.n_donors} donors × {args.n_types} cell types, {os.cpu_count()} cores"
    )
    r1 = json.loads(
        subprocess.run(common + ["--step", "inmem", "--write"], env=env, capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    print(
        f"  in memory : {r1['seconds']:.2f} s for {r1['nnz']:,} stored counts → {r1['n_rows_out']} rows "
        f"(numba warm-up {r1['compile_seconds']:.1f} s, data generation {r1['generate_seconds']:.1f} s, "
        f"peak RSS {r1['peak_rss_gb']:.2f} GB incl. the input)   bar ≤ 10 s: "
        f"{'PASS' if r1['seconds'] <= 10 else 'FAIL'}"
    )
    r2 = json.loads(
        subprocess.run(common + ["--step", "backed"], env=env, capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    print(
        f"  backed    : {r2['seconds']:.2f} s; output {r2['output_gb']:.3f} GB; peak RSS {r2['peak_rss_gb']:.2f} GB "
        f"(baseline {r2['baseline_rss_gb']:.2f} GB) → {r2['peak_above_output_gb']:.2f} GB above baseline + output; "
        f"equal to in-memory: {r2['equal_to_in_memory']}   bar ≤ 1.5 GB: "
        f"{'PASS' if r2['peak_above_output_gb'] <= 1.5 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
