"""Differential abundance: calibration on nulls and power on simulated changes, per method.

Data: ``scmlm.datasets.simulate_composition`` with 12 cell types per dataset (proportions 0.3 … 0.02), donor effects
(sd 0.3) and sample effects within donors (sd 0.2) on the log-abundance scale, 50–3,000 cells per sample
(log-uniform), 3–10 donors per condition (drawn per dataset), the design alternating between ``paired`` (each donor
one sample per condition, ``~ condition + (1|donor)``) and ``between`` (one sample per donor, ``~ condition``).
Methods:

* ``glmm``: ``abundance_de(method="glmm")`` (REML, ``(1|sample)`` added to the paired design);
* ``clr``, ``logit``: ``abundance_de(method="clr" / "logit")`` (weighted linear model, dream with ``(1|donor)``);
* ``masc``: the MASC model on the same counts: binomial GLMM with ``(1|donor)`` only, Laplace ML and a z test
  (``abundance_de(method="glmm", replication="as_written", estimation="ML")``, p from ``coef / se`` on N(0, 1)). The
  sample-level binomial is the cell-level Bernoulli GLMM on a per-type indicator with the same likelihood;
* ``donor_only``: ``(1|donor)`` only but REML and the package's df (isolates the missing sample term).

Prints, per method and design, the fraction of p < 0.05 (and < 0.01) over all null types, and on change datasets
(two of 12 types changed by ±``logfc``) the power at p < 0.05 on the changed types and the fraction of p < 0.05 on the
unchanged ones (composition makes their proportions move a little; for ``clr`` the reference moves by 1/12 of each
change).

Figures (``--datasets 100``; nulls at ``--seed``, changes at ``--seed`` + 1; 600 types per design and method):

  fraction of null types at p < 0.05        paired   between   all      (seed 0 | seed 2, all)
    glmm (default)                          3.0 %    5.0 %     4.0 %    3.9 %
    clr                                     5.2 %    6.5 %     5.8 %    4.6 %
    logit                                   5.5 %    6.3 %     5.9 %    4.1 %
    masc ((1|donor), ML, z)                 23.5 %   13.8 %    18.7 %   18.1 %
    donor_only ((1|donor), REML, df)        23.2 %   –         –        25.7 % (paired)
  power at p < 0.05 on the 200 changed types (seed 1 | seed 3), unchanged types at p < 0.05 (seed 1)
    glmm 70.5 % | 66 %, 4.8 %;  clr 70 % | 65.5 %, 5.6 %;  logit 70 % | 67 %, 6.4 %;  masc 89 % | 89.5 %, 20.4 %

    python benchmarks/bench_abundance.py [--datasets 40] [--types 12] [--logfc 0.7] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from scipy import stats

import scmlm

CON = ("condition", "case", "ctrl")


def dataset(k: int, *, seed: int, n_types: int, null: bool, logfc: float):
    """The k-th dataset of a run: design alternates, donors per condition drawn in 3..10."""
    rng = np.random.default_rng([seed, k, 7])
    design = "paired" if k % 2 == 0 else "between"
    n_donors = int(rng.integers(3, 11))
    adata = scmlm.datasets.simulate_composition(
        n_donors=n_donors,
        n_cell_types=n_types,
        design=design,
        n_cells=(50, 3000),
        n_changed=0 if null else 2,
        logfc=logfc,
        null=null,
        sd_donor=0.3,
        sd_sample=0.2,
        seed=seed * 100_000 + k,
    )
    return adata, design, n_donors


def run_methods(adata, design: str) -> dict[str, np.ndarray]:
    """p-values per method (one per cell type, NaN when untested)."""
    formula = "~ condition + (1|donor)" if design == "paired" else "~ condition"
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in ("glmm", "clr", "logit"):
            t = scmlm.tl.abundance_de(adata, formula, CON, method=m, inplace=False).table
            out[m] = t["pvalue"].to_numpy(dtype=float)
        masc = scmlm.tl.abundance_de(
            adata, "~ condition + (1|donor)", CON, replication="as_written", estimation="ML", inplace=False
        ).table
        z = masc["coef"].to_numpy(dtype=float) / masc["se"].to_numpy(dtype=float)
        out["masc"] = 2 * stats.norm.sf(np.abs(z))
        if design == "paired":
            only = scmlm.tl.abundance_de(
                adata, "~ condition + (1|donor)", CON, replication="as_written", inplace=False
            ).table
            out["donor_only"] = only["pvalue"].to_numpy(dtype=float)
    return out


def collect(n_datasets: int, *, seed: int, n_types: int, null: bool, logfc: float = 0.7) -> pd.DataFrame:
    """Long table: dataset, design, n_donors, type, changed, method, pvalue."""
    rows = []
    for k in range(n_datasets):
        adata, design, n_donors = dataset(k, seed=seed, n_types=n_types, null=null, logfc=logfc)
        changed = np.asarray(adata.uns["simulate_composition"]["changed"], dtype=bool)
        for m, p in run_methods(adata, design).items():
            rows.append(
                pd.DataFrame(
                    {
                        "dataset": k,
                        "design": design,
                        "n_donors": n_donors,
                        "type": np.arange(n_types),
                        "changed": changed,
                        "method": m,
                        "pvalue": p,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def summary(table: pd.DataFrame, *, null: bool) -> pd.DataFrame:
    def one(g):
        p = g["pvalue"].to_numpy(dtype=float)
        ch = g["changed"].to_numpy(dtype=bool)
        tested = np.isfinite(p)
        pp = np.where(tested, p, 1.0)
        res = {"types": len(g), "untested": int((~tested).sum())}
        if null:
            res["p<0.05"] = float(np.mean(pp[tested] < 0.05)) if tested.any() else np.nan
            res["p<0.01"] = float(np.mean(pp[tested] < 0.01)) if tested.any() else np.nan
        else:
            res["power@0.05"] = float(np.mean(pp[ch] < 0.05))
            res["unchanged p<0.05"] = float(np.mean(pp[~ch] < 0.05))
        return pd.Series(res)

    parts = []
    for keys, g in table.groupby(["method", "design"], sort=False):
        parts.append(one(g).rename(keys))
    for m, g in table.groupby("method", sort=False):
        parts.append(one(g).rename((m, "all")))
    return pd.DataFrame(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=40)
    ap.add_argument("--types", type=int, default=12)
    ap.add_argument("--logfc", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pd.set_option("display.width", 160)
    t0 = time.time()
    null = collect(args.datasets, seed=args.seed, n_types=args.types, null=True)
    print(f"nulls: {args.datasets} datasets × {args.types} types (seed {args.seed}), {time.time() - t0:.0f} s")
    print(summary(null, null=True).round(4).to_string())
    t0 = time.time()
    alt = collect(args.datasets, seed=args.seed + 1, n_types=args.types, null=False, logfc=args.logfc)
    print(f"\nchanges: 2 of {args.types} types ±{args.logfc} (log abundance), {args.datasets} datasets "
          f"(seed {args.seed + 1}), {time.time() - t0:.0f} s")  # fmt: skip
    print(summary(alt, null=False).round(4).to_string())


if __name__ == "__main__":
    main()
