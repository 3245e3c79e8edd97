"""Count tested and significant genes (cell types, for an abundance analysis) per analysis, group and contrast.

Rule summary. ``rows`` says what the counts count: ``genes``, or ``cell types`` for a differential-abundance analysis.
"""

import os
import sys

import pandas as pd

ALPHA = 0.05


def summarise(paths, names):
    rows = []
    for name, path in zip(names, paths, strict=True):
        res = pd.read_csv(path)
        res["group"] = res["group"].fillna("all") if "group" in res else "all"
        for (group, contrast), df in res.groupby(["group", "contrast"], sort=True, dropna=False):
            sig = df["padj"] < ALPHA
            method = str(df["method"].iloc[0])
            rows.append(
                {
                    "analysis": name,
                    "method": method,
                    "rows": "cell types" if method.startswith("abundance") else "genes",
                    "group": group,
                    "contrast": contrast,
                    "n_genes": len(df),
                    "n_tested": int(df["pvalue"].notna().sum()),
                    "n_converged": int(df["converged"].astype(str).str.lower().eq("true").sum()),
                    f"n_padj_lt_{ALPHA}": int(sig.sum()),
                    "n_up": int((sig & (df["log2fc"] > 0)).sum()),
                    "n_down": int((sig & (df["log2fc"] < 0)).sum()),
                }
            )
    return pd.DataFrame(rows)


if __name__ == "__main__":
    smk = globals()["snakemake"]
    with open(smk.log[0], "w") as log:
        sys.stderr = log
        summary = summarise(list(smk.input), list(smk.params.analyses))
        tmp = smk.output[0] + ".tmp"
        summary.to_csv(tmp, index=False)
        os.replace(tmp, smk.output[0])
        print(summary.to_string(index=False), file=log)
