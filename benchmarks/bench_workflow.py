"""Scale benchmark of the Snakemake workflow: a simulated 1,000,000 cells × 20,000 genes h5ad through both analyses
(pseudobulk NB-QL and a cell-level NB GLMM with donor and batch random effects), locally or through SLURM.

Prints every job's wall time and peak resident memory (from Snakemake's `benchmark:` files) next to the memory it
requested (`mem_mb`, read from Snakemake's log), so the bound each job runs under is stated and checked (measured ≤
requested); the per-shard GLMM fit time (mean and max, and per 1,000 genes); the wall time of the whole run and the
peak resident memory of the process tree (sampled every 0.5 s); and a projection of the wall time over N cluster
nodes from the measured figures. Bar: ≤ 1 hour and ≤ 16 GB on 2 cores.

    .venv/bin/python benchmarks/bench_workflow.py                      # the full size, locally (not part of CI)
    .venv/bin/python benchmarks/bench_workflow.py --executor slurm     # the same through the SLURM profile
    .venv/bin/python benchmarks/bench_workflow.py --n-cells 50000 --n-genes 2000 --shards 2   # a quick check

`--executor slurm` runs Snakemake here (the "login node") with `workflow/profiles/slurm`, one SLURM job per rule
instance, on a cluster without an accounting database (`--slurm-status-command squeue --slurm-no-account`, as
tests/test_slurm.py); `bash .ci/slurm-up.sh` starts a single-node SLURM on this machine (root). Each executor runs in
its own folder under --workdir (`run-local`, `run-slurm`); jobs import scmlm from this checkout (PYTHONPATH).

The input is simulated here, in row blocks written straight into the h5ad (so memory stays small), from the same
negative-binomial GLMM as `scmlm simulate`: log mu = log s_i + log mu_g + logfc_g·case + cell-type shift + donor and
batch effects, NB2 dispersion per gene, ~2,000 UMIs and ~8 % non-zeros per cell. Donors come in case/control pairs
sharing a batch, so batch and condition are not confounded. The h5ad is kept in --workdir/data and reused by later
runs (of either executor) with the same size and seed; its simulation time is reported apart from the workflow's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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


def requested_resources(log_text: str) -> dict[str, dict]:
    """Threads and `mem_mb` of every job, keyed by its benchmark file, from the job records Snakemake logs."""
    found = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", log_text, flags=re.M):  # a job record starts "rule X:"
        bench = re.search(r"^\s+benchmark: (\S+)$", block, re.M)
        res = re.search(r"^\s+resources: (.+)$", block, re.M)
        if not (bench and res):
            continue
        fields = dict(kv.split("=", 1) for kv in res.group(1).split(", ") if "=" in kv)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        found[bench.group(1)] = {
            "threads": int(threads.group(1)) if threads else 1,
            "mem_mb": float(fields["mem_mb"]) if "mem_mb" in fields else math.nan,
        }
    return found


def _rule_of(stem: str) -> str:
    if stem.startswith("fit_glmm_"):
        return "fit_glmm"
    if stem.startswith("split_"):
        return "split_shards"
    return stem


def job_table(run: Path, requested: dict[str, dict]) -> pd.DataFrame:
    """One row per job: wall and CPU seconds, peak RSS (MiB, Snakemake's benchmark) and the requested mem_mb."""
    bench_dir = run / "results" / "benchmarks"
    rows = []
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t").iloc[-1]
        req = requested.get(str(tsv.relative_to(run)), {})
        rows.append(
            {
                "job": tsv.stem if tsv.parent == bench_dir else f"{tsv.parent.name}: {tsv.stem}",
                "analysis": "" if tsv.parent == bench_dir else tsv.parent.name,
                "rule": _rule_of(tsv.stem),
                "threads": req.get("threads", 1),
                "wall_s": float(b["s"]),
                "cpu_s": float(b["cpu_time"]) if "cpu_time" in b else math.nan,
                "max_rss_mb": float(b["max_rss"]),
                "mem_mb": req.get("mem_mb", math.nan),
            }
        )
    jobs = pd.DataFrame(rows)
    jobs["rss/mem"] = jobs["max_rss_mb"] / jobs["mem_mb"]
    jobs["within"] = jobs["max_rss_mb"] <= jobs["mem_mb"]
    return jobs


def _wall(jobs: pd.DataFrame, rule: str, analysis: str | None = None) -> float:
    sel = jobs[(jobs["rule"] == rule) & ((jobs["analysis"] == analysis) if analysis is not None else True)]
    return float(sel["wall_s"].max()) if len(sel) else 0.0


def projection(jobs: pd.DataFrame, n_genes: int, shards: int, nodes=(1, 2, 4, 8, 16, 32)) -> tuple[dict, pd.DataFrame]:
    """Wall time over N nodes (each like this machine) from the measured jobs.

    T(1) = the sum of all jobs' wall times (one job after another on one node). For N ≥ 2, every job on a node of its
    own: T(N) = max(T_pb, T_pre + ceil(S/N)·t_shard + T_post) + T_final, with T_pre = max(split_shards, warmup),
    t_shard the slowest GLMM shard, T_post = merge + max(hierarchy, plot), T_pb = aggregate + fit_pseudobulk + plot
    of the pseudobulk analysis (run beside the GLMM chain), T_final = summary + report_html. With S = N shards instead
    of the measured S, t_shard is scaled by genes: t_1k · (G / 1000) / N.
    """
    glmm = jobs[jobs["rule"] == "fit_glmm"]
    glmm_names = sorted(glmm["analysis"].unique())
    pb_names = sorted(jobs.loc[jobs["rule"] == "fit_pseudobulk", "analysis"].unique())
    t_shard_mean, t_shard_max = float(glmm["wall_s"].mean()), float(glmm["wall_s"].max())
    t_1k = t_shard_mean / (n_genes / shards / 1000)
    t_pre = max(_wall(jobs, "split_shards"), _wall(jobs, "warmup"))
    t_post = max(
        (_wall(jobs, "merge", a) + max(_wall(jobs, "hierarchy", a), _wall(jobs, "plot", a)) for a in glmm_names),
        default=0.0,
    )
    t_pb = _wall(jobs, "aggregate") + max(
        (_wall(jobs, "fit_pseudobulk", a) + _wall(jobs, "plot", a) for a in pb_names), default=0.0
    )
    t_final = _wall(jobs, "summary") + _wall(jobs, "report_html")
    t_all = float(jobs["wall_s"].sum())
    figures = {
        "t_shard_mean_s": t_shard_mean,
        "t_shard_max_s": t_shard_max,
        "t_shard_per_1k_genes_s": t_1k,
        "genes_per_shard": n_genes / shards,
        "T_pre_s": t_pre,
        "T_post_s": t_post,
        "T_pb_s": t_pb,
        "T_final_s": t_final,
        "T_sum_all_jobs_s": t_all,
        "glmm_analyses": len(glmm_names),
    }
    rows = []
    for n in nodes:
        if n == 1:
            fixed = scaled = t_all
        else:
            waves = math.ceil(shards * len(glmm_names) / n)
            fixed = max(t_pb, t_pre + waves * t_shard_max + t_post) + t_final
            per_shard = t_1k * n_genes / 1000 / n
            scaled = max(t_pb, t_pre + len(glmm_names) * per_shard + t_post) + t_final
        rows.append({"nodes": n, f"T (S={shards}) min": fixed / 60, "T (S=N) min": scaled / 60})
    return figures, pd.DataFrame(rows)


def _slurm_args(run: Path) -> list[str]:
    """The repository's SLURM profile on a cluster without accounting (squeue status, no account), as the tests."""
    if shutil.which("sinfo") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        raise SystemExit("no SLURM cluster answers `sinfo`; start the local one with `bash .ci/slurm-up.sh` (root)")
    return [
        "--profile",
        str(REPO / "workflow" / "profiles" / "slurm"),
        "--slurm-status-command",
        "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--slurm-logdir",
        str(run / "slurm_logs"),
        "--retries",
        "0",  # a job over its memory or time fails the benchmark instead of being retried with more
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--n-donors", type=int, default=20)
    ap.add_argument("--n-batches", type=int, default=5)
    ap.add_argument("--n-cell-types", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2, help="local cores; also config.threads (CPUs of a GLMM shard job)")
    ap.add_argument("--executor", choices=("local", "slurm"), default="local")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scmlm_bench"))
    ap.add_argument("--analyses", default="pb,glmm", help="comma-separated subset of pb,glmm")
    args = ap.parse_args()

    work = args.workdir.resolve()
    name = f"cells_{args.n_cells}x{args.n_genes}_d{args.n_donors}_b{args.n_batches}_ct{args.n_cell_types}_s{args.seed}"
    data = work / "data" / f"{name}.h5ad"
    print(
        f"scmlm workflow benchmark ({args.executor}): {args.n_cells:,} cells × {args.n_genes:,} genes, "
        f"{args.n_donors} donors, {args.n_cell_types} cell types, {args.shards} GLMM shards, threads {args.cores}"
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
    run = work / f"run-{args.executor}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "config").mkdir(parents=True)
    (run / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the jobs (and SLURM's, which inherit this environment) run scmlm from this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(run)]
    cmd += ["--configfile", str(run / "config" / "config.yaml")]
    cmd += ["--cores", str(args.cores)] if args.executor == "local" else _slurm_args(run)
    t0 = time.perf_counter()
    with open(run / "snakemake.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run)
        mem = TreeMemory(proc.pid)
        mem.start()
        rc = proc.wait()
        mem.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"snakemake failed ({rc}); see {run / 'snakemake.log'} and {run / 'results' / 'logs'}")
        return rc

    jobs = job_table(run, requested_resources((run / "snakemake.log").read_text()))
    shown = jobs.drop(columns=["analysis", "rule"])
    print()
    print("every job: wall and CPU seconds, peak RSS (MiB) against the memory it requested (mem_mb)")
    print(shown.to_string(index=False, float_format=lambda x: f"{x:,.2f}" if abs(x) < 10 else f"{x:,.0f}"))
    over = jobs[~jobs["within"]]
    print(
        f"memory bound: {len(jobs) - len(over)} of {len(jobs)} jobs within their request"
        + ("" if over.empty else f"; OVER: {', '.join(over['job'])}")
    )

    figures, proj = projection(jobs, args.n_genes, args.shards)
    # the same from CPU time: each job alone on its node, its threads busy (on a shared machine wall time is longer)
    cpu_figures, cpu_proj = projection(jobs.assign(wall_s=jobs["cpu_s"] / jobs["threads"]), args.n_genes, args.shards)
    proj = proj.merge(cpu_proj.rename(columns=lambda c: c if c == "nodes" else f"{c} (CPU)"), on="nodes")
    glmm = jobs[jobs["rule"] == "fit_glmm"]
    print(
        f"\nGLMM shards: {len(glmm)} jobs of {figures['genes_per_shard']:,.0f} genes × {args.n_cells:,} cells, "
        f"{args.cores} threads each: wall mean {figures['t_shard_mean_s']:.0f} s, max {figures['t_shard_max_s']:.0f} s "
        f"({figures['t_shard_per_1k_genes_s']:.1f} s per 1,000 genes); peak RSS max {glmm['max_rss_mb'].max():,.0f} "
        f"MiB of {glmm['mem_mb'].max():,.0f} requested"
    )
    where = "the process tree" if args.executor == "local" else "Snakemake on the login node (jobs run under slurmd)"
    print(f"\nworkflow wall time {wall / 60:.1f} min; peak resident memory of {where} {mem.peak / 1e9:.2f} GB")
    print(f"sum of all jobs' wall times {figures['T_sum_all_jobs_s'] / 60:.1f} min")
    print(
        "\nprojection over N nodes like this one (T(1): all jobs one after another; N ≥ 2: every job on its own node)\n"
        f"  T(N) = max(T_pb, T_pre + ceil(S·A/N)·t_shard + T_post) + T_final, A = {figures['glmm_analyses']} "
        f"GLMM analyses\n  T_pre = max(split_shards, warmup) = {figures['T_pre_s']:.0f} s, "
        f"t_shard (slowest) = {figures['t_shard_max_s']:.0f} s, T_post = merge + max(hierarchy, plot) = "
        f"{figures['T_post_s']:.0f} s,\n  T_pb = aggregate + fit_pseudobulk + plot = {figures['T_pb_s']:.0f} s, "
        f"T_final = summary + report_html = {figures['T_final_s']:.0f} s; "
        f"S=N: t_shard = {figures['t_shard_per_1k_genes_s']:.1f} s × (G/1000)/N"
    )
    print(
        f"  from CPU time (job time = CPU s / threads): t_shard mean {cpu_figures['t_shard_mean_s']:.0f} s "
        f"({cpu_figures['t_shard_per_1k_genes_s']:.1f} s per 1,000 genes), T_pre {cpu_figures['T_pre_s']:.0f} s, "
        f"T_post {cpu_figures['T_post_s']:.0f} s, T_pb {cpu_figures['T_pb_s']:.0f} s, "
        f"T_final {cpu_figures['T_final_s']:.0f} s"
    )
    print(proj.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))

    peak_gb = mem.peak / 1e9
    ok = wall <= 3600 and (args.executor != "local" or peak_gb <= 16) and over.empty
    print(f"\nbar (≤ 60 min, ≤ 16 GB, every job within its memory request): {'met' if ok else 'NOT met'}")
    summary = {
        "executor": args.executor,
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "shards": args.shards,
        "cores": args.cores,
        "input_gb": data.stat().st_size / 1e9,
        "wall_s": wall,
        "peak_rss_gb": peak_gb,
        "figures": figures,
        "figures_from_cpu": cpu_figures,
        "projection": proj.to_dict(orient="records"),
        "jobs": jobs.to_dict(orient="records"),
    }
    (run / "bench_workflow.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
