"""Every public plot renders to PNG, honours ax=/show=/save=, and names missing columns in its error."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes

from scmlm import InputError
from scmlm.pl._de import ma, pvalue_hist, qq, volcano
from scmlm.pl._hier import icc, shrinkage, variance_partition

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def de_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 300
    lfc = rng.normal(0, 0.4, n)
    lfc[:30] += rng.choice([-2.0, 2.0], 30)
    z = lfc / 0.35
    from scipy import stats

    p = 2 * stats.norm.sf(np.abs(z))
    from scmlm.results import bh_adjust

    return pd.DataFrame(
        {
            "gene": [f"g{i:03d}" for i in range(n)],
            "group": "all",
            "contrast": "condition_case_vs_ctrl",
            "coef": lfc * np.log(2),
            "log2fc": lfc,
            "pvalue": p,
            "padj": bh_adjust(p),
            "base_mean": np.exp(rng.normal(0, 1.5, n)),
        }
    )


def _vp(n_genes=200, groups=None, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for g in groups or [None]:
        frac = rng.dirichlet([2.0, 0.6, 1.0, 5.0], n_genes)  # donor, batch, fixed, residual
        df = pd.DataFrame(
            frac, columns=["donor", "batch", "fixed", "residual"], index=[f"g{i}" for i in range(n_genes)]
        )
        df["icc_donor"] = frac[:, 0] / (frac[:, 0] + frac[:, 3])
        df["icc_batch"] = frac[:, 1] / (frac[:, 1] + frac[:, 3])
        df["converged"] = True
        df["status"] = "ok"
        if g is not None:
            df.insert(0, "group", g)
        frames.append(df)
    return pd.concat(frames)


@pytest.fixture(scope="module")
def vp_table() -> pd.DataFrame:
    return _vp()


@pytest.fixture(scope="module")
def re_table() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for gene in ("g1", "g2"):
        n_cells = np.array([5, 8, 12, 20, 35, 60, 90, 150, 220, 300])
        u = rng.normal(0, 0.5, n_cells.size)
        unp_se = 1.2 / np.sqrt(n_cells)
        unp = u + rng.normal(0, unp_se)
        shrink = 0.25 / (0.25 + unp_se**2)
        for term in ("donor", "batch"):
            rows.append(
                pd.DataFrame(
                    {
                        "gene": gene,
                        "group": "all",
                        "term": term,
                        "level": [f"{term}{k}" for k in range(n_cells.size)],
                        "blup": shrink * unp,
                        "blup_se": np.sqrt(shrink) * unp_se,
                        "unpooled": unp,
                        "unpooled_se": unp_se,
                        "n_cells": n_cells,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def _calls(de_table, vp_table, re_table):
    return {
        "volcano": lambda **kw: volcano(de_table, **kw),
        "ma": lambda **kw: ma(de_table, **kw),
        "pvalue_hist": lambda **kw: pvalue_hist(de_table, **kw),
        "qq": lambda **kw: qq(de_table, **kw),
        "variance_partition": lambda **kw: variance_partition(vp_table, **kw),
        "variance_partition_bars": lambda **kw: variance_partition(vp_table, genes=["g0", "g1", "g2"], **kw),
        "icc": lambda **kw: icc(vp_table, **kw),
        "shrinkage": lambda **kw: shrinkage(re_table, "g1", term="donor", **kw),
    }


PLOTS = ["volcano", "ma", "pvalue_hist", "qq", "variance_partition", "variance_partition_bars", "icc", "shrinkage"]


def _drawn(ax: Axes) -> int:
    return len(ax.collections) + len(ax.patches) + len(ax.lines)


@pytest.mark.parametrize("name", PLOTS)
def test_renders_png_and_returns_axes(name, de_table, vp_table, re_table, tmp_path):
    path = tmp_path / f"{name}.png"
    ax = _calls(de_table, vp_table, re_table)[name](show=False, save=path)
    assert isinstance(ax, Axes)
    assert _drawn(ax) > 0
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left nothing behind


@pytest.mark.parametrize("name", PLOTS)
def test_draws_into_given_axes(name, de_table, vp_table, re_table):
    fig, (left, right) = plt.subplots(1, 2)
    ret = _calls(de_table, vp_table, re_table)[name](ax=right, show=False)
    assert ret is right
    assert _drawn(right) > 0 and _drawn(left) == 0
    assert ret.get_figure() is fig


def test_save_true_uses_default_name(vp_table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    icc(vp_table, show=False, save=True)
    assert (tmp_path / "icc.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("volcano", "padj"),
        ("ma", "base_mean"),
        ("pvalue_hist", "pvalue"),
        ("qq", "pvalue"),
        ("variance_partition", "residual"),
        ("shrinkage", "blup_se"),
        ("shrinkage", "n_cells"),
    ],
)
def test_missing_column_is_named(name, column, de_table, vp_table, re_table):
    tables = {
        "volcano": de_table,
        "ma": de_table,
        "pvalue_hist": de_table,
        "qq": de_table,
        "variance_partition": vp_table,
        "shrinkage": re_table,
    }
    broken = tables[name].drop(columns=[column])
    calls = _calls(
        broken if name in ("volcano", "ma", "pvalue_hist", "qq") else de_table,
        broken if name == "variance_partition" else vp_table,
        broken if name == "shrinkage" else re_table,
    )
    with pytest.raises(InputError, match=column):
        calls[name](show=False)


def test_icc_without_icc_columns(vp_table):
    with pytest.raises(InputError, match="icc_<factor>"):
        icc(vp_table.drop(columns=["icc_donor", "icc_batch"]), show=False)


# ---------------------------------------------------------------- what the hierarchy plots show


def test_variance_partition_orders_by_median_residual_last(vp_table):
    ax = variance_partition(vp_table, show=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "residual"
    meds = vp_table[["donor", "batch", "fixed"]].median().sort_values(ascending=False)
    assert labels[:-1] == list(meds.index)
    ax2 = variance_partition(vp_table, sort=False, show=False)
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["donor", "batch", "fixed", "residual"]
    # icc_, converged and status columns are not components
    assert not {"icc_donor", "converged", "status"} & set(labels)


def test_variance_partition_bars_stack_to_100(vp_table):
    genes = ["g5", "g7"]
    ax = variance_partition(vp_table, genes=genes, show=False)
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == 4 * len(genes)
    ends = sorted({round(p.get_x() + p.get_width(), 6) for p in bars})
    assert ends[-1] == pytest.approx(100.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == genes[::-1] or [
        t.get_text() for t in ax.get_yticklabels()
    ] == genes
    with pytest.raises(InputError, match="'nope'"):
        variance_partition(vp_table, genes=["nope"], show=False)


def test_variance_partition_groups_and_anndata_input():
    table = _vp(n_genes=80, groups=["T cells", "B cells"])
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.uns["variance_partition"] = {"params": {}, "results": table}
    ax = variance_partition(adata, show=False)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T cells", "B cells"]
    ax = variance_partition(adata, groups="B cells", show=False)
    assert "B cells" in ax.get_title()
    with pytest.raises(InputError, match="'NK'"):
        variance_partition(adata, groups="NK", show=False)
    with pytest.raises(InputError, match="no result under"):
        variance_partition(adata, key="vp2", show=False)


def test_variance_partition_refuses_fractions_not_summing_to_one(vp_table):
    bad = vp_table.assign(extra=0.5)
    with pytest.raises(InputError, match="components="):
        variance_partition(bad, show=False)
    ax = variance_partition(bad, components=["donor", "batch", "fixed", "residual"], show=False)
    assert "extra" not in [t.get_text() for t in ax.get_xticklabels()]


def test_variance_partition_constant_component():
    table = _vp(n_genes=50).assign(fixed=0.0)
    table["residual"] = 1 - table[["donor", "batch"]].sum(axis=1)
    ax = variance_partition(table, show=False)  # a point mass must not break the density estimate
    assert "fixed" in [t.get_text() for t in ax.get_xticklabels()]


def test_shrinkage_draws_one_arrow_per_level(re_table):
    ax = shrinkage(re_table, "g1", term="donor", show=False)
    sub = re_table[(re_table["gene"] == "g1") & (re_table["term"] == "donor")]
    arrows = [c for c in ax.texts if getattr(c, "arrow_patch", None) is not None]
    assert len(arrows) == len(sub)
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == sorted(sub["level"])
    # each arrow starts at a level's unpooled estimate and ends at its BLUP, on that level's row
    drawn = sorted((round(a.xyann[0], 9), round(a.xy[0], 9)) for a in arrows)
    expected = sorted(zip(sub["unpooled"].round(9), sub["blup"].round(9), strict=True))
    assert drawn == expected
    rows = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)}
    by_level = dict(zip(sub["level"], sub["blup"], strict=True))
    for a in arrows:
        level = min(rows, key=lambda lev: abs(rows[lev] - a.xy[1]))
        assert a.xy[0] == pytest.approx(by_level[level])
    # the population-mean line is drawn at center
    assert any(np.allclose(line.get_xdata(), 0.0) for line in ax.lines)


def test_shrinkage_selection_errors(re_table):
    with pytest.raises(InputError, match="'g9'"):
        shrinkage(re_table, "g9", show=False)
    with pytest.raises(InputError, match=r"'celltype'.*'donor', 'batch'"):
        shrinkage(re_table, "g1", term="celltype", show=False)
    two = pd.concat([re_table, re_table.assign(group="B")], ignore_index=True)
    with pytest.raises(InputError, match="pass group="):
        shrinkage(two, "g1", show=False)
    ax = shrinkage(two, "g1", group="B", show=False)
    assert "B" in ax.get_title()


def test_volcano_labels_never_overlap_when_top_genes_crowd(tmp_path):
    """25 significant genes within a hair of each other (the labels at a fixed offset would sit on top of each other):
    the labels' rendered boxes do not overlap pairwise, stay inside the axes, and most top genes keep a label."""
    from matplotlib.text import Text

    rng = np.random.default_rng(1)
    n = 400
    lfc = rng.normal(0, 0.3, n)
    p = rng.uniform(0.01, 1, n)
    lfc[:25] = 2.0 + rng.normal(0, 0.01, 25)  # crowded: same fold change and p-value, up to noise
    p[:25] = 1e-9 * np.exp(rng.normal(0, 0.05, 25))
    lfc[25:30], p[25:30] = -1.5 + rng.normal(0, 0.01, 5), 1e-6
    df = pd.DataFrame({"gene": [f"LONGGENE{i}" for i in range(n)], "log2fc": lfc, "pvalue": p})
    df["padj"] = np.where(np.arange(n) < 30, 1e-4, 0.5)
    ax = volcano(df, n_labels=15, show=False, save=tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:8] == PNG_MAGIC
    fig = ax.get_figure()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().startswith("LONGGENE")]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    points = ax.transData.transform(np.column_stack([lfc[:25], -np.log10(p[:25])]))
    assert np.ptp(points[:, 0]) < boxes[0].width and np.ptp(points[:, 1]) < boxes[0].height  # they would collide
    assert len(labels) >= 10
    assert {t.get_text() for t in labels} <= {f"LONGGENE{i}" for i in range(30)}
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    area = ax.get_window_extent(renderer)
    for b in boxes:
        assert area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(b) for b in boxes)
