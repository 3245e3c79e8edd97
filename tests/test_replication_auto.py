"""``replication="auto"`` beyond paired designs: donor-varying effects of within-donor contrasts, few-level batches.

(A) A contrast that varies within donors (a cell-level covariate ``x``, time points of a longitudinal design) whose
effect differs between donors is replicated by donors: the default call adds ``(0 + x|donor)`` or ``(1|donor:time)``.
Nulls from ``scmlm.datasets.simulate(sd_slope=0.25)`` (donor slopes of ``x``) and ``design="longitudinal"`` (three
samples per donor, each with its own effect), unbalanced cells per sample, 4 to 10 donors, NB and binomial.

(B) ``(1|donor) + (1|batch)`` with donors nested in 3 batches: the 3-level batch variance is fitted as a fixed effect.
12 donors, balanced or unbalanced for the condition across batches (``simulate(donor_batch=...)``).

The calibration tests pool the genes of two data sets (1,500–2,400 tested genes) and assert the fraction of null
p-values below 0.05 in [0.035, 0.06]; they print every figure (run with ``-s``).
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest

import scmlm
from scmlm.design import MIN_RANDOM_LEVELS, build_design, fitted_design, replication

CONTRAST = ("condition", "case", "ctrl")
UNBALANCED = [0, 0, 1, 0, 1, 0, 1, 1, 2, 2, 2, 2]
"""Batch of each of 12 donors (odd donors are cases): 1 control and 3 cases in batch 0, 3 and 1 in batch 1, 2 and 2."""


def _expressed(adata):
    return adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()


def _glmm(adata, formula, contrast, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scmlm.tl.glmm_de(adata, formula, contrast, inplace=False, **kw)


def _pooled(tables, contrast: str | None = None) -> tuple[float, int]:
    p = np.concatenate(
        [(t if contrast is None else t[t["contrast"] == contrast])["pvalue"].dropna().to_numpy() for t in tables]
    )
    return float((p < 0.05).mean()), p.size


def _report(label: str, frac: float, n: int) -> None:
    print(f"\n{label}: {frac:.4f} of {n} null genes at p < 0.05")


# ---------------------------------------------------------------- (A) cell-level covariate with donor slopes


def _slope_null(n_donors: int, seed: int, n_genes: int = 1200):
    return _expressed(
        scmlm.datasets.simulate(
            n_donors=n_donors, n_cells=(40, 200), n_genes=n_genes, n_batches=1, null=True, sd_slope=0.25, seed=seed
        )
    )


@pytest.fixture(scope="module")
def slope_nulls():
    return [_slope_null(4, 21), _slope_null(10, 22)]


def test_slope_rule_and_as_written_warning():
    """Cheap (about 5 s): the rule, the log line, params, and the failure the default prevents."""
    adata = _slope_null(6, 3, n_genes=150)
    d = build_design(adata.obs, "~ x + (1|donor)")
    rep = replication(d, d.contrast("x").L)
    assert rep.level == "slope" and rep.unit == "donor" and rep.term == "(0 + x|donor)" and rep.n_units == 6
    fd = fitted_design(adata.obs, "~ x + (1|donor)", "x")
    assert fd.formula == "~ x + (1|donor) + (0 + x|donor)" and fd.added_terms == ("(0 + x|donor)",)
    # time points as numbers: the samples sample_key names get their term; without it, a random slope over donors
    long = scmlm.datasets.simulate(n_donors=4, n_cells=30, n_genes=2, design="longitudinal", seed=0).obs
    long["day"] = long["time"].cat.codes.astype(float) * 7
    assert fitted_design(long, "~ day + (1|donor)", "day", sample_key="sample").added_terms == ("(1|sample)",)
    assert fitted_design(long, "~ day + (1|donor)", "day").added_terms == ("(0 + day|donor)",)
    # an explicit slope, correlated or not, is kept as written
    for f in ("~ x + (1 + x|donor)", "~ x + (1|donor) + (0 + x|donor)"):
        assert fitted_design(adata.obs, f, "x").added_terms == ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong = scmlm.tl.glmm_de(adata, "~ x + (1|donor)", "x", replication="as_written", inplace=False)
    assert any(
        re.search(r"varies within each of the 6 donor levels.*\(0 \+ x\|donor\)", str(w.message)) for w in caught
    )
    assert wrong.params["added_terms"] == [] and wrong.table["df"].median() > 100
    frac, n = _pooled([wrong.table])
    _report("cell-level x, 6 donors, as written", frac, n)
    assert frac > 0.15


@pytest.mark.slow
@pytest.mark.parametrize("family", ["nb", "binomial"])
def test_cell_level_slope_default_is_calibrated(slope_nulls, family, caplog):
    tables = []
    for adata in slope_nulls:
        with caplog.at_level(logging.INFO, logger="scmlm"):
            res = _glmm(adata, "~ x + (1|donor)", "x", family=family)
        p = res.params
        assert p["design_fitted"] == "~ x + (1|donor) + (0 + x|donor)" and p["added_terms"] == ["(0 + x|donor)"]
        assert p["replication_unit"] == "donor" and "var_donor:x" in res.table.columns
        tables.append(res.table)
    assert any("added (0 + x|donor)" in r.getMessage() for r in caplog.records)
    frac, n = _pooled(tables)
    _report(f"cell-level x with donor slopes (sd 0.25), 4 + 10 donors, {family}, default", frac, n)
    assert n >= 1200
    assert 0.035 <= frac <= 0.06


# ---------------------------------------------------------------- (A) a factor that varies within donors


def _time_null(n_donors: int, seed: int, sd_slope=None):
    return _expressed(
        scmlm.datasets.simulate(
            n_donors=n_donors,
            n_cells=(40, 300),
            n_genes=1200,
            n_batches=1,
            design="longitudinal",
            n_timepoints=3,
            null=True,
            seed=seed,
            sd_slope=sd_slope,
        )  # fmt: skip
    )


TIME_CONTRASTS = {"t1_vs_t0": ("time", "t1", "t0"), "any_time": [("time", "t1", "t0"), ("time", "t2", "t0")]}


@pytest.fixture(scope="module")
def time_nulls():
    return [_time_null(4, 31), _time_null(8, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["nb", "binomial"])
def test_time_points_default_is_calibrated(time_nulls, family):
    tables = []
    for adata in time_nulls:
        res = _glmm(adata, "~ time + (1|donor)", TIME_CONTRASTS, family=family)
        assert res.params["added_terms"] == ["(1|donor:time)"]
        assert res.params["replication_unit"] == {"t1_vs_t0": "donor:time", "any_time": "donor:time"}
        tables.append(res.table)
    for name in TIME_CONTRASTS:
        frac, n = _pooled(tables, name)
        _report(f"longitudinal, 3 time points, 4 + 8 donors, {family}, {name}", frac, n)
        assert n >= 1200
        assert 0.035 <= frac <= 0.06


@pytest.mark.slow
def test_numeric_time_points_are_calibrated(time_nulls):
    """Time as a number (days): a random slope over donors by default, the sample term given sample_key."""
    tables = {"(0 + day|donor)": [], "(1|sample)": []}
    for adata in time_nulls:
        adata = adata.copy()
        adata.obs["day"] = adata.obs["time"].cat.codes.astype(float) * 7
        for term, key in (("(0 + day|donor)", None), ("(1|sample)", "sample")):
            res = _glmm(adata, "~ day + (1|donor)", "day", sample_key=key)
            assert res.params["added_terms"] == [term]
            tables[term].append(res.table)
    for term, tabs in tables.items():
        frac, n = _pooled(tabs)
        _report(f"longitudinal, day as a number, 4 + 8 donors, nb, default adds {term}", frac, n)
        assert n >= 1200
        assert 0.035 <= frac <= 0.06


@pytest.mark.slow
def test_joint_test_of_slope_and_time_is_calibrated():
    """One model needs both terms: ``x`` varies within samples, ``time`` between samples of a donor."""
    tables = []
    for n_donors, seed in ((5, 41), (9, 42)):
        adata = _time_null(n_donors, seed, sd_slope=0.25)
        res = _glmm(adata, "~ x + time + (1|donor)", {"x": "x", "all": ["x", "time[T.t1]", "time[T.t2]"]})
        assert res.params["added_terms"] == ["(0 + x|donor)", "(1|donor:time)"]
        tables.append(res.table)
    for name in ("x", "all"):
        frac, n = _pooled(tables, name)
        _report(f"longitudinal with donor slopes of x, 5 + 9 donors, nb, {name}", frac, n)
        assert n >= 1200
        assert 0.035 <= frac <= 0.06


# ---------------------------------------------------------------- (B) few batches holding whole donors


def _batch_data(layout: str, seed: int, null: bool):
    return _expressed(
        scmlm.datasets.simulate(
            n_donors=12,
            n_cells=(30, 200),
            n_genes=1200,
            n_batches=3,
            null=null,
            frac_de=0.1,
            seed=seed,
            donor_batch=UNBALANCED if layout == "unbalanced" else None,
        )  # fmt: skip
    )


def test_few_level_batch_rule():
    """Cheap: which terms are fitted as fixed effects, and when they stay random."""
    obs = scmlm.datasets.simulate(n_donors=12, n_cells=5, n_genes=2, n_batches=3, seed=0).obs
    assert MIN_RANDOM_LEVELS == 5
    fd = fitted_design(obs, "~ condition + (1|donor) + (1|batch)", CONTRAST)
    assert fd.formula == "~ condition + batch + (1|donor)" and fd.as_fixed == ("(1|batch)",) and fd.units == ("donor",)
    nested = fitted_design(obs, "~ condition + (1|batch/donor)", CONTRAST)
    assert nested.formula == "~ condition + batch + (1|batch:donor)"
    kept = fitted_design(obs, "~ condition + (1|donor) + (1|batch)", CONTRAST, replication="as_written")
    assert kept.formula == "~ condition + (1|donor) + (1|batch)" and kept.as_fixed == () and kept.few_levels
    # five batches are enough levels for a variance; a batch crossed with donors holds no whole unit
    five = scmlm.datasets.simulate(n_donors=10, n_cells=5, n_genes=2, n_batches=5, seed=0).obs
    assert fitted_design(five, "~ condition + (1|donor) + (1|batch)", CONTRAST).as_fixed == ()
    crossed = obs.copy()
    crossed["plate"] = np.tile(["p0", "p1", "p2"], len(obs) // 3 + 1)[: len(obs)]
    assert fitted_design(crossed, "~ condition + (1|donor) + (1|plate)", CONTRAST).as_fixed == ()
    # a batch confounded with the contrast stays random: as a fixed effect the contrast would not be estimable
    conf = obs.copy()
    conf["run"] = np.where(conf["condition"] == "case", "r1", "r0")
    conf["run"] = conf["run"].where(conf["donor"] != "donor11", "r2")
    assert fitted_design(conf, "~ condition + (1|donor) + (1|run)", CONTRAST).as_fixed == ()
    # donors that pair the contrast stay random however few (a paired design of 4 donors), and so do batches that
    # each hold one control and one case donor (matched pairs, the workflow's .test data)
    paired = scmlm.datasets.simulate(n_donors=4, n_cells=6, n_genes=2, design="within", seed=0).obs
    fd = fitted_design(paired, "~ condition + (1|donor)", CONTRAST)
    assert fd.formula == "~ condition + (1|donor) + (1|donor:condition)" and fd.as_fixed == ()
    pairs = scmlm.datasets.simulate(n_donors=6, n_cells=6, n_genes=2, n_batches=3, seed=0).obs
    assert fitted_design(pairs, "~ condition + (1|donor) + (1|batch)", CONTRAST).as_fixed == ()
    # a numeric contrast vector is carried over to the new columns by name
    vec = fitted_design(obs, "~ condition + (1|donor) + (1|batch)", {"c": np.array([0.0, 1.0])})
    np.testing.assert_array_equal(vec.contrasts[0].L, [0.0, 1.0, 0.0, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["balanced", "unbalanced"])
def test_few_batches_fixed_is_calibrated(layout, caplog):
    auto, written = [], []
    for seed in (51, 52):
        adata = _batch_data(layout, seed, null=True)
        with caplog.at_level(logging.INFO, logger="scmlm"):
            res = _glmm(adata, "~ condition + (1|donor) + (1|batch)", CONTRAST)
        assert res.params["design_fitted"] == "~ condition + batch + (1|donor)"
        assert res.params["as_fixed"] == ["(1|batch)"]
        auto.append(res.table)
        written.append(_glmm(adata, "~ condition + (1|donor) + (1|batch)", CONTRAST, replication="as_written").table)
    assert any("fitted it as a fixed effect" in r.getMessage() for r in caplog.records)
    frac, n = _pooled(auto)
    _report(f"12 donors in 3 batches, {layout}, nb, default (batch fixed)", frac, n)
    _report(f"12 donors in 3 batches, {layout}, nb, (1|batch) as written", *_pooled(written))
    assert n >= 1500
    assert 0.035 <= frac <= 0.06


def _true_positives(table, truth: np.ndarray, fdp: float = 0.05) -> int:
    """True positives among the most genes, in p-value order, whose observed false discovery proportion is <= fdp."""
    p = table["pvalue"].fillna(1.0).to_numpy()
    hits = truth[np.argsort(p, kind="stable")]
    fd = np.cumsum(~hits)
    k = np.flatnonzero(fd <= fdp * np.arange(1, hits.size + 1))
    return int(np.cumsum(hits)[k[-1]]) if k.size else 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["balanced", "unbalanced"])
def test_few_batches_fixed_keeps_power(layout, capsys):
    tp = {"auto": 0, "fixed": 0, "random": 0}
    for seed in (61, 62):
        adata = _batch_data(layout, seed, null=False)
        truth = adata.var["is_de"].to_numpy()
        auto = _glmm(adata, "~ condition + (1|donor) + (1|batch)", CONTRAST).table
        fixed = _glmm(adata, "~ condition + batch + (1|donor)", CONTRAST).table
        random = _glmm(adata, "~ condition + (1|donor) + (1|batch)", CONTRAST, replication="as_written").table
        np.testing.assert_allclose(auto["pvalue"], fixed["pvalue"], rtol=1e-12, equal_nan=True)
        counts = {k: _true_positives(t, truth) for k, t in (("auto", auto), ("fixed", fixed), ("random", random))}
        with capsys.disabled():
            print(f"\n12 donors in 3 batches, {layout}, seed {seed}, {truth.sum()} DE: TP at FDP <= 0.05 {counts}")
        for k in tp:
            tp[k] += counts[k]
    assert tp["auto"] >= tp["fixed"]
    if layout == "unbalanced":  # the per-gene fallback of the random batch term loses power there
        assert tp["auto"] >= tp["random"]


def test_model_decisions_are_printed_by_default_in_a_plain_script(tmp_path):
    """A term the default adds is said on stderr in a plain script (no logging configured), not only in params;
    verbosity 0 silences it. Run in a fresh interpreter: pytest's own log handlers would take the records here."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, numpy as np, scmlm\n"
        "scmlm.settings.verbosity = int(sys.argv[1])\n"
        "a = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=40, sd_slope=0.25, seed=1)\n"
        "a = a[np.asarray(a.layers['counts'].sum(axis=1)).ravel() > 0].copy()\n"
        "scmlm.tl.glmm_de(a, '~ x + (1|donor)', 'x', layer='counts')\n"
    )
    out = {
        v: subprocess.run([sys.executable, str(script), str(v)], capture_output=True, text=True, check=True).stderr
        for v in (1, 0)
    }
    assert "scmlm: glmm_de: contrast 'x'" in out[1] and "added (0 + x|donor)" in out[1]
    assert "added (0 + x|donor)" not in out[0]
