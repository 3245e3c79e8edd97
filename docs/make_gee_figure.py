"""Make docs/figures/gee_vs_glmm.png and print the numbers quoted in docs/gee_vs_glmm.md.

A logistic GLMM with a large donor variance: for each of 30 genes, 40 donors × 50 cells, half of each donor's cells in
``case``; ``logit P(y > 0) = b0 + b1 [case] + u_d`` with ``u_d ~ N(0, sd^2)``. Compared are the population-average log
odds ratio estimated by ``scmlm.tl.gee_de(family="binomial")`` and the cluster-specific one estimated by conditional
logistic regression (the donor intercepts conditioned away: the quantity a GLMM estimates, without assuming their
distribution), with the exact marginal value (normal ``u`` integrated numerically) and the Zeger–Liang–Albert
approximation ``b1 / sqrt(1 + 0.346 sd^2)``.

Run from the repository root: ``python docs/make_gee_figure.py`` (about 30 s).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit, logit
from statsmodels.discrete.conditional_models import ConditionalLogit

from scmlm.tl import gee_de, glmm_de

B0, B1, SD = -0.5, 1.0, 2.0
N_DONORS, N_CELLS, N_GENES, SEED = 40, 50, 30, 3
OUT = Path(__file__).parent / "figures" / "gee_vs_glmm.png"


def simulate(rng: np.random.Generator) -> tuple[ad.AnnData, np.ndarray, np.ndarray]:
    donor = np.repeat(np.arange(N_DONORS), N_CELLS)
    x = np.tile((np.arange(N_CELLS) >= N_CELLS // 2).astype(float), N_DONORS)
    u = rng.normal(0.0, SD, (N_DONORS, N_GENES))
    y = rng.random((x.size, N_GENES)) < expit(B0 + B1 * x[:, None] + u[donor])
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"d{d:02d}" for d in donor]),
            "condition": pd.Categorical(np.where(x == 1, "case", "ctrl"), categories=["ctrl", "case"]),
        },
        index=[f"c{i}" for i in range(x.size)],
    )
    return ad.AnnData(X=sp.csr_matrix(y.astype(np.float32)), obs=obs), donor, x


def main() -> None:
    rng = np.random.default_rng(SEED)
    adata, donor, x = simulate(rng)
    gee = gee_de(adata, "~ condition", ("condition", "case", "ctrl"), family="binomial", offset=None, inplace=False)
    t = gee.table
    cs, cs_z = [], []
    Y = adata.X.toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # donors with all-0 or all-1 cells carry no information and are dropped
        for j in range(N_GENES):
            fit = ConditionalLogit(Y[:, j].astype(float), x[:, None], groups=donor).fit(disp=0)
            cs.append(float(fit.params[0]))
            cs_z.append(float(fit.tvalues[0]))
    cs, cs_z = np.array(cs), np.array(cs_z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        glmm = glmm_de(
            adata, "~ condition + (1|donor)", ("condition", "case", "ctrl"), family="binomial", offset=None,
            replication="as_written", inplace=False,
        ).table  # fmt: skip
    # as written: the condition is drawn cell by cell within each donor here (no samples), so the cells do replicate
    # it; by default glmm_de would take donor × condition for samples and add (1|donor:condition)
    gl = glmm.loc[glmm["converged"], "coef"].to_numpy()
    sd_hat = np.sqrt(glmm.loc[glmm["converged"], "var_donor"].median())
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    pa_exact = logit(np.sum(w * expit(B0 + B1 + SD * z))) - logit(np.sum(w * expit(B0 + SD * z)))
    zla = B1 / np.sqrt(1 + 0.346 * SD**2)
    n = N_GENES
    print(f"true cluster-specific log OR          {B1:.3f}")
    print(f"conditional logit (cluster-specific)  {cs.mean():.3f} ± {cs.std(ddof=1) / np.sqrt(n):.3f}")
    print(
        f"GLMM glmm_de binomial (1|donor)       {gl.mean():.3f} ± {gl.std(ddof=1) / np.sqrt(gl.size):.3f}"
        f"  ({gl.size} converged; median donor sd {sd_hat:.2f})"
    )
    print(f"GLMM log OR / sqrt(1 + 0.346 sd_hat^2) {gl.mean() / np.sqrt(1 + 0.346 * sd_hat**2):.3f}")
    print(f"exact population-average log OR       {pa_exact:.3f}")
    print(f"ZLA approximation                     {zla:.3f}")
    print(f"GEE (population-average)              {t['coef'].mean():.3f} ± {t['coef'].std(ddof=1) / np.sqrt(n):.3f}")
    print(f"ratio GEE / cluster-specific          {t['coef'].mean() / cs.mean():.3f}")
    print(f"mean GEE se {t['se'].mean():.3f}, mean conditional-logit se {np.mean(cs / cs_z):.3f}")
    print(
        f"median |t| GEE {np.median(np.abs(t['stat'])):.2f}, median |z| conditional logit {np.median(np.abs(cs_z)):.2f}"
    )
    print(f"mean working correlation {t['working_corr'].mean():.3f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    u = np.random.default_rng(SEED + 1).normal(0.0, SD, 25)
    xs = np.array([0.0, 1.0])
    for ud in u:
        left.plot(xs, expit(B0 + B1 * xs + ud), c="0.75", lw=0.8)
    marg = np.array([np.sum(w * expit(B0 + B1 * xv + SD * z)) for xv in xs])
    left.plot(xs, marg, c="tab:red", lw=2.5, label=f"mean over donors: log OR {pa_exact:.2f}")
    left.plot([], [], c="0.75", lw=0.8, label=f"one donor each: log OR {B1:.2f}")
    left.set_xticks(xs, ["ctrl", "case"])
    left.set_ylabel("P(gene detected in a cell)")
    left.set_title(f"logistic GLMM, donor sd = {SD:g}: 25 donors and their mean", fontsize=9)
    left.legend(frameon=True, framealpha=0.95, edgecolor="none", fontsize=7, loc="upper left")
    bins = np.linspace(0.0, 1.6, 33)
    right.hist(cs, bins=bins, color="tab:blue", alpha=0.6, label="conditional logit (cluster-specific)")
    right.hist(gl, bins=bins, color="tab:green", alpha=0.5, label="GLMM glmm_de (cluster-specific)")
    right.hist(t["coef"], bins=bins, color="tab:red", alpha=0.6, label="GEE (population-average)")
    right.axvline(B1, c="tab:blue", lw=1.5, label="true cluster-specific")
    right.axvline(pa_exact, c="tab:red", lw=1.5, label="exact population-average")
    right.axvline(zla, c="tab:red", lw=1.0, ls=":", label="ZLA approximation")
    right.set_xlabel("estimated log odds ratio, case vs ctrl")
    right.set_ylabel(f"genes (of {n})")
    right.set_title(f"{N_DONORS} donors × {N_CELLS} cells per gene", fontsize=9)
    right.set_ylim(0, 1.8 * right.get_ylim()[1])  # room for the legend above the bars
    right.legend(frameon=False, fontsize=7, loc="upper left", ncols=2)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
