"""Configuration checks, paths and input functions shared by the rules (no rules here)."""

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMA = "../schemas/config.schema.yaml"


# ---- configuration ------------------------------------------------------------------------------------------------
def _where(path):
    keys = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return f"config{keys}"


def _describe(err):
    """One line naming the offending key or value of a jsonschema error."""
    where = _where(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        bad = [k for k in err.instance if k not in allowed]
        key = bad[0] if bad else "?"
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if (
            str(key) in _RENAMED_KEYS
            and _RENAMED_KEYS[str(key)].split(":")[0] in allowed
        ):
            hint = f"; use {_RENAMED_KEYS[str(key)]} instead"
        return (
            f"{where}: unknown key {key!r}{hint} (allowed keys: {', '.join(allowed)})"
        )
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return f"{where}: missing required key {missing[0]!r}"
    if "contrast" in list(err.absolute_path):
        return (
            f"{where}: must be [factor, level, reference level], a list of such lists, or a mapping "
            f"name -> contrast ([factor, level, reference level], a coefficient name, or 'coefA,coefB' for a "
            f"joint F test; names without '=', ',', ':' or spaces), got {err.instance!r}"
        )
    if err.validator == "enum":
        choices = ", ".join(map(repr, err.validator_value))
        return f"{where}: {err.instance!r} is not one of {choices}"
    return f"{where}: {err.message}"


# keys the command line knows under another name, with the workflow's key and value
_RENAMED_KEYS = {
    "reml": "estimation: REML (or estimation: ML)",
    "pb-method": "pb_method",
}


def _dataset_problems(cfg):
    """create_input.dataset must name a dataset bundled with scmlm (scmlm.datasets)."""
    name = cfg.get("create_input", {}).get("dataset")
    if name is None:
        return []
    try:
        from scmlm.checks import bundled_datasets
    except (
        ImportError
    ):  # scmlm lives in the rules' conda environment only: its rule checks the name
        return []
    names = bundled_datasets()
    if name in names:
        return []
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return [
        f"config.create_input.dataset: {name!r} is not a dataset bundled with scmlm; {hint}"
        f"use one of {', '.join(map(repr, names))}"
    ]


def _inside(path, folder):
    """Whether `path` is `folder` or lies inside it (both relative to the working directory)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_triple(c):
    return isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c)


def _contrast_levels(contrast):
    """The factor and level names of an analysis' (factor, level, reference) contrasts."""
    if _is_triple(contrast):
        return list(contrast)
    items = contrast.values() if isinstance(contrast, dict) else contrast
    return [x for c in items if _is_triple(c) for x in c]


def _join(triple):
    """factor:level:reference as `scmlm de --contrast` reads it (a colon inside a level written \\:)."""
    return ":".join(str(x).replace(":", "\\:") for x in triple)


def contrast_args(contrast):
    """`--contrast` options of an analysis' contrast: one, a list of them, or a mapping name -> contrast."""
    if _is_triple(contrast):
        return ["--contrast", _join(contrast)]
    if isinstance(contrast, dict):
        args = []
        for name, c in contrast.items():
            args += ["--contrast", f"{name}={_join(c) if _is_triple(c) else c}"]
        return args
    return [arg for c in contrast for arg in ("--contrast", _join(c))]


def contrast_spec(contrast):
    """The contrast as the scmlm API reads it (what `scmlm de` makes of the `--contrast` options), for the TMM
    samples split_shards computes: the union of the contrasts' factors."""
    if _is_triple(contrast):
        return list(contrast)
    if isinstance(contrast, dict):
        return {n: _join(c) if _is_triple(c) else c for n, c in contrast.items()}
    return [_join(c) for c in contrast]


def validate_config(cfg):
    """Validate against the schema (filling defaults) and add cross-key checks; fail with one clear line."""
    if not cfg:
        raise WorkflowError(
            "invalid scmlm configuration: no configuration given; pass one with --configfile, e.g. "
            "--configfile config/config.yaml (the example on bundled data) or your own copy of it (config/README.md)"
        )
    try:
        validate(cfg, SCHEMA)
    except WorkflowError as e:
        # snakemake wraps the jsonschema error (raised in its `except`) into a message listing the whole schema
        cause = e.__cause__ or e.__context__
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        raise WorkflowError(
            f"invalid scmlm configuration: {_describe(cause)}"
        ) from None
    problems = []
    names = [a["name"] for a in cfg["analyses"]]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"config.analyses: name {name!r} is used more than once")
    for i, a in enumerate(cfg["analyses"]):
        where = f"config.analyses[{i}] ({a['name']})"
        problems += _abundance_key_problems(a, where)
        if a["method"] == "abundance":
            pass
        elif a["method"] == "pseudobulk":
            for key in ("family", "shards"):
                if key in a:
                    problems.append(f"{where}: {key!r} applies to method glmm only")
            if "estimation" in a:
                problems.append(
                    f"{where}: 'estimation' applies to methods glmm and abundance only"
                )
        elif "pb_method" in a:
            problems.append(f"{where}: 'pb_method' applies to method pseudobulk only")
        for level in _contrast_levels(a["contrast"]):
            if ":" in level or "=" in level or "," in level:
                problems.append(
                    f"{where}: contrast entry {level!r} must not contain ':', '=' or ','"
                )
        random_terms = "(" in a["design"] and "|" in a["design"]
        if (
            a["method"] == "pseudobulk"
            and random_terms
            and a.get("pb_method", "nb_ql") != "voom"
        ):
            problems.append(
                f"{where}: random-effect terms in design {a['design']!r} need method glmm, or "
                "pb_method voom (dream: precision-weighted mixed model on the pseudobulk)"
            )
    problems += _dataset_problems(cfg)
    problems += _input_problems(cfg)
    if problems:
        raise WorkflowError(f"invalid scmlm configuration: {'; '.join(problems)}")


_ABUNDANCE_ONLY = ("cell_type_key", "abundance_method", "min_cells_type")
_NOT_ABUNDANCE = (
    "pb_method",
    "family",
    "shards",
    "offset",
    "hierarchy_genes",
    "shrinkage_genes",
)


def _abundance_key_problems(a, where):
    """Keys of differential abundance on other analyses, and gene-level keys on an abundance analysis."""
    if a["method"] == "abundance":
        bad = [k for k in _NOT_ABUNDANCE if k in a]
        if a.get("abundance_method", "glmm") != "glmm" and "estimation" in a:
            bad.append("estimation")
        return [
            (
                f"{where}: 'estimation' applies to abundance_method glmm only; this analysis uses "
                f"{a.get('abundance_method')!r}"
                if k == "estimation"
                else f"{where}: {k!r} does not apply to method abundance"
            )
            for k in bad
        ]
    return [
        f"{where}: {k!r} applies to method abundance only"
        for k in _ABUNDANCE_ONLY
        if k in a
    ]


def _input_problems(cfg):
    """The workflow writes only inside `outdir`: a created input lives there, a user's input never does."""
    inp, outdir = cfg["input"], cfg["outdir"]
    if "create_input" in cfg:
        if not _inside(inp, outdir) or _inside(outdir, inp):
            return [
                f"config.input: {inp!r} is written by create_input, so it must lie inside outdir {outdir!r} "
                f"(e.g. {os.path.join(outdir, 'data', 'input.h5ad')!r}); the workflow never writes outside outdir"
            ]
        return []
    if _inside(inp, outdir) or _inside(outdir, inp):
        return [
            f"config.input: {inp!r} lies inside outdir {outdir!r}, which the workflow writes; keep your data "
            "outside it or choose another outdir"
        ]
    if not os.path.exists(inp):
        return [
            f"config.input: {inp!r} does not exist (working directory {os.getcwd()!r}); set input to your .h5ad, or "
            "add create_input to write a bundled or simulated data set"
        ]
    return []


validate_config(config)


# ---- the input against the configuration (obs only, before any job) ----------------------------------------------
def _read_obs(path):
    """The obs table and layer names of an .h5ad file, without reading its counts."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    try:
        with h5py.File(path, "r") as f:
            return read_elem(f["obs"]), sorted(f["layers"]) if "layers" in f else []
    except (OSError, KeyError) as err:
        raise WorkflowError(
            f"invalid scmlm configuration: config.input: {path!r} cannot be read as an .h5ad file ({err}); "
            "give the AnnData file written by anndata's write_h5ad"
        ) from None


def _cols(obs):
    """The obs columns a user wrote, for messages (scmlm's own working columns, scmlm_*, left out)."""
    return ", ".join(
        repr(str(c)) for c in obs.columns if not str(c).startswith("scmlm_")
    )


def _key_problem(obs, where, col, fix):
    if not col or col in obs.columns:
        return []
    return [
        f"{where}: {col!r} is not a column of the input's obs ({_cols(obs)}); {fix}"
    ]


def _analysis_keys(a):
    """The obs columns an analysis reads as keys, each with its config key: [(where, column)]."""
    if a["method"] == "abundance":
        return [
            ("cell_type_key", abundance_cell_type_key(a)),
            ("sample_key", a.get("sample_key", config["sample_key"])),
        ]
    if a["method"] == "pseudobulk":
        return [
            ("sample_key", config["sample_key"]),
            ("groups_key", config["groups_key"]),
        ]
    return [("sample_key", a.get("sample_key")), ("groups_key", config["groups_key"])]


def _design_problems(obs, a, where):
    """The analysis' design columns and contrast levels against the input (scmlm's own design checks); prints the
    warnings scmlm gives for the design (an integer identifier entering as a number)."""
    from scmlm.checks import design_warnings, pseudobulk_design_problem
    from scmlm.errors import DesignError

    keys = [col for _, col in _analysis_keys(a)]
    c = a["contrast"]
    spec = tuple(c) if _is_triple(c) else contrast_spec(c)
    try:
        found = design_warnings(obs, a["design"], spec, factors=keys)
    except DesignError as err:
        return [f"{where}: {err} (input {config['input']!r})"]
    if a["method"] == "pseudobulk":
        problem = pseudobulk_design_problem(
            obs, a["design"], config["sample_key"], config["groups_key"]
        )
        if problem:
            return [f"{where}: {problem}"]
    for message in found:
        print(f"scmlm configuration warning: {where}: {message}", file=sys.stderr)
    return []


def input_problems(cfg):
    """Keys, layer, design columns and contrast levels of every analysis, checked on the input's obs when the
    workflow is parsed (a created input does not exist yet; its rule checks it)."""
    path = cfg["input"]
    if "create_input" in cfg or not os.path.isfile(path):
        return []
    try:
        import scmlm.design  # noqa: F401  (the rules' conda environment may be the only place scmlm lives)
    except ImportError:
        return []
    obs, layers = _read_obs(path)
    problems = _key_problem(
        obs,
        "config.sample_key",
        cfg["sample_key"],
        "set sample_key to the obs column naming each sample (donor)",
    )
    problems += _key_problem(
        obs,
        "config.groups_key",
        cfg["groups_key"],
        "set groups_key to the obs column of the cell types, or to null for one fit over all cells",
    )
    if cfg["layer"] and cfg["layer"] not in layers:
        problems.append(
            f"config.layer: {cfg['layer']!r} is not a layer of {path!r} (layers: {', '.join(map(repr, layers)) or 'none'}); "
            "set layer to the layer holding the raw counts, or to null to use .X"
        )
    for i, a in enumerate(cfg["analyses"]):
        where = f"config.analyses[{i}] ({a['name']})"
        keys = _analysis_keys(a)
        for key, col in keys:
            if key in a:
                problems += _key_problem(
                    obs, f"{where}.{key}", col, f"set {key} to an obs column"
                )
        if all(not col or col in obs.columns for _, col in keys):
            problems += _design_problems(obs, a, where)
        problems += _analysis_input_problems(obs, a, where)
    if any(a["method"] != "abundance" for a in cfg["analyses"]):
        from scmlm.checks import counts_sample_problem

        problem = counts_sample_problem(path, cfg["layer"])
        if problem:
            problems.append(f"config.layer: {path!r}: {problem}")
    return problems


def _analysis_input_problems(obs, a, where):
    """An abundance analysis needs two cell types; a GLMM offset named as an obs column must be one."""
    if a["method"] == "abundance":
        col = abundance_cell_type_key(a)
        n = obs[col].nunique() if col in obs.columns else 2
        if n < 2:
            return [
                f"{where}: cell_type_key {col!r} holds {n} cell type{'s' if n != 1 else ''} in the input; a "
                "differential abundance analysis compares the shares of at least 2 cell types: set cell_type_key "
                "to the obs column of the cell types, or remove this analysis"
            ]
        return []
    if a["method"] != "glmm" or a.get("offset", "auto") == "auto":
        return []
    offset = a["offset"]
    if offset in ("tmm", "log_total", "none") or offset in obs.columns:
        return []
    return [
        f"{where}.offset: {offset!r} is not a column of the input's obs ({_cols(obs)}); set offset to auto, tmm, "
        "log_total, none, or the obs column holding each cell's offset"
    ]


def check_input(cfg):
    """Fail when the workflow is parsed (not inside a job), in one line, when the input does not fit the
    configuration: today's alternative is an error in a job log after the aggregation has run.
    """
    if not workflow.is_main_process:
        return
    problems = input_problems(cfg)
    if problems:
        raise WorkflowError(f"invalid scmlm configuration: {'; '.join(problems)}")


def check_scmlm_command():
    """The rules call the `scmlm` command: fail at start, in one line, when it is not on PATH (it is provided by
    the rules' conda environment with --software-deployment-method conda)."""
    deploy = (
        getattr(
            getattr(workflow, "deployment_settings", None), "deployment_method", None
        )
        or ()
    )
    if shutil.which("scmlm") is None and "conda" not in {
        str(getattr(m, "name", m)).lower() for m in deploy
    }:
        raise WorkflowError(
            "the workflow's rules call the 'scmlm' command, which is not on PATH: activate the environment scmlm "
            "is installed in (e.g. 'source .venv/bin/activate') or run with --software-deployment-method conda"
        )


check_scmlm_command()

OUTDIR = config["outdir"]
ANALYSES = {a["name"]: a for a in config["analyses"]}


wildcard_constraints:
    analysis="|".join(map(re.escape, ANALYSES)),
    i=r"\d+",
    n=r"\d+",


# ---- paths --------------------------------------------------------------------------------------------------------
def out(*parts):
    """A path under the configured output folder."""
    return os.path.join(OUTDIR, *parts)


def names_regex(*methods):
    """A regex matching the names of the analyses with these methods (and nothing when there are none)."""
    names = [n for n, a in ANALYSES.items() if a["method"] in methods]
    return "|".join(map(re.escape, names)) or "(?!)"


def n_shards(name):
    """Gene shards of a GLMM analysis: its own `shards` or the top-level one."""
    return int(ANALYSES[name].get("shards", config["shards"]))


def shard_csvs(wildcards):
    """All shard tables of one GLMM analysis; merge refuses an incomplete set, Snakemake builds the missing ones."""
    n = n_shards(wildcards.analysis)
    return [
        out(wildcards.analysis, "shards", f"{i}-of-{n}.csv") for i in range(1, n + 1)
    ]


def de_args(wildcards):
    """The analysis-specific options of `scmlm de`, shell-quoted."""
    a = ANALYSES[wildcards.analysis]
    args = ["--tool", a["method"], "--design", a["design"]]
    args += contrast_args(a["contrast"])
    if config["groups_key"]:
        args += ["--groups-key", config["groups_key"]]
    # pseudobulk fits read the aggregated h5ad and GLMM shards the split h5ads, both with the counts in .X
    if a["method"] == "pseudobulk":
        args += ["--method", a.get("pb_method", "nb_ql")]
    else:
        args += ["--family", a.get("family", "nb")]
        args += ["--replication", a.get("replication", "auto")]
        args += ["--estimation", a.get("estimation", "REML")]
        if a.get("sample_key"):
            args += ["--sample-key", a["sample_key"]]
    return shlex.join(args)


def glmm_offset(name):
    """The offset a GLMM analysis uses: `offset`, with auto resolved by scmlm's one rule (tmm for nb/poisson when
    the design or sample_key names the samples, log_total otherwise)."""
    from scmlm.design import resolve_offset

    a = ANALYSES[name]
    c = a["contrast"]
    return resolve_offset(
        a.get("offset", "auto"),
        a.get("family", "nb"),
        design=a["design"],
        contrast=tuple(c) if _is_triple(c) else contrast_spec(c),
        sample_key=a.get("sample_key"),
    )


def tmm_specs(wildcards):
    """What split_shards needs to compute each TMM analysis' offset on all genes while it streams the input."""
    specs = {}
    for name, a in ANALYSES.items():
        if a["method"] == "glmm" and glmm_offset(name) == "tmm":
            specs[name] = {
                "design": a["design"],
                "contrast": contrast_spec(a["contrast"]),
                "sample_key": a.get("sample_key"),
                "groups_key": config["groups_key"] or None,
            }
    return specs


def shard_offset(name):
    """obs column of a shard file holding the analysis' offset over all genes (split_shards writes them)."""
    offset = glmm_offset(name)
    if offset == "tmm":
        return f"scmlm_offset_{name}"
    return {"log_total": "scmlm_log_total"}.get(offset, offset)


def abundance_args(wildcards):
    """The options of `scmlm abundance` for one analysis, shell-quoted."""
    a = ANALYSES[wildcards.analysis]
    args = ["--design", a["design"], *contrast_args(a["contrast"])]
    args += ["--cell-type-key", abundance_cell_type_key(a)]
    args += ["--sample-key", a.get("sample_key", config["sample_key"])]
    args += ["--method", a.get("abundance_method", "glmm")]
    args += ["--replication", a.get("replication", "auto")]
    args += ["--estimation", a.get("estimation", "REML")]
    args += ["--min-cells", str(a.get("min_cells_type", 10))]
    return shlex.join(args)


def abundance_cell_type_key(a):
    return a.get("cell_type_key") or config["groups_key"] or "cell_type"


def aggregate_args(wildcards):
    args = ["--sample-key", config["sample_key"]]
    if config["groups_key"]:
        args += ["--groups-key", config["groups_key"]]
    if config["layer"]:
        args += ["--layer", config["layer"]]
    args += ["--min-cells", str(config["min_cells"])]
    return shlex.join(args)


def simulate_args(wildcards):
    opts = config.get("create_input", {}).get("simulate", {})
    args = []
    for key, value in opts.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def plot_args(wildcards):
    return shlex.join(arg for kind in config["plots"] for arg in ("--kind", kind))


def hierarchy_genes(name):
    """Genes of a GLMM analysis described by the hierarchy step (0: no hierarchy step)."""
    a = ANALYSES[name]
    return int(a.get("hierarchy_genes", 200)) if a["method"] == "glmm" else 0


def hierarchy_args(wildcards):
    a = ANALYSES[wildcards.analysis]
    args = ["--design", a["design"], *contrast_args(a["contrast"])]
    args += ["--family", a.get("family", "nb")]
    if config["groups_key"]:
        args += ["--groups-key", config["groups_key"]]
    if config["layer"]:
        args += ["--layer", config["layer"]]
    args += ["--offset", glmm_offset(wildcards.analysis)]
    if a.get("sample_key"):
        args += ["--sample-key", a["sample_key"]]
    args += ["--n-genes", str(hierarchy_genes(wildcards.analysis))]
    args += ["--n-shrinkage", str(int(a.get("shrinkage_genes", 3)))]
    return shlex.join(args)


def hierarchy_dirs():
    """The hierarchy folders of the GLMM analyses that have a hierarchy step."""
    return [out(name, "hierarchy") for name in ANALYSES if hierarchy_genes(name) > 0]


def report_params(name):
    """What the report lists under an analysis' methods, from its configuration."""
    a = ANALYSES[name]
    params = {
        "method": a["method"],
        "design": a["design"],
        "contrast": a[
            "contrast"
        ],  # as written (a mapping name -> contrast stays one): the fitted design reads it
    }
    if a["method"] == "abundance":
        params["abundance_method"] = a.get("abundance_method", "glmm")
        params["cell_type_key"] = abundance_cell_type_key(a)
        params["sample_key"] = a.get("sample_key", config["sample_key"])
        params["replication"] = a.get("replication", "auto")
        if params["abundance_method"] == "glmm":
            params["estimation"] = a.get("estimation", "REML")
        return params
    if a["method"] == "pseudobulk":
        params["pb_method"] = a.get("pb_method", "nb_ql")
        params["normalisation"] = {
            "nb_ql": "TMM (edgeR calcNormFactors) on the pseudobulk samples",
            "voom": "TMM (edgeR calcNormFactors) on the pseudobulk samples",
            "pydeseq2": "DESeq2 median-of-ratios size factors",
        }[params["pb_method"]]
        params["sample_key"] = config["sample_key"]
    else:
        params["family"] = a.get("family", "nb")
        params["offset"] = glmm_offset(name)
        params["replication"] = a.get("replication", "auto")
        params["estimation"] = a.get("estimation", "REML")
        if a.get("sample_key"):
            params["sample_key"] = a["sample_key"]
        params["shards"] = n_shards(name)
    if config["groups_key"]:
        params["groups_key"] = config["groups_key"]
    if config["layer"]:
        params["layer"] = config["layer"]
    return params


def report_args(wildcards):
    args = [f"{name}={out(name)}" for name in ANALYSES]
    args += ["--params", json.dumps({name: report_params(name) for name in ANALYSES})]
    args += ["--input", config["input"]]
    args += ["--title", f"scmlm results: {os.path.basename(config['input'])}"]
    return shlex.join(args)


# ---- resources ----------------------------------------------------------------------------------------------------
# Set here only (the SLURM profile carries executor settings, no resources): every job asks for what it uses. Each
# process runs one BLAS thread (shell prefix in the Snakefile); a GLMM shard job runs `threads` workers.
# Memory is sized from the input and, like runtime, multiplied by `attempt` on a retry (`--retries`), capped at the
# cluster's largest node; a request that no node of the cluster can meet stops the workflow with an error instead of a
# job that stays pending forever. --set-resources RULE:mem_mb=... still overrides a value for one run.


def _slurm_time_min(text):
    """A SLURM time limit ('infinite', 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH[:MM[:SS]]') in minutes (None: no limit)."""
    text = text.strip()
    if not text or text in ("infinite", "UNLIMITED", "n/a"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        h, m, sec = parts
    else:  # MM, MM:SS
        h, m, sec = 0, parts[0], parts[1] if len(parts) > 1 else 0
    return (int(days or 0) * 24 + h) * 60 + m + sec / 60


_LIMITS = []


def limits():
    """`cluster_limits()`, read once, when the first job's resources are evaluated (the executor is known then)."""
    if not _LIMITS:
        _LIMITS.append(cluster_limits())
    return _LIMITS[0]


def cluster_limits():
    """The largest node of the SLURM cluster: {'cpus', 'mem_mb', 'runtime'} (None entries: unknown or unlimited).

    Read from `sinfo` when the workflow submits to SLURM (or config.cluster_check is "always"); {} otherwise.
    """
    check = config.get("cluster_check", "auto")
    plugin = getattr(workflow, "executor_plugin", None)
    executor = plugin.name if plugin is not None else ""
    if check == "never" or (check == "auto" and executor != "slurm"):
        return {}
    if shutil.which("sinfo") is None:
        raise WorkflowError(
            "cluster check: 'sinfo' is not on PATH, so the cluster's limits cannot be read"
        )
    try:
        lines = subprocess.run(
            ["sinfo", "-h", "-o", "%c %m %l"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split("\n")
    except (subprocess.SubprocessError, OSError) as err:
        raise WorkflowError(f"cluster check: 'sinfo' failed: {err}") from None
    cpus, mem, time_ = [], [], []
    for line in lines:
        fields = line.split()
        if len(fields) != 3:
            continue
        cpus.append(int(fields[0].rstrip("+")))
        mem.append(int(fields[1].rstrip("+")))
        time_.append(_slurm_time_min(fields[2]))
    if not cpus:
        raise WorkflowError(
            "cluster check: 'sinfo' lists no node; is the SLURM cluster up?"
        )
    runtime_max = None if any(t is None for t in time_) else max(time_)
    return {"cpus": max(cpus), "mem_mb": max(mem), "runtime": runtime_max}


def _check(rule_name, what, value, limit, fix):
    if limit is not None and value > limit:
        raise WorkflowError(
            f"{rule_name} jobs ask for {what}={value:g} but the largest SLURM node offers {limit:g}; "
            f"the job could never start. {fix}"
        )


_STATIC = []  # (rule, resource, value) requests known before any input exists


def check_cluster_limits():
    """Before the first job is submitted (onstart): every request known in advance fits the largest node."""
    lim = limits()
    _check(
        "fit_glmm",
        "cpus",
        int(config["threads"]),
        lim.get("cpus"),
        "Lower config.threads.",
    )
    for rule_name, what, value in _STATIC:
        _check(
            rule_name,
            what,
            value,
            lim.get(what),
            f"Lower it with --set-resources {rule_name}:{what}=...",
        )


def glmm_threads(wildcards=None):
    """Workers of one GLMM shard job (config.threads), one CPU each."""
    n = int(config["threads"])
    _check("fit_glmm", "cpus", n, limits().get("cpus"), "Lower config.threads.")
    return n


def _size_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def _mem(rule_name, base_mb, attempt):
    """`base_mb` for the first attempt (refused if no node has it), more on a retry, at most the largest node."""
    limit = limits().get("mem_mb")
    _check(
        rule_name,
        "mem_mb",
        int(base_mb),
        limit,
        "Use more gene shards (config.shards) or a smaller input.",
    )
    mem = int(base_mb * attempt)
    return min(mem, limit) if limit else mem


def mem_from_input(rule_name, factor, floor=1000):
    def mem_mb(wildcards, input, attempt):
        return _mem(rule_name, max(floor, factor * _size_mb(input)), attempt)

    return mem_mb


def fixed_mem(rule_name, mb):
    _STATIC.append((rule_name, "mem_mb", mb))

    def mem_mb(wildcards, attempt):
        return _mem(rule_name, mb, attempt)

    return mem_mb


def shard_mem_mb(wildcards, attempt):
    """A GLMM shard job holds ~1/n of the input's counts; its `threads` share them (no copy per worker).

    Measured (benchmarks/bench_workflow.py, 1,000,000 cells x 20,000 genes, 13.7 GB input, 8 shards, 2 threads): peak
    RSS 1.7x the shard's share of the input (2.8 GB); 1000 + 2.5x that share asks 5.1 GB.
    """
    size_mb = _size_mb([config["input"]])
    return _mem("fit_glmm", max(2000, 1000 + 2.5 * size_mb / int(wildcards.n)), attempt)


def _n_cells(path):
    """Rows of an .h5ad's obs, read from its index alone; 0 while the file does not exist yet (a dry run of a workflow
    that creates its input), as `_size_mb` counts a missing file as 0."""
    import h5py

    if not os.path.isfile(path):
        return 0
    with h5py.File(path, "r") as f:
        obs = f["obs"]
        return int(obs[obs.attrs["_index"]].shape[0])


def hierarchy_mem_mb(wildcards, input, attempt):
    """The hierarchy job fits its genes on every cell: its memory grows with the cells, not with the input's size.

    Measured (benchmarks/bench_workflow.py, 200 genes): 0.4 GB at 50,000 cells, 4.3 GB at 1,000,000 cells (~4 kB a
    cell); 1000 MB + 6 kB a cell (x hierarchy_genes / 200) asks 7 GB at 1,000,000 cells, 4 GB at least.
    """
    per_cell = 0.006 * max(1.0, hierarchy_genes(wildcards.analysis) / 200)
    return _mem("hierarchy", max(4000, 1000 + per_cell * _n_cells(input.data)), attempt)


def runtime(rule_name, minutes):
    _STATIC.append((rule_name, "runtime", minutes))

    def runtime_min(wildcards, attempt):
        limit = limits().get("runtime")
        _check(
            rule_name,
            "runtime",
            minutes,
            limit,
            "Ask your administrators for a partition with a longer limit.",
        )
        return min(minutes * attempt, limit) if limit else minutes * attempt

    return runtime_min


onstart:
    check_cluster_limits()


# ---- targets ------------------------------------------------------------------------------------------------------
def final_outputs():
    targets = [out("summary.csv"), out("report.html")]
    for name in ANALYSES:
        targets += [out(name, "results.csv"), out(name, "plots")]
        if hierarchy_genes(name) > 0:
            targets.append(out(name, "hierarchy"))
    return targets


check_input(config)
