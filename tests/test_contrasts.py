"""Several contrasts in one call: equal to the single-contrast calls, joint F tests against edgeR and limma, errors.

References: ``tests/data/reference/dose_ftest/`` (three doses × 4 pseudobulk samples, made by
``tests/data/reference/make_dose_ftest.py``; R outputs by ``tests/data/reference/R/run_dose_ftest.R``, edgeR 3.40.2's
``glmQLFTest(fit, coef = 2:3)`` and limma 3.54.1's ``topTableF`` on ``eBayes``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scmlm
from scmlm._errors import DesignError, InputError
from scmlm.cli import contrast_arg, main
from scmlm.design import build_design, parse_contrasts
from scmlm.models import fit_glmm, glmm_contrast, glmm_wald_f, intercept_term, prepare_glmm, satterthwaite_df_f

REF = Path(__file__).parent / "data" / "reference" / "dose_ftest"
STATS = ["coef", "se", "stat", "df", "pvalue", "padj"]
DOSES = ["low", "mid", "high"]


@pytest.fixture(scope="module")
def dose_pb() -> ad.AnnData:
    counts = pd.read_csv(REF / "counts.csv", index_col=0)
    obs = pd.read_csv(REF / "samples.csv", index_col=0)
    obs["dose"] = pd.Categorical(obs["dose"], categories=DOSES)
    return ad.AnnData(counts.T.to_numpy(dtype=float), obs=obs, var=pd.DataFrame(index=counts.index))


def _same(multi: pd.DataFrame, single: pd.DataFrame, name: str, atol: float = 1e-10) -> float:
    """Rows of contrast ``name`` in ``multi`` against the single call: same genes, statuses and numbers."""
    m = multi[multi["contrast"] == name].reset_index(drop=True)
    s = single.reset_index(drop=True)
    assert (s["contrast"] != name).all() or (s["contrast"] == name).all()
    assert m["gene"].tolist() == s["gene"].tolist()
    assert m["status"].tolist() == s["status"].tolist()
    worst = 0.0
    for col in STATS:
        a, b = m[col].to_numpy(dtype=float), s[col].to_numpy(dtype=float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
        fin = np.isfinite(a)
        np.testing.assert_allclose(a[fin], b[fin], rtol=0, atol=atol, err_msg=col)
        worst = max(worst, float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)))
    return worst


# ---------------------------------------------------------------- pseudobulk: one fit, several tests


@pytest.mark.parametrize("method", ["nb_ql", "voom", "pydeseq2"])
def test_pseudobulk_multi_equals_single_calls(dose_pb, method):
    contrasts = [("dose", "mid", "low"), ("dose", "high", "low"), ("dose", "high", "mid")]
    if method == "pydeseq2":  # slower per fit: fewer genes and contrasts
        dose_pb, contrasts = dose_pb[:, :80].copy(), contrasts[:2]
    names = [f"dose_{c[1]}_vs_{c[2]}" for c in contrasts]
    kw = {"method": method, "inplace": False, "rows_are_samples": True}
    multi = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", contrasts, **kw)
    table = multi.table
    assert len(table) == len(contrasts) * dose_pb.n_vars  # gene × contrast
    assert list(dict.fromkeys(table["contrast"])) == names
    assert multi.params["contrasts"] == names
    worst = 0.0
    for c in contrasts:
        single = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", c, **kw).table
        worst = max(worst, _same(table, single, f"dose_{c[1]}_vs_{c[2]}"))
    print(f"{method}: largest difference multi vs single {worst:.2e}")


def test_pseudobulk_dict_names_and_numeric_vectors(dose_pb):
    kw = {"inplace": False, "rows_are_samples": True}
    res = scmlm.tl.pseudobulk_de(
        dose_pb, "~ dose", {"trend": [0, 1, 2], "high": "dose[T.high]", "mid_vs_low": "dose:mid:low"}, **kw
    )
    assert list(dict.fromkeys(res.table["contrast"])) == ["trend", "high", "mid_vs_low"]
    assert res.params["contrast"] == {"trend": ["0", "1", "2"], "high": "dose[T.high]", "mid_vs_low": "dose:mid:low"}
    single = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", np.array([0.0, 1.0, 2.0]), **kw).table
    assert (single["contrast"] == "custom").all()
    _same(res.table, single.assign(contrast="trend"), "trend")
    high = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", ("dose", "high", "low"), **kw).table
    _same(res.table, high, "high")  # the coefficient is the high-vs-low contrast


# ---------------------------------------------------------------- joint F tests against R


def _f_against_reference(dose_pb, method: str, ref_file: str):
    res = scmlm.tl.pseudobulk_de(
        dose_pb, "~ dose", {"any_dose": ["dose[T.mid]", "dose[T.high]"], "mid": ("dose", "mid", "low")},
        method=method, inplace=False, rows_are_samples=True,
    ).table  # fmt: skip
    ref = pd.read_csv(REF / ref_file).set_index("gene")
    f = res[res["contrast"] == "any_dose"].set_index("gene")
    assert set(f.index[f["status"] == "ok"]) == set(ref.index)  # the same filterByExpr genes
    f = f.loc[ref.index]
    assert f["coef"].isna().all() and f["se"].isna().all()  # a joint test has no single estimate
    rel_f = float(np.max(np.abs(f["stat"] / ref["F"] - 1)))
    rel_p = float(np.max(np.abs(np.log(f["pvalue"] / ref["pvalue"]))))
    mid = res[res["contrast"] == "mid"].set_index("gene").loc[ref.index]
    rel_mid = float(np.max(np.abs(np.log(mid["pvalue"] / ref["pvalue_mid"]))))
    print(f"{method}: F rel {rel_f:.1e}, log p {rel_p:.1e}; single contrast of the same fit: log p {rel_mid:.1e}")
    # BH per contrast: the joint test's padj comes from its own p-values only
    ok = f["pvalue"].notna()
    from statsmodels.stats.multitest import multipletests

    np.testing.assert_allclose(f.loc[ok, "padj"], multipletests(f.loc[ok, "pvalue"], method="fdr_bh")[1], rtol=1e-12)
    return rel_f, rel_p, rel_mid


def test_nb_ql_f_test_matches_edger(dose_pb):
    rel_f, rel_p, rel_mid = _f_against_reference(dose_pb, "nb_ql", "pb_edgeR_QL_F.csv")
    assert rel_f < 1e-6 and rel_p < 1e-5 and rel_mid < 1e-5


def test_voom_f_test_matches_limma(dose_pb):
    rel_f, rel_p, rel_mid = _f_against_reference(dose_pb, "voom", "pb_limma_voom_F.csv")
    assert rel_f < 1e-9 and rel_p < 1e-9 and rel_mid < 1e-9


def test_f_test_of_coefficients_equals_array_form(dose_pb):
    kw = {"inplace": False, "rows_are_samples": True}
    names = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"F": ["dose[T.mid]", "dose[T.high]"]}, **kw).table
    rows = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"F": np.array([[0, 1.0, 0], [0, 0, 1.0]])}, **kw).table
    # the same hypothesis written with other rows (mid - low, high - mid): the LR test does not depend on it
    other = scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"F": ["dose:mid:low", "dose:high:mid"]}, **kw).table
    np.testing.assert_allclose(names["stat"], rows["stat"], rtol=1e-12)
    np.testing.assert_allclose(names["pvalue"], other["pvalue"], rtol=1e-6)


# ---------------------------------------------------------------- GLMM


@pytest.fixture(scope="module")
def paired_cells() -> ad.AnnData:
    a = scmlm.datasets.simulate(n_donors=6, n_cells=40, n_genes=60, design="within", seed=0)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    a.obs["sex"] = np.where(a.obs["donor"].cat.codes.to_numpy() % 2 == 0, "F", "M")
    return a


def test_glmm_multi_equals_single_calls_of_the_model_with_all_terms(paired_cells):
    """A paired contrast (condition within donors) and a between-donor one (sex) in one call: the fitted model holds
    the paired contrast's sample-level term, so the between-donor contrast is tested in that model too. A single
    call for sex alone would fit ``~ condition + sex + (1|donor)`` (a different model); the equality is with single
    calls of the model that holds all terms. Moderation on (the default): one prior per group and contrast."""
    contrast = {
        "cond": ("condition", "case", "ctrl"),
        "sex": ("sex", "M", "F"),
        "both": ["condition[T.case]", "sex[T.M]"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        multi = scmlm.tl.glmm_de(paired_cells, "~ condition + sex + (1|donor)", contrast, inplace=False)
        full = "~ condition + sex + (1|donor) + (1|donor:condition)"
        single = {
            name: scmlm.tl.glmm_de(paired_cells, full, c, inplace=False).table
            for name, c in contrast.items()
            if name != "both"
        }
        alone = scmlm.tl.glmm_de(paired_cells, "~ condition + sex + (1|donor)", ("sex", "M", "F"), inplace=False)
    p = multi.params
    assert p["design_fitted"] == full and p["added_terms"] == ["(1|donor:condition)"]
    assert p["replication_unit"] == {"cond": "donor:condition", "sex": "donor", "both": "donor:condition"}
    assert alone.params["design_fitted"] == "~ condition + sex + (1|donor)"  # sex alone: no sample-level term
    t = multi.table
    assert len(t) == 3 * paired_cells.n_vars
    worst = max(_same(t, single["cond"], "cond"), _same(t, single["sex"], "sex"))
    print(f"glmm: largest difference multi vs single calls of the full model {worst:.2e}")
    by = t.groupby("contrast")["moderation"].agg(lambda s: s.value_counts().index[0])
    assert by["cond"] == "moderated" and by["sex"] == "moderated" and by["both"] == "moderated"
    both = t[t["contrast"] == "both"]
    assert both["coef"].isna().all()
    assert (both["stat"].notna() == both["status"].isin(["ok", "singular"])).all() and both["stat"].notna().any()


def test_glmm_sharded_run_finishes_moderation_per_contrast(paired_cells):
    contrast = {"cond": ("condition", "case", "ctrl"), "sex": ("sex", "M", "F"), "F": ["condition[T.case]", "sex[T.M]"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        whole = scmlm.tl.glmm_de(paired_cells, "~ condition + sex + (1|donor)", contrast, inplace=False).table
        shards = [
            scmlm.tl.glmm_de(
                paired_cells, "~ condition + sex + (1|donor)", contrast, shard=(i, 2), inplace=False
            ).table.assign(shard=f"{i}/2")
            for i in (1, 2)
        ]
    assert (pd.concat(shards)["moderation"] == "pending").any()
    merged = scmlm.results.merge_shards(shards)
    key = ["contrast", "gene"]
    a, b = whole.sort_values(key).reset_index(drop=True), merged.sort_values(key).reset_index(drop=True)
    for col in ("stat", "pvalue", "padj", "df"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-10, atol=1e-12)
    assert (a.loc[a["contrast"] == "F", "moderation"] == "moderated").sum() > 0


def test_glmm_wald_f_is_t_squared_and_parametrisation_free():
    a = scmlm.datasets.simulate(n_donors=9, n_cells=30, n_genes=40, null=True, n_batches=1, seed=2)
    X = np.column_stack([np.ones(a.n_obs), *(a.obs["donor"].cat.codes.to_numpy() % 3 == k for k in (1, 2))])
    d = a.obs["donor"].cat.codes.to_numpy()
    off = np.log(np.asarray(a.X.sum(axis=1)).ravel() + 1)
    res = fit_glmm(a.X.tocsc().astype(float), prepare_glmm(X, [intercept_term("donor", d)], off, family="nb"))
    L = np.array([[0, 1.0, 0], [0, 0, 1.0]])
    t = glmm_contrast(res, L[0], df=6.0)
    f1 = glmm_wald_f(res, L[:1], df=6.0)
    np.testing.assert_allclose(f1.stat, t.stat**2, rtol=1e-12)
    np.testing.assert_allclose(f1.pvalue, t.pvalue, rtol=1e-10)
    f = glmm_wald_f(res, L, df=6.0)
    g = glmm_wald_f(res, np.array([[0, 1.0, 0], [0, -1.0, 1.0]]), df=6.0)
    np.testing.assert_allclose(f.stat, g.stat, rtol=1e-10)
    # lmerTest's multi-row Satterthwaite df: the same for any basis of the hypothesis
    np.testing.assert_allclose(satterthwaite_df_f(res, L), satterthwaite_df_f(res, L[::-1]), rtol=1e-6)


def test_glmm_f_test_null_calibration():
    """3-level between-donor factor (12 donors, 4 per level), null, 100 cells per donor, 1,500 genes. The moderated
    F; the per-gene Wald F on the containment/Satterthwaite df is conservative here (2.5–3.1 % on such nulls, as the
    per-gene t is at 4.1 %: the cells carry information the containment df does not count)."""
    a = scmlm.datasets.simulate(n_donors=12, n_cells=100, n_genes=1500, null=True, n_batches=1, sd_response=0.0, seed=3)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    codes = a.obs["donor"].cat.codes.to_numpy()
    a.obs["dose"] = pd.Categorical(np.array(DOSES)[codes % 3], categories=DOSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = scmlm.tl.glmm_de(
            a, "~ dose + (1|donor)", {"any": ["dose[T.mid]", "dose[T.high]"], "mid": ("dose", "mid", "low")},
            inplace=False,
        ).table  # fmt: skip
    frac = {c: float(np.mean(g["pvalue"].dropna() < 0.05)) for c, g in t.groupby("contrast")}
    n = int(t.loc[t["contrast"] == "any", "pvalue"].notna().sum())
    print(f"null fraction p < 0.05 over {n} genes: {frac}")
    assert n > 1300
    assert 0.035 <= frac["mid"] <= 0.06  # the moderated t of the same fit
    assert 0.035 <= frac["any"] <= 0.06  # the moderated joint F
    assert (t.loc[t["contrast"] == "any", "moderation"] == "moderated").mean() > 0.9


def test_gee_multi_equals_single_calls():
    a = scmlm.datasets.simulate(n_donors=9, n_cells=40, n_genes=40, n_batches=3, seed=1)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    contrast = {
        "cond": ("condition", "case", "ctrl"),
        "batch": "batch[T.batch1]",
        "F": [[0, 1.0, 0, 0], [0, 0, 1.0, 0]],
    }
    multi = scmlm.tl.gee_de(a, "~ batch + condition", contrast, cluster_key="donor", inplace=False).table
    for name in ("cond", "batch"):
        single = scmlm.tl.gee_de(a, "~ batch + condition", contrast[name], cluster_key="donor", inplace=False).table
        _same(multi, single.assign(contrast=name), name)
    f = multi[multi["contrast"] == "F"]
    assert f["coef"].isna().all() and f["stat"].notna().any()


# ---------------------------------------------------------------- errors


def test_malformed_contrasts_are_refused_with_the_item_named(dose_pb):
    kw = {"inplace": False, "rows_are_samples": True}
    with pytest.raises(DesignError, match=r"contrast item 0 \(\[0, 1, 0\]\) is a numeric vector without a name.*dict"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", [[0, 1, 0], [0, 0, 1]], **kw)
    with pytest.raises(DesignError, match="2-D array of 2 unnamed rows"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", np.eye(3)[1:], **kw)
    with pytest.raises(DesignError, match=r"contrast 'bad': value \{'x': 1\} is not a contrast"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"ok": "dose:mid:low", "bad": {"x": 1}}, **kw)
    with pytest.raises(DesignError, match="'dose_mid_vs_low' occur more than once"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", [("dose", "mid", "low"), "dose:mid:low"], **kw)
    with pytest.raises(DesignError, match="contrast 'typo': coefficient 'dose\\[T.hgh\\]' is not in the design"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"typo": ["dose[T.mid]", "dose[T.hgh]"]}, **kw)
    with pytest.raises(DesignError, match="linearly dependent"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"F": ["dose[T.mid]", "dose:mid:low"]}, **kw)
    with pytest.raises(DesignError, match="empty list"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", [], **kw)
    with pytest.raises(InputError, match="pydeseq2.*'F'"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", {"F": ["dose[T.mid]", "dose[T.high]"]}, method="pydeseq2", **kw)
    a = scmlm.datasets.simulate(n_donors=4, n_cells=10, n_genes=5, seed=0)
    with pytest.raises(DesignError, match="numeric vector without a name"):  # before any fitting
        scmlm.tl.glmm_de(a, "~ condition + (1|donor)", [[0, 1], [1, 0]], inplace=False)
    with pytest.raises(InputError, match="'F' need test='wald'"):
        scmlm.tl.glmm_de(a, "~ condition + batch + (1|donor)", {"F": ["condition[T.case]", "batch[T.batch1]"]},
                         test="lrt", inplace=False)  # fmt: skip


def test_parse_contrasts_forms():
    names = [s.name for s in parse_contrasts([("a", "b", "c"), "x:y:z", "coef"])]
    assert names == ["a_b_vs_c", "x_y_vs_z", "coef"]
    spec = parse_contrasts({"n": [0, 1], "F": ["u", "v"], "t": ("a", "b", "c")})
    assert [(s.name, s.joint) for s in spec] == [("n", False), ("F", True), ("t", False)]
    obs = pd.DataFrame({"dose": pd.Categorical(np.repeat(DOSES, 2), categories=DOSES)})
    d = build_design(obs, "~ dose")
    # a 3-item list in a dict: a factor contrast when its first item is a factor of the design, else 3 coefficients
    (c,) = d.contrasts({"x": ["dose", "high", "low"]})
    assert c.L.ndim == 1 and c.L.tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------- CLI and workflow config


def test_cli_contrast_forms(tmp_path, dose_pb):
    from scmlm.cli import build_parser

    def parsed(*values):
        argv = ["de", "x.h5ad", "--tool", "pseudobulk", "--design", "~ dose", "--out", "o.csv"]
        for v in values:
            argv += ["--contrast", v]
        return contrast_arg(build_parser().parse_args(argv).contrast)

    assert parsed("dose:mid:low") == ("dose", "mid", "low")
    assert parsed("dose:mid:low", "dose:high:low") == [("dose", "mid", "low"), ("dose", "high", "low")]
    assert parsed("dose:mid:low", "hi=dose:high:low", "doses=dose[T.mid],dose[T.high]", "tr=0,1,2") == {
        "dose_mid_vs_low": ("dose", "mid", "low"),
        "hi": ("dose", "high", "low"),
        "doses": ["dose[T.mid]", "dose[T.high]"],
        "tr": [0.0, 1.0, 2.0],
    }
    with pytest.raises(SystemExit):
        parsed("dose[T.mid],dose[T.high]")  # a joint test needs a name
    dose_pb.obs["n_cells"] = 50  # an aggregation record: the rows are samples
    path = tmp_path / "pb.h5ad"
    dose_pb.write_h5ad(path)
    out = tmp_path / "res.csv"
    argv = ["de", str(path), "--tool", "pseudobulk", "--design", "~ dose", "--out", str(out)]
    argv += ["--contrast", "dose:mid:low", "--contrast", "doses=dose[T.mid],dose[T.high]"]
    assert main(argv) == 0
    res = pd.read_csv(out)
    assert list(dict.fromkeys(res["contrast"])) == ["dose_mid_vs_low", "doses"]
    assert main([*argv[:-4], "--contrast", "a=dose:mid:low", "--contrast", "a=dose:high:low"]) == 2


WORKFLOW_CONFIG = """
input: results/input.h5ad
create_input: {{simulate: {{n_donors: 6, n_cells: 20, n_genes: 20, n_batches: 3, seed: 3}}}}
sample_key: donor
outdir: results
shards: 1
analyses:
  - name: pb
    method: pseudobulk
    design: "~ batch + condition"
    contrast: [[condition, case, ctrl], [batch, batch1, batch0]]
  - name: glmm
    method: glmm
    design: "~ batch + condition + (1|donor)"
    contrast: {{cond: [condition, case, ctrl], batches: "batch[T.batch1],batch[T.batch2]"}}
{extra}
"""


def _dry_run(tmp_path, extra=""):
    from test_workflow import snakemake

    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.yaml").write_text(WORKFLOW_CONFIG.format(extra=extra))
    return snakemake(tmp_path, "-n", "-p", check=False)


def test_workflow_config_takes_several_contrasts(tmp_path):
    proc = _dry_run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "--contrast condition:case:ctrl --contrast batch:batch1:batch0" in out
    assert "--contrast cond=condition:case:ctrl --contrast 'batches=batch[T.batch1],batch[T.batch2]'" in out


def test_workflow_config_refuses_a_bad_contrast_mapping(tmp_path):
    bad = """  - name: bad
    method: glmm
    design: "~ condition + (1|donor)"
    contrast: {cond: [condition, case]}"""
    proc = _dry_run(tmp_path, bad)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid scmlm configuration" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert "config.analyses[2].contrast" in lines[0] and "mapping name -> contrast" in lines[0]


def test_tmm_samples_cross_the_random_factors_with_every_contrast_factor():
    from scmlm.design import design_samples, streamed_tmm, tmm_units

    obs = pd.DataFrame({"donor": list("aabb"), "condition": ["x", "y", "x", "y"], "sex": list("FFMM")})
    design = "~ condition + sex + (1|donor)"
    assert design_samples(design, ("condition", "y", "x"), obs) == ["donor", "condition"]
    both = [("condition", "y", "x"), ("sex", "M", "F")]
    assert design_samples(design, both, obs) == ["donor", "condition", "sex"]
    assert design_samples(design, {"c": "condition:y:x", "s": ("sex", "M", "F")}, obs) == ["donor", "condition", "sex"]
    # the workflow's stored form (a list of "f:t:r") resolves to the same samples
    spec = {"design": design, "contrast": ["condition:y:x", "sex:M:F"], "sample_key": None, "groups_key": None}
    codes, units = tmm_units(obs, ["donor", "condition", "sex"])
    streamed = streamed_tmm(obs, spec, 3)
    assert streamed.units.equals(units) and np.array_equal(streamed.codes, codes)


def test_one_fit_serves_every_contrast(monkeypatch, dose_pb, paired_cells):
    """The expensive per-gene fit runs once per chunk of genes (GLMM) and once per group (edgeR's dispersions and
    QL fit, voom + lmFit), however many contrasts are tested: counted by wrapping the real functions."""
    import scmlm.tl._glmm_de as tl_glmm_de
    from scmlm import models
    from scmlm.models import limma
    from scmlm.models.edger import ql

    calls = {"fit_glmm": 0, "estimate_disp": 0, "voom_weights": 0}

    def counting(name, func):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return func(*args, **kwargs)

        return wrapper

    # glmm_de calls the public scmlm.models.fit_glmm, bound by name in its module
    monkeypatch.setattr(tl_glmm_de, "fit_glmm", counting("fit_glmm", models.fit_glmm))
    monkeypatch.setattr(ql, "estimate_disp", counting("estimate_disp", ql.estimate_disp))
    monkeypatch.setattr(limma, "voom_weights", counting("voom_weights", limma.voom_weights))
    contrast = {
        "cond": ("condition", "case", "ctrl"),
        "sex": ("sex", "M", "F"),
        "both": ["condition[T.case]", "sex[T.M]"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scmlm.tl.glmm_de(paired_cells, "~ condition + sex + (1|donor)", contrast, n_jobs=1, inplace=False)
    assert calls["fit_glmm"] == 1  # 60 genes: one chunk
    doses = {"a": ("dose", "mid", "low"), "b": ("dose", "high", "low"), "F": ["dose[T.mid]", "dose[T.high]"]}
    for method in ("nb_ql", "voom"):
        scmlm.tl.pseudobulk_de(dose_pb, "~ dose", doses, method=method, inplace=False, rows_are_samples=True)
    assert calls["estimate_disp"] == 1 and calls["voom_weights"] == 1
