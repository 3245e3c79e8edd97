"""Speed of the pseudobulk DE kernels against PyDESeq2 on simulated NB pseudobulk counts.

Prints, for 2,000 genes × 10 samples and 20,000 genes × 200 samples (design ``~ batch + condition``, 3 batches),
the fit seconds of ``nb_ql`` (edgeR QL), ``voom_limma`` and PyDESeq2 (``DeseqDataSet`` + ``DeseqStats``,
``n_cpus=1``) on the same data in the same run, and the ratios. BLAS is pinned to one thread. Each method gets one
untimed warm-up run on the small data; times are the best of ``--reps`` runs (wall clock, with the process CPU time
alongside, which is less sensitive to other load on the machine). ``nb_ql`` and ``voom_limma`` are timed on
counts already filtered (``filter_by_expr``) with TMM factors; that preparation is timed on its own line, and the
whole edgeR-style pipeline (filter + TMM + QL) on another. PyDESeq2 gets the unfiltered counts and estimates its own
size factors.

Bars (issue): ``nb_ql`` ≤ 0.3 s on 2,000 × 10 and ≥ 10× faster than PyDESeq2 on both sizes.

Usage::

    python benchmarks/bench_pseudobulk_de.py [--reps 3] [--small-only] [--sizes 2000x10,20000x200]

``--sizes`` picks the genes × samples sizes (default both; ``--small-only`` is ``--sizes 2000x10``). ``nb_ql`` runs
its NB fits in a numba kernel (``scmlm.models.edger.kernel``) compiled on first use and cached on disk; the
untimed warm-up run keeps that one-off compilation out of the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from scmlm.models import filter_by_expr, nb_ql, tmm_factors, voom_limma


def simulate_pseudobulk(n_genes: int, n_samples: int, seed: int = 0):
    """NB pseudobulk counts: gene means log-normal, dispersion trend in the mean, library sizes ±30 %, a batch
    factor (3 levels), a condition, and 10 % of genes with a condition effect."""
    rng = np.random.default_rng(seed)
    log_mu = rng.normal(4.0, 1.5, n_genes)
    phi = 0.05 + 0.5 * np.exp(-log_mu / 2)
    lib = rng.uniform(0.7, 1.3, n_samples)
    cond = np.arange(n_samples) % 2
    batch = np.arange(n_samples) % 3
    lfc = np.where(rng.random(n_genes) < 0.1, rng.normal(0, 1, n_genes), 0.0)
    batch_eff = rng.normal(0, 0.2, (n_genes, 3))
    mu = np.exp(log_mu[:, None] + lfc[:, None] * cond[None, :] + batch_eff[:, batch]) * lib[None, :]
    counts = rng.negative_binomial(1 / phi[:, None], 1 / (1 + phi[:, None] * mu)).astype(float)
    X = np.column_stack([np.ones(n_samples), batch == 1, batch == 2, cond]).astype(float)
    meta = pd.DataFrame(
        {"condition": np.where(cond == 1, "case", "ctrl"), "batch": [f"b{b}" for b in batch]},
        index=[f"s{i}" for i in range(n_samples)],
    )
    return counts, X, meta


def prepare(counts, X):
    """edgeR's gene filter and TMM factors (shared by nb_ql and voom_limma; timed separately)."""
    keep = filter_by_expr(counts, design=X)
    y = counts[keep]
    return y, tmm_factors(y)


def run_nb_ql(y, X, nf):
    return nb_ql(y, X, np.array([0.0, 0.0, 0.0, 1.0]), norm_factors=nf)


def run_voom(y, X, nf):
    return voom_limma(y, X, np.array([0.0, 0.0, 0.0, 1.0]), norm_factors=nf)


def run_pydeseq2(counts, X, meta):
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    df = pd.DataFrame(counts.T.astype(int), index=meta.index, columns=[f"g{i}" for i in range(counts.shape[0])])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=df, metadata=meta, design="~batch + condition", n_cpus=1, quiet=True)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "case", "ctrl"], n_cpus=1, quiet=True)
        stats.summary()
    return stats.results_df


def timed(fn, *args, reps: int = 1) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds over ``reps`` runs."""
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(*args)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--small-only", action="store_true")
    parser.add_argument("--sizes", default="2000x10,20000x200", help="comma-separated GENESxSAMPLES sizes")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s.strip()]
    if args.small_only:
        sizes = [(2000, 10)]
    with threadpool_limits(1):
        warm = simulate_pseudobulk(500, 10, seed=1)
        wy, wnf = prepare(warm[0], warm[1])
        run_nb_ql(wy, warm[1], wnf)
        run_voom(wy, warm[1], wnf)
        run_pydeseq2(*warm)
        print(f"{'genes × samples':>16} {'method':>14} {'wall s':>9} {'cpu s':>9} {'PyDESeq2 / method (wall)':>25}")
        for n_genes, n_samples in sizes:
            counts, X, meta = simulate_pseudobulk(n_genes, n_samples)
            reps_big = args.reps if n_samples <= 50 else 1
            t_prep = timed(prepare, counts, X, reps=args.reps)
            y, nf = prepare(counts, X)
            t_ql = timed(run_nb_ql, y, X, nf, reps=args.reps)
            t_voom = timed(run_voom, y, X, nf, reps=args.reps)
            t_deseq = timed(run_pydeseq2, counts, X, meta, reps=reps_big)
            label = f"{n_genes} × {n_samples}"
            rows = (
                ("filter+TMM", t_prep),
                ("nb_ql", t_ql),
                ("voom_limma", t_voom),
                ("pydeseq2", t_deseq),
            )
            for name, t in rows:
                print(f"{label:>16} {name:>14} {t[0]:9.3f} {t[1]:9.3f} {t_deseq[0] / t[0]:25.1f}")
            pipeline = (t_prep[0] + t_ql[0], t_prep[1] + t_ql[1])
            print(f"{label:>16} {'filter+TMM+QL':>14} {pipeline[0]:9.3f} {pipeline[1]:9.3f} "
                  f"{t_deseq[0] / pipeline[0]:25.1f}")  # fmt: skip
            small_bar = ""
            if n_samples == 10:
                small_bar = f"nb_ql <= 0.3 s: {'ok' if t_ql[0] <= 0.3 else 'MISSED'} (cpu {t_ql[1]:.3f} s)  "
            speedup = t_deseq[0] / t_ql[0]
            print(
                f"{label:>16} bars: {small_bar}nb_ql speed-up vs PyDESeq2 {speedup:.1f}x (wall), "
                f"{t_deseq[1] / t_ql[1]:.1f}x (cpu) {'ok' if speedup >= 10 else 'MISSED'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
