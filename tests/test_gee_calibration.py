"""Null calibration of gee_de's default on donor-level designs the simulator lacks (``tests/gee_nulls.py``): two
groups of 2-4 donors, a three-level dose with 4 donors per level, ``~ batch + condition`` with 12 donors, paired
samples with donor-specific responses; donors of unequal size; NB counts and detection (binomial).

The default: a t test of a donor-level contrast uses the average of the Kauermann–Carroll and Mancl–DeRouen
sandwiches on the donor-level design's df; a joint F test of donor-level rows Mancl–DeRouen times ``(K - q) / K``
with Hotelling's T² on Zhang's df of the donor-level design; a t test within donors Mancl–DeRouen on the
Bell–McCaffrey df (CR2 adjustment, working model), at most ``K - q``.

The bound is the issue's: a fraction of p < 0.05 within [0.035, 0.06] (p < 0.01 at most 0.02), pooled over enough
genes that it means something (about 4,300 genes in the default suite and 1,600-6,000 in the slow version: standard
error 0.003-0.0055 at 0.05). ``benchmarks/calib_gee.py`` prints the same fractions for the other corrections.
"""

from __future__ import annotations

import numpy as np
import pytest
from gee_nulls import null_cells

from scmlm.models.gee_sandwich import bm_df, htz_eta
from scmlm.tl import gee_de

DESIGNS = {
    "two": ("~ condition", {"t": ("condition", "case", "ctrl")}),
    "paired": ("~ condition", {"t": ("condition", "case", "ctrl")}),
    "batch": ("~ batch + condition", {"t": ("condition", "case", "ctrl")}),
    "dose": (
        "~ condition",
        {
            "t_d1": ("condition", "d1", "d0"),
            "t_d2-d1": ("condition", "d2", "d1"),
            "F": [("condition", "d1", "d0"), ("condition", "d2", "d0")],
        },
    ),
}


def _fractions(kind, n_per, cells, n_genes, seeds, family="nb"):
    """Per contrast: (genes tested, fraction p < 0.05, fraction p < 0.01) pooled over ``seeds``."""
    design, contrasts = DESIGNS[kind]
    pooled: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        adata = null_cells(kind, n_per, cells, n_genes, seed)
        t = gee_de(adata, design, contrasts, family=family, inplace=False).table
        assert (t["status"] == "ok").mean() > 0.8
        t = t[t["status"] == "ok"]
        for name, sub in t.groupby("contrast"):
            pooled.setdefault(name, []).append(sub["pvalue"].to_numpy())
    out = {}
    for name, ps in pooled.items():
        p = np.concatenate(ps)
        out[name] = (p.size, float(np.mean(p < 0.05)), float(np.mean(p < 0.01)))
        print(f"{kind} {n_per}/level {cells} {family} {name}: {p.size} genes, p<.05 {out[name][1]:.4f}, "
              f"p<.01 {out[name][2]:.4f}")  # fmt: skip
    return out


def _check(out, min_genes):
    for name, (n, f05, f01) in out.items():
        assert n >= min_genes, name
        assert 0.035 <= f05 <= 0.06, (name, f05)
        assert f01 <= 0.02, (name, f01)


@pytest.mark.parametrize(
    ("kind", "n_per", "family", "seed"),
    [
        ("dose", 4, "nb", 101),
        ("batch", 6, "nb", 102),
        ("two", 3, "nb", 103),
        ("paired", 4, "nb", 104),
        ("two", 3, "binomial", 105),
        ("paired", 6, "nb", 106),
        ("dose", 4, "binomial", 107),
    ],
)
def test_default_null_calibration(kind, n_per, family, seed):
    """Three data sets per design of 1,500 genes, 30-120 cells per sample (unequal), pooled (about 4,300 tested
    genes; one set of 1,500 spreads by ±0.011 around the true rate): t and joint F tests in the band, including the
    two designs the previous default missed (6 paired donors: 0.066; the binomial dose joint F: 0.070)."""
    _check(_fractions(kind, n_per, (30, 120), 1500, [seed, seed + 10, seed + 20], family), 3600)


def test_df_of_the_donor_level_design():
    """A pairwise contrast of three dose groups of 4 donors rests on 8 donors: Welch's 6 df, not 12 - 3 = 9; the
    joint test is Hotelling's T² on Zhang's df of the donor-level design, 6.75, i.e. F(2, 5.75);
    ``df="clusters"`` keeps 9 for both."""
    adata = null_cells("dose", 4, 40, 60, 5)
    _, contrasts = DESIGNS["dose"]
    t = gee_de(adata, "~ condition", contrasts, inplace=False).table.set_index("contrast")
    ok = t["status"] == "ok"
    np.testing.assert_allclose(t.loc[ok, "df"].loc[["t_d1", "t_d2-d1"]], 6.0)
    np.testing.assert_allclose(t.loc[ok, "df"].loc[["F"]], 5.75)
    c = gee_de(adata, "~ condition", contrasts, df="clusters", inplace=False).table.set_index("contrast")
    assert (c.loc[c["status"] == "ok", "df"] == 9).all()
    # Hotelling's T^2: the F statistic is W / 2 * 5.75 / 6.75, W / 2 being the plain Wald F of df="clusters" (both
    # on the joint test's covariance, Mancl-DeRouen times (K - q) / K)
    f_design = t.loc["F"].set_index("gene")["stat"]
    f_clusters = c.loc["F"].set_index("gene")["stat"]
    np.testing.assert_allclose(f_design, f_clusters * 5.75 / 6.75, rtol=1e-10)
    # ... and that covariance is Mancl-DeRouen times (K - q) / K, the "md_scaled" correction
    m = gee_de(adata, "~ condition", contrasts, small_sample="md_scaled", df="clusters", inplace=False).table
    f_md_scaled = m.set_index("contrast").loc["F"].set_index("gene")["stat"]
    np.testing.assert_allclose(f_clusters, f_md_scaled, rtol=1e-10)


def test_df_within_donors_are_bell_mccaffrey():
    """A t test within donors (paired samples) gets the Bell–McCaffrey df of the Kauermann–Carroll-adjusted sandwich
    under the working model, capped at K - q = 5, on the Mancl–DeRouen standard error: below 5 when donors differ in
    size, as ``df="satterthwaite"`` with ``small_sample="kc"`` computes them."""
    adata = null_cells("paired", 6, (50, 400), 60, 57)
    kw = {"inplace": False}
    contrast = {"t": ("condition", "case", "ctrl")}
    t = gee_de(adata, "~ condition", contrast, **kw).table
    bm = gee_de(adata, "~ condition", contrast, small_sample="kc", df="satterthwaite", **kw).table
    md = gee_de(adata, "~ condition", contrast, small_sample="md", df="clusters", **kw).table
    ok = (t["status"] == "ok").to_numpy()
    assert ok.sum() > 40
    np.testing.assert_allclose(t["df"][ok], np.minimum(bm["df"][ok], 5.0), rtol=1e-8)
    assert (t["df"][ok] < 5.0).mean() > 0.9 and (t["df"][ok] > 2.0).all()
    np.testing.assert_allclose(t["se"][ok], md["se"][ok], rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "n_per", "cells", "family", "seeds"),
    [
        ("two", 2, 200, "nb", [31, 32, 33]),
        ("two", 3, (50, 400), "nb", [37, 38, 39]),
        ("two", 3, 2000, "nb", [40, 41]),
        ("two", 4, (50, 400), "nb", [42, 43, 44, 72, 73, 74]),
        ("two", 4, 200, "nb", [75, 76, 77]),
        ("dose", 4, (50, 400), "nb", [45, 46, 47]),
        ("dose", 4, 200, "nb", [48, 49, 50]),
        ("batch", 6, (50, 400), "nb", [51, 52, 53]),
        ("paired", 4, (50, 400), "nb", [54, 55, 56]),
        ("paired", 6, (50, 400), "nb", [57, 58, 59]),
        ("two", 3, (50, 400), "binomial", [60, 61, 62]),
        ("dose", 4, (50, 400), "binomial", [63, 64, 65]),
        ("batch", 6, (50, 400), "binomial", [66, 67, 68]),
        ("paired", 4, (50, 400), "binomial", [69, 70, 71]),
    ],
)
def test_default_null_calibration_full(kind, n_per, cells, family, seeds):
    """The issue's designs pooled over 2-6 data sets of 800-1,000 genes (1,600-6,000 tested genes): 3 v 3 donors
    x 2,000 cells, 2-4 donors per condition equal and unequal (50-400 cells per donor), the dose joint F and its
    pairwise t tests, ``~ batch + condition`` with 12 donors, paired samples with donor-specific responses (4 and 6
    donors); NB and binomial. Two of them were out of the band with the rules before (6 paired donors 0.066, the
    binomial dose joint F 0.070); 2 v 2 donors of unequal size are tested on their own below."""
    n_genes = 800 if cells == 2000 else 1000
    _check(_fractions(kind, n_per, cells, n_genes, seeds, family), 1500)


@pytest.mark.slow
def test_two_v_two_donors_of_unequal_size_are_not_liberal():
    """2 v 2 donors of 50-400 cells: the t test has ``K - q = 2`` df and the fraction of null p < 0.05 depends on
    the four donor sizes drawn (per data set 0.024-0.031 with the default, 0.061-0.191 with Kauermann–Carroll;
    ``docs/gee_vs_glmm.md``): no rule measured is in the band on every draw, and the default errs on the
    conservative side (0.028 pooled). Asserted: not liberal, not far below the band, and the reported df are 2."""
    out = _fractions("two", 2, (50, 400), 1000, [34, 35, 36])
    n, f05, f01 = out["t"]
    assert n >= 2500
    assert 0.02 <= f05 <= 0.06, f05
    assert f01 <= 0.01, f01
    adata = null_cells("two", 2, (50, 400), 50, 34)
    t = gee_de(adata, "~ condition", {"t": ("condition", "case", "ctrl")}, inplace=False).table
    assert (t.loc[t["status"] == "ok", "df"] == 2).all()


def test_bm_df_equals_the_one_row_htz():
    """The O(clusters p^2) Bell–McCaffrey df used for contrasts within donors equal the one-row HTZ df built from the
    clusters × clusters matrix, for both adjustments, with clusters of unequal information."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(7, 5, 10, 3))
    A = np.einsum("kgia,kgib->kgab", X, X) * rng.uniform(0.2, 3.0, (7, 5, 1, 1))
    c = np.array([0.0, 1.0, 0.5])
    for power in (0.5, 1.0):
        got = bm_df(A, c, power)
        np.testing.assert_allclose(got, htz_eta(A, c[None], power), rtol=1e-10)
        assert np.all((got > 1.0) & (got < 7.0))
