"""Write the sample × cell-type count tables that fit_lme4.R fits (run from the repository root).

PYTHONPATH=. python tests/data/reference/abundance/make_counts.py
"""

from pathlib import Path

import scmlm

HERE = Path(__file__).resolve().parent
# name: (donors per condition, cell types, design, cells per sample, logfc, seed)
CASES = {
    "paired6": (6, 6, "paired", (150, 2500), 0.8, 101),
    "between8": (8, 5, "between", (100, 3000), 0.8, 102),
    "paired4": (4, 8, "paired", (80, 1500), 1.0, 103),
}

for name, (n_donors, n_types, design, n_cells, logfc, seed) in CASES.items():
    adata = scmlm.datasets.simulate_composition(
        n_donors=n_donors, n_cell_types=n_types, design=design, n_cells=n_cells, logfc=logfc, seed=seed,
        sd_donor=0.4, sd_sample=0.3,
    )  # fmt: skip
    obs = adata.obs
    k = obs.groupby(["sample", "cell_type"], observed=False).size().rename("k").reset_index()
    meta = obs.groupby("sample", observed=True)[["donor", "condition"]].first().reset_index()
    table = k.merge(meta, on="sample")
    table["N"] = table.groupby("sample", observed=True)["k"].transform("sum")
    table = table[["sample", "donor", "condition", "cell_type", "k", "N"]].astype(
        {"sample": str, "donor": str, "condition": str, "cell_type": str}
    )
    table.to_csv(HERE / f"counts_{name}.csv", index=False)
    print(name, table.shape)
