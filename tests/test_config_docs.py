"""config/README.md documents exactly the configuration that workflow/schemas/config.schema.yaml accepts.

A key added to the schema without a line in the README (or a README line left after a key was removed), a default
that differs between the two, or a rule missing from the README's list of rule names fails here, so the user-facing
table cannot drift from what the workflow validates.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "config" / "README.md").read_text()
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _tables(text: str) -> list[dict[str, str]]:
    """Markdown tables whose first column is ``key``: {key: rest of the row}, one dict per table, in order."""
    tables, current = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else None
        if cells and cells[0] == "key":
            current = {}
            tables.append(current)
        elif cells and current is not None and not set(cells[0]) <= {"-", ":"}:
            m = re.fullmatch(r"`([^`]+)`", cells[0])
            assert m, f"config/README.md: first cell {cells[0]!r} is not a `key`"
            current[m.group(1)] = " | ".join(cells[1:])
        elif cells is None:
            current = None
    return tables


TOP, ANALYSIS = _tables(README)
TOP_SCHEMA = SCHEMA["properties"]
ANALYSIS_SCHEMA = TOP_SCHEMA["analyses"]["items"]["properties"]


@pytest.mark.parametrize(
    ("documented", "schema", "where"),
    [(TOP, TOP_SCHEMA, "top level"), (ANALYSIS, ANALYSIS_SCHEMA, "each analysis")],
)
def test_readme_lists_every_schema_key(documented, schema, where):
    assert set(documented) == set(schema), (
        f"config/README.md ({where}) and config.schema.yaml differ: only in README "
        f"{sorted(set(documented) - set(schema))}, only in schema {sorted(set(schema) - set(documented))}"
    )


def _render(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


@pytest.mark.parametrize("key", [k for k, v in TOP_SCHEMA.items() if "default" in v])
def test_readme_default_matches_schema(key):
    default_cell = TOP[key].split(" | ")[0]
    assert f"`{_render(TOP_SCHEMA[key]['default'])}`" in default_cell, (
        f"config/README.md gives {key!r} the default {default_cell!r}; the schema says {TOP_SCHEMA[key]['default']!r}"
    )


def test_required_keys_are_marked_required():
    documented = {k for k, row in TOP.items() if row.split(" | ")[0] == "required"}
    assert documented == set(SCHEMA["required"])
    assert {"name", "method", "design", "contrast"} == set(SCHEMA["properties"]["analyses"]["items"]["required"])


def test_readme_names_every_rule():
    rules = {
        m.group(1)
        for f in [REPO / "workflow" / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]
        for m in re.finditer(r"^\s*rule (\w+)\s*:", f.read_text(), flags=re.M)
    } - {"all"}
    listed = set(re.findall(r"`(\w+)`", README.split("Rule names:")[1]))
    assert rules == listed, f"missing in config/README.md: {sorted(rules - listed)}; gone: {sorted(listed - rules)}"
