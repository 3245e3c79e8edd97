"""Scale benchmark of the Snakemake workflow: a simulated 1,000,000 cells × 20,000 genes h5ad through both analyses
(pseudobulk NB-QL and a cell-level NB GLMM with donor and batch random effects) on this machine.

Prints the wall time and peak memory of every rule (from Snakemake's `benchmark:` files), the wall time of the whole
run and the peak resident memory of the whole process tree (sampled every 0.5 s). Bar: ≤ 1 hour and ≤ 16 GB on 2 cores.

    .venv/bin/python benchmarks/bench_workflow.py                      # the full size (not part of CI)
    .venv/bin/python benchmarks/bench_workflow.py --n-cells 50000 --n-genes 2000 --shards 2   # a quick check

The input is simulated here, in row blocks written straight into the h5ad (so memory stays small), from the same
negative-binomial GLMM as `scmlm simulate`: log mu = log s_i + log mu_g + logfc_g·case + cell-type shift + donor and
batch effects, NB2 dispersion per gene, ~2,000 UMIs and ~8 % non-zeros per cell. Donors come in case/control pairs
sharing a batch, so batch and condition are not confounded. The h5ad is kept in --workdir and reused by later runs
with the same size and seed; its simulation time is reported apart from the workflow's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
BLOCK = 2500  # cells per simulated block


# ---- simulation ------------------------------------------------------------------------------------------------------
def _nb_block_kernel():
    import numba

    @numba.njit(nogil=True)
    def nb_block(seed, log_s, case, ct, donor, batch, log_mu, logfc, ct_shift, u, v, phi):
        """NB2 counts of a block of cells by inversion of the CDF; only non-zeros are stored (CSR parts)."""
        np.random.seed(seed)  # noqa: NPY002 (numba supports the legacy API only)
        n, g = log_s.shape[0], log_mu.shape[0]
        cap = max(1024, int(0.12 * n * g))
        indices = np.empty(cap, np.int32)
        data = np.empty(cap, np.float32)
        indptr = np.zeros(n + 1, np.int64)
        nnz = 0
        for i in range(n):
            for j in range(g):
                eta = log_s[i] + log_mu[j] + case[i] * logfc[j] + ct_shift[ct[i], j] + u[donor[i], j] + v[batch[i], j]
                pm = phi[j] * np.exp(eta)
                r = 1.0 / phi[j]
                pmf = np.exp(-r * np.log1p(pm))  # P(Y = 0)
                x = np.random.random()  # noqa: NPY002
                if x < pmf:
                    continue
                q = pm / (1.0 + pm)
                cdf = pmf
                k = 0
                while x >= cdf and pmf > 1e-300:
                    k += 1
                    pmf *= (k - 1 + r) / k * q
                    cdf += pmf
                if nnz == cap:
                    cap *= 2
                    indices2 = np.empty(cap, np.int32)
                    data2 = np.empty(cap, np.float32)
                    indices2[:nnz] = indices[:nnz]
                    data2[:nnz] = data[:nnz]
                    indices, data = indices2, data2
                indices[nnz] = j
                data[nnz] = k
                nnz += 1
            indptr[i + 1] = nnz
        return indptr, indices[:nnz].copy(), data[:nnz].copy()

    return nb_block


def _simulate_block(kernel, args):
    import scipy.sparse as sp

    seed, cells, genes = args
    indptr, indices, data = kernel(
        seed,
        cells["log_s"],
        cells["case"],
        cells["ct"],
        cells["donor"],
        cells["batch"],
        genes["log_mu"],
        genes["logfc"],
        genes["ct_shift"],
        genes["u"],
        genes["v"],
        genes["phi"],
    )
    return sp.csr_matrix((data, indices, indptr), shape=(len(cells["log_s"]), len(genes["log_mu"])))


def simulate_h5ad(path: Path, n_cells: int, n_genes: int, n_donors: int, n_batches: int, n_cell_types: int, seed: int):
    """Write the simulated counts (CSR float32 in .X) block by block; return (seconds, non-zeros)."""
    import h5py
    from anndata.io import sparse_dataset, write_elem
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    log_mu = np.clip(rng.normal(-3.3, 1.4, n_genes), -8.0, 3.0)
    phi = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    logfc = np.zeros(n_genes)
    de = rng.choice(n_genes, n_genes // 10, replace=False)
    logfc[de] = rng.choice([-1.0, 1.0], de.size) * rng.uniform(0.4, 1.2, de.size)
    ct_shift = rng.normal(0.0, 0.5, (n_cell_types, n_genes))
    ct_shift[0] = 0.0
    genes = {
        "log_mu": log_mu,
        "phi": phi,
        "logfc": logfc,
        "ct_shift": ct_shift,
        "u": rng.normal(size=(n_donors, n_genes)) * np.exp(rng.normal(np.log(0.35), 0.35, n_genes)),
        "v": rng.normal(size=(n_batches, n_genes)) * np.exp(rng.normal(np.log(0.2), 0.35, n_genes)),
    }
    per_donor = -(-n_cells // n_donors)
    donor = np.minimum(np.arange(n_cells) // per_donor, n_donors - 1).astype(np.int64)
    cells = {
        "donor": donor,
        "batch": (donor // 2) % n_batches,  # donors 2k (ctrl) and 2k+1 (case) share a batch
        "case": (donor % 2).astype(np.float64),
        "ct": rng.integers(0, n_cell_types, n_cells),
        "log_s": rng.normal(0.0, 0.25, n_cells),
    }
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical.from_codes(donor, [f"donor{d:02d}" for d in range(n_donors)]),
            "batch": pd.Categorical.from_codes(cells["batch"], [f"batch{k}" for k in range(n_batches)]),
            "condition": pd.Categorical.from_codes(donor % 2, ["ctrl", "case"]),
            "cell_type": pd.Categorical.from_codes(cells["ct"], [f"type{c}" for c in range(n_cell_types)]),
        },
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"logfc": logfc, "log_mu": log_mu, "dispersion": phi}, index=[f"g{j:05d}" for j in range(n_genes)]
    )

    blocks = [
        ((seed * 1_000_003 + b) % 2**32, {k: a[s : s + BLOCK] for k, a in cells.items()}, genes)
        for b, s in enumerate(range(0, n_cells, BLOCK))
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    nnz = 0
    with h5py.File(tmp, "w") as f:
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        X = None
        kernel = _nb_block_kernel()  # compiled once; releases the GIL, so two threads use both cores
        jobs = Parallel(n_jobs=2, prefer="threads", return_as="generator")(
            delayed(_simulate_block)(kernel, b) for b in blocks
        )
        for k, block in enumerate(jobs):
            if X is None:
                block.indptr = block.indptr.astype(np.int64)
                write_elem(f, "X", block)
                X = sparse_dataset(f["X"])
            else:
                X.append(block)
            nnz += block.nnz
            if k % 40 == 0:
                print(f"  simulated {min(n_cells, (k + 1) * BLOCK):,} / {n_cells:,} cells", file=sys.stderr, flush=True)
        for key in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        write_elem(f, "uns", {"simulate": {"n_donors": n_donors, "n_batches": n_batches, "seed": seed}})
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    os.replace(tmp, path)
    return time.perf_counter() - t0, nnz


# ---- measuring the run -----------------------------------------------------------------------------------------------
class TreeMemory(threading.Thread):
    """Peak of the summed resident memory of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._stop_event = pid, interval, 0, threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()


def rule_table(bench_dir: Path) -> pd.DataFrame:
    """One row per rule (and analysis) from Snakemake's benchmark files: jobs, wall seconds, peak RSS of a job."""
    rows = []
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        stem = "fit_glmm" if tsv.stem.startswith("fit_glmm_") else tsv.stem
        label = stem if tsv.parent == bench_dir else f"{tsv.parent.name}: {stem}"
        b = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"rule": label, "s": float(b["s"]), "max_rss_mb": float(b["max_rss"])})
    jobs = pd.DataFrame(rows)
    return (
        jobs.groupby("rule", sort=False)
        .agg(jobs=("s", "size"), wall_s_sum=("s", "sum"), wall_s_max=("s", "max"), peak_rss_mb=("max_rss_mb", "max"))
        .reset_index()
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--n-donors", type=int, default=20)
    ap.add_argument("--n-batches", type=int, default=5)
    ap.add_argument("--n-cell-types", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scmlm_bench"))
    ap.add_argument("--analyses", default="pb,glmm", help="comma-separated subset of pb,glmm")
    args = ap.parse_args()

    work = args.workdir.resolve()
    name = f"cells_{args.n_cells}x{args.n_genes}_d{args.n_donors}_b{args.n_batches}_ct{args.n_cell_types}_s{args.seed}"
    data = work / "data" / f"{name}.h5ad"
    print(
        f"scmlm workflow benchmark: {args.n_cells:,} cells × {args.n_genes:,} genes, {args.n_donors} donors, "
        f"{args.n_cell_types} cell types, {args.shards} GLMM shards, --cores {args.cores}"
    )
    if data.exists():
        print(f"input: reusing {data} ({data.stat().st_size / 1e9:.2f} GB)")
    else:
        print(f"simulating {data} ...")
        sim_s, nnz = simulate_h5ad(
            data, args.n_cells, args.n_genes, args.n_donors, args.n_batches, args.n_cell_types, args.seed
        )
        dens = nnz / (args.n_cells * args.n_genes)
        print(f"input: simulated in {sim_s:.0f} s, {nnz:,} non-zeros ({dens:.1%}), {data.stat().st_size / 1e9:.2f} GB")

    analyses = {
        "pb": {"name": "pb", "method": "pseudobulk", "design": "~ batch + condition"},
        "glmm": {"name": "glmm", "method": "glmm", "family": "nb", "design": "~ condition + (1|donor) + (1|batch)"},
    }
    chosen = [analyses[a] | {"contrast": ["condition", "case", "ctrl"]} for a in args.analyses.split(",")]
    config = {
        "input": str(data),
        "layer": None,
        "sample_key": "donor",
        "groups_key": "cell_type" if args.n_cell_types > 1 else None,
        "outdir": "results",
        "shards": args.shards,
        "threads": args.cores,
        "analyses": chosen,
    }
    import yaml

    # a full run every time: earlier results and Snakemake's records go, the simulated h5ad stays
    for old in (work / "results", work / ".snakemake"):
        shutil.rmtree(old, ignore_errors=True)
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(work)]
    cmd += ["--configfile", str(work / "config" / "config.yaml"), "--cores", str(args.cores)]
    t0 = time.perf_counter()
    with open(work / "snakemake.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        mem = TreeMemory(proc.pid)
        mem.start()
        rc = proc.wait()
        mem.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"snakemake failed ({rc}); see {work / 'snakemake.log'} and {work / 'results' / 'logs'}")
        return rc

    table = rule_table(work / "results" / "benchmarks")
    print()
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    peak_gb = mem.peak / 1e9
    print(f"\nworkflow wall time {wall / 60:.1f} min; peak resident memory of the process tree {peak_gb:.2f} GB")
    ok = wall <= 3600 and peak_gb <= 16
    print(f"bar (≤ 60 min, ≤ 16 GB): {'met' if ok else 'NOT met'}")
    summary = {
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "shards": args.shards,
        "cores": args.cores,
        "wall_s": wall,
        "peak_rss_gb": peak_gb,
        "rules": table.to_dict(orient="records"),
    }
    (work / "bench_workflow.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
