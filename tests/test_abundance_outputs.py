"""Differential abundance beyond the tool: its plots (pl.composition, pl.abundance_effects) and `scmlm abundance`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes

import scmlm
from scmlm import InputError
from scmlm.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTRAST = ("condition", "case", "ctrl")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def comp():
    adata = scmlm.datasets.simulate_composition(n_donors=4, n_cell_types=5, seed=0)
    scmlm.tl.abundance_de(adata, "~ condition + (1|donor)", CONTRAST)
    return adata


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, comp):
    path = tmp_path_factory.mktemp("abundance") / "cells.h5ad"
    data = comp.copy()
    del data.uns["abundance_de"]
    data.write_h5ad(path)
    return path


def _drawn(ax: Axes) -> int:
    return len(ax.collections) + len(ax.patches) + len(ax.lines)


# ---------------------------------------------------------------- plots


@pytest.mark.parametrize("name", ["composition", "abundance_effects"])
def test_abundance_plots_render_png_and_honour_ax(name, comp, tmp_path):
    func = getattr(scmlm.pl, name)
    path = tmp_path / f"{name}.png"
    ax = func(comp, show=False, save=path)
    assert isinstance(ax, Axes) and _drawn(ax) > 0
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000
    assert not list(tmp_path.glob("*.tmp*"))
    fig, (left, right) = plt.subplots(1, 2)
    assert func(comp, ax=right, show=False) is right
    assert _drawn(right) > 0 and _drawn(left) == 0


def test_composition_stacks_each_sample_to_one_grouped_by_condition(comp):
    ax = scmlm.pl.composition(comp, show=False)
    n_samples, n_types = comp.obs["sample"].nunique(), comp.obs["cell_type"].nunique()
    bars = ax.patches
    assert len(bars) == n_samples * n_types
    tops = {}
    for b in bars:
        x = round(b.get_x() + b.get_width() / 2, 6)
        tops[x] = max(tops.get(x, 0.0), b.get_y() + b.get_height())
    assert np.allclose(list(tops.values()), 1.0)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    # ctrl samples first (the condition's level order), then case
    assert all(s.endswith("_ctrl") for s in labels[: n_samples // 2])
    assert all(s.endswith("_case") for s in labels[n_samples // 2 :])
    assert {t.get_text() for t in ax.texts} == {"ctrl", "case"}


def test_composition_without_a_result_needs_the_keys(comp):
    bare = comp.copy()
    del bare.uns["abundance_de"]
    with pytest.raises(InputError, match=r"no abundance result under adata.uns\['abundance_de'\].*cell_type_key="):
        scmlm.pl.composition(bare, show=False)
    ax = scmlm.pl.composition(bare, cell_type_key="cell_type", sample_key="sample", condition="condition", show=False)
    assert len(ax.patches) == 8 * 5
    with pytest.raises(InputError, match="condition='cell_type' varies within sample"):
        scmlm.pl.composition(bare, cell_type_key="cell_type", sample_key="sample", condition="cell_type", show=False)
    with pytest.raises(InputError, match="condition='arm'"):
        scmlm.pl.composition(bare, cell_type_key="cell_type", sample_key="sample", condition="arm", show=False)


def test_abundance_effects_intervals_use_t_quantiles(comp):
    from scipy import stats

    ax = scmlm.pl.abundance_effects(comp, show=False)
    res = scmlm.get.de_df(comp)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted(res["gene"])
    segments = [line for line in ax.lines if len(line.get_xdata()) == 2 and line.get_xdata()[0] != line.get_xdata()[1]]
    row = res.iloc[0]
    q = stats.t.ppf(0.975, row["df"])
    lo, hi = (row["coef"] - q * row["se"]) / np.log(2), (row["coef"] + q * row["se"]) / np.log(2)
    assert any(np.allclose(seg.get_xdata(), [lo, hi]) for seg in segments)
    # significant types are red
    n_sig = int((res["padj"] < 0.05).sum())
    assert sum(1 for seg in segments if seg.get_color() == "tab:red") == n_sig


def test_abundance_effects_errors_name_the_key_and_contrast(comp):
    with pytest.raises(InputError, match=r"no result under adata.uns\['abund2'\].*abundance_de"):
        scmlm.pl.abundance_effects(comp, "abund2", show=False)
    two = scmlm.tl.abundance_de(comp, "~ condition + (1|donor)", {"a": CONTRAST, "b": CONTRAST}, inplace=False).table
    with pytest.raises(InputError, match="pass contrast="):
        scmlm.pl.abundance_effects(two, show=False)
    assert isinstance(scmlm.pl.abundance_effects(two, contrast="b", show=False), Axes)
    with pytest.raises(InputError, match="coef"):
        scmlm.pl.abundance_effects(two.drop(columns="coef"), contrast="a", show=False)


# ---------------------------------------------------------------- command line


def _args(h5ad, out, *extra):
    return ["abundance", "--input", str(h5ad), "--design", "~ condition + (1|donor)", "--contrast",
            "condition:case:ctrl", "--out", str(out), *extra]  # fmt: skip


def test_cli_abundance_equals_the_api_and_writes_plots(h5ad, comp, tmp_path):
    out = tmp_path / "abundance.csv"
    assert main(_args(h5ad, out, "--sample-key", "sample", "--plots", str(tmp_path / "plots"))) == 0
    table = pd.read_csv(out)
    direct = scmlm.get.de_df(comp)
    assert list(table["gene"]) == list(direct["gene"])
    np.testing.assert_allclose(table["coef"], direct["coef"], rtol=1e-8)
    np.testing.assert_allclose(table["pvalue"], direct["pvalue"], rtol=1e-8)
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["abundance_effects__condition_case_vs_ctrl.png", "composition.png"]


def test_cli_abundance_flags_reach_the_tool(h5ad, comp, tmp_path):
    out = tmp_path / "clr.csv"
    args = _args(
        h5ad,
        out,
        "--method",
        "clr",
        "--min-cells",
        "5",
        "--pseudocount",
        "1",
        "--contrast",
        "other=condition:case:ctrl",
    )
    assert main(args) == 0
    table = pd.read_csv(out)
    assert set(table["method"]) == {"abundance_clr"}
    assert set(table["contrast"]) == {"condition_case_vs_ctrl", "other"}
    direct = scmlm.tl.abundance_de(
        comp, "~ condition + (1|donor)", {"condition_case_vs_ctrl": CONTRAST, "other": CONTRAST}, method="clr",
        min_cells=5, pseudocount=1.0, inplace=False,
    ).table  # fmt: skip
    np.testing.assert_allclose(table["coef"], direct["coef"], rtol=1e-8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cell-type-key", "celltype"], "--cell-type-key 'celltype' is not a column of the input's obs"),
        (["--sample-key", "library"], "--sample-key 'library' is not a column"),
        (["--cell-type-key", "sample"], "cell_type_key and sample_key are both 'sample'"),
        (["--min-cells", "-1"], "--min-cells -1 must be 0 or more"),
    ],
)
def test_cli_abundance_bad_input_is_one_line(h5ad, tmp_path, capsys, extra, message):
    out = tmp_path / "t.csv"
    assert main(_args(h5ad, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scmlm abundance: error:") and message in err[0], err
    assert not out.exists()


def test_cli_abundance_one_cell_type_only(tmp_path, comp, capsys):
    one = comp[comp.obs["cell_type"] == "type0"].copy()
    del one.uns["abundance_de"]
    path = tmp_path / "one.h5ad"
    one.write_h5ad(path)
    assert main(_args(path, tmp_path / "t.csv")) == 2
    assert "has 1 cell type with cells" in capsys.readouterr().err


def test_cli_abundance_unknown_method_and_outputs_checked_first(h5ad, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(_args(h5ad, tmp_path / "t.csv", "--method", "masc"))
    assert err.value.code == 2 and "invalid choice: 'masc'" in capsys.readouterr().err
    assert main(_args(h5ad, h5ad)) == 2  # the output is the input
    assert "also an input" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_args(h5ad, tmp_path / "t.csv", "--plots", str(blocker))) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


# ---------------------------------------------------------------- report


def test_report_abundance_section(h5ad, tmp_path):
    """A result folder of `scmlm abundance` (table, params.json, plots) gets its own section in the report."""
    folder = tmp_path / "abund"
    args = _args(h5ad, folder / "results.csv", "--sample-key", "sample", "--method", "clr")
    assert main([*args, "--out-params", str(folder / "params.json"), "--plots", str(folder / "plots")]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(out), str(folder), "--params", '{"abund": {"design": "~ condition + (1|donor)"}}']) == 0
    html = out.read_text()
    summary = html.split('id="summary"')[1].split("</table>")[0]  # the landing table names what the rows are
    assert '<td data-v="cell types">cell types</td>' in summary and ">genes<" not in summary
    section = html.split('<h2 id="s-abund">abund</h2>')[1]
    assert "Fitted design: <code>~ condition + (1|donor)</code>; added terms: none." in section
    assert "Composition is relative" in section
    head = section.split("<thead>")[1].split("</thead>")[0]
    for col in ("cell type", "coef", "se", "df", "pvalue", "padj", "status"):
        assert f">{col}</th>" in head, col
    assert section.count("<tr><td") == 5  # one row per cell type
    assert section.count('src="data:image/png;base64,') == 2
    assert "<dt>method</dt><dd>clr</dd>" in section  # params.json, under --params
