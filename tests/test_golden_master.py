"""Golden master: scmlm's own outputs for every tool, family, random structure, test and offset, frozen at 1e-10.

R references catch a method that is wrong; their tolerances (1e-5 and up) would not catch a refactor that moves a
result a little. This module runs small fixtures through every public tool and compares each numeric column with
the stored snapshot ``tests/data/golden/golden_master.json`` at a relative tolerance of 1e-10 (NaN positions and
status strings must match exactly). The snapshot is only rewritten on purpose, when a change of results is meant::

    python -m pytest tests/test_golden_master.py --overwrite

and the commit that does it says why the numbers moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scmlm

GOLDEN = Path(__file__).parent / "data" / "golden" / "golden_master.json"
RTOL = 1e-10
ATOL = 1e-12
CONTRAST = ("condition", "case", "ctrl")


def _cells(design: str, seed: int, n_donors: int = 6, n_genes: int = 40, n_batches: int = 2):
    a = scmlm.datasets.simulate(
        n_donors=n_donors, n_cells=(40, 120), n_genes=n_genes, n_batches=n_batches, design=design, seed=seed
    )
    totals = np.asarray(a.layers["counts"].sum(axis=1)).ravel()
    a = a[totals > 0].copy()
    a.X = a.layers["counts"].copy()
    return a


@pytest.fixture(scope="module")
def between():
    a = _cells("between", seed=101, n_donors=8, n_batches=3)
    rng = np.random.default_rng(7)
    a.obs["x"] = rng.normal(size=a.n_obs)
    a.obs["dose"] = pd.Categorical(np.where(a.obs["donor"].cat.codes % 3 == 0, "d0", "d1"))
    return a


@pytest.fixture(scope="module")
def within():
    return _cells("within", seed=202)


@pytest.fixture(scope="module")
def gaussian(between):
    a = between.copy()
    a.X = np.log1p(a.layers["counts"].toarray())
    return a


def _pb(adata, key):
    return scmlm.pp.pseudobulk(adata, key, layer="counts")


def _glmm(adata, design, **kw):
    kw.setdefault("contrast", CONTRAST)
    contrast = kw.pop("contrast")
    return scmlm.tl.glmm_de(adata, design, contrast, inplace=False, **kw).table


CASES = {
    # pseudobulk DE
    "pb_nb_ql_between": lambda f: (
        scmlm.tl.pseudobulk_de(_pb(f["between"], "donor"), "~ batch + condition", CONTRAST, inplace=False).table
    ),
    "pb_nb_ql_within": lambda f: (
        scmlm.tl.pseudobulk_de(_pb(f["within"], "sample"), "~ donor + condition", CONTRAST, inplace=False).table
    ),
    "pb_voom_between": lambda f: (
        scmlm.tl.pseudobulk_de(
            _pb(f["between"], "donor"), "~ batch + condition", CONTRAST, method="voom", inplace=False
        ).table
    ),
    "pb_dream_within": lambda f: (
        scmlm.tl.pseudobulk_de(
            _pb(f["within"], "sample"), "~ condition + (1|donor)", CONTRAST, method="voom", inplace=False
        ).table
    ),
    "pb_nb_ql_two_contrasts": lambda f: (
        scmlm.tl.pseudobulk_de(
            _pb(f["between"], "donor"),
            "~ batch + condition",
            {
                "cond": CONTRAST,
                "batch": ("batch", "batch1", "batch0"),
                "joint": [CONTRAST, ("batch", "batch1", "batch0")],
            },
            inplace=False,
        ).table
    ),
    "pb_pydeseq2_between": lambda f: (
        scmlm.tl.pseudobulk_de(
            _pb(f["between"], "donor"), "~ batch + condition", CONTRAST, method="pydeseq2", inplace=False
        ).table
    ),
    "pb_voom_joint": lambda f: (
        scmlm.tl.pseudobulk_de(
            _pb(f["between"], "donor"),
            "~ batch + condition",
            {"joint": [CONTRAST, ("batch", "batch1", "batch0")]},
            method="voom",
            inplace=False,
        ).table
    ),
    # cell-level GLMM: families
    "glmm_nb_default": lambda f: _glmm(f["between"], "~ condition + (1|donor)"),
    "glmm_nb_unmoderated": lambda f: _glmm(f["between"], "~ condition + (1|donor)", moderate=False),
    "glmm_nb_two_workers": lambda f: _glmm(f["between"], "~ condition + (1|donor) + (1|batch)", n_jobs=2),
    "glmm_poisson": lambda f: _glmm(f["between"], "~ condition + (1|donor)", family="poisson"),
    "glmm_binomial": lambda f: _glmm(f["between"], "~ condition + (1|donor)", family="binomial"),
    "glmm_gaussian": lambda f: _glmm(f["gaussian"], "~ condition + (1|donor)", family="gaussian", offset=None),
    # random structures
    "glmm_crossed": lambda f: _glmm(f["between"], "~ condition + (1|donor) + (1|batch)"),
    "glmm_nested": lambda f: _glmm(f["between"], "~ condition + (1|batch/donor)"),
    # the random 3-level batch as written (the default fits it as a fixed effect)
    "glmm_crossed_as_written": lambda f: _glmm(
        f["between"], "~ condition + (1|donor) + (1|batch)", replication="as_written"
    ),
    "glmm_nested_as_written": lambda f: _glmm(f["between"], "~ condition + (1|batch/donor)", replication="as_written"),
    "glmm_within_auto": lambda f: _glmm(f["within"], "~ condition + (1|donor)"),
    "glmm_within_as_written": lambda f: _glmm(f["within"], "~ condition + (1|donor)", replication="as_written"),
    "glmm_slope_corr": lambda f: _glmm(f["within"], "~ condition + (1 + condition|donor)"),
    "glmm_slope_uncorr": lambda f: _glmm(f["within"], "~ condition + (1|donor) + (0 + condition|donor)"),
    "glmm_continuous_slope": lambda f: _glmm(
        f["between"], "~ x + (1 + x|donor)", contrast=[0, 1], moderate=False, replication="as_written"
    ),
    "glmm_continuous_poisson": lambda f: _glmm(
        f["between"], "~ x + condition + (1|donor)", contrast=[0, 1, 0], family="poisson", moderate=False
    ),
    # estimation, tests, offsets
    "glmm_ml": lambda f: _glmm(f["between"], "~ condition + (1|donor)", estimation="ML"),
    "glmm_lrt": lambda f: _glmm(f["between"], "~ condition + (1|donor)", test="lrt"),
    "glmm_offset_log_total": lambda f: _glmm(f["between"], "~ condition + (1|donor)", offset="log_total"),
    "glmm_offset_tmm_sample": lambda f: _glmm(
        f["within"], "~ condition + (1|donor)", offset="tmm", sample_key="sample"
    ),
    "glmm_offset_none": lambda f: _glmm(f["between"], "~ condition + (1|donor)", offset=None),
    "glmm_joint_f": lambda f: _glmm(
        f["between"], "~ condition + dose + (1|donor)", contrast={"joint": [CONTRAST, ("dose", "d1", "d0")]}
    ),
    "glmm_groups": lambda f: _glmm(
        f["between"].copy(), "~ condition + (1|donor)", groups_key="batch", min_cells_expressing=5
    ),
    # GEE
    "gee_default": lambda f: scmlm.tl.gee_de(f["between"], "~ condition", CONTRAST, inplace=False).table,
    "gee_kc_satterthwaite": lambda f: (
        scmlm.tl.gee_de(
            f["between"], "~ condition", CONTRAST, small_sample="kc", df="satterthwaite", inplace=False
        ).table
    ),
    "gee_binomial_md": lambda f: (
        scmlm.tl.gee_de(
            f["between"], "~ batch + condition", CONTRAST, family="binomial", small_sample="md", inplace=False
        ).table
    ),
    # hierarchy
    "variance_partition": lambda f: (
        scmlm.tl.variance_partition(f["between"], "~ condition + (1|donor) + (1|batch)", inplace=False).table
    ),
    "variance_partition_binomial": lambda f: (
        scmlm.tl.variance_partition(f["between"], "~ (1|donor)", family="binomial", inplace=False).table
    ),
    "random_effects": lambda f: _random_effects(f["between"]),
}


def _random_effects(adata):
    a = adata.copy()
    scmlm.tl.glmm_de(a, "~ condition + (1|donor)", CONTRAST)
    genes = list(a.var_names[:6])
    return scmlm.tl.random_effects(a, key="glmm_de", genes=genes, inplace=False).table


def _snapshot(table: pd.DataFrame) -> dict:
    t = table.reset_index(drop=isinstance(table.index, pd.RangeIndex))
    keys = [c for c in ("group", "contrast", "gene", "term", "level", "donor") if c in t.columns]
    t = t.sort_values(keys, kind="stable").reset_index(drop=True) if keys else t
    out = {}
    for col in t.columns:
        v = t[col]
        if pd.api.types.is_bool_dtype(v):
            out[str(col)] = {"kind": "bool", "values": [bool(x) for x in v]}
        elif pd.api.types.is_numeric_dtype(v):
            arr = v.to_numpy(dtype=float)
            out[str(col)] = {"kind": "num", "values": [None if np.isnan(x) else float(x) for x in arr]}
        else:
            out[str(col)] = {"kind": "str", "values": [str(x) for x in v]}
    return out


def _compare(name: str, got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), f"{name}: columns {sorted(got)} != stored {sorted(want)}"
    for col, w in want.items():
        g = got[col]
        assert g["kind"] == w["kind"], f"{name}.{col}: kind {g['kind']} != stored {w['kind']}"
        assert len(g["values"]) == len(w["values"]), f"{name}.{col}: {len(g['values'])} rows != {len(w['values'])}"
        if w["kind"] != "num":
            bad = [i for i, (a, b) in enumerate(zip(g["values"], w["values"], strict=True)) if a != b]
            assert not bad, f"{name}.{col}: row {bad[0]} {g['values'][bad[0]]!r} != stored {w['values'][bad[0]]!r}"
            continue
        a = np.array([np.nan if x is None else x for x in g["values"]], dtype=float)
        b = np.array([np.nan if x is None else x for x in w["values"]], dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}.{col}: NaN positions differ"
        ok = np.isnan(b) | np.isclose(a, b, rtol=RTOL, atol=ATOL)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise AssertionError(f"{name}.{col}: row {i} {a[i]!r} != stored {b[i]!r} ({(~ok).sum()} rows differ)")


@pytest.fixture(scope="module")
def fixtures(between, within, gaussian):
    return {"between": between, "within": within, "gaussian": gaussian}


@pytest.fixture(scope="module")
def stored(request):
    if request.config.getoption("--overwrite"):
        return {}
    assert GOLDEN.exists(), f"{GOLDEN} is missing: create it with pytest tests/test_golden_master.py --overwrite"
    return json.loads(GOLDEN.read_text())


_NEW: dict = {}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_master(name, fixtures, stored, request):
    got = _snapshot(CASES[name](fixtures))
    if request.config.getoption("--overwrite"):
        _NEW[name] = got
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        old.update(_NEW)
        tmp = GOLDEN.with_suffix(".tmp")
        tmp.write_text(json.dumps(old, indent=0, sort_keys=True))
        tmp.replace(GOLDEN)
        return
    assert name in stored, f"case {name!r} has no stored snapshot: run with --overwrite once, on purpose"
    _compare(name, got, stored[name])


def test_every_stored_case_still_runs(stored):
    assert sorted(stored) == sorted(CASES) or not stored
