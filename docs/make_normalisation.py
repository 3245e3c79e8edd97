"""Figures of docs/normalisation.md: Kang 2018 (2 donors × ctrl/stim), GLMM with offset="log_total" and "tmm" against
paired pseudobulk (edgeR QL, ``~ donor + condition``), per cell type. Run: python docs/make_normalisation.py"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

import scmlm

STIM = ("condition", "stim", "ctrl")


def summary(tab: pd.DataFrame, label: str) -> pd.DataFrame:
    ok = tab[tab["status"].isin(["ok", "singular"]) & tab["log2fc"].notna()]
    rows = []
    for group, t in ok.groupby("group", sort=False):
        called = t[t["padj"] < 0.05]
        rows.append(
            {
                "cell type": group,
                "model": label,
                "tested": len(t),
                "median log2FC": round(float(t["log2fc"].median()), 3),
                "fraction up": round(float((t["log2fc"] > 0).mean()), 3),
                "called (padj<0.05)": len(called),
                "up": int((called["log2fc"] > 0).sum()),
                "down": int((called["log2fc"] < 0).sum()),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    kang = scmlm.datasets.kang2018()
    pb = scmlm.pp.pseudobulk(kang, "sample_id", groups_key="cell_type")
    paired = scmlm.tl.pseudobulk_de(pb, "~ donor + condition", STIM, groups_key="cell_type", inplace=False)
    out = [summary(paired.table, "paired pseudobulk (edgeR QL)")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for design in ("~ condition + (1|donor) + (1|sample_id)", "~ condition + (1|donor)"):
            for offset in ("log_total", "tmm"):
                res = scmlm.tl.glmm_de(kang, design, STIM, offset=offset, groups_key="cell_type", inplace=False)
                out.append(summary(res.table, f"GLMM {design}, offset={offset!r}"))
    table = pd.concat(out, ignore_index=True)
    order = {g: i for i, g in enumerate(pd.unique(table["cell type"]))}
    table = table.sort_values(["cell type", "model"], key=lambda s: s.map(order) if s.name == "cell type" else s)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    mono = kang[kang.obs["cell_type"] == "CD14+ Monocytes"]
    tot = np.log(np.asarray(mono.X.sum(axis=1), dtype=float).ravel())
    from scmlm.design import tmm_offset

    print(tmm_offset(mono.obs, mono.X, tot, "sample_id")[1].to_string(index=False))


if __name__ == "__main__":
    main()
