"""The HTML report (`scmlm.report`, `scmlm report`), the informative choice of shrinkage genes, and plot layout."""

from __future__ import annotations

import base64
import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scmlm
from scmlm import cli
from scmlm.pl.files import save_result_plots

GROUPS = {"type0": "CD14+ Monocytes", "type1": "T/NK <b>&</b>"}
PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Tables (attributes, header, rows of cell text and data-v), images, headings and scripts of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.headings, self.scripts, self.links = [], [], [], [], []
        self._cell = None
        self._heading = None
        self._script = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": a, "header": [], "rows": [], "values": []})
        elif tag == "tr" and self.tables:
            self._row, self._values = [], []
        elif tag in ("td", "th"):
            self._cell = [tag, "", a.get("data-v")]
        elif tag == "img":
            self.images.append(a)
        elif tag in ("h1", "h2", "h3"):
            self._heading = [tag, a.get("id"), ""]
        elif tag == "script":
            self._script = ""
        elif tag == "link":
            self.links.append(a)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._heading is not None:
            self._heading[2] += data
        if self._script is not None:
            self._script += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            kind, text, value = self._cell
            (self.tables[-1]["header"] if kind == "th" else self._row).append(text.strip())
            if kind == "td":
                self._values.append(value)
            self._cell = None
        elif tag == "tr" and self.tables and self._row:
            self.tables[-1]["rows"].append(self._row)
            self.tables[-1]["values"].append(self._values)
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(tuple(self._heading))
            self._heading = None
        elif tag == "script":
            self.scripts.append(self._script)
            self._script = None


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A result folder as the workflow writes it: pseudobulk DE of 2 cell types with awkward names, and its plots."""
    folder = tmp_path_factory.mktemp("report") / "pb"
    adata = scmlm.datasets.simulate(n_donors=8, n_cells=40, n_genes=120, n_cell_types=2, frac_de=0.3, seed=4)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).map(GROUPS)
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type", layer="counts")
    scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"), groups_key="cell_type")
    table = scmlm.get.de_df(pb, key="pseudobulk_de")
    folder.mkdir()
    table.to_csv(folder / "results.csv", index=False)
    save_result_plots(table, folder / "plots", kinds=["volcano", "pvalue_hist"])
    return folder


def test_report_summarises_each_group_with_counts_equal_to_the_results(results, tmp_path):
    params = {"method": "pseudobulk", "design": "~ condition", "contrast": "condition:case:ctrl", "offset": "TMM"}
    out = scmlm.report.write_report(
        tmp_path / "report.html", [scmlm.report.analysis_from_folder(results, params=params)], title="Test <run>"
    )
    text = out.read_text()
    page = parse(text)
    table = pd.read_csv(results / "results.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # written atomically, no temporary file left

    # the landing table comes first and holds the counts of the results
    summary = next(t for t in page.tables if t["attrs"].get("id") == "summary")
    assert page.tables[0] is summary
    assert summary["header"][:4] == ["analysis", "method", "group", "contrast"]
    assert len(summary["rows"]) == 2
    for row in summary["rows"]:
        analysis, method, group, contrast, unit, n_genes, n_tested, n_called, n_up, n_down = row
        assert unit == "genes"
        sub = table[(table["group"] == group) & (table["contrast"] == contrast)]
        called = sub["padj"] < 0.05
        assert analysis == "pb" and method == "nb_ql" and group in GROUPS.values()
        assert int(n_genes) == len(sub) and int(n_tested) == sub["pvalue"].notna().sum()
        assert int(n_called) == called.sum() > 0
        assert int(n_up) == (called & (sub["log2fc"] > 0)).sum()
        assert int(n_down) == (called & (sub["log2fc"] < 0)).sum()
        assert int(n_up) + int(n_down) == int(n_called)

    # one sortable top-gene table per group, the smallest p-values first, with sort keys on numeric cells
    tops = [t for t in page.tables if t["attrs"].get("class") == "sortable" and t is not summary]
    assert len(tops) == 2
    for top, group in zip(tops, ["CD14+ Monocytes", "T/NK <b>&</b>"], strict=True):
        assert top["header"][:2] == ["gene", "log2fc"] and "padj" in top["header"]
        sub = table[table["group"] == group].sort_values("pvalue")
        assert [r[0] for r in top["rows"]] == list(sub["gene"].head(20))
        p = [float(v[top["header"].index("pvalue")]) for v in top["values"]]
        np.testing.assert_allclose(p, sub["pvalue"].head(20), rtol=1e-12)
    assert any("addEventListener" in s and "sortable" in s for s in page.scripts)

    # every figure embedded (nothing fetched), under its own group
    pngs = sorted((results / "plots").glob("*.png"))
    assert len(pngs) == 4 and len(page.images) == 4
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG
    assert not page.links and "http://" not in text and "https://" not in text
    order = [h[2] for h in page.headings] + [i["alt"] for i in page.images]
    assert any("CD14+ Monocytes" in h for h in order)
    mono = text.index("pb · CD14+ Monocytes")
    tnk = text.index("pb · T/NK &lt;b&gt;&amp;&lt;/b&gt;")
    for img in page.images:
        at = text.index(f'alt="{img["alt"]}"')
        assert (mono < at < tnk) == (img["alt"].find("CD14plus") >= 0), img["alt"]

    # labels are escaped, never markup; the methods are listed
    assert "<b>&</b>" not in text and "T/NK &lt;b&gt;&amp;&lt;/b&gt;" in text
    assert "<title>Test &lt;run&gt;</title>" in text
    for key, value in params.items():
        assert f"<dt>{key}</dt><dd>{value}</dd>" in text.replace("~", "~")
    # group links in the landing table lead to the group's section
    ids = {h[1] for h in page.headings}
    for href in [seg.split('"')[0] for seg in text.split('href="#')[1:]]:
        assert href in ids, href


def test_report_from_anndata_results_and_several_analyses(tmp_path):
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=30, n_genes=50, seed=2)
    pb = scmlm.pp.pseudobulk(adata, "donor", layer="counts")
    scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"))
    scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"), method="voom", key_added="voom")
    out = scmlm.report.write_report(tmp_path / "r.html", {"edgeR QL": (pb, "pseudobulk_de"), "voom": (pb, "voom")})
    page = parse(out.read_text())
    summary = page.tables[0]
    assert [r[:2] for r in summary["rows"]] == [["edgeR QL", "nb_ql"], ["voom", "voom"]]
    # params from adata.uns are shown (the design of each call)
    assert out.read_text().count("<dt>design</dt><dd>~ condition</dd>") == 2
    with pytest.raises(scmlm.InputError, match="unique"):
        scmlm.report.render_report([scmlm.report.Analysis("a", pb.uns["voom"]["results"])] * 2)


def test_demo_sized_report_is_light_with_screen_sized_images_and_collapsed_tables(results, tmp_path):
    """A report the size of the demo (7 analyses × 2 groups, 28 figures, top-20 tables) stays below 600 kB: figures
    are embedded as palette PNGs with a display width, long tables are collapsed with the full CSV linked."""
    import shutil

    run = tmp_path / "run"
    names = [f"pb{i}" for i in range(7)]
    for name in names:
        shutil.copytree(results, run / name)
    figures = sum(len(list((run / n / "plots").glob("*.png"))) for n in names)
    raw = sum(p.stat().st_size for n in names for p in (run / n / "plots").glob("*.png"))
    out = scmlm.report.write_report(run / "report.html", {n: run / n for n in names})
    size = out.stat().st_size
    assert figures == 28
    assert size < 600_000  # bytes; the figures inlined as they are took ~750 kB (4/3 × raw in base64)
    assert size < raw  # the palette PNGs take less than the figures' own bytes, base64 included
    text = out.read_text()
    page = parse(text)
    assert len(page.images) == 28
    for img in page.images:
        assert 0 < int(img["width"]) <= scmlm.report.FIGURE_WIDTH, img.get("width")
        data = base64.b64decode(img["src"].split(",", 1)[1])
        assert data[:8] == PNG and data[25] == 3  # PNG colour type 3: palette
    assert ".figs img{max-width:100%;height:auto" in text
    # each group's top-20 table is collapsed, with the result table linked (relative: it moves with the folder)
    for name in names:
        section = text.split(f'<h2 id="s-{name}">')[1].split("<h2")[0]
        assert section.count("<details><summary>Top 20 genes (20 rows)</summary><table") == 2
        assert section.count(f'<a href="{name}/results.csv">') == 2
        assert "more figure" not in section  # two figures per group, both shown


def test_cli_report_and_bad_input(results, tmp_path, capsys):
    out = tmp_path / "report.html"
    params = '{"pb": {"design": "~ condition", "offset": "TMM"}}'
    assert cli.main(["report", str(out), str(results), "--params", params, "--n-top", "5"]) == 0
    page = parse(out.read_text())
    assert all(len(t["rows"]) == 5 for t in page.tables[1:])
    assert len(page.images) == 4
    # a table given directly, named, with its figure folder
    out2 = tmp_path / "named.html"
    argv = ["report", str(out2), f"mine={results / 'results.csv'}", "--figures", f"mine={results / 'plots'}"]
    assert cli.main(argv) == 0
    assert parse(out2.read_text()).tables[0]["rows"][0][0] == "mine"
    assert len(parse(out2.read_text()).images) == 4
    for argv, message in (
        (["report", str(out), str(results), "--params", '{"other": {}}'], "not in the report"),
        (["report", str(out), str(results), "--params", "{not json"], "not valid JSON"),
        (["report", str(out), str(tmp_path / "missing")], "does not exist"),
        (["report", str(out), str(results), "--figures", "pb"], "NAME=DIR"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_shrinkage_genes_have_a_positive_donor_variance(caplog):
    table = pd.DataFrame(
        {
            "gene": ["a", "b", "c", "d"] * 2,
            "group": ["T/NK"] * 4 + ["B"] * 4,
            "status": ["ok"] * 8,
            "pvalue": [1e-9, 1e-6, 1e-3, 0.5] * 2,
            "var_donor": [0.0, 0.2, 0.0, 0.1] + [0.3, 0.0, 0.0, 0.0],
        }
    )
    assert cli._shrinkage_term("~ condition + (1|donor) + (1|batch)") == "donor"
    assert cli._shrinkage_pairs(table, 3, "donor") == [("b", "T/NK"), ("d", "T/NK"), ("a", "B")]
    with caplog.at_level(logging.INFO, logger="scmlm"):
        zero = table.assign(var_donor=np.where(table["group"] == "B", 0.0, table["var_donor"]))
        assert cli._shrinkage_pairs(zero, 2, "donor") == [("b", "T/NK"), ("d", "T/NK"), ("a", "B"), ("b", "B")]
    assert "no fitted gene of group B has var_donor > 0" in caplog.text


def test_volcano_legend_does_not_cover_gene_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    n = 400
    lfc = rng.normal(0, 1, n)
    p = np.exp(-np.abs(lfc) * 12 * rng.uniform(0.5, 1, n))
    df = pd.DataFrame({"gene": [f"GENE{i}" for i in range(n)], "log2fc": lfc, "pvalue": p})
    df["padj"] = np.minimum(1, p * n / (np.argsort(np.argsort(p)) + 1))
    df[["group", "contrast"]] = ["CD14+ Monocytes", "stim_vs_ctrl"]
    ax = scmlm.pl.volcano(df, show=False)
    fig = ax.get_figure()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    points = ax.transData.transform(np.column_stack([lfc, -np.log10(p)]))
    assert len(labels) == 10
    assert not any(legend.overlaps(b) for b in labels)
    assert not any(legend.contains(x, y) for x, y in points)
    plt.close(fig)


def test_fitted_design_is_the_design_glmm_de_fits(tmp_path, results):
    paired = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=100, n_cell_types=2, design="within", seed=0)
    design, contrast = "~ condition + (1|donor)", ("condition", "case", "ctrl")
    with pytest.warns(UserWarning, match="gene fits"):
        res = scmlm.tl.glmm_de(paired, design, contrast, groups_key="cell_type", inplace=False)
    got = scmlm.report.fitted_design(paired.obs, design, contrast, groups_key="cell_type")
    assert got == res.params["design_fitted"] == "~ condition + (1|donor) + (1|donor:condition)"
    assert scmlm.report.fitted_design(paired.obs, design, contrast, replication="as_written") == design
    between = scmlm.datasets.simulate(n_donors=6, n_cells=10, n_genes=20, seed=0)
    assert scmlm.report.fitted_design(between.obs, design, contrast) == design
    # scmlm report --input reads the obs and lists the fitted design of a GLMM analysis
    scmlm.io.write_h5ad(paired, tmp_path / "cells.h5ad")
    out = tmp_path / "r.html"
    params = json.dumps({"pb": {"method": "glmm", "design": design, "contrast": list(contrast)}})
    argv = ["report", str(out), str(results), "--params", params, "--input", str(tmp_path / "cells.h5ad")]
    assert cli.main(argv) == 0
    assert "<dt>design_fitted</dt><dd>~ condition + (1|donor) + (1|donor:condition)</dd>" in out.read_text()


def _few_donor_run(tmp_path, n_donors: int):
    """Cells of `n_donors` donors (half per condition), `scmlm de` on them and the report with --input."""
    cells = tmp_path / f"cells{n_donors}.h5ad"
    scmlm.datasets.simulate(n_donors=n_donors, n_cells=20, n_genes=40, frac_de=0.3, seed=5).write_h5ad(cells)
    folder = tmp_path / f"pb{n_donors}"
    folder.mkdir()
    argv = ["de", str(cells), "--tool", "pseudobulk", "--sample-key", "donor", "--layer", "counts"]
    argv += ["--design", "~ condition", "--contrast", "condition:case:ctrl", "--out", str(folder / "results.csv")]
    return cells, folder, argv


@pytest.mark.parametrize("n_donors", [4, 8])
def test_few_replicates_are_flagged_by_de_and_the_report(tmp_path, caplog, n_donors):
    """2 donors per condition: `scmlm de` warns and the report shows a banner naming the levels; 4 per condition:
    neither. The report always explains df, df_prior, singular and small p-values from few donors."""
    cells, folder, argv = _few_donor_run(tmp_path, n_donors)
    with caplog.at_level(logging.WARNING, logger="scmlm"):
        assert cli.main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "few replicates" in
              r.getMessage()]  # fmt: skip
    few = n_donors < 2 * scmlm.checks.FEW_REPLICATES
    assert len(warned) == int(few), warned
    if few:
        assert "condition=case has 2 units of replication (fewer than 3)" in warned[0]
        assert "condition=ctrl has 2 units of replication" in warned[0]
        assert "not that the effect will replicate in other donors" in warned[0]
    out = tmp_path / f"report{n_donors}.html"
    params = json.dumps({folder.name: {"method": "pseudobulk", "design": "~ condition",
                                        "contrast": ["condition", "case", "ctrl"], "sample_key": "donor"}})  # fmt: skip
    assert cli.main(["report", str(out), str(folder), "--params", params, "--input", str(cells)]) == 0
    text = out.read_text()
    assert "Reading the numbers: df, df_prior, singular" in text and "<b>df_prior</b>" in text
    assert f"<dt>units_per_level</dt><dd>{{&quot;condition=case&quot;: {n_donors // 2}" in text
    assert text.count('class="banner"') == 2 * int(few)
    if few:
        top = text.split('id="few-replicates"')[1].split("</div>")[0]
        assert f'<a href="#s-{folder.name}">{folder.name}</a>' in top
        section = text.split(f'<h2 id="s-{folder.name}">')[1]
        assert section.index('class="banner"') < section.index("<h3>Methods</h3>")
        assert "<li>condition=case has 2 units of replication (fewer than 3)</li>" in section


def test_a_median_df_of_two_or_less_is_flagged(results):
    table = pd.read_csv(results / "results.csv")
    low = table.assign(df=np.where(table["group"] == "CD14+ Monocytes", 2.0, 12.0))
    text = scmlm.report.render_report([scmlm.report.Analysis("low", low), scmlm.report.Analysis("fine", table)])
    assert text.count('class="banner"') == 2  # the page's and the analysis'
    assert '<a href="#s-low">low</a>' in text.split('id="few-replicates"')[1].split("</div>")[0]
    banner = text.split('<h2 id="s-low">')[1].split("</div>")[0]
    assert "<li>CD14+ Monocytes · condition_case_vs_ctrl: the median test has only 2 residual df (at most 2)</li>" in (
        banner
    )
    assert "T/NK" not in banner


def test_report_fitted_design_of_named_contrasts_is_the_fitted_one(tmp_path, results):
    """B3: a mapping name -> contrast (a slope and a factor contrast) as the workflow passes it: the report's
    design_fitted is the design glmm_de fits (few-level batch fixed, the slope's random term added), not the written
    one."""
    adata = scmlm.datasets.simulate(n_donors=9, n_cells=20, n_genes=20, n_batches=3, design="within", seed=2)
    adata.obs["x"] = np.random.default_rng(0).normal(size=adata.n_obs)
    design = "~ x + condition + (1|donor) + (1|batch)"
    contrast = {"x_slope": "x", "cond": ["condition", "case", "ctrl"]}
    want = scmlm.report.fitted_design(adata.obs, design, {"x_slope": "x", "cond": ("condition", "case", "ctrl")})
    assert want != design
    cells = tmp_path / "cells.h5ad"
    scmlm.io.write_h5ad(adata, cells)
    out = tmp_path / "r.html"
    params = json.dumps({"pb": {"method": "glmm", "design": design, "contrast": contrast}})
    assert cli.main(["report", str(out), str(results), "--params", params, "--input", str(cells)]) == 0
    assert f"<dt>design_fitted</dt><dd>{want}</dd>" in out.read_text()


def test_report_params_without_method(tmp_path, results, capsys):
    """B15: the method is inferred from the params (family: glmm) or the result table; refused in one line when
    neither names it."""
    adata = scmlm.datasets.simulate(n_donors=6, n_cells=20, n_genes=20, design="within", seed=0)
    cells = tmp_path / "cells.h5ad"
    scmlm.io.write_h5ad(adata, cells)
    design, contrast = "~ condition + (1|donor)", ["condition", "case", "ctrl"]
    out = tmp_path / "r.html"
    params = json.dumps({"pb": {"family": "nb", "design": design, "contrast": contrast}})
    assert cli.main(["report", str(out), str(results), "--params", params, "--input", str(cells)]) == 0
    assert "<dt>design_fitted</dt><dd>~ condition + (1|donor) + (1|donor:condition)</dd>" in out.read_text()
    mixed = tmp_path / "mixed.csv"
    table = pd.read_csv(results / "results.csv")
    table.assign(method=np.where(np.arange(len(table)) % 2, "glmm_nb", "nb_ql")).to_csv(mixed, index=False)
    params = json.dumps({"mixed": {"design": design, "contrast": contrast}})
    argv = ["report", str(tmp_path / "m.html"), str(mixed), "--params", params, "--input", str(tmp_path / "cells.h5ad")]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "give design and contrast but no 'method'" in err[-1] and '"method": "glmm"' in err[-1]
    assert not (tmp_path / "m.html").exists()
    # a pseudobulk table names its method: no fitted design, no error
    params = json.dumps({"pb": {"design": "~ condition", "contrast": contrast}})
    assert cli.main(["report", str(out), str(results), "--params", params, "--input", str(cells)]) == 0
    assert "<dt>design_fitted</dt>" not in out.read_text()
    assert scmlm.checks.report_tool({}, table) == "pseudobulk"
    assert scmlm.checks.report_tool({"offset": "tmm"}) == "glmm"


def test_report_params_help_says_what_params_hold(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "method: glmm|pseudobulk|abundance" in text and "fitted design" in text


def test_reading_guide_of_cell_types_speaks_of_cell_types(results):
    table = pd.read_csv(results / "results.csv").assign(df_prior=4.0)
    assert "df borrowed from the other genes" in scmlm.checks.reading_guide(table)
    types = table.assign(method="abundance_clr")
    assert "df borrowed from the other cell types" in scmlm.checks.reading_guide(types)
