"""Build docs/tutorial.md and its figures from the bundled data: ``python docs/make_tutorial.py``.

Every number in the tutorial text is computed here, from the run that drew the figures.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

import scmlm

HERE = Path(__file__).parent
FIG = HERE / "figures"


def _fig(name: str) -> str:
    return f"figures/{name}"


def main() -> None:
    FIG.mkdir(parents=True, exist_ok=True)
    out: list[str] = []
    w = out.append
    warnings.simplefilter("ignore", UserWarning)
    t0 = time.perf_counter()

    # ------------------------------------------------------------------ pig airway: between-subject
    pig = scmlm.datasets.pig_airway()
    contrast = ("condition", "CFTRKO", "WT")
    pb = scmlm.pp.pseudobulk(pig, "donor", groups_key="cell_type", layer="counts", min_cells=10)
    scmlm.tl.pseudobulk_de(pb, "~ condition", contrast, groups_key="cell_type")
    pbr = scmlm.get.de_df(pb, key="pseudobulk_de")
    t_glmm = time.perf_counter()
    scmlm.tl.glmm_de(pig, "~ condition + (1|donor)", contrast, groups_key="cell_type", layer="counts")
    t_glmm = time.perf_counter() - t_glmm
    gr = scmlm.get.de_df(pig, key="glmm_de")
    naive = scmlm.tl.glmm_de(pig, "~ condition", contrast, groups_key="cell_type", layer="counts", inplace=False).table

    m = pbr.merge(gr, on=["gene", "group"], suffixes=("_pb", "_glmm"))
    m = m.merge(naive[["gene", "group", "pvalue"]].rename(columns={"pvalue": "pvalue_naive"}), on=["gene", "group"])
    both = m[np.isfinite(m["pvalue_pb"]) & np.isfinite(m["pvalue_glmm"])]
    rho = stats.spearmanr(both["pvalue_pb"], both["pvalue_glmm"]).statistic
    r_coef = np.corrcoef(both["coef_pb"], both["coef_glmm"])[0, 1]
    n_sig = {
        "pseudobulk nb_ql": int((pbr["padj"] < 0.05).sum()),
        "GLMM `(1\\|donor)`": int((gr["padj"] < 0.05).sum()),
        "cell-level GLM, no donor term": int((scmlm.results.bh_adjust(naive["pvalue"].to_numpy()) < 0.05).sum()),
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
    axes[0].scatter(both["coef_pb"], both["coef_glmm"], s=5, alpha=0.5)
    lim = np.nanpercentile(np.abs(both[["coef_pb", "coef_glmm"]].to_numpy()), 99.5)
    axes[0].plot([-lim, lim], [-lim, lim], c="0.3", lw=0.7)
    axes[0].set(xlabel="pseudobulk nb_ql coef (ln FC)", ylabel="GLMM coef (ln FC)")
    axes[0].set_title(f"estimates, r = {r_coef:.2f}")
    axes[1].scatter(-np.log10(both["pvalue_pb"]), -np.log10(both["pvalue_glmm"]), s=5, alpha=0.5)
    axes[1].set(xlabel="−log10 p, pseudobulk", ylabel="−log10 p, GLMM", title=f"p-values, Spearman {rho:.2f}")
    axes[2].hist([m["pvalue_naive"].dropna(), m["pvalue_glmm"].dropna()], bins=20, label=["no donor term", "GLMM"])
    axes[2].set(xlabel="p-value", ylabel="genes", title="pseudoreplication inflates evidence")
    axes[2].legend(frameon=False)
    fig.savefig(FIG / "pig_pb_vs_glmm.png", dpi=110)
    plt.close(fig)
    ax = scmlm.pl.volcano(pb, key="pseudobulk_de", group="Secretory cell", show=False)
    ax.get_figure().savefig(FIG / "pig_volcano_secretory.png", dpi=110)
    plt.close(ax.get_figure())

    sec = pig[pig.obs["cell_type"] == "Secretory cell"].copy()
    expressed = np.asarray((sec.layers["counts"] > 0).sum(0)).ravel() >= 50
    sec = sec[:, expressed].copy()
    vp = scmlm.tl.variance_partition(sec, "~ (1|donor) + condition", layer="counts", inplace=False).table
    ax = scmlm.pl.variance_partition(vp, show=False)
    ax.get_figure().savefig(FIG / "pig_variance_partition.png", dpi=110)
    plt.close(ax.get_figure())
    ax = scmlm.pl.icc(vp, show=False)
    ax.get_figure().savefig(FIG / "pig_icc.png", dpi=110)
    plt.close(ax.get_figure())

    # ------------------------------------------------------------------ glioblastoma: paired, within-donor
    gbm = scmlm.datasets.glioblastoma()
    gcon = ("condition", "panobinostat", "ctrl")
    gpb = scmlm.pp.pseudobulk(gbm, "sample_id", layer="counts")
    scmlm.tl.pseudobulk_de(gpb, "~ donor + condition", gcon)
    gp = scmlm.get.de_df(gpb, key="pseudobulk_de")
    # the default call: the condition is constant within each slice, so glmm_de adds the slice-level term
    scmlm.tl.glmm_de(gbm, "~ condition + (1|donor)", gcon, layer="counts", sample_key="sample_id")
    gg = scmlm.get.de_df(gbm, key="glmm_de")
    g_fitted = gbm.uns["glmm_de"]["params"]["design_fitted"]
    g_written = scmlm.tl.glmm_de(
        gbm, "~ condition + (1|donor)", gcon, layer="counts", replication="as_written", inplace=False
    ).table
    g_slope = scmlm.tl.glmm_de(gbm, "~ condition + (1 + condition|donor)", gcon, layer="counts", inplace=False).table
    g_sig = {
        "paired pseudobulk nb_ql, `~ donor + condition`": int((gp["padj"] < 0.05).sum()),
        f"GLMM default: `~ condition + (1\\|donor)` → fits `{g_fitted.replace('|', chr(92) + '|')}`": int(
            (gg["padj"] < 0.05).sum()
        ),
        "GLMM random slope `~ condition + (1 + condition\\|donor)`": int((g_slope["padj"] < 0.05).sum()),
        'GLMM `~ condition + (1\\|donor)`, `replication="as_written"`': int((g_written["padj"] < 0.05).sum()),
    }
    g_df = {"default": float(gg["df"].median()), "as written": float(g_written["df"].median())}
    n_default, n_pb = int((gg["padj"] < 0.05).sum()), int((gp["padj"] < 0.05).sum())
    gm = gp.merge(gg, on="gene", suffixes=("_pb", "_glmm"))
    gboth = gm[np.isfinite(gm["pvalue_pb"]) & np.isfinite(gm["pvalue_glmm"])]
    g_r = np.corrcoef(gboth["coef_pb"], gboth["coef_glmm"])[0, 1]
    g_rho = stats.spearmanr(gboth["pvalue_pb"], gboth["pvalue_glmm"]).statistic
    # a gene where pooling matters: modest expression and a clearly non-zero donor variance
    cand = gg[(gg["status"] == "ok") & (gg["var_donor"] > 0.05) & (gg["base_mean"].between(0.05, 0.5))]
    cand = cand.sort_values("base_mean").head(25)["gene"].tolist()
    re_all = scmlm.tl.random_effects(gbm, genes=cand, inplace=False).table
    d = re_all[(re_all["term"] == "donor") & np.isfinite(re_all["unpooled"])].copy()
    d["shrink"] = 1 - d["blup"].abs() / d["unpooled"].abs().clip(lower=1e-9)
    gene = d.groupby("gene")["shrink"].median().idxmax()
    symbol = str(gbm.var.loc[gene, "symbol"])
    top = [gene]
    re = re_all[re_all["gene"] == gene]
    ax = scmlm.pl.shrinkage(re, gene, term="donor", show=False)
    ax.set_title(f"{symbol} ({gene}): donor effects, unpooled vs BLUP", fontsize=9)
    ax.get_figure().savefig(FIG / "gbm_shrinkage.png", dpi=110)
    plt.close(ax.get_figure())
    gvp = scmlm.tl.variance_partition(gbm, "~ (1|donor) + condition", layer="counts", inplace=False).table
    med = gvp[["donor", "fixed", "residual"]].median()

    # ------------------------------------------------------------------ text
    w("# Tutorial: pseudobulk and cell-level models on multi-donor data\n")
    w(
        "This page is generated by `docs/make_tutorial.py` from the data bundled with scmlm; every number below "
        f"comes from that run ({time.perf_counter() - t0:.0f} s on a 2-core machine).\n"
    )
    w("## 1. Between-subject design: CFTR-knockout vs wild-type pig airways\n")
    w(
        f"`scmlm.datasets.pig_airway()` has {pig.n_obs:,} cells from 7 pigs (3 CFTR-knockout, 4 wild type) and three "
        "cell types. The condition is a property of the pig, so the pig — not the cell — is the unit of replication.\n"
    )
    w('```python\nimport scmlm\n\npig = scmlm.datasets.pig_airway()\ncontrast = ("condition", "CFTRKO", "WT")')
    w('pb = scmlm.pp.pseudobulk(pig, "donor", groups_key="cell_type", layer="counts", min_cells=10)')
    w('scmlm.tl.pseudobulk_de(pb, "~ condition", contrast, groups_key="cell_type")        # edgeR-style QL')
    w('scmlm.tl.glmm_de(pig, "~ condition + (1|donor)", contrast, groups_key="cell_type", layer="counts")')
    w('scmlm.get.de_df(pb, key="pseudobulk_de", padj_max=0.05)\n```\n')
    w(
        f"Across the three cell types the pseudobulk and the GLMM estimates agree closely (Pearson r = {r_coef:.2f} "
        f"on the natural-log fold changes, Spearman {rho:.2f} on p-values; the GLMM took {t_glmm:.1f} s for "
        f"{gr.shape[0]:,} gene × cell-type fits). Genes at BH-adjusted p < 0.05:\n"
    )
    w("| model | genes |\n|---|---|")
    for k, v in n_sig.items():
        w(f"| {k} | {v} |")
    w(
        "\nThe last row is the pseudoreplication trap: a cell-level model without the pig effect treats thousands of "
        "cells as independent replicates of 7 animals and reports many more 'discoveries' (right panel: its p-values "
        "pile up near 0). With the donor random intercept, a donor-level contrast is tested on donor-level degrees "
        "of freedom (7 pigs − 2 donor-level coefficients = 5), as the pseudobulk test is.\n"
    )
    w(f"![pseudobulk vs GLMM]({_fig('pig_pb_vs_glmm.png')})\n")
    w(f"![volcano, secretory cells]({_fig('pig_volcano_secretory.png')})\n")
    w("### Where does the variation live?\n")
    w(
        "`scmlm.tl.variance_partition` splits each gene's latent-scale variance into random terms, fixed effects and "
        "the distribution-specific residual (Nakagawa–Schielzeth), summing to one; `icc_<factor>` is the correlation "
        "of two cells from the same pig. In secretory cells the median fractions are: "
        + ", ".join(f"{c} {vp[c].median():.3f}" for c in ("donor", "fixed", "residual"))
        + ". Most of a single cell's variance is sampling noise (residual); the donor fraction is small per cell but "
        "it is shared by hundreds of cells of the same pig, which is why ignoring it inflates evidence so much.\n"
    )
    w(f"![variance partition]({_fig('pig_variance_partition.png')})\n")
    w(f"![ICC]({_fig('pig_icc.png')})\n")
    w("## 2. Paired design: glioblastoma slices, DMSO vs panobinostat\n")
    w(
        f"`scmlm.datasets.glioblastoma()`: {gbm.n_obs:,} cells, 5 patients, each with a control and a treated slice. "
        "The treatment varies within patient but is constant within each slice, so the slice is the unit of "
        "replication: the pseudobulk design is `~ donor + condition` on slice sums (paired), and the GLMM needs a "
        "slice-level term. The cells of one slice share the slice's handling, its library and the patient's own "
        "response to the drug; with only `(1|donor)` the treatment would be tested against cell-to-cell noise. "
        '`glmm_de` sees that the contrast is constant within the slices (`sample_key="sample_id"`; without it, '
        "donor × condition) and, by default, adds `(1|sample_id)` and logs that it did.\n"
    )
    w("```python\ngbm = scmlm.datasets.glioblastoma()")
    w('gpb = scmlm.pp.pseudobulk(gbm, "sample_id", layer="counts")')
    w('scmlm.tl.pseudobulk_de(gpb, "~ donor + condition", ("condition", "panobinostat", "ctrl"))')
    w(
        'scmlm.tl.glmm_de(gbm, "~ condition + (1|donor)", ("condition", "panobinostat", "ctrl"), layer="counts",\n'
        '                 sample_key="sample_id")   # adds (1|sample_id)'
    )
    w(f're = scmlm.tl.random_effects(gbm, genes=["{top[0]}"], inplace=False).table   # not written to gbm.uns')
    w(f'scmlm.pl.shrinkage(re, "{top[0]}", term="donor")\n```\n')
    w("Genes at BH-adjusted p < 0.05 (300 genes):\n")
    w("| model | genes |\n|---|---|")
    for k, v in g_sig.items():
        w(f"| {k} | {v} |")
    w(
        f"\nThe sample-aware GLMM calls {n_default} genes, the paired pseudobulk {n_pb} (median df "
        f"{g_df['default']:.1f}, from the 10 slices of 5 patients: with about 4 df per gene the moderation borrows "
        "few df from the other genes, so that genes whose slices vary most stay calibrated; see the README's "
        '"Reading a result"). As written, `(1|donor)` alone tests the treatment '
        f"on cell-level df (median {g_df['as written']:.0f}) and calls most of the 300 genes: the pseudoreplication of "
        'slices, one level below the pseudoreplication of donors. `replication="as_written"` is for experts who '
        "know that their cells replicate the contrast.\n"
    )
    w(
        f"Estimates agree with the paired pseudobulk fit (r = {g_r:.2f}; Spearman of p-values {g_rho:.2f}). "
        f"Median variance fractions: donor {med['donor']:.3f}, treatment (fixed) {med['fixed']:.3f}, residual "
        f"{med['residual']:.3f}.\n"
    )
    w(
        "Partial pooling: the BLUP of each patient's effect (conditional mode) sits between that patient's own "
        "estimate (unpooled, with everything else held fixed) and the population mean 0; the pull is strongest "
        f"where a patient's own estimate is least certain (median shrinkage toward 0 for this gene: "
        f"{d[d['gene'] == gene]['shrink'].median():.0%}). For {symbol} ({gene}):\n"
    )
    w(f"![shrinkage]({_fig('gbm_shrinkage.png')})\n")
    out += abundance_section()
    w("## 4. Which tool when\n")
    w(
        "- **Pseudobulk (`pseudobulk_de`, nb_ql)**: the first choice for condition effects between donors; fast, "
        'calibrated, matches edgeR. Use `method="voom"` with `(1|donor)` when samples repeat within donors.\n'
        "- **Cell-level GLMM (`glmm_de`)**: when covariates vary between cells (continuous cell-level covariates, "
        "`center_within` for within vs between effects), for paired designs, when you need crossed donor and batch "
        "effects, variance components, ICCs or BLUPs. Every contrast is tested at its unit of replication: "
        "donor-level contrasts get donor-level df, paired contrasts a sample-level term (added by default) and "
        "sample-level df, cell-level covariates a random slope over donors (added by default: their average effect is "
        "a donor-level quantity) and donor-level df; see docs/replication.md.\n"
        "- **GEE (`gee_de`)**: population-average effects (see `docs/gee_vs_glmm.md`).\n"
        "- **Differential abundance (`abundance_de`)**: which cell types change in share; one test per type between "
        'samples, with `method="clr"` as the reference-free check (see `docs/abundance.md`).\n'
    )
    (HERE / "tutorial.md").write_text("\n".join(out) + "\n")
    print(f"wrote {HERE / 'tutorial.md'} and figures in {FIG} in {time.perf_counter() - t0:.0f} s")


_RES_COLS = ["gene", "base_mean", "coef", "se", "df", "pvalue", "padj", "status"]


def abundance_section() -> list[str]:
    """Section 3: which cell types change in abundance (``tl.abundance_de``), on Kang 2018 and the pig airways."""
    out: list[str] = []
    w = out.append
    kang = scmlm.datasets.kang2018()
    scmlm.tl.abundance_de(kang, "~ donor + condition", ("condition", "stim", "ctrl"), sample_key="sample_id")
    k_fitted = kang.uns["abundance_de"]["params"]["design_fitted"]
    k_res = scmlm.get.de_df(kang)[_RES_COLS].round(3).to_string()
    n_cells = kang.obs.groupby(["sample_id", "cell_type"], observed=True).size()
    pig = scmlm.datasets.pig_airway()
    printed = {}
    for method in ("glmm", "clr"):
        scmlm.tl.abundance_de(pig, "~ condition", ("condition", "CFTRKO", "WT"), sample_key="sample_id", method=method)
        res = scmlm.get.de_df(pig)
        printed[method] = (pig.uns["abundance_de"]["params"]["design_fitted"], res[_RES_COLS].round(3).to_string())
    # the figures show the default (GLMM) result
    scmlm.tl.abundance_de(pig, "~ condition", ("condition", "CFTRKO", "WT"), sample_key="sample_id")
    for name, func in (
        ("pig_composition.png", scmlm.pl.composition),
        ("pig_abundance.png", scmlm.pl.abundance_effects),
    ):
        ax = func(pig, show=False)
        ax.get_figure().savefig(FIG / name, dpi=110)
        plt.close(ax.get_figure())
    immune = pig.obs[pig.obs["condition"] == "CFTRKO"].groupby("sample_id", observed=True)["cell_type"]
    share = immune.apply(lambda c: float((c == "Immune cell").mean()))

    w("## 3. Which cell types change? Differential abundance\n")
    w(
        "`scmlm.tl.abundance_de` counts the cells of each type in each sample and tests every type between samples: "
        "samples, not cells, replicate a condition (`docs/abundance.md` has the methods and their calibration). The "
        "default is a binomial GLMM per type with a sample-level term for the over-dispersion of composition between "
        'samples; `method="clr"` (centred log-ratios) is the reference-free check. Composition is relative: the '
        "shares of a sample sum to one, so a type that expands lowers the others' shares even if their numbers of "
        "cells do not change.\n"
    )
    w(
        "**Kang 2018 (bundled subset), IFN-β stimulated vs control PBMCs, paired by donor.** The bundled subset has "
        f"2 donors and at most {int(n_cells.max())} cells per type and sample, so its composition is set by the "
        "subsampling, not by the study: it shows the call, not the study's composition. With 2 donors the donor is "
        "a fixed effect (two levels cannot estimate a variance) and the paired contrast has 1 df.\n"
    )
    w("```python\nkang = scmlm.datasets.kang2018()")
    w('scmlm.tl.abundance_de(kang, "~ donor + condition", ("condition", "stim", "ctrl"), sample_key="sample_id")')
    w('print(kang.uns["abundance_de"]["params"]["design_fitted"])')
    w(f"cols = {_RES_COLS!r}")
    w('print(scmlm.get.de_df(kang, key="abundance_de")[cols].round(3).to_string())\n```\n')
    w(f"```\n{k_fitted}\n{k_res}\n```\n")
    capped = [t for t in n_cells.index.levels[1] if (n_cells.xs(t, level="cell_type") == n_cells.max()).all()]
    if len(capped) > 1:
        w(
            f"{' and '.join(capped)} reach the cap in every sample, so their counts, and their rows, are the same: an "
            "artefact of the subset.\n"
        )
    w(
        '**Pig airway, CFTR knockout vs wild type.** Seven pigs, one sample each (`sample_key="sample_id"`): '
        "between donors, the GLMM's added `(1|sample_id)` is the pig term.\n"
    )
    w('```python\nfor method in ("glmm", "clr"):')
    w('    scmlm.tl.abundance_de(pig, "~ condition", ("condition", "CFTRKO", "WT"), sample_key="sample_id",')
    w("                          method=method)")
    w('    print(method, pig.uns["abundance_de"]["params"]["design_fitted"])')
    w('    print(scmlm.get.de_df(pig, key="abundance_de")[cols].round(3).to_string())\n```\n')
    w("```\n" + "\n".join(f"{m} {f}\n{t}" for m, (f, t) in printed.items()) + "\n```\n")
    w(
        "No type changes detectably with 7 pigs: the immune share of the three knockout pigs ranges from "
        f"{share.min():.0%} to {share.max():.0%}. The two methods measure against different references (the GLMM a "
        "type against all other cells of its sample, `clr` against the geometric mean of the three types), so their "
        "coefficients differ. `scmlm.pl.composition(pig)` draws each sample's composition grouped by condition, "
        "`scmlm.pl.abundance_effects(pig)` each type's log2 change with its 95 % interval (the GLMM result):\n"
    )
    w('```python\nscmlm.tl.abundance_de(pig, "~ condition", ("condition", "CFTRKO", "WT"), sample_key="sample_id")')
    w("scmlm.pl.composition(pig)\nscmlm.pl.abundance_effects(pig)\n```\n")
    w(f"![composition]({_fig('pig_composition.png')})\n")
    w(f"![abundance effects]({_fig('pig_abundance.png')})\n")
    w(
        'The same from the command line: `scmlm abundance --input pig.h5ad --design "~ condition" --contrast '
        "condition:CFTRKO:WT --sample-key sample_id --out abundance.csv --plots abundance_plots`; in the workflow, "
        "an analysis with `method: abundance` (config/README.md).\n"
    )
    return out


if __name__ == "__main__":
    main()
