"""Configuration checks, paths and input functions shared by the rules (no rules here)."""

import difflib
import os
import re
import shlex

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
        return (
            f"{where}: unknown key {key!r}{hint} (allowed keys: {', '.join(allowed)})"
        )
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return f"{where}: missing required key {missing[0]!r}"
    if err.absolute_path and err.absolute_path[-1] == "contrast":
        return (
            f"{where}: must be [factor, level, reference level], got {err.instance!r}"
        )
    if err.validator == "enum":
        choices = ", ".join(map(repr, err.validator_value))
        return f"{where}: {err.instance!r} is not one of {choices}"
    return f"{where}: {err.message}"


def validate_config(cfg):
    """Validate against the schema (filling defaults) and add cross-key checks; fail with one clear line."""
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
        if a["method"] == "pseudobulk":
            for key in ("family", "shards"):
                if key in a:
                    problems.append(f"{where}: {key!r} applies to method glmm only")
        elif "pb_method" in a:
            problems.append(f"{where}: 'pb_method' applies to method pseudobulk only")
        for level in a["contrast"]:
            if ":" in level:
                problems.append(
                    f"{where}: contrast entry {level!r} must not contain ':'"
                )
        if a["method"] == "pseudobulk" and "(" in a["design"] and "|" in a["design"]:
            problems.append(
                f"{where}: random-effect terms in design {a['design']!r} need method glmm"
            )
    if problems:
        raise WorkflowError(f"invalid scmlm configuration: {'; '.join(problems)}")


validate_config(config)

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


def names_regex(method):
    """A regex matching the names of the analyses with this method (and nothing when there are none)."""
    names = [n for n, a in ANALYSES.items() if a["method"] == method]
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
    args = ["--method", a["method"], "--design", a["design"]]
    args += ["--contrast", ":".join(a["contrast"])]
    if config["groups_key"]:
        args += ["--groups-key", config["groups_key"]]
    # pseudobulk fits read the aggregated h5ad and GLMM shards the split h5ads, both with the counts in .X
    if a["method"] == "pseudobulk":
        args += ["--pb-method", a.get("pb_method", "nb_ql")]
    else:
        args += ["--family", a.get("family", "nb")]
    return shlex.join(args)


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
    args = ["--design", a["design"], "--contrast", ":".join(a["contrast"])]
    args += ["--family", a.get("family", "nb")]
    if config["groups_key"]:
        args += ["--groups-key", config["groups_key"]]
    if config["layer"]:
        args += ["--layer", config["layer"]]
    args += ["--n-genes", str(hierarchy_genes(wildcards.analysis))]
    args += ["--n-shrinkage", str(int(a.get("shrinkage_genes", 3)))]
    return shlex.join(args)


# ---- resources ----------------------------------------------------------------------------------------------------
# Defaults sized from the input and doubled on each retry (`--retries`); override per rule with --set-resources or in
# a profile (see workflow/profiles/slurm).
def _size_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def mem_from_input(factor, floor=1000):
    def mem_mb(wildcards, input, attempt):
        return int(max(floor, factor * _size_mb(input)) * attempt)

    return mem_mb


def shard_mem_mb(wildcards, attempt):
    """A GLMM shard job holds ~1/n of the input's counts (plus a column-major copy and the workers' data)."""
    size_mb = _size_mb([config["input"]])
    return int(max(2000, 1000 + 5 * size_mb / int(wildcards.n)) * attempt)


def runtime(minutes):
    def runtime_min(wildcards, attempt):
        return minutes * attempt

    return runtime_min


# ---- targets ------------------------------------------------------------------------------------------------------
def final_outputs():
    targets = [out("summary.csv")]
    for name in ANALYSES:
        targets += [out(name, "results.csv"), out(name, "plots")]
        if hierarchy_genes(name) > 0:
            targets.append(out(name, "hierarchy"))
    return targets
