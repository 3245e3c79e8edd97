"""Moderated (empirical-Bayes) vs per-gene GLMM tests beside pseudobulk nb_ql, on DE simulations with known truth.

Data: ``scmlm.datasets.simulate`` with 10 % DE genes:
  * ``between``: 10 donors × 400 cells, 3 batches, ``~ condition + (1|donor) + (1|batch)`` (the case of the issue);
  * ``unbalanced``: 10 donors with 20–2,000 cells each, ``~ condition + (1|donor)``.
For each: ``glmm_de`` with ``moderate=True`` (default) and ``moderate=False``, and pseudobulk ``nb_ql`` on donor sums
(``~ batch + condition`` / ``~ condition``). In the between case donors are nested in 3 batches with unequal
case/control counts, so with ``(1|batch)`` the default falls back to per-gene tests (the contrast's variance rests on
a 3-level batch variance that no prior for the donor term moderates: moderated, it was calibrated on some nulls and
not on others, see ``scmlm.models.moderate``); the same data with batch as a fixed effect,
``~ condition + batch + (1|donor)``, is moderated. Prints the AUC of p-values for the true DE genes
(genes without a p-value count as p = 1), the number of genes at BH padj < 0.05, the TPR and the observed FDR there,
the prior df, and the wall time of each GLMM fit (the first fit includes compiling the kernels; ``--timing`` fits
2,000 genes × 4,000 cells with ``(1|donor)+(1|batch)`` and with a crossed ``(1|lane)``, with and without moderation).
Figures (seed 0, ``--n-jobs 2``, 2,000 genes):

  between donors, 4,000 cells, 200 DE
    (1|donor)+(1|batch) (per gene)      AUC 0.8801  calls 37  TPR 0.180  FDR 0.027
    batch + (1|donor) moderated         AUC 0.8907  calls 49  TPR 0.240  FDR 0.020  (df_prior 5.83)
    batch + (1|donor) per gene          AUC 0.8718  calls 13  TPR 0.060  FDR 0.077
    pseudobulk nb_ql                    AUC 0.8563  calls 49  TPR 0.240  FDR 0.020
  unbalanced donors, 2,989 cells, 200 DE
    (1|donor) moderated                 AUC 0.8773  calls 23  TPR 0.115  FDR 0.000  (df_prior 5.29)
    (1|donor) per gene                  AUC 0.8586  calls 10  TPR 0.050  FDR 0.000
    pseudobulk nb_ql                    AUC 0.6507  calls 34  TPR 0.165  FDR 0.029
  timing, 2,000 genes × 4,000 cells (kernels compiled): (1|donor)+(1|batch) 3.7 s per gene tests, 2.9 s with
    moderation on (falls back); (1|donor)+(1|lane) (moderated) 7.1 s and 5.7 s

The unbalanced moderated test calls fewer genes than nb_ql: with one unit scale ``c`` for all genes it called 29
(FDR 0.034) but boundary fits were anticonservative on unbalanced nulls (13-16 % of p < 0.05); the per-gene scale
and the boundary fits' df that fix this cost the difference (see ``scmlm.models.moderate``).
The issue's AUC bar (0.93) is out of reach on this simulation: ranking the genes by the z statistic of an estimate
with known variances (donor and sampling variance only, no batch) gives AUC 0.925 averaged over 20 draws (0.914
with a share of the batch variance).
Bars (issue): between AUC ≥ 0.93, TPR ≥ 0.35, FDR ≤ 0.05; unbalanced calls ≥ nb_ql's with FDR ≤ 0.05.

``--power`` (issue 19 item 5) compares the default ``glmm_de`` with pseudobulk nb_ql and voom on 10-donor
between-donor data (``simulate(n_donors=10, frac_de=0.1)``, 400 and 20–2,000 cells, seeds 0 and 1): genes tested,
calls at BH 0.05, true genes among them, their FDP, the true genes within an observed FDP of 5 % along each ranking,
the AUC, the null fractions of p < 0.05 (all non-DE genes / the top third of their true ``sd_donor``) and the df.
Figures (2,000 genes, guarded prior; tested, calls / true / true at FDP ≤ 0.05, AUC, null % all / top third, df):

  400 cells, seed 0        GLMM 1992, 28 / 28 / 60, 0.891, 3.6 / 6.0, 13.3   nb_ql 1787, 40 / 39 / 64, 0.795,
                           3.9 / 6.3, 15.3   voom 1787, 45 / 44 / 60, 0.793, 4.0 / 6.7, 14.9
  400 cells, seed 1        GLMM 1997, 41 / 39 / 61, 0.916, 3.2 / 5.7, 13.9   nb_ql 1774, 45 / 42 / 32, 0.819,
                           4.1 / 8.1, 16.3   voom 1774, 50 / 47 / 60, 0.827, 3.4 / 6.8, 15.8
  20-2,000 cells, seed 0   GLMM 1994,  0 /  0 / 29, 0.855, 4.3 / 6.7, 11.7   nb_ql 1140, 27 / 27 / 42, 0.651,
                           4.7 / 9.1, 17.6   voom 1140, 34 / 31 / 25, 0.649, 4.9 / 8.2, 15.5
  20-2,000 cells, seed 1   GLMM 1994, 22 / 22 / 47, 0.876, 3.5 / 5.7, 12.4   nb_ql 1335, 34 / 33 / 39, 0.651,
                           4.5 / 8.9, 17.8   voom 1335, 39 / 39 / 43, 0.644, 4.4 / 7.7, 16.1

The GLMM ranks better but calls fewer: its |t| match voom's, its t has fewer df and BH runs over more genes (the
diagnosis is in ``scmlm.models.moderate``): the issue's bar is not reached. Without ``--power`` (seed 0): between,
moderated, null 4.5 % (top third 8.0 %), nb_ql 4.9 % (8.6 %); unbalanced, moderated, 3.5 % (5.7 %), per gene
3.7 % (3.7 %), nb_ql 4.5 % (8.9 %).

    python benchmarks/bench_moderation.py [--genes 2000] [--cells 400] [--seed 0] [--n-jobs 1] [--power]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

CONTRAST = ("condition", "case", "ctrl")


def _auc(score: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = truth.sum(), (~truth).sum()
    return float((r[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _null_rates(p: np.ndarray, truth: np.ndarray, true_var: np.ndarray) -> tuple[float, float]:
    """Fractions of p < 0.05 among the tested non-DE genes, all of them and the top third of their true sample-level
    variance (``sd_donor``, as ``tests/test_moderation_spread.py`` ranks them)."""
    null = ~truth & np.isfinite(p)
    top = null & (true_var >= np.quantile(true_var[null], 2 / 3))
    return float(np.mean(p[null] < 0.05)), float(np.mean(p[top] < 0.05))


def _line(name: str, p: np.ndarray, padj: np.ndarray, truth: np.ndarray, true_var: np.ndarray, extra: str = "") -> None:
    null, top = _null_rates(p, truth, true_var)
    p = np.where(np.isfinite(p), p, 1.0)
    sig = np.isfinite(padj) & (padj < 0.05)
    fdr = float((~truth[sig]).mean()) if sig.any() else 0.0
    tpr = float(sig[truth].mean())
    print(
        f"  {name:<52} AUC {_auc(-np.log(np.maximum(p, 1e-300)), truth):.4f}  calls {int(sig.sum()):4d}  "
        f"TPR {tpr:.3f}  FDR {fdr:.3f}  null p<0.05 {null:.4f} (top third {top:.4f}){extra}"
    )


def _case(title: str, adata, formulas: list[str], pb_formula: str, n_jobs: int) -> None:
    import scmlm

    truth = adata.var["is_de"].to_numpy()
    sd = adata.var["sd_donor"].to_numpy()
    print(f"{title}: {adata.n_obs} cells, {adata.n_vars} genes, {truth.sum()} DE")
    for formula, moderate in [(f, m) for f in formulas for m in (True, False)]:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tab = scmlm.tl.glmm_de(adata, formula, CONTRAST, moderate=moderate, n_jobs=n_jobs, inplace=False).table
        dt = time.perf_counter() - t
        extra = f"  ({dt:.1f} s"
        if moderate and tab["df_prior"].notna().any():
            extra += f", df_prior {np.nanmedian(tab['df_prior']):.2f}"
        sing = (tab["status"] == "singular").to_numpy()
        extra += f", {sing.mean():.0%} singular; {tab['moderation'].iloc[0][:40]})"
        _line(f"{formula} moderate={moderate}", tab["pvalue"].to_numpy(), tab["padj"].to_numpy(), truth, sd, extra)
    pb = scmlm.pp.pseudobulk(adata, "donor", layer="counts")
    tab = (
        scmlm.tl.pseudobulk_de(pb, pb_formula, CONTRAST, inplace=False).table.set_index("gene").reindex(adata.var_names)
    )
    _line("pseudobulk nb_ql", tab["pvalue"].to_numpy(), tab["padj"].to_numpy(), truth, sd)


def _tp_at_fdp(p: np.ndarray, truth: np.ndarray, level: float = 0.05) -> int:
    """True positives among the most genes, ranked by p-value, whose observed false discovery proportion is at most
    ``level`` (what a perfectly calibrated threshold on this ranking could call)."""
    p = np.where(np.isfinite(p), p, 1.0)
    t = truth[np.argsort(p, kind="stable")]
    ok = np.cumsum(~t) / np.arange(1, t.size + 1) <= level
    return int(np.cumsum(t)[ok].max()) if ok.any() else 0


def _power(genes: int, n_jobs: int) -> None:
    """Issue 19 item 5: the default GLMM against pseudobulk nb_ql and voom on 10-donor between-donor DE data."""
    import scmlm

    for label, cells in (("balanced, 400 cells", 400), ("unbalanced, 20-2,000 cells", (20, 2000))):
        for seed in (0, 1):
            a = scmlm.datasets.simulate(n_donors=10, design="between", frac_de=0.1, n_cells=cells, n_genes=genes,
                                        seed=seed)  # fmt: skip
            truth = a.var["is_de"].to_numpy()
            print(f"power, {label}, seed {seed}: {truth.sum()} DE of {genes}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                g = scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST, n_jobs=n_jobs, inplace=False).table
            pb = scmlm.pp.pseudobulk(a, "donor", layer="counts")
            tabs = {"glmm ~ condition + (1|donor)": g.set_index("gene").reindex(a.var_names)}
            for method in ("nb_ql", "voom"):
                t = scmlm.tl.pseudobulk_de(pb, "~ condition", CONTRAST, method=method, inplace=False).table
                tabs[f"pseudobulk {method}"] = t.set_index("gene").reindex(a.var_names)
            prior = (
                f"df_prior_fit {np.nanmedian(g['df_prior_fit']):.2f}, df_prior {np.nanmedian(g['df_prior']):.2f}, "
                f"df {np.nanmedian(g['df']):.2f}"
            )
            for name, t in tabs.items():
                p = t["pvalue"].to_numpy()
                sig = (t["padj"] < 0.05).to_numpy()
                fdp = float((~truth[sig]).mean()) if sig.any() else 0.0
                null, top = _null_rates(p, truth, a.var["sd_donor"].to_numpy())
                extra = prior if name.startswith("glmm") else f"df {np.nanmedian(t['df']):.2f}"
                print(
                    f"  {name:<30} tested {int(np.isfinite(p).sum()):4d}  calls {int(sig.sum()):4d}  "
                    f"true {int((sig & truth).sum()):4d}  FDP {fdp:.3f}  true at FDP<=0.05 {_tp_at_fdp(p, truth):4d}  "
                    f"AUC {_auc(-np.log(np.maximum(np.where(np.isfinite(p), p, 1.0), 1e-300)), truth):.4f}  "
                    f"null p<0.05 {null:.4f} (top third {top:.4f})  {extra}"
                )


def _timing(genes: int, n_jobs: int) -> None:
    import pandas as pd

    import scmlm

    adata = scmlm.datasets.simulate(n_donors=10, n_cells=400, n_genes=genes, n_batches=3, seed=11)
    # the nested (1|batch) design keeps per-gene tests; a lane crossed with donors is moderated
    adata.obs["lane"] = pd.Categorical(np.random.default_rng(0).integers(0, 3, adata.n_obs).astype(str))
    for formula in ("~ condition + (1|donor) + (1|batch)", "~ condition + (1|donor) + (1|lane)"):
        print(f"timing: {adata.n_obs} cells × {genes} genes, {formula}, n_jobs={n_jobs}")
        for moderate in (False, True):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scmlm.tl.glmm_de(adata, formula, CONTRAST, moderate=moderate, n_jobs=n_jobs)
            print(f"  moderate={moderate}: {time.perf_counter() - t:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--timing", action="store_true", help="also time 2,000 genes × 4,000 cells")
    ap.add_argument("--skip-unbalanced", action="store_true")
    ap.add_argument("--power", action="store_true", help="only the 10-donor power comparison (issue 19 item 5)")
    args = ap.parse_args()
    import scmlm

    if args.power:
        _power(args.genes, args.n_jobs)
        return

    between = scmlm.datasets.simulate(n_donors=10, n_cells=args.cells, n_genes=args.genes, n_batches=3, seed=args.seed)
    _case(
        "between donors",
        between,
        ["~ condition + (1|donor) + (1|batch)", "~ condition + batch + (1|donor)"],
        "~ batch + condition",
        args.n_jobs,
    )
    if not args.skip_unbalanced:
        unbal = scmlm.datasets.simulate(n_donors=10, n_cells=(20, 2000), n_genes=args.genes, seed=args.seed + 1)
        _case("unbalanced donors (20-2,000 cells)", unbal, ["~ condition + (1|donor)"], "~ condition", args.n_jobs)
    if args.timing:
        _timing(2000, args.n_jobs)


if __name__ == "__main__":
    main()
