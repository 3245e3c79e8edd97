"""Gene-parallel GLMM fits and their memory: CPU and wall of ``n_jobs=2`` against ``n_jobs=1``, peak RSS.

The default call ``glmm_de(a, "~ condition + (1|donor) + (1|batch)", ("condition", "case", "ctrl"))`` on 2,000
genes, 20 donors in 3 batches, at 40,000 and 400,000 cells (``scmlm.datasets.simulate``, cells with zero counts
dropped). Prints, from one run:

  * per size: CPU seconds of the call with ``n_jobs=1`` and ``n_jobs=2`` (the process and its worker processes), the
    ratio CPU(2) / CPU(1) (bar: at most 1.15), and the wall speed-up wall(1) / wall(2) (bar: at least 1.7; only
    meaningful on two idle cores, so the load average is printed with it);
  * 400,000 cells with ``n_jobs=1``: CPU seconds (bar: 30 s) and peak RSS against the size of the input matrix
    (bar: input + 1 GB).

Each configuration runs in a fresh process (``--step``), itself started by a fresh process that reads its peak RSS
and CPU from ``resource.getrusage(RUSAGE_CHILDREN)`` once it has exited, so each peak is that configuration's own and
worker processes count. The data are simulated once by another process and cached as h5ad files in ``--workdir``.
A warm-up call on tiny data runs first in each configuration (imports, numba kernels loaded from the disk cache);
the measured call itself includes everything a user's second call pays, worker start-up included.

``--tool gee_de`` / ``--tool variance_partition`` measure those tools the same way (designs in ``TOOLS``);
``--backed`` opens the input with ``anndata.read_h5ad(path, backed="r")``, so the counts are read from the file
(the peak is then compared with the size the matrix would have in memory).

    python benchmarks/bench_parallel.py [--sizes 40000,400000] [--jobs 1,2] [--workdir /tmp/scmlm_bench_parallel]
        [--tool glmm_de|gee_de|variance_partition] [--backed] [--no-probe]
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
from pathlib import Path

DESIGN = "~ condition + (1|donor) + (1|batch)"
CONTRAST = ("condition", "case", "ctrl")
N_DONORS = 20
TOOLS: dict[str, str] = {
    "glmm_de": DESIGN,
    "gee_de": "~ condition",
    "variance_partition": "~ (1|donor) + (1|batch) + condition",
}
"""The tools measured (``--tool``) and the design each is called with (defaults otherwise; GEE: donors as clusters)."""


def _call(tool: str, adata, n_jobs: int):
    import scmlm

    if tool == "variance_partition":
        return scmlm.tl.variance_partition(adata, TOOLS[tool], n_jobs=n_jobs, inplace=False)
    return getattr(scmlm.tl, tool)(adata, TOOLS[tool], CONTRAST, n_jobs=n_jobs, inplace=False)


def _data_file(workdir: str, cells: int, genes: int) -> Path:
    path = Path(workdir) / f"cells_{cells}_genes_{genes}.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = (
            "import numpy as np, scmlm; "
            f"a = scmlm.datasets.simulate(n_donors={N_DONORS}, n_cells={cells // N_DONORS}, n_genes={genes}, "
            "n_batches=3, seed=0); "
            "a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy(); "
            "a.layers.clear(); "
            f"a.write_h5ad({str(path)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def step(args) -> dict:
    """One configuration, in this fresh process: warm-up, then the measured call."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    import scmlm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=20, n_batches=3, seed=99)
        _call(args.tool, warm, 1)
        del warm
    if args.backed:  # the counts stay on disk; their in-memory size is read from the file
        import h5py

        adata = ad.read_h5ad(args.data, backed="r")
        with h5py.File(args.data, "r") as f:
            g = f["X"]
            parts = [g[k] for k in ("data", "indices", "indptr")] if isinstance(g, h5py.Group) else [g]
            input_gb = sum(d.size * d.dtype.itemsize for d in parts) / 1024**3
            fmt, nnz = str(g.attrs.get("encoding-type", "dense")), int(parts[0].size)
        X = None
    else:
        adata = ad.read_h5ad(args.data)
        X = adata.X
        nbytes = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) if sp.issparse(X) else X.nbytes
        input_gb = nbytes / 1024**3
        fmt = X.format if sp.issparse(X) else "dense"
        nnz = int(X.nnz) if sp.issparse(X) else int(np.count_nonzero(X))
    loaded = _rss_gb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c0, ch0, w0 = time.process_time(), _cpu_children(), time.perf_counter()
        res = _call(args.tool, adata, args.n_jobs)
        wall = time.perf_counter() - w0
        cpu_self = time.process_time() - c0
    try:  # worker processes (loky) count once they have exited
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    except Exception:  # noqa: BLE001 - no executor was started
        pass
    cpu = cpu_self + _cpu_children() - ch0
    st = res.table["status"].value_counts().to_dict()
    return {
        "cells": int(adata.n_obs),
        "nnz": nnz,
        "format": fmt + (" backed" if args.backed else ""),
        "input_gb": input_gb,
        "rss_loaded_gb": loaded,
        "cpu": cpu,
        "cpu_main": cpu_self,
        "wall": wall,
        "status": {k: int(v) for k, v in st.items()},
        "checksum": float(np.nansum(np.abs(_numbers(res.table)))),
    }


def _numbers(table):
    """The coefficients of a DE table; the float columns of another (variance_partition's fractions)."""
    return table["coef"].to_numpy() if "coef" in table else table.select_dtypes("float").to_numpy()


def probe(args) -> dict:
    """Whether the GLMM kernel releases the GIL: a Python thread counting while a chunk is fitted.

    numba keys its disk cache by the kernel's source file, not by the decorator's options, so a cache written before
    the kernels were compiled ``nogil`` is still loaded, and threads then take turns (results are unchanged).
    """
    import threading

    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from scmlm.design import build_design
    from scmlm.models import fit_glmm, prepare_glmm

    a = ad.read_h5ad(args.data)
    d = build_design(a.obs, DESIGN)
    g = prepare_glmm(d.X, d.terms, np.log(np.asarray(a.X.sum(axis=1)).ravel()), family="nb")
    Y = sp.csc_matrix(a.X[:, :100])
    fit_glmm(Y[:, :2], g)
    stop, ticks = [False], [0]

    def spin() -> None:
        while not stop[0]:
            ticks[0] += 1

    rates = []
    for busy in (False, True):
        th = threading.Thread(target=spin)
        stop[0] = False
        th.start()
        t0, w0 = ticks[0], time.perf_counter()
        if busy:
            fit_glmm(Y, g)
        else:
            time.sleep(0.5)
        rates.append((ticks[0] - t0) / (time.perf_counter() - w0))
        stop[0] = True
        th.join()
    return {"idle_rate": rates[0], "fit_rate": rates[1]}


def measure(args) -> dict:
    """Run one configuration in a child process; add its peak RSS (its workers included) and total CPU."""
    cmd = [sys.executable, __file__, "--step", "run", "--data", args.data, "--n-jobs", str(args.n_jobs)]
    cmd += ["--tool", args.tool] + (["--backed"] if args.backed else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"configuration {cmd} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["peak_gb"] = ru.ru_maxrss / 1024**2
    res["cpu_process_total"] = ru.ru_utime + ru.ru_stime
    res["sys_process_total"] = ru.ru_stime
    return res


def _run(data: Path, n_jobs: int, tool: str, backed: bool) -> dict:
    cmd = [sys.executable, __file__, "--step", "measure", "--data", str(data), "--n-jobs", str(n_jobs)]
    cmd += ["--tool", tool] + (["--backed"] if backed else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="40000,400000", help="total cells, comma-separated")
    p.add_argument("--jobs", default="1,2", help="n_jobs values; the first is the reference")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--workdir", default="/tmp/scmlm_bench_parallel")
    p.add_argument("--tool", choices=sorted(TOOLS), default="glmm_de", help="the tool measured")
    p.add_argument("--backed", action="store_true", help="open the input with backed='r' (counts stay on disk)")
    p.add_argument("--no-probe", action="store_true", help="skip the GIL probe of the GLMM kernel")
    p.add_argument("--step", choices=["run", "measure", "probe"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--n-jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step == "run":
        print(json.dumps(step(args)))
        return
    if args.step == "measure":
        print(json.dumps(measure(args)))
        return
    if args.step == "probe":
        print(json.dumps(probe(args)))
        return
    import scmlm

    print(
        f"scmlm from {Path(scmlm.__file__).parent}; {os.cpu_count()} cores; {args.tool}, design "
        f"{TOOLS[args.tool]!r}, {args.genes} genes{'; input opened backed' if args.backed else ''}"
    )
    jobs = [int(j) for j in args.jobs.split(",")]
    if not args.no_probe:
        small = _data_file(args.workdir, 40000, args.genes)
        cmd = [sys.executable, __file__, "--step", "probe", "--data", str(small)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        pr = json.loads(out.strip().splitlines()[-1])
        share = pr["fit_rate"] / pr["idle_rate"]
        verdict = "releases the GIL" if share > 0.4 else "HOLDS THE GIL (numba cache from before nogil? delete *.nbi)"
        print(f"a Python thread ran at {share:.0%} of its speed while the GLMM kernel fitted a chunk: it {verdict}")
    for cells in (int(c) for c in args.sizes.split(",")):
        data = _data_file(args.workdir, cells, args.genes)
        runs = {}
        for n in jobs:
            load = os.getloadavg()[0]
            r = runs[n] = _run(data, n, args.tool, args.backed)
            print(
                f"{r['cells']:>7} cells n_jobs={n}: CPU {r['cpu']:6.1f} s (main {r['cpu_main']:.1f}; process total "
                f"{r['cpu_process_total']:.1f}, system {r['sys_process_total']:.1f}), wall {r['wall']:6.1f} s, peak "
                f"RSS {r['peak_gb']:.2f} GB (after loading {r['rss_loaded_gb']:.2f}; input {r['input_gb']:.2f} GB "
                f"{r['format']}, {r['nnz'] / 1e6:.0f} M non-zeros), load before {load:.2f}, checksum "
                f"{r['checksum']:.10g}",
                flush=True,
            )
        ref = runs[jobs[0]]
        for n in jobs[1:]:
            r = runs[n]
            print(
                f"{ref['cells']:>7} cells: CPU(n_jobs={n}) / CPU(n_jobs={jobs[0]}) = {r['cpu'] / ref['cpu']:.2f} "
                f"(bar <= 1.15); wall speed-up {ref['wall'] / r['wall']:.2f}x (bar >= 1.7 on idle cores)",
                flush=True,
            )
        if 1 in runs:
            r = runs[1]
            where = "on disk, " if args.backed else ""  # backed: the input is not in the peak
            print(
                f"{r['cells']:>7} cells n_jobs=1: CPU {r['cpu']:.1f} s; peak RSS {r['peak_gb']:.2f} GB = input "
                f"({where}{r['input_gb']:.2f} GB in memory) + {r['peak_gb'] - r['input_gb']:.2f} GB (after loading: "
                f"+{r['peak_gb'] - r['rss_loaded_gb']:.2f} GB)",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
