"""``make demo``: run scmlm's main job on the bundled real data and say where the results went.

Run with ``python -m scmlm.demo [OUTDIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(outdir: str = "demo_results") -> int:
    import scmlm
    from scmlm import io

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = scmlm.datasets.pig_airway()
    print(f"pig airway data: {adata.n_obs} cells × {adata.n_vars} genes, {adata.obs['donor'].nunique()} pigs")
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type", layer="counts", min_cells=10)
    io.write_h5ad(pb, out / "pig_airway_pseudobulk.h5ad")
    print(f"pseudobulk: {pb.n_obs} pig × cell-type samples → {out / 'pig_airway_pseudobulk.h5ad'}")
    scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "CFTRKO", "WT"), groups_key="cell_type")
    table = scmlm.get.de_df(pb, key="pseudobulk_de")
    io.write_csv(table, out / "pig_airway_pseudobulk_de.csv")
    n_sig = table[table["padj"] < 0.05].groupby("group").size().to_dict()
    print(f"pseudobulk DE (nb_ql, CFTRKO vs WT, per cell type): genes at padj < 0.05 {n_sig}")
    print(f"  table → {out / 'pig_airway_pseudobulk_de.csv'}")
    print(f"done in {time.perf_counter() - t0:.1f} s; results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
