"""``make demo``: run the scmlm Snakemake workflow on the bundled pig airway data and say where everything went.

Run from a checkout with ``python -m scmlm.demo [OUTDIR]`` (default ``demo_results``). The workflow
(``workflow/Snakefile`` with ``config/config.yaml``) writes the bundled data to h5ad, aggregates pseudobulk samples,
fits pseudobulk DE (edgeR-style quasi-likelihood) and a cell-level NB GLMM with a pig random effect per cell type
in gene shards, merges them, draws plots and builds the HTML report. Rules run in this Python environment.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path


def main(outdir: str = "demo_results") -> int:
    """Run the workflow on the bundled data into ``outdir``, print where the results went, return the exit status."""
    repo = Path(__file__).resolve().parents[1]
    snakefile = repo / "workflow" / "Snakefile"
    if not snakefile.exists():
        print(f"scmlm demo: {snakefile} not found; run the demo from a checkout of the repository.", file=sys.stderr)
        return 2
    if importlib.util.find_spec("snakemake") is None:
        print("scmlm demo: the workflow needs Snakemake, an extra: pip install 'scmlm[workflow]'.", file=sys.stderr)
        return 2
    out = Path(outdir).resolve()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    smk = [
        sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(repo),
        "--configfile", str(repo / "config" / "config.yaml"),
        "--config", f"outdir={out}", f"input={out}/data/pig_airway.h5ad",
    ]  # fmt: skip
    t0 = time.perf_counter()
    print(f"scmlm demo: Snakemake workflow on the bundled pig airway data (CFTR-KO vs WT) → {out}")
    subprocess.run([*smk, "--cores", "2", "--quiet", "rules"], check=True, env=env)
    subprocess.run([*smk, "--report", str(out / "snakemake_report.html"), "--quiet", "all"], check=True, env=env)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    for name in ("pb", "glmm"):
        table = out / name / "results.csv"
        if table.exists():
            import pandas as pd

            t = pd.read_csv(table)
            n_sig = t[t["padj"] < 0.05].groupby("group").size().to_dict()
            print(f"  {name:5s} results: {table}   (genes at padj < 0.05 per cell type: {n_sig or 'none'})")
            print(f"  {name:5s} plots  : {out / name / 'plots'}")
            if (out / name / "hierarchy").exists():
                print(f"  {name:5s} hierarchy (variance partition, ICC, shrinkage): {out / name / 'hierarchy'}")
    print(f"  summary      : {out / 'summary.csv'}")
    print(f"  results page : {out / 'report.html'}   (genes called, top genes, figures, methods: start here)")
    print(f"  Snakemake report: {out / 'snakemake_report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
