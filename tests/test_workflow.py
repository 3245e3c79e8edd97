"""The Snakemake workflow run for real on the small `.test/` configuration (simulated data, 2 cell types, 40 genes).

Rules run in this Python environment (`scmlm` from the venv on PATH), not in conda environments.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.stats.multitest import multipletests

from scmlm import results as scmlm_results

# end-to-end Snakemake runs: part of `make test` and CI, left out of `make test-fast`
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
COLUMNS = scmlm_results.COLUMNS
GROUPS = {"type0", "type1"}
N_GENES = 40


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _job_logs(workdir: Path) -> str:
    parts = []
    for log in sorted((workdir / "results" / "logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n{log.read_text()[-2000:]}")
    return "\n".join(parts)


def config_args(workdir: Path, snakefile: Path = SNAKEFILE) -> list[str]:
    """The workflow reads only the config it is given: pass the run folder's config/config.yaml explicitly."""
    cfg = workdir / "config" / "config.yaml"
    return ["--configfile", str(cfg)] if snakefile == SNAKEFILE and cfg.exists() else []


def snakemake(workdir: Path, *args: str, snakefile: Path = SNAKEFILE, check: bool = True, timeout: float = 900):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir)]
    cmd += [*([] if "--configfile" in args else config_args(workdir, snakefile)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n"
            f"{_job_logs(workdir)}"
        )
    return proc


def make_workdir(path: Path, **overrides) -> Path:
    """A run folder with `.test/config/config.yaml`, top-level keys replaced by `overrides`."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg.update(overrides)
    (path / "config").mkdir(parents=True, exist_ok=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_dirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_results(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).sort_values(["group", "contrast", "gene"]).reset_index(drop=True)


def assert_same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same rows; numbers equal up to floating-point noise (different thread counts or gene shards)."""
    a, b = a.drop(columns="shard", errors="ignore"), b.drop(columns="shard", errors="ignore")
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-10)


# ---- static checks ---------------------------------------------------------------------------------------------------
def test_snakefmt_clean():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakefmt"), "--check", str(REPO / "workflow")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.mark.parametrize("config", ["config/config.yaml", ".test/config/config.yaml"])
def test_lint_clean(tmp_path, config):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / config, tmp_path / "config" / "config.yaml")
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def _analysis(**kw) -> dict:
    return {"analyses": [{"name": "x", "method": "glmm", "design": "~ a", "contrast": ["a", "b", "c"], **kw}]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"shard": 2}, "config: unknown key 'shard'; did you mean 'shards'?"),
        ({"shards": "many"}, "config.shards: 'many' is not of type 'integer'"),
        (_analysis(famly="nb"), "config.analyses[0]: unknown key 'famly'; did you mean 'family'?"),
        (_analysis(family="nbinom"), "config.analyses[0].family: 'nbinom' is not one of 'nb', 'poisson'"),
        (_analysis(method="pseudobulk", shards=2), "config.analyses[0] (x): 'shards' applies to method glmm only"),
        (_analysis(contrast=["a", "b"]), "config.analyses[0].contrast: must be [factor, level, reference level]"),
        (_analysis(cell_type_key="ct"), "config.analyses[0] (x): 'cell_type_key' applies to method abundance only"),
        (
            _analysis(method="abundance", shards=2),
            "config.analyses[0] (x): 'shards' does not apply to method abundance",
        ),
        (
            _analysis(method="pseudobulk", estimation="ML"),
            "config.analyses[0] (x): 'estimation' applies to methods glmm and abundance only",
        ),
        (
            _analysis(method="abundance", abundance_method="clr", estimation="ML"),
            "config.analyses[0] (x): 'estimation' applies to abundance_method glmm only; this analysis uses 'clr'",
        ),
        (
            {"create_input": {"dataset": "pig_airways"}},
            "config.create_input.dataset: 'pig_airways' is not a dataset bundled with scmlm; did you mean "
            "'pig_airway'? use one of 'glioblastoma', 'kang2018', 'kang2018_100genes', 'pig_airway'",
        ),
        (_analysis(reml=True), "config.analyses[0]: unknown key 'reml'; use estimation: REML (or estimation: ML)"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, edit, message):
    make_workdir(tmp_path, **edit)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid scmlm configuration" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert message in lines[0]


def _input_workdir(path: Path, obs_edit=None, **overrides) -> tuple[Path, Path]:
    """A run folder whose config reads a user's h5ad (outside outdir, no create_input); returns (workdir, input)."""
    import anndata as ad

    import scmlm

    data = make_dirs(path / "data") / "cells.h5ad"
    adata = scmlm.datasets.simulate(n_donors=4, n_cells=10, n_genes=8, n_cell_types=2, seed=1)
    if obs_edit is not None:
        obs_edit(adata.obs)
    ad.AnnData(adata.X, obs=adata.obs, var=adata.var, layers=dict(adata.layers)).write_h5ad(data)
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    del cfg["create_input"]
    cfg.update(input=str(data), **overrides)
    make_dirs(path / "run" / "config")
    (path / "run" / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path / "run", data


def test_input_keys_design_and_levels_are_checked_when_the_workflow_starts(tmp_path):
    """Obs keys, layer, design columns and contrast levels against the input's obs: one line before any job."""
    import hashlib

    analyses = [
        {"name": "g1", "method": "glmm", "design": "~ conditon + (1|donor)", "contrast": ["condition", "case", "ctrl"]},
        {"name": "g2", "method": "glmm", "design": "~ condition + (1|donor)", "contrast": ["condition", "cse", "ctrl"]},
        {"name": "ab", "method": "abundance", "design": "~ condition", "contrast": ["condition", "case", "ctrl"],
         "cell_type_key": "celltype"},
    ]  # fmt: skip
    workdir, data = _input_workdir(tmp_path, sample_key="donr", layer="raw", analyses=analyses)
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    proc = snakemake(workdir, "-n", check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid scmlm configuration" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    for message in (
        "config.sample_key: 'donr' is not a column of the input's obs (",
        "set sample_key to the obs column naming each sample",
        "config.layer: 'raw' is not a layer of",
        "set layer to the layer holding the raw counts, or to null to use .X",
        "config.analyses[0] (g1): design '~ conditon + (1|donor)' uses 'conditon', not found among the columns",
        "config.analyses[1] (g2): level 'cse' of 'condition' is not in the data; its levels are: 'ctrl', 'case'",
        "config.analyses[2] (ab).cell_type_key: 'celltype' is not a column of the input's obs",
    ):
        assert message in lines[0], message
    assert not (workdir / "results").exists()
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    # a pseudobulk design on a column that varies within the samples (aggregation would merge its levels)
    pb = {"name": "pb", "method": "pseudobulk", "design": "~ condition + size_factor",
          "contrast": ["condition", "case", "ctrl"]}  # fmt: skip
    workdir, data = _input_workdir(tmp_path / "within", analyses=[pb])
    proc = snakemake(workdir, "-n", check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid scmlm configuration" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    within = "design '~ condition + size_factor' uses 'size_factor', which varies within the samples of sample_key"
    assert f"config.analyses[0] (pb): {within} 'donor'" in lines[0]
    assert "or use method glmm" in lines[0] and not (workdir / "results").exists()


def _start_error(workdir: Path) -> str:
    """The one line a dry run stops with (asserting it is one line and that nothing was written)."""
    proc = snakemake(workdir, "-n", check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid scmlm configuration" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert not (workdir / "results").exists()
    return lines[0]


def test_counts_cell_types_and_offset_are_checked_when_the_workflow_starts(tmp_path):
    """B11, B12, B14: non-integer counts (read on the first rows of the layer), an abundance analysis of one cell type
    and a GLMM offset that is no obs column fail at start in one line, not in a job after others ran."""
    import anndata as ad

    workdir, data = _input_workdir(tmp_path / "float")
    adata = ad.read_h5ad(data)
    adata.layers["counts"] = adata.layers["counts"].astype(float).log1p()
    adata.write_h5ad(data)
    line = _start_error(workdir)
    assert "config.layer: " in line and "'counts' must hold raw non-negative integer counts" in line
    assert "set layer to the layer holding the raw counts" in line

    contrast = ["condition", "case", "ctrl"]
    one_type = [{"name": "ab", "method": "abundance", "design": "~ condition", "contrast": contrast}]
    workdir, _ = _input_workdir(tmp_path / "one", obs_edit=lambda obs: obs.__setitem__("cell_type", "T"),
                                analyses=one_type)  # fmt: skip
    line = _start_error(workdir)
    assert "config.analyses[0] (ab): cell_type_key 'cell_type' holds 1 cell type in the input" in line
    assert "at least 2 cell types" in line

    glmm = [{"name": "g", "method": "glmm", "design": "~ condition + (1|donor)", "offset": "libsize",
             "contrast": ["condition", "case", "ctrl"]}]  # fmt: skip
    workdir, _ = _input_workdir(tmp_path / "offset", analyses=glmm)
    line = _start_error(workdir)
    assert "config.analyses[0] (g).offset: 'libsize' is not a column of the input's obs ('donor'" in line
    assert "set offset to auto, tmm, log_total, none, or the obs column" in line and "scmlm_" not in line


def test_report_gets_the_named_contrasts_and_failed_logs_are_shown(tmp_path):
    """B3: the report rule passes each contrast's definition (not only its name), so the report's fitted design is
    the one the fit uses; the workflow profile prints a failed job's log on the console."""
    contrast = {"x_slope": "x", "cond": ["condition", "case", "ctrl"]}
    glmm = [{"name": "g", "method": "glmm", "design": "~ x + condition + (1|donor)", "contrast": contrast}]
    workdir, _ = _input_workdir(tmp_path, obs_edit=lambda obs: obs.__setitem__("x", np.arange(len(obs)) % 7 * 0.5),
                                analyses=glmm)  # fmt: skip
    proc = snakemake(workdir, "-n", "-p")
    assert '"contrast": {"x_slope": "x", "cond": ["condition", "case", "ctrl"]}' in proc.stdout + proc.stderr
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "default" / "config.v8+.yaml").read_text())
    assert profile["show-failed-logs"] is True


def test_integer_id_in_the_design_warns_at_start_as_the_api_does(tmp_path):
    """An integer-coded batch entering the fixed design as a number: the API's warning and fix, before any job; the
    glmm analysis' `estimation` reaches `scmlm de`."""
    import warnings

    import scmlm

    def add_batch_id(obs):
        obs["batch_id"] = obs["batch"].cat.codes.astype("int64")

    analyses = [
        {"name": "pb", "method": "pseudobulk", "design": "~ batch_id + condition",
         "contrast": ["condition", "case", "ctrl"]},
        {"name": "glmm", "method": "glmm", "design": "~ condition + (1|donor)",
         "contrast": ["condition", "case", "ctrl"], "estimation": "ML"},
    ]  # fmt: skip
    workdir, data = _input_workdir(tmp_path, add_batch_id, analyses=analyses)
    import anndata as ad

    obs = ad.read_h5ad(data, backed="r").obs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scmlm.design.build_design(obs, "~ batch_id + condition", factors=["donor", "cell_type"])
    api = [str(w.message) for w in caught]
    assert len(api) == 1 and "write C(batch_id) in the design" in api[0]
    proc = snakemake(workdir, "-n", "-p")
    out = proc.stdout + proc.stderr
    assert f"scmlm configuration warning: config.analyses[0] (pb): {api[0]}" in out
    assert out.count("scmlm configuration warning") == 1
    fits = [line for line in out.splitlines() if "scmlm -v de" in line and "--shard" in line]
    assert fits and all("--estimation ML" in line for line in fits)
    assert not (workdir / "results").exists()


# ---- one full local run on .test -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    workdir = make_workdir(tmp_path_factory.mktemp("local"))
    snakemake(workdir, "--cores", "2")
    return workdir


def test_rerun_has_nothing_to_do(local_run):
    proc = snakemake(local_run, "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_results_schema_and_coverage(local_run):
    import anndata as ad

    genes = set(ad.read_h5ad(local_run / "results" / "input.h5ad", backed="r").var_names)
    assert len(genes) == N_GENES
    for name in ("pb", "glmm"):
        res = pd.read_csv(local_run / "results" / name / "results.csv")
        assert set(COLUMNS) <= set(res.columns), f"{name}: missing {set(COLUMNS) - set(res.columns)}"
        assert set(res["group"]) == GROUPS
        assert set(res["contrast"]) == {"condition_case_vs_ctrl"}
        assert not res.duplicated(["gene", "group", "contrast"]).any()
        for group, df in res.groupby("group"):
            assert set(df["gene"]) == genes, f"{name}/{group}: genes missing from the results"
        ok = res["status"] == "ok"
        assert ok.sum() >= 10, f"{name}: only {ok.sum()} genes fitted"
        assert res.loc[ok, "pvalue"].between(0, 1).all()
        assert np.allclose(res.loc[ok, "log2fc"], res.loc[ok, "coef"] / np.log(2))
    glmm = pd.read_csv(local_run / "results" / "glmm" / "results.csv")
    assert {"var_donor", "var_batch"} <= set(glmm.columns)


def test_glmm_shards_partition_genes_and_padj_is_computed_after_merging(local_run):
    shards = sorted((local_run / "results" / "glmm" / "shards").glob("*.csv"))
    assert [p.name for p in shards] == ["1-of-2.csv", "2-of-2.csv"]
    tables = [pd.read_csv(p) for p in shards]
    for i, t in enumerate(tables, start=1):
        assert set(t["shard"]) == {f"{i}/2"}
        assert t["padj"].isna().all(), "padj must be left to merge"
    genes = [set(t["gene"]) for t in tables]
    assert genes[0] and genes[1] and not genes[0] & genes[1]
    assert len(genes[0] | genes[1]) == N_GENES

    res = pd.read_csv(local_run / "results" / "glmm" / "results.csv")
    for (group, _), df in res.groupby(["group", "contrast"]):
        tested = df["pvalue"].notna()
        expected = multipletests(df.loc[tested, "pvalue"], method="fdr_bh")[1]
        np.testing.assert_allclose(df.loc[tested, "padj"], expected, rtol=1e-9, err_msg=f"group {group}")
        assert df.loc[~tested, "padj"].isna().all()


def test_glmm_equals_one_unsharded_cli_call(local_run, tmp_path):
    """Splitting the input into gene shards (TMM offsets computed on all genes while splitting) changes nothing."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    glmm = next(a for a in cfg["analyses"] if a["method"] == "glmm")
    direct = tmp_path / "direct.csv"
    cmd = ["scmlm", "de", str(local_run / "results" / "input.h5ad"), "--tool", "glmm", "--family", glmm["family"]]
    cmd += ["--design", glmm["design"], "--contrast", ":".join(glmm["contrast"]), "--groups-key", cfg["groups_key"]]
    cmd += ["--layer", cfg["layer"], "--out", str(direct)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert_same_results(read_results(local_run / "results" / "glmm" / "results.csv"), read_results(direct))


def test_plots_and_summary(local_run):
    for name in ("pb", "glmm"):
        pngs = sorted(p.name for p in (local_run / "results" / name / "plots").glob("*.png"))
        for kind in ("volcano", "pvalue_hist"):
            for group in GROUPS:
                assert any(p.startswith(f"{kind}__{group}__") for p in pngs), (name, kind, group, pngs)
        for p in (local_run / "results" / name / "plots").glob("*.png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = pd.read_csv(local_run / "results" / "summary.csv")
    summary = summary[summary["analysis"] != "abundance"]  # one row per cell type, test_abundance_analysis
    assert sorted(zip(summary["analysis"], summary["group"], strict=True)) == [
        ("glmm", "type0"),
        ("glmm", "type1"),
        ("pb", "type0"),
        ("pb", "type1"),
    ]
    assert (summary["n_genes"] == N_GENES).all() and (summary["rows"] == "genes").all()
    res = pd.read_csv(local_run / "results" / "glmm" / "results.csv")
    n_sig = (res.loc[res["group"] == "type0", "padj"] < 0.05).sum()
    assert summary.set_index(["analysis", "group"]).loc[("glmm", "type0"), "n_padj_lt_0.05"] == n_sig


def test_hierarchy_step(local_run):
    """GLMM analyses also describe the hierarchy: variance partition + ICC (top genes) and shrinkage plots."""
    hier = local_run / "results" / "glmm" / "hierarchy"
    vp = pd.read_csv(hier / "variance_partition.csv")
    assert set(vp["group"]) == set(GROUPS)
    ok = vp["converged"]
    parts = vp.loc[ok, ["donor", "batch", "fixed", "residual"]]
    assert ok.sum() > 0 and np.allclose(parts.sum(axis=1), 1.0)
    re_ = pd.read_csv(hier / "random_effects.csv")
    assert {"blup", "unpooled", "blup_se", "n_cells"} <= set(re_.columns)
    names = sorted(p.name for p in hier.glob("*.png"))
    for group in GROUPS:
        assert f"variance_partition__{group}.png" in names and f"icc__{group}.png" in names
        assert any(n.startswith("shrinkage__") and n.endswith(f"__{group}.png") for n in names), names
    assert not (local_run / "results" / "pb" / "hierarchy").exists()  # pseudobulk analyses have no random terms


def test_landing_report(local_run):
    """rule report_html writes one self-contained page naming every analysis and group, with the summary's counts."""
    html = (local_run / "results" / "report.html").read_text()
    summary = pd.read_csv(local_run / "results" / "summary.csv")
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    for a in cfg["analyses"]:
        assert f'<h2 id="s-{a["name"]}">{a["name"]}</h2>' in html, a["name"]
        if a["method"] == "abundance":
            continue
        assert f"<dt>design</dt><dd>{a['design']}</dd>" in html
        for group in GROUPS:
            row = summary[(summary["analysis"] == a["name"]) & (summary["group"] == group)].iloc[0]
            assert f"{a['name']} · {group} · condition_case_vs_ctrl</h3>" in html
            counts = f"{row['n_tested']} of {row['n_genes']} genes tested; <b>{row['n_padj_lt_0.05']}</b> called"
            assert counts in html, (a["name"], group, counts)
    n_png = sum(1 for _ in (local_run / "results").glob("*/*/*.png"))
    assert html.count('src="data:image/png;base64,') == n_png > 0
    assert "<dt>offset</dt><dd>tmm</dd>" in html  # the GLMM's resolved offset is listed
    # and the design it fitted (a donor-level contrast: no term added)
    assert "<dt>design_fitted</dt><dd>~ condition + (1|donor) + (1|batch)</dd>" in html
    assert "<dt>estimation</dt><dd>REML</dd>" in html  # the glmm default, passed to scmlm de
    # figures sized for the screen; the guide to df, df_prior and singular; 3 donors per condition and group (read
    # from the input's obs) is not "very few replicates", so no banner
    assert html.count('<img alt="') == html.count('width="') == n_png
    assert "Reading the numbers: df, df_prior, singular" in html
    assert "<dt>units_per_level</dt><dd>{&quot;condition=case in type0&quot;: 3, " in html
    assert 'class="banner"' not in html
    summary_table = html.split('id="summary"')[1].split("</table>")[0]
    assert summary_table.count('<td data-v="cell types">') == 1 and summary_table.count('<td data-v="genes">') == 4


def test_abundance_analysis(local_run):
    """method: abundance runs `scmlm abundance` on the input (no shards): a row per cell type, plots, report section."""
    folder = local_run / "results" / "abundance"
    res = pd.read_csv(folder / "results.csv")
    assert set(res["gene"]) == GROUPS and set(res["group"]) == {"all"}
    assert set(res["contrast"]) == {"condition_case_vs_ctrl"} and set(res["method"]) == {"abundance_glmm"}
    assert res["pvalue"].between(0, 1).all() and (res["df"] == 4).all()  # 6 donors, one sample each
    params = yaml.safe_load((folder / "params.json").read_text())
    assert params["design_fitted"] == "~ condition + (1|donor)" and params["added_terms"] == ["(1|donor)"]
    assert sorted(p.name for p in (folder / "plots").glob("*.png")) == [
        "abundance_effects__condition_case_vs_ctrl.png",
        "composition.png",
    ]
    assert not (folder / "shards").exists() and not (folder / "hierarchy").exists()
    html = (local_run / "results" / "report.html").read_text()
    section = html.split('<h2 id="s-abundance">abundance</h2>')[1].split("<h2 ")[0]
    assert "Fitted design: <code>~ condition + (1|donor)</code>; added terms: (1|donor)." in section
    assert "Composition is relative" in section and "CLR method" in section
    assert "<th>cell type</th>" in section and section.count('src="data:image/png;base64,') == 2
    for t in GROUPS:
        assert f'data-v="{t}">{t}</td>' in section
    summary = pd.read_csv(local_run / "results" / "summary.csv")
    row = summary[summary["analysis"] == "abundance"]
    assert len(row) == 1 and int(row["n_genes"].iloc[0]) == 2 and row["rows"].iloc[0] == "cell types"


def test_html_report(local_run):
    report = local_run / "results" / "snakemake_report.html"
    snakemake(local_run, "--report", str(report))
    html = report.read_text()
    assert len(html) > 10_000
    for item in (
        "summary.csv",
        "results.csv",
        "volcano__type0__condition_case_vs_ctrl.png",
        "pvalue_hist__type1",
        "variance_partition__type0.png",
        "icc__type1.png",
        "shrinkage__",
        "report.html",
    ):
        assert item in html, item


# ---- reliability -----------------------------------------------------------------------------------------------------
def _finished_shards(log: str) -> set[str]:
    """Shard files of the fit_glmm jobs that Snakemake reported as finished."""
    outputs = dict(
        re.findall(
            r"rule fit_glmm:\n(?:    .*\n)*?    output: \S*/(\d+-of-\d+\.csv)\n(?:    .*\n)*?    jobid: (\d+)", log
        )
    )
    done = set(re.findall(r"Finished jobid: (\d+) \(Rule: fit_glmm\)", log))
    jobs = {job: shard for shard, job in outputs.items()}
    return {jobs[j] for j in done}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_glmm_run(tmp_path: Path, local_run: Path) -> tuple[Path, str]:
    """A 4-shard GLMM run, Ctrl-C once the first shard has finished; the run folder and its log."""
    workdir = make_workdir(tmp_path, shards=4)
    shutil.copy(local_run / "results" / "input.h5ad", make_dirs(workdir / "results") / "input.h5ad")
    target = "results/glmm/results.csv"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir), "--cores", "1", target]
    cmd += config_args(workdir)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
            # a test run started in the background inherits SIGINT ignored (POSIX shells do that to asynchronous
            # commands), and Python then installs no handler for it: give Snakemake the default disposition back
            preexec_fn=_default_sigint,
        )
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if "(Rule: fit_glmm)" in first_log.read_text():
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "snakemake ended before it was interrupted"
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    time.sleep(0.5)
    return workdir, first_log.read_text()


def test_interrupted_run_resumes_without_refitting_finished_shards(tmp_path, local_run):
    """Ctrl-C after the first GLMM shard: no partial outputs; the rerun fits only the shards that had not finished."""
    # the interrupt races the shards: a run whose shards all finish before Snakemake handles it (a fast, idle machine)
    # tests nothing, so such an attempt is repeated from a fresh folder
    for attempt in range(3):
        workdir, log = _interrupted_glmm_run(tmp_path / f"attempt{attempt}", local_run)
        finished = _finished_shards(log)
        if len(finished) < 4:
            break
    target = "results/glmm/results.csv"
    shard_dir = workdir / "results" / "glmm" / "shards"
    assert 1 <= len(finished) < 4, log
    assert not (workdir / target).exists()
    assert not [p for p in shard_dir.iterdir() if p.suffix != ".csv"], "temporary files left behind"
    for p in shard_dir.glob("*.csv"):  # whatever exists is a complete table
        t = pd.read_csv(p)
        assert len(t) == N_GENES // 4 * len(GROUPS) and t["status"].notna().all()
    # a shard may complete while the interrupt is handled, before its "Finished job" line is logged: Snakemake may
    # then keep it or refit it; a shard logged as finished is never refitted, and a missing one always is
    present = {p.name for p in shard_dir.glob("*.csv")}
    stamps = {name: (shard_dir / name).stat().st_mtime_ns for name in present}

    proc = snakemake(workdir, "--cores", "2", target)
    log = proc.stdout + proc.stderr
    refitted = {p.name for p in shard_dir.glob("*.csv") if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert not refitted & finished, (refitted, finished)
    assert refitted >= {f"{i}-of-4.csv" for i in range(1, 5)} - present, (refitted, present)
    assert log.count("rule fit_glmm:") == len(refitted), log
    # 4 shards give the same table as the 2 shards of the reference run
    assert_same_results(read_results(workdir / target), read_results(local_run / target))


def test_failing_shard_log_names_genes_and_reason(tmp_path):
    """A gene with no counts in a group cannot be fitted: its row says why and the shard log names it."""
    import scipy.sparse as sp

    import scmlm

    sim = yaml.safe_load(TEST_CONFIG.read_text())["create_input"]["simulate"]
    adata = scmlm.datasets.simulate(**sim)
    counts = sp.csr_matrix(adata.layers["counts"]).tolil()
    zero_gene = adata.var_names[7]
    counts[:, 7] = 0
    adata.layers["counts"] = counts.tocsr()
    adata.X = adata.layers["counts"].copy()
    (tmp_path / "data").mkdir()
    adata.write_h5ad(tmp_path / "data" / "input.h5ad")
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    del cfg["create_input"]
    cfg.update(input="data/input.h5ad", shards=2, analyses=[a for a in cfg["analyses"] if a["method"] == "glmm"])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    snakemake(tmp_path, "--cores", "2", "results/glmm/results.csv")
    res = pd.read_csv(tmp_path / "results" / "glmm" / "results.csv")
    bad = res[res["gene"] == zero_gene]
    assert len(bad) == 2 and (bad["status"] != "ok").all() and bad["pvalue"].isna().all()
    holding = [p.stem for p in (tmp_path / "results" / "glmm" / "shards").glob("*.csv") if zero_gene in p.read_text()]
    assert len(holding) == 1
    logs = {p.name: p.read_text() for p in (tmp_path / "results" / "logs" / "glmm").glob("fit_glmm_*.log")}
    assert len(logs) == 2
    text = logs[f"fit_glmm_{holding[0]}.log"]
    assert zero_gene in text, text
    assert str(bad["status"].iloc[0]) in text, text


# ---- module use ------------------------------------------------------------------------------------------------------
def test_used_as_a_module(tmp_path, local_run):
    """Another workflow imports every rule with a prefix and passes its own config (not config/config.yaml)."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    del cfg["create_input"]
    cfg.update(input="data/cells.h5ad", outdir="scmlm_out", analyses=[a for a in cfg["analyses"] if a["name"] == "pb"])
    (tmp_path / "data").mkdir()
    shutil.copy(local_run / "results" / "input.h5ad", tmp_path / "data" / "cells.h5ad")
    (tmp_path / "scmlm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    outer = tmp_path / "Snakefile"
    outer.write_text(
        textwrap.dedent(
            f"""\
            configfile: "scmlm.yaml"

            module scmlm:
                snakefile: "{SNAKEFILE}"
                config: config

            use rule * from scmlm as scmlm_*

            rule all:
                default_target: True
                input:
                    rules.scmlm_all.input,
                    "n_genes.txt",

            rule count_genes:
                input:
                    "scmlm_out/pb/results.csv",
                output:
                    "n_genes.txt",
                shell:
                    "cut -d, -f1 {{input}} | tail -n +2 | sort -u | wc -l > {{output}}"
            """
        )
    )
    proc = snakemake(tmp_path, "--cores", "2", snakefile=outer)
    log = proc.stdout + proc.stderr
    for rule in ("scmlm_aggregate", "scmlm_fit_pseudobulk", "scmlm_plot", "scmlm_summary"):
        assert f"rule {rule}:" in log, rule
    assert not (tmp_path / "results").exists() and not (tmp_path / "config").exists()
    ours = read_results(tmp_path / "scmlm_out" / "pb" / "results.csv")
    assert_same_results(ours, read_results(local_run / "results" / "pb" / "results.csv"))
    assert int((tmp_path / "n_genes.txt").read_text()) == N_GENES


def test_scmlm_command_missing_from_path_stops_at_start(tmp_path):
    """The rules call `scmlm`: without it on PATH (an environment not activated) the run stops before any job."""
    workdir = make_workdir(tmp_path / "run")
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p) / "scmlm").exists())
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir), "-n"]
    proc = subprocess.run([*cmd, *config_args(workdir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "'scmlm' command, which is not on PATH" in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()
