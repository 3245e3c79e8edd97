"""Paired (within-donor) designs with donor-specific responses: type-I error and power by the unit of replication.

Data: ``scmlm.datasets.simulate(design="within")``, 8 donors each giving a control and a treated sample, donor ×
condition sample effects (``sd_response``, default 0.25 on the log scale), cells per sample drawn in a range.
Prints, for the null and for data with 10 % DE genes:
  * the default call ``glmm_de(adata, "~ condition + (1|donor)", ...)`` (``replication="auto"``: it adds
    ``(1|donor:condition)``), the same model as written (``replication="as_written"``), and the explicit
    random-slope model ``(1 + condition|donor)``;
  * paired pseudobulk: ``pseudobulk_de`` (nb_ql) on donor × condition sums with ``~ donor + condition``.
On the null: the fraction of genes with p < 0.05. On DE data: the AUC of p-values for the true DE genes (genes
without a p-value count as p = 1) and the fraction of true DE genes at BH padj < 0.05 with the observed FDR.
Bars (issue): default null fraction within [0.035, 0.06]; sample-aware GLMM AUC ≥ paired pseudobulk AUC.

``--cost`` instead times what ``replication="auto"`` adds beyond paired designs (issue 19), on one null data set
with a cell-level covariate ``x`` whose slope differs between donors (``simulate(sd_slope=0.25)``, donors in 3
batches, one worker): the default ``~ x + (1|donor)`` (it adds ``(0 + x|donor)``) against the intercept-only model
as written, and the default ``~ condition + (1|donor) + (1|batch)`` (batch as a fixed effect) against the random
batch as written. Each pair runs alternately ``--repeats`` times; it prints the median seconds, their ratio and the
fraction of p < 0.05.

    python benchmarks/bench_replication.py [--genes 2000] [--cells 60 600] [--sd-response 0.25] [--seed 0]
    python benchmarks/bench_replication.py --cost [--genes 1000] [--donors 8] [--cells 60 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

CONTRAST = ("condition", "case", "ctrl")
MODELS = {
    "GLMM default (auto: + (1|donor:condition))": ("~ condition + (1|donor)", "auto"),
    "GLMM (1|donor) as written": ("~ condition + (1|donor)", "as_written"),
    "GLMM (1 + condition|donor)": ("~ condition + (1 + condition|donor)", "auto"),
}


def _auc(score: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = truth.sum(), (~truth).sum()
    return float((r[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _run(adata, null: bool) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    import scmlm

    out = []
    for name, (formula, rep) in MODELS.items():
        t = time.perf_counter()
        tab = scmlm.tl.glmm_de(adata, formula, CONTRAST, replication=rep, inplace=False).table
        out.append((name, tab["pvalue"].to_numpy(), tab["padj"].to_numpy(), time.perf_counter() - t))
        if not null:
            coef = tab["coef"].to_numpy()[~adata.var["is_de"].to_numpy()]
            print(f"  [{name}: median coef of the non-DE genes {np.nanmedian(coef):+.3f} (default offset: TMM)]")
    # a check of the default offset: the same model with the samples' TMM factors computed here by hand from the
    # pseudobulk (edgeR's normalisation) and passed as an obs column gives the same fits
    from scmlm.models import tmm_factors

    pb = scmlm.pp.pseudobulk(adata, "sample")
    pb_counts = np.asarray(pb.X.toarray() if hasattr(pb.X, "toarray") else pb.X, dtype=float)
    factors = dict(zip(pb.obs_names, tmm_factors(pb_counts.T), strict=True))
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.obs["log_tmm_total"] = np.log(total) + np.log(adata.obs["sample"].astype(str).map(factors).to_numpy(float))
    t = time.perf_counter()
    tab = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", CONTRAST, offset="log_tmm_total", inplace=False).table
    out.append(("GLMM default, TMM by hand", tab["pvalue"].to_numpy(), tab["padj"].to_numpy(), time.perf_counter() - t))
    if not null:
        coef = tab["coef"].to_numpy()[~adata.var["is_de"].to_numpy()]
        print(f"  [GLMM default, TMM by hand: median coef of the non-DE genes {np.nanmedian(coef):+.3f}]")
    t = time.perf_counter()
    tab = scmlm.tl.pseudobulk_de(pb, "~ donor + condition", CONTRAST, inplace=False).table
    tab = tab.set_index("gene").reindex(adata.var_names)
    out.append(("paired pseudobulk nb_ql", tab["pvalue"].to_numpy(), tab["padj"].to_numpy(), time.perf_counter() - t))
    return out


COST_MODELS = {
    "cell-level x": ("x", "~ x + (1|donor)"),
    "donors in 3 batches": (CONTRAST, "~ condition + (1|donor) + (1|batch)"),
}


def _cost(args) -> None:
    import scmlm

    a = scmlm.datasets.simulate(
        n_donors=args.donors, n_cells=tuple(args.cells), n_genes=args.genes, n_batches=3, null=True, sd_slope=0.25,
        seed=args.seed,
    )  # fmt: skip
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    print(f"{a.n_obs} cells, {args.donors} donors in 3 batches, {args.genes} genes, NB, one worker")
    for label, (contrast, formula) in COST_MODELS.items():
        secs: dict[str, list[float]] = {"auto": [], "as_written": []}
        frac, fitted = {}, {}
        for _ in range(args.repeats):
            for rule in secs:
                t = time.perf_counter()
                res = scmlm.tl.glmm_de(a, formula, contrast, replication=rule, n_jobs=1, inplace=False)
                secs[rule].append(time.perf_counter() - t)
                p = res.table["pvalue"].dropna().to_numpy()
                frac[rule], fitted[rule] = float(np.mean(p < 0.05)), res.params["design_fitted"]
        med = {k: float(np.median(v)) for k, v in secs.items()}
        print(f"\n{label}: {formula!r}")
        for rule in secs:
            print(f"  {rule:10s} {fitted[rule]:45s} {med[rule]:7.1f} s  p<0.05: {frac[rule]:.4f}")
        print(f"  default / as written: {med['auto'] / med['as_written']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--donors", type=int, default=8)
    ap.add_argument("--cells", type=int, nargs=2, default=(60, 600), metavar=("LOW", "HIGH"))
    ap.add_argument("--sd-response", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost", action="store_true", help="time the terms replication='auto' adds (see above)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    if args.cost:
        _cost(args)
        return
    import scmlm

    def data(null: bool, sd: float, seed: int):
        a = scmlm.datasets.simulate(
            n_donors=args.donors, n_cells=tuple(args.cells), n_genes=args.genes, n_batches=2, design="within",
            null=null, sd_response=sd, seed=seed,
        )  # fmt: skip
        return a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()

    print(
        f"paired design: {args.donors} donors × 2 samples, {args.cells[0]}–{args.cells[1]} cells per sample, "
        f"{args.genes} genes, NB; n_jobs={scmlm.settings.n_jobs}"
    )
    for sd in (args.sd_response, 0.0):
        adata = data(True, sd, args.seed)
        print(f"\nnull, donor-specific response sd {sd} ({adata.n_obs} cells): fraction of p < 0.05")
        for name, p, _, secs in _run(adata, null=True):
            ok = np.isfinite(p)
            print(f"  {name:45s} {np.mean(p[ok] < 0.05):.4f}  ({ok.sum()} genes, {secs:.1f} s)")
    adata = data(False, args.sd_response, args.seed + 1)
    truth = adata.var["is_de"].to_numpy()
    print(f"\n10 % DE, donor-specific response sd {args.sd_response} ({adata.n_obs} cells, {truth.sum()} DE genes)")
    print("  AUC: all genes (no p-value = p 1); AUC*: genes that every method tests")
    runs = _run(adata, null=False)
    common = np.logical_and.reduce([np.isfinite(p) for _, p, _, _ in runs])
    for name, p, padj, secs in runs:
        score = -np.log10(np.clip(np.where(np.isfinite(p), p, 1.0), 1e-300, 1.0))
        called = np.isfinite(padj) & (padj < 0.05)
        fdr = (called & ~truth).sum() / max(called.sum(), 1)
        print(
            f"  {name:45s} AUC {_auc(score, truth):.4f}  AUC* {_auc(score[common], truth[common]):.4f}  "
            f"TPR@padj<0.05 {np.mean(called[truth]):.3f}  FDR {fdr:.3f}  ({secs:.1f} s)"
        )
    print(f"  ({common.sum()} genes tested by every method, {truth[common].sum()} of them DE)")


if __name__ == "__main__":
    main()
