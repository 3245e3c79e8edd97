"""Structural rules of the package, checked so that ``docs/architecture.md`` cannot drift from the code.

The rule: AnnData stops at ``pp``/``tl``/``pl``/``get``; ``design/`` speaks DataFrames; ``models/`` speaks ndarrays
and named records and is exported through ``scmlm.models.__all__``; kernels take named records; lower layers never
import upper ones; each concept is defined once. Every import counts, function-level ones included.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "scmlm"
WORKFLOW = ROOT / "workflow"

LOWER = ("io", "results", "engine", "design", "models", "get")
UPPER = ("tl", "pp", "pl", "cli", "report")
MAX_LINES = 1000
MAX_POSITIONAL = 8


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """Every import of a file (module level and inside functions): (absolute module, imported names, line)."""
    name = _module_name(path) if path.is_relative_to(PKG) else ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out.extend((a.name, (), node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, tuple(a.name for a in node.names), node.lineno))
    return out


def _targets(mod: str, names: tuple[str, ...]) -> set[str]:
    """The scmlm modules an import statement loads (a ``from pkg import submodule`` loads the submodule too)."""
    mods = _modules()
    found = set()
    if mod in mods:
        found.add(mod)
    for n in names:
        if f"{mod}.{n}" in mods:
            found.add(f"{mod}.{n}")
    return found


@cache
def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, path in _modules().items():
        edges = set()
        for imported, names, _ in _imports(path):
            edges |= _targets(imported, names)
        # importing a submodule runs its parent packages' __init__ first
        for e in list(edges):
            parts = e.split(".")
            edges |= {".".join(parts[:k]) for k in range(2, len(parts))}
        edges.discard(mod)
        graph[mod] = {e for e in edges if not mod.startswith(e + ".")}
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_lower_layers_never_import_upper_ones():
    bad = []
    for mod, path in _modules().items():
        if _layer(mod) not in LOWER:
            continue
        for imported, names, line in _imports(path):
            for t in _targets(imported, names) | ({imported} if imported.startswith("scmlm.") else set()):
                if _layer(t) in UPPER:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def test_models_import_neither_pandas_nor_anndata():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for mod, path in _modules().items()
        if _layer(mod) == "models"
        for imported, _, line in _imports(path)
        if imported.split(".")[0] in ("pandas", "anndata", "scanpy")
    ]
    assert not bad, "\n".join(bad)


def _outside_files():
    files = [p for m, p in _modules().items() if _layer(m) != "models"]
    return files + sorted((WORKFLOW / "scripts").glob("*.py"))


def test_outside_models_only_public_model_names():
    import scmlm.models

    public = set(scmlm.models.__all__)
    bad = []
    for path in _outside_files():
        for imported, names, line in _imports(path):
            if imported.startswith("scmlm.models."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the private module {imported}")
            elif imported == "scmlm.models":
                bad += [
                    f"{path.relative_to(ROOT)}:{line} imports {n}, not in scmlm.models.__all__"
                    for n in names
                    if n not in public
                ]
    assert not bad, "\n".join(bad)


def test_models_exports_the_fitters():
    import scmlm.models

    fitters = {
        "prepare_glmm", "fit_glmm", "glmm_contrast", "glmm_wald_f", "glmm_lrt", "moderate",
        "nb_ql", "nb_ql_multi", "voom_limma", "voom_limma_multi", "dream", "tmm_factors",
        "fit_gee", "fit_unpooled", "squeeze_var",
    }  # fmt: skip
    missing = fitters - set(scmlm.models.__all__)
    assert not missing, f"scmlm.models.__all__ lacks {sorted(missing)}"
    for name in scmlm.models.__all__:
        obj = getattr(scmlm.models, name)
        where = getattr(obj, "__module__", "scmlm.models") or "scmlm.models"
        assert where.startswith("scmlm.models"), f"scmlm.models.{name} is defined in {where}, outside models"


def test_cli_report_and_workflow_use_public_names_only():
    files = [PKG / "cli.py", PKG / "checks.py", PKG / "report.py", PKG / "_warmup.py"]
    files += sorted((WORKFLOW / "scripts").glob("*.py"))
    bad = []
    for path in files:
        if not path.exists():
            continue
        for imported, names, line in _imports(path):
            if not imported.startswith("scmlm"):
                continue
            private = [p for p in imported.split(".") if p.startswith("_")]
            private += [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses the private {private} of {imported}")
    assert not bad, "\n".join(bad)


def test_workflow_rules_use_public_names_only():
    """The Snakemake rules (not Python files, so read line by line) import only public scmlm names."""
    import re

    pattern = re.compile(r"^\s*(?:from\s+(scmlm[\w.]*)\s+import\s+([\w, ()]+)|import\s+(scmlm[\w.]*))")
    bad = []
    for path in sorted((WORKFLOW / "rules").glob("*.smk")) + [WORKFLOW / "Snakefile"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = pattern.match(line)
            if not m:
                continue
            module = m.group(1) or m.group(3)
            names = [n.strip(" ()") for n in (m.group(2) or "").split(",") if n.strip(" ()")]
            if any(p.startswith("_") for p in module.split(".")) or any(n.startswith("_") for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_no_module_over_the_line_limit():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_models_functions_take_few_positional_arguments():
    bad = []
    for mod, path in _modules().items():
        if _layer(mod) != "models":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = len(node.args.posonlyargs) + len(node.args.args)
                if n > MAX_POSITIONAL:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} takes {n} positional arguments")
    assert not bad, "\n".join(bad)


def test_kernel_containers_are_read_by_name():
    """A kernel container (a tuple of arrays) is read by field name, never as ``dz[5][:, 8]`` or ``ws[5][2]``.

    Caught: an integer index on a subscript whose own index is an integer (a container of arrays read by
    position), and integer reads of the names the kernels used for their tuples."""
    tuple_names = {"dz", "ws", "gd", "cf", "cfs", "kernel_arrays"}
    bad = []
    for mod, path in _modules().items():
        if _layer(mod) != "models":
            continue
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Subscript):
                continue
            inner = node.value
            int_index = isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)
            nested = (
                isinstance(inner, ast.Subscript)
                and isinstance(inner.slice, ast.Constant)
                and isinstance(inner.slice.value, int)
            )
            named = (isinstance(inner, ast.Name) and inner.id in tuple_names) or (
                isinstance(inner, ast.Attribute) and inner.attr in tuple_names
            )
            if nested or (named and int_index):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, f"{len(bad)} positional reads of kernel containers:\n" + "\n".join(bad[:30])


def _string_collections(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            vals = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(vals) == len(node.elts) and vals:
                yield node.lineno, set(vals)


def test_each_concept_is_defined_once():
    families = {"nb", "poisson", "binomial"}
    usable = {"ok", "singular"}
    bad = []
    for mod, path in _modules().items():
        for line, vals in _string_collections(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if families <= vals:
                bad.append(f"{where}: a list of family names ({sorted(vals)}); use scmlm.models.FAMILY_NAMES")
            if vals == usable and mod != "scmlm.models":
                bad.append(f"{where}: the usable statuses; use scmlm.models.USABLE_STATUS")
        text = path.read_text()
        if "NB, POISSON, BINOMIAL, GAUSSIAN = " in text and mod != "scmlm.models._families":
            bad.append(f"{path.relative_to(ROOT)}: family codes defined again")
    assert not bad, "\n".join(bad)


TL_TOOLS = ("pseudobulk_de", "glmm_de", "gee_de", "variance_partition", "random_effects", "abundance_de")


@pytest.mark.parametrize("name", TL_TOOLS)
def test_tl_tools_follow_the_sibling_convention(name):
    import inspect

    import scmlm

    sig = inspect.signature(getattr(scmlm.tl, name))
    params = list(sig.parameters.values())
    assert params[0].name == "adata", f"{name}: first argument {params[0].name!r}, not 'adata'"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name}: {len(positional)} positional arguments"
    assert all(p.default is inspect.Parameter.empty for p in positional), f"{name}: optional positionals"
    for kw in ("key_added", "inplace", "copy"):
        assert kw in sig.parameters, f"{name}: no {kw!r} argument"
        assert sig.parameters[kw].kind == inspect.Parameter.KEYWORD_ONLY, f"{name}: {kw!r} is not keyword-only"
