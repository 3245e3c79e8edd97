"""Checks of what a user typed, shared by the command line (``cli.py``) and the workflow (``common.smk``).

Each check raises (or returns) one line that names the offending option, key or value and the fix, before any
work starts. Like ``cli.py`` this module sits above the layers and imports public names of scmlm only.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path

from .errors import ScmlmError
from .models import USABLE_STATUS

CONTRAST_HELP = (
    "repeatable: factor:test:reference (e.g. condition:case:ctrl; write \\: for a colon inside a level, "
    "e.g. 'time:8\\:00:0\\:00'), a coefficient name, or NAME=one of those; "
    "NAME=coefA,coefB (coefficient names) is one joint F test, e.g. doses=dose[T.mid],dose[T.high]; "
    "NAME=0,1,-1 a numeric vector over the design's columns"
)

CONTRAST_FORMS = (
    "factor:test:reference (e.g. condition:case:ctrl), a coefficient name (e.g. 'condition[T.case]'), "
    "NAME=coefA,coefB (a joint F test) or NAME=0,1,-1 (a numeric vector)"
)
"""The accepted forms of ``--contrast``, quoted by the messages about a malformed one."""

# options the command line once had, with what replaced them
RENAMED_OPTIONS = {
    "--pb-method": "--method (e.g. --method voom: the pseudobulk method; --tool picks pseudobulk or glmm)",
    "--reml": "--estimation REML (or --estimation ML)",
}

FEW_REPLICATES = 3
"""A contrast level observed in fewer units of replication (donors or samples) than this, or a test with at most
``FEW_DF`` degrees of freedom, rests on very few replicates: the report shows a banner and ``scmlm de`` a warning."""

FEW_DF = 2


def contrast_item(text: str):
    r"""One ``--contrast`` value: ``(name or None, specification, joint)``; ``\:`` is a colon inside a level."""
    from .design import split_contrast

    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = None, text
    elif not name.strip() or not spec.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=CONTRAST with both parts, e.g. dose=dose:high:low")
    else:
        name = name.strip()
    if "," in spec:
        parts = [p.strip() for p in spec.split(",")]
        if any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty item in the comma-separated list")
        try:
            vec = [float(p) for p in parts]
        except ValueError:
            vec = None
        if name is None:
            what = "a numeric vector" if vec is not None else "a joint F test"
            raise argparse.ArgumentTypeError(f"{text!r} is {what} and needs a name: --contrast NAME={spec}")
        if vec is not None:
            return name, vec, False
        return name, [split_contrast(p) or p for p in parts], True
    if split_contrast(spec) is not None:
        return name, split_contrast(spec), False
    if re.search(r"(?<!\\):\s*$|^\s*:", spec):
        raise argparse.ArgumentTypeError(f"{text!r} is not a contrast; the accepted forms are {CONTRAST_FORMS}")
    return name, spec, False


def contrast_arg(items) -> object:
    """The ``contrast=`` of the API from the (repeated) ``--contrast`` values.

    One contrast as it is, several unnamed ones as a list, and a dict as soon as one is named (unnamed ones get their
    usual label).
    """
    from .design import contrast_label

    if not isinstance(items, list):  # set programmatically
        return items
    if len(items) == 1 and items[0][0] is None:
        return items[0][1]
    if all(name is None for name, _, _ in items):
        return [spec for _, spec, _ in items]
    out = {}
    for name, spec, _ in items:
        key = name if name is not None else contrast_label(spec)
        if key in out:
            raise ScmlmError(f"--contrast name {key!r} is given twice; give each contrast its own name.")
        out[key] = spec
    return out


def _text_specs(contrast):
    """The contrasts given as one text (a coefficient name, or factor:level missing its reference)."""
    if isinstance(contrast, str):
        return [contrast]
    items = contrast.values() if isinstance(contrast, dict) else contrast if isinstance(contrast, list) else []
    return [c for c in items if isinstance(c, str)]


def check_contrast_levels(obs, contrast) -> None:
    """Refuse ``factor:level`` (the reference level missing), which would otherwise be read as a coefficient name.

    ``condition:case`` where ``condition`` is an obs column and ``case`` is not a column (so not an interaction of
    two columns) is a factor contrast without its reference level.
    """
    for spec in _text_specs(contrast):
        parts = re.split(r"(?<!\\):", spec)
        if len(parts) != 2:
            continue
        factor, level = (p.strip().replace("\\:", ":") for p in parts)
        if factor not in obs.columns or level in obs.columns:
            continue
        others = [str(v) for v in dict.fromkeys(obs[factor].astype(str)) if str(v) != level]
        example = f"{factor}:{level}:{others[0]}" if others else f"{factor}:{level}:REFERENCE"
        raise ScmlmError(
            f"--contrast {spec!r} names factor {factor!r} and level {level!r} but no reference level; write "
            f"factor:test:reference, e.g. {example} (accepted forms: {CONTRAST_FORMS})."
        )


def renamed_option(argv) -> str | None:
    """The message for an option the command line no longer has (``None`` when ``argv`` uses none)."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in RENAMED_OPTIONS:
            return f"{old} is no longer an option; use {RENAMED_OPTIONS[old]}."
    return None


def check_h5ad_path(path, *, what: str = "output") -> None:
    """An AnnData output must end in ``.h5ad`` (checked before the work that writes it)."""
    p = Path(path)
    if p.suffix != ".h5ad":
        raise ScmlmError(
            f"{what} {str(path)!r} ends in {p.suffix or 'no suffix'!r}; AnnData is written as HDF5 .h5ad: e.g. "
            f"{str(p.with_suffix('.h5ad'))!r}."
        )


def check_outputs(outputs, *inputs) -> None:
    """Validate every output path before any work starts; an output may never be one of the inputs."""
    from . import io

    given = [Path(p).resolve() for p in inputs]
    for out in outputs:
        if out is None:
            continue
        if Path(out).resolve() in given:
            raise ScmlmError(
                f"output {out!r} is also an input; choose another output path (inputs are never overwritten)."
            )
        io.check_writable(out, what="output")
    resolved = [Path(p).resolve() for p in outputs if p is not None]
    if len(set(resolved)) < len(resolved):
        raise ScmlmError(f"the same path is given for two outputs: {[str(p) for p in outputs if p is not None]}.")


def check_outdir(path: str) -> None:
    """An output folder that exists as a folder or can be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ScmlmError(f"--outdir {path!r} is a file; give a folder.")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ScmlmError(f"--outdir {path!r} cannot be created or written: {str(parent)!r} is not a writable folder.")


# ---- few replicates ------------------------------------------------------------------------------------------------
def few_replicates(table, units: dict | None = None) -> list[str]:
    """Why a result rests on very few replicates: one line per reason (empty when it does not).

    The rule: the median df of the usable tests is at most ``FEW_DF`` (a between-donor contrast has about donors
    minus donor-level coefficients), or a contrast level is observed in fewer than ``FEW_REPLICATES`` units of
    replication (``units``: level label -> number of donors/samples, when known).
    """
    import numpy as np

    out = []
    if "df" in table.columns and "status" in table.columns:
        ok = table.loc[table["status"].isin(USABLE_STATUS), "df"].to_numpy(dtype=float)
        ok = ok[np.isfinite(ok)]
        if ok.size and np.median(ok) <= FEW_DF:
            out.append(f"the median test has only {np.median(ok):.3g} residual df (at most {FEW_DF})")
    for level, n in (units or {}).items():
        if n < FEW_REPLICATES:
            out.append(f"{level} has {n} unit{'s' if n != 1 else ''} of replication (fewer than {FEW_REPLICATES})")
    return out


def units_per_level(obs, design: str, contrast, *, unit_key=None, groups_key=None, rows_are_units=False) -> dict:
    """Units of replication (donors or samples) at each level of each factor contrast: ``{label: n}``.

    The unit is ``unit_key`` (a sample key), else the first random term's grouping factor of ``design`` (``donor``
    in ``(1|donor)``), else each row when ``rows_are_units`` (pseudobulk samples); a cell-level analysis with no unit
    gives ``{}``. Counted per group of ``groups_key`` (labels ``"condition=case in T cells"``).
    """
    from .design import parse_contrasts, parse_formula

    if unit_key is None:
        random = [g for r in parse_formula(design).random for g in r.group]
        unit_key = random[0] if random else None
    if (unit_key is None and not rows_are_units) or (unit_key is not None and unit_key not in obs.columns):
        return {}
    parts = [(None, obs)] if not groups_key or groups_key not in obs.columns else obs.groupby(groups_key, observed=True)
    out: dict[str, int] = {}
    for spec in parse_contrasts(contrast):
        triple = spec.spec
        if not (isinstance(triple, tuple) and len(triple) == 3 and triple[0] in obs.columns):
            continue
        factor = triple[0]
        for group, sub in parts:
            values = sub[factor].astype(str)
            for level in triple[1:]:
                rows = sub[values == str(level)]
                n = int(rows[unit_key].nunique()) if unit_key is not None else len(rows)
                label = f"{factor}={level}" + ("" if group is None else f" in {group}")
                out[label] = min(out.get(label, n), n)
    return out


def replicates(obs, design: str, contrast, **kwargs) -> dict:
    """:func:`units_per_level`, with a contrast as the workflow writes it (lists), and ``{}`` when it cannot be read."""
    try:
        return units_per_level(obs, design, json_contrast(contrast), **kwargs)
    except ScmlmError:
        return {}


FEW_REPLICATES_MEANING = (
    "a very small p-value then says that these few donors differ, not that the effect will replicate in other "
    "donors; a single unusual donor can make it, and df_prior (df borrowed from the other genes) adds no donors"
)
"""What a very small p-value from few replicates means (the report's banner and the warning of ``scmlm de``)."""


def reading_guide(table) -> str:
    """One line saying what df, df_prior and 'singular' mean, and how many df the tests rest on."""
    import numpy as np

    parts = ["df = degrees of freedom of each test (for a between-donor contrast about donors minus donor-level "
             "coefficients)"]  # fmt: skip
    if "df_prior" in table.columns:
        methods = table["method"].dropna().astype(str) if "method" in table.columns else []
        cell_types = len(methods) > 0 and bool(methods.str.startswith("abundance_").all())
        parts.append(f"df_prior = df borrowed from the other {'cell types' if cell_types else 'genes'} by moderation")
    if (table["status"] == "singular").any():
        parts.append("status 'singular' = a variance estimated at zero (still a valid test)")
    ok = table.loc[table["status"].isin(USABLE_STATUS), "df"].to_numpy(dtype=float)
    ok = ok[np.isfinite(ok)]
    if ok.size and np.median(ok) < 5:
        parts.append(
            f"the median test has only {np.median(ok):.3g} df: p-values rest on very few replicates, so a very small "
            "p-value is evidence from few donors, not from many cells"
        )
    return f"reading the table: {'; '.join(parts)}."


# ---- the workflow's start-time check of the input ----------------------------------------------------------------
def design_rows(obs, design: str, keys=()):
    """One row per distinct combination of the columns the design and keys may use.

    Rows with a missing value are all kept, so counts of missing values stay true; the checks then cost little on a
    million cells.
    """
    import pandas as pd

    used = [c for c in obs.columns if str(c) in design or c in keys]
    if not used:
        return obs
    missing = obs[used].isna().any(axis=1)
    return pd.concat([obs[~missing].drop_duplicates(subset=used), obs[missing]])


def design_warnings(obs, design: str, contrast, *, factors=()) -> list[str]:
    """Build ``design`` on ``obs`` and its contrasts as the tools do; return the warnings the tools would give.

    Raises the tools' :class:`~scmlm.errors.DesignError` (unknown column, single-level factor, unknown contrast
    level, ...). Rank is not checked: the fits decide estimability per group and name the columns.
    """
    from .errors import EstimabilityError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _build(design_rows(obs, design, [f for f in factors if f]), design, contrast, factors)
        except EstimabilityError:
            pass
    return list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))


def _build(obs, design, contrast, factors) -> None:
    # a frame of its own: build_design warns with the stack level of the tool that calls it
    from .design import build_design, make_contrasts

    d = build_design(obs, design, check_rank=False, factors=[f for f in factors if f])
    make_contrasts(d, contrast)


def design_variables(design: str) -> list[str]:
    """The obs columns a design uses (fixed part, random terms' factors and slopes), in sorted order."""
    import formulaic

    from .design import parse_formula

    parsed = parse_formula(design)
    names = list(formulaic.Formula(parsed.fixed).required_variables)
    for r in parsed.random:
        names += list(r.group)
        if r.lhs not in ("1", "0", "-1"):
            names += list(formulaic.Formula("~ " + r.lhs).required_variables)
    return sorted(dict.fromkeys(names))


def pseudobulk_design_problem(obs, design: str, sample_key: str, groups_key=None) -> str | None:
    """Why a pseudobulk design cannot be fitted after aggregating ``obs`` by the sample key (``None``: it can).

    A design column that varies within the aggregated rows (a condition inside each donor) is not carried by
    :func:`scmlm.pp.pseudobulk`, which would merge its levels.
    """
    keys = [sample_key] + ([groups_key] if groups_key else [])
    for v in design_variables(design):
        if v not in obs.columns or v in keys:
            continue
        n = obs.groupby(keys, observed=True)[v].nunique(dropna=False)
        if (n > 1).any():
            row = n.idxmax()
            return (
                f"design {design!r} uses {v!r}, which varies within the samples of sample_key {sample_key!r} (e.g. "
                f"{row!r} has {int(n.max())} values), so aggregating would merge its levels: set sample_key to a "
                f"column that separates them (e.g. {sample_key}_{v}: obs[{sample_key!r}] + '_' + obs[{v!r}]) or use "
                "method glmm"
            )
    return None


def json_contrast(contrast):
    """A contrast as JSON or YAML gives it (``[factor, level, reference]`` lists) in the form the API reads (tuples).

    One triple, a list of them or of coefficient names, or a mapping name -> one of those.
    """

    def one(c):
        return tuple(c) if isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c) else c

    if isinstance(contrast, dict):
        return {k: one(v) for k, v in contrast.items()}
    if isinstance(contrast, list) and not isinstance(one(contrast), tuple):
        return [one(c) for c in contrast]
    return one(contrast)


def bundled_datasets() -> list[str]:
    """The names of the bundled real datasets (``scmlm dataset NAME``, the workflow's ``create_input.dataset``)."""
    from . import datasets

    return [n for n in datasets.__all__ if not n.startswith("simulate")]


def public_columns(obs) -> list[str]:
    """The obs columns a user wrote (scmlm's own working columns, ``scmlm_*``, left out), for messages."""
    return [str(c) for c in obs.columns if not str(c).startswith("scmlm_")]


COUNT_SAMPLE_ROWS = 2000
"""Rows of the input's count matrix the workflow's start-time check reads (an atlas costs no more than a demo)."""


def counts_sample_problem(path, layer: str | None = None, n_rows: int = COUNT_SAMPLE_ROWS) -> str | None:
    """Why the first ``n_rows`` rows of an .h5ad's counts (``layer``, or ``X``) are not raw counts (``None``: they are).

    Read with h5py (dense, CSR or CSC storage; a CSC matrix by its first stored entries), so an atlas costs a few
    thousand rows; a matrix that cannot be read here is left to the jobs.
    """
    import h5py
    import numpy as np

    where = f"layer {layer!r}" if layer else ".X"
    try:
        with h5py.File(path, "r") as f:
            node = f["layers"][layer] if layer else f["X"]
            if isinstance(node, h5py.Dataset):
                values = node[: min(n_rows, node.shape[0])] if node.ndim else node[()]
            else:
                fmt = str(node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", "")))
                data = node["data"]
                if fmt.startswith("csr"):
                    indptr = node["indptr"]
                    stop = int(indptr[min(n_rows, len(indptr) - 1)])
                else:
                    stop = n_rows * 200
                values = data[: min(stop, data.shape[0])]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    values = np.asarray(values).ravel()
    if values.size == 0 or values.dtype.kind not in "biuf":
        return None
    if values.dtype.kind in "iub":
        bad = values < 0
    else:
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
    if not bad.any():
        return None
    first = values[np.flatnonzero(bad)[0]]
    fix = "set layer to the layer holding the raw counts" + (", or to null to use .X" if layer else " (e.g. counts)")
    return (
        f"{where} must hold raw non-negative integer counts, but its first {n_rows} rows hold {int(bad.sum())} "
        f"negative or non-whole values (e.g. {first!r}); it looks normalised or log-transformed: {fix}"
    )


REPORT_TOOL_KEYS = {
    "glmm": ("family", "offset", "shards"),
    "pseudobulk": ("pb_method", "normalisation"),
    "abundance": ("abundance_method", "cell_type_key"),
}


def report_tool(params: dict, table=None) -> str | None:
    """The method (glmm, pseudobulk or abundance) of an analysis given to the report.

    ``params["method"]``, else the one its parameters or its result table's ``method`` column name (``None``: not
    known).
    """
    if params.get("method"):
        return str(params["method"])
    for tool, keys in REPORT_TOOL_KEYS.items():
        if any(k in params for k in keys):
            return tool
    if table is not None and "method" in getattr(table, "columns", ()):
        methods = {str(m).split("_")[0] for m in table["method"].dropna()}
        if len(methods) == 1:
            m = methods.pop()
            return {"nb": "pseudobulk", "voom": "pseudobulk", "pydeseq2": "pseudobulk"}.get(m, m)
    return None
