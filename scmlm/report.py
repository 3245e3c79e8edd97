"""A one-file HTML report a scientist reads: what each analysis found, its top genes, its figures and its methods.

The page is self-contained (figures embedded as base64 PNG, a few lines of JavaScript to sort the tables, no network),
so it can be mailed or opened offline. ``scmlm report`` (and the workflow's ``report_html`` rule) call
:func:`write_report` on result folders; from Python, pass result tables or AnnData objects holding results.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .checks import FEW_DF, FEW_REPLICATES, FEW_REPLICATES_MEANING, few_replicates
from .design import fitted_design as _fitted_design
from .design import one_or_all
from .errors import InputError, ScmlmError
from .pl.files import file_labels, slug

__all__ = ["Analysis", "analysis_from_folder", "fitted_design", "render_report", "summarise", "write_report"]

#: Parameters shown under "Methods", in this order (others follow alphabetically).
_PARAM_ORDER = [
    "tool",
    "method",
    "pb_method",
    "family",
    "design",
    "design_fitted",
    "added_terms",
    "replication_unit",
    "contrast",
    "offset",
    "offset_samples",
    "sample_key",
    "groups_key",
    "layer",
    "estimation",
]
#: Columns of the top-gene tables, when present.
_TOP_COLUMNS = ["gene", "log2fc", "se", "stat", "df", "pvalue", "padj", "base_mean", "status"]
_NUMERIC = {"log2fc", "se", "stat", "df", "pvalue", "padj", "base_mean", "coef"}


@dataclass
class Analysis:
    """One analysis of a report: its name, result table, parameters and figures (PNG paths)."""

    name: str
    table: pd.DataFrame
    params: dict = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    source: Path | None = None  # the result table read, linked from the page when it lies next to it


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")


def analysis_from_folder(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    params: dict | None = None,
    figure_dirs: Sequence[str | os.PathLike] = (),
) -> Analysis:
    """An :class:`Analysis` from a result folder as the workflow writes it.

    ``path`` is a folder holding ``results.csv`` (or ``.tsv``/``.parquet``) and, optionally, ``plots/`` and
    ``hierarchy/`` with PNG figures (``scmlm plot`` and ``scmlm hierarchy``), or a result table itself (with the
    PNG files of the folders ``figure_dirs``). The name defaults to the folder's (or table's) name.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        tables = [folder / f"results.{ext}" for ext in ("csv", "tsv", "parquet")]
        found = [t for t in tables if t.exists()]
        if not found:
            raise InputError(f"result folder {str(path)!r} holds no results.csv (nor .tsv/.parquet).")
        table_path = found[0]
        dirs = [folder / "plots", folder / "hierarchy", *map(Path, figure_dirs)]
    elif path.exists():
        folder, table_path = path.parent, path
        dirs = [Path(d) for d in figure_dirs]
        name = name or path.stem
    else:
        raise InputError(f"result {str(path)!r} does not exist; give a result folder or a result table.")
    table = _read_table(table_path)
    missing = [c for c in ("gene", "group", "contrast", "log2fc", "pvalue", "padj") if c not in table.columns]
    if missing:
        raise InputError(f"{str(table_path)!r} is not a scmlm result table: columns {missing} are missing.")
    for d in dirs[2 if path.is_dir() else 0 :]:
        if not d.is_dir():
            raise InputError(f"figure folder {str(d)!r} does not exist.")
    figures = sorted(p for d in dirs for p in d.glob("*.png"))
    stored = _stored_params(folder / "params.json") if path.is_dir() else {}
    return Analysis(name or folder.name, table, {**stored, **dict(params or {})}, figures, table_path)


def _stored_params(path: Path) -> dict:
    """The ``params.json`` a result folder may hold (``scmlm abundance --out-params``: the fitted design)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{str(path)!r} is not valid JSON ({err}); delete it or write it again.") from None
    if not isinstance(value, dict):
        raise InputError(f"{str(path)!r} must hold a JSON object of parameters, not {type(value).__name__}.")
    return value


def _as_analysis(name: str, value) -> Analysis:
    if isinstance(value, Analysis):
        return value
    if isinstance(value, pd.DataFrame):
        return Analysis(name, value)
    if isinstance(value, str | os.PathLike):
        return analysis_from_folder(value, name=name)
    uns = getattr(value, "uns", None)
    if uns is not None:  # (adata, key) is passed as a tuple; a bare AnnData must hold exactly one result
        keys = [k for k, v in uns.items() if isinstance(v, Mapping) and "results" in v]
        if len(keys) != 1:
            raise InputError(f"analysis {name!r}: the AnnData holds results under {keys}; pass (adata, key).")
        value = (value, keys[0])
    if isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "uns"):
        adata, key = value
        if key not in adata.uns or "results" not in adata.uns[key]:
            raise InputError(f"analysis {name!r}: no result under adata.uns[{key!r}].")
        entry = adata.uns[key]
        table = entry["results"]
        return Analysis(name, pd.DataFrame(table), dict(entry.get("params", {})))
    raise InputError(
        f"analysis {name!r}: expected an Analysis, a result DataFrame, a result folder, an AnnData or (adata, key); "
        f"got {type(value).__name__}."
    )


def fitted_design(
    obs: pd.DataFrame,
    design: str,
    contrast,
    *,
    groups_key: str | None = None,
    sample_key: str | None = None,
    replication: str = "auto",
) -> str | dict[str, str]:
    """The design ``tl.glmm_de`` fits for these cells: ``design``, plus the sample-level term a paired contrast needs.

    Read from the cells' obs only (no counts), per group when ``groups_key`` is given, with
    :func:`scmlm.design.fitted_design`; one formula when every group fits the same, else ``{group: formula}``. A group
    whose design cannot be built is left out.
    """
    contrast = tuple(contrast) if isinstance(contrast, list) else contrast
    if groups_key is None:
        parts = {"all": obs}
    else:
        parts = {str(g): sub for g, sub in obs.groupby(groups_key, observed=True, sort=True)}
    formulas = {}
    for group, sub in parts.items():
        try:
            fitted = _fitted_design(sub, design, contrast, sample_key=sample_key, replication=replication)
        except ScmlmError:
            continue
        formulas[group] = fitted.formula
    return one_or_all(formulas, design)


# ---------------------------------------------------------------- numbers


def summarise(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Genes per group and contrast: in the table, tested (a p-value), called (``padj < alpha``), up and down."""
    df = table.copy()
    df["group"] = df["group"].astype(object).where(df["group"].notna(), "all").astype(str)
    df["contrast"] = df["contrast"].astype(str)
    rows = []
    for (group, contrast), sub in df.groupby(["group", "contrast"], sort=False):
        padj = pd.to_numeric(sub["padj"], errors="coerce")
        lfc = pd.to_numeric(sub["log2fc"], errors="coerce")
        called = padj < alpha
        rows.append(
            {
                "group": group,
                "contrast": contrast,
                "n_genes": len(sub),
                "n_tested": int(pd.to_numeric(sub["pvalue"], errors="coerce").notna().sum()),
                "n_called": int(called.sum()),
                "n_up": int((called & (lfc > 0)).sum()),
                "n_down": int((called & (lfc < 0)).sum()),
            }
        )
    return pd.DataFrame(rows, columns=["group", "contrast", "n_genes", "n_tested", "n_called", "n_up", "n_down"])


def _top(sub: pd.DataFrame, n: int) -> pd.DataFrame:
    tested = sub[pd.to_numeric(sub["pvalue"], errors="coerce").notna()].copy()
    tested["_p"] = pd.to_numeric(tested["pvalue"], errors="coerce")
    tested["_s"] = -pd.to_numeric(tested.get("stat", np.nan), errors="coerce").abs()
    top = tested.sort_values(["_p", "_s"], kind="stable").head(n)
    return top[[c for c in _TOP_COLUMNS if c in top.columns]]


def _fmt(value, col: str) -> tuple[str, str]:
    """Display text and sort key of a cell."""
    if col in _NUMERIC:
        try:
            x = float(value)
        except (TypeError, ValueError):
            return html.escape(str(value)), ""
        if not math.isfinite(x):
            return "NA", ""
        if col in ("pvalue", "padj"):
            text = f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"
        elif col == "base_mean":
            text = f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        else:
            text = f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"
        return text, repr(x)
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return html.escape(text), html.escape(text)


# ---------------------------------------------------------------- differential abundance

#: Columns of an abundance analysis' tables: every cell type, in the order of the result.
_ABUNDANCE_COLUMNS = ["cell type", "coef", "se", "df", "pvalue", "padj", "status"]
_ABUNDANCE_NOTE = (
    "Composition is relative: the shares of a sample sum to one, so a change in one cell type shifts the others' "
    "proportions even when their numbers of cells do not change. Read the CLR method (centred log-ratios, each type "
    "against the geometric mean of all types) as the reference-free check, and a significant type next to the types "
    "with the largest effects."
)


def _is_abundance(analysis: Analysis) -> bool:
    """Whether an analysis is a differential abundance test of cell types (``tl.abundance_de``, ``scmlm abundance``)."""
    if str(analysis.params.get("tool", "")) == "abundance_de" or str(analysis.params.get("method", "")) == "abundance":
        return True
    methods = analysis.table["method"].dropna().astype(str) if "method" in analysis.table else pd.Series(dtype=str)
    return bool(len(methods)) and bool(methods.str.startswith("abundance_").all())


def _abundance_section(a: Analysis, s: pd.DataFrame, anchors: dict, alpha: float, csv_link: str) -> list[str]:
    """An abundance analysis: the fitted design, the relative-composition caveat, one table of types per contrast."""
    parts = []
    fitted, added = a.params.get("design_fitted"), a.params.get("added_terms")
    if fitted:
        terms = ", ".join(map(str, added)) if isinstance(added, list | tuple) else str(added or "")
        parts.append(
            f'<p class="abundance-design">Fitted design: <code>{_e(fitted)}</code>; added terms: '
            f"{_e(terms) if terms else 'none'}.</p>"
        )
    parts.append(f'<p class="note abundance-note">{_e(_ABUNDANCE_NOTE)}</p>')
    table = a.table.copy()
    table["group"] = table["group"].astype(object).where(table["group"].notna(), "all").astype(str)
    table["contrast"] = table["contrast"].astype(str)
    for r in s.itertuples(index=False):
        sub = table[(table["group"] == r.group) & (table["contrast"] == r.contrast)].rename(
            columns={"gene": "cell type"}
        )
        parts.append(f'<h3 id="{anchors[(a.name, r.group, r.contrast)]}">{_e(a.name)} · {_e(r.contrast)}</h3>')
        parts.append(
            f'<p class="counts">{r.n_tested} of {r.n_genes} cell types tested; <b>{r.n_called}</b> changed at padj '
            f"&lt; {alpha:g}: <b>{r.n_up}</b> up, <b>{r.n_down}</b> down.</p>"
        )
        shown = sub[[c for c in _ABUNDANCE_COLUMNS if c in sub.columns]]
        parts.append(_collapsed(_table(shown), len(shown), "All cell types", csv_link))
    if a.figures:
        figs = sorted(a.figures, key=lambda p: (not Path(p).name.startswith("composition"), Path(p).name))
        parts.append(_figures(figs))
    return parts


# ---------------------------------------------------------------- HTML pieces

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:36px 0 8px;padding-top:12px;border-top:2px solid #d9dee7}
h3{font-size:16px;margin:26px 0 6px}.sub{color:#5b6577;margin:0 0 18px}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid #e4e8ef;text-align:left;white-space:nowrap}
th{background:#eef1f6;position:sticky;top:0}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#9aa3b2}
table.sortable th.asc:after{content:" \\2191";color:#1d2330}
table.sortable th.desc:after{content:" \\2193";color:#1d2330}
td.up{color:#b42318}td.down{color:#175cd3}.called{font-weight:600}
dl.params{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0 10px}
dl.params dt{color:#5b6577}dl.params dd{margin:0;font-family:ui-monospace,Menlo,monospace;font-size:12.5px}
.figs{display:flex;flex-wrap:wrap;gap:10px}.figs figure{margin:0;background:#fff;border:1px solid #e4e8ef;padding:6px}
.figs img{max-width:100%;height:auto;display:block}.figs figcaption{font-size:11.5px;color:#5b6577}
.figs figure{max-width:calc(50% - 24px)}details{margin:6px 0 10px}summary{cursor:pointer;color:#175cd3}
.note{color:#5b6577;font-size:12.5px}a{color:#175cd3}nav a{margin-right:12px}
.banner{background:#fff4e5;border:1px solid #f79009;border-left:6px solid #f79009;padding:8px 12px;margin:10px 0}
.banner ul{margin:4px 0 0 18px;padding:0}
"""

# Sort a table by a header click: numeric cells carry their value in data-v (empty: NA, always last).
_JS = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.querySelectorAll("th").forEach(function (th, i) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc"), body = t.tBodies[0], num = th.classList.contains("n");
      t.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i].getAttribute("data-v"), y = b.cells[i].getAttribute("data-v");
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var d = num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(df: pd.DataFrame, *, cls: str = "sortable") -> str:
    head = "".join(f'<th class="n">{_e(c)}</th>' if c in _NUMERIC else f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            text, key = _fmt(row[c], c)
            klass = "n" if c in _NUMERIC else ""
            if c == "log2fc" and key:
                klass += " up" if float(key) > 0 else " down"
            cells.append(f'<td class="{klass.strip()}" data-v="{key}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _count_table(summary: pd.DataFrame, anchors: dict[tuple[str, str, str], str], alpha: float) -> str:
    cols = ["analysis", "method", "group", "contrast", "of", "in table", "tested", f"called (padj < {alpha:g})", "up",
            "down"]  # fmt: skip
    head = "".join(
        f'<th class="n">{_e(c)}</th>' if c in ("in table", "tested", "up", "down") or c.startswith("called") else
        f"<th>{_e(c)}</th>"
        for c in cols
    )  # fmt: skip
    rows = []
    for r in summary.itertuples(index=False):
        anchor = anchors[(r.analysis, r.group, r.contrast)]
        cells = [
            f'<td data-v="{_e(r.analysis)}">{_e(r.analysis)}</td>',
            f'<td data-v="{_e(r.method)}">{_e(r.method)}</td>',
            f'<td data-v="{_e(r.group)}"><a href="#{anchor}">{_e(r.group)}</a></td>',
            f'<td data-v="{_e(r.contrast)}">{_e(r.contrast)}</td>',
            f'<td data-v="{_e(r.unit)}">{_e(r.unit)}</td>',
        ]
        for value, cls in ((r.n_genes, "n"), (r.n_tested, "n"), (r.n_called, "n called"), (r.n_up, "n up"),
                           (r.n_down, "n down")):  # fmt: skip
            cells.append(f'<td class="{cls}" data-v="{value}">{value}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable" id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _params(params: dict) -> str:
    keys = [k for k in _PARAM_ORDER if k in params] + sorted(k for k in params if k not in _PARAM_ORDER)
    items = []
    for k in keys:
        v = params[k]
        if v is None or (isinstance(v, str | list | tuple | dict) and len(v) == 0):
            continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, list | tuple):
            v = ", ".join(map(str, v)) if all(not isinstance(x, list | tuple | dict) for x in v) else json.dumps(v)
        elif isinstance(v, dict):
            v = json.dumps(v, default=str)
        items.append(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>")
    if not items:
        return '<p class="note">No parameters recorded.</p>'
    return '<dl class="params">' + "".join(items) + "</dl>"


#: Display width of an embedded figure (CSS pixels); the image is never wider than its column either.
FIGURE_WIDTH = 420
#: Tables with more rows than this are collapsed under a <details> summary line.
COLLAPSE_ROWS = 10


def _compact_png(raw: bytes) -> bytes:
    """The PNG as a 256-colour palette image (plots have few colours: about a third of the bytes), if smaller."""
    try:
        from io import BytesIO

        from PIL import Image  # a dependency of matplotlib

        with Image.open(BytesIO(raw)) as img:
            img.load()
            out = BytesIO()
            img.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)
    except Exception:  # noqa: BLE001 - an image PIL cannot read is embedded as it is
        return raw
    return out.getvalue() if len(out.getvalue()) < len(raw) else raw


def _png_width(raw: bytes) -> int | None:
    """Pixel width from a PNG header (``None`` if the bytes are not a PNG)."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or len(raw) < 24:
        return None
    return int.from_bytes(raw[16:20], "big")


def _figure(path: Path) -> str:
    raw = Path(path).read_bytes()
    width = min(_png_width(raw) or FIGURE_WIDTH, FIGURE_WIDTH)
    data = base64.b64encode(_compact_png(raw)).decode("ascii")
    name = _e(Path(path).name)
    return (
        f'<figure><img alt="{name}" width="{width}" loading="lazy" src="data:image/png;base64,{data}">'
        f"<figcaption>{name}</figcaption></figure>"
    )


def _figures(paths: Sequence[Path], *, shown: int = 2) -> str:
    """The first ``shown`` figures side by side, the others collapsed under a summary line."""
    if not paths:
        return ""
    out = '<div class="figs">' + "".join(_figure(p) for p in paths[:shown]) + "</div>"
    if len(paths) > shown:
        more = paths[shown:]
        out += (
            f"<details><summary>{len(more)} more figure{'s' if len(more) > 1 else ''}</summary>"
            '<div class="figs">' + "".join(_figure(p) for p in more) + "</div></details>"
        )
    return out


def _collapsed(html_table: str, n_rows: int, what: str, csv_link: str = "") -> str:
    """A table of more than ``COLLAPSE_ROWS`` rows under a summary line (open it to read, click to sort)."""
    if n_rows <= COLLAPSE_ROWS:
        return html_table + csv_link
    return f"<details><summary>{_e(what)} ({n_rows} rows)</summary>{html_table}</details>{csv_link}"


def _figures_by_group(figures: list[Path], combos: list[tuple[str, str]]) -> tuple[dict, list[Path]]:
    """Assign each PNG to the (group, contrast) it shows, by the file-name labels the plot commands use.

    ``scmlm plot`` writes ``<kind>__<label of "group__contrast">.png``; ``scmlm hierarchy`` writes
    ``<kind>__<label of group>.png`` and ``shrinkage__<label of "gene__group">.png``. Figures that match no group
    (e.g. one fitted without groups) are returned apart.
    """
    pair_label = file_labels(f"{g}__{c}" for g, c in combos)
    groups = list(dict.fromkeys(g for g, _ in combos))
    group_label = file_labels(groups)
    out: dict[tuple[str, str], list[Path]] = {combo: [] for combo in combos}
    rest = []
    for path in figures:
        stem = Path(path).stem
        owner = None
        for g, c in combos:  # exact plot names first
            if stem.endswith("__" + pair_label[f"{g}__{c}"]):
                owner = (g, c)
                break
        if owner is None:
            # longest group label first, so "T-NK" is not taken for "NK"
            for g in sorted(groups, key=lambda x: -len(group_label[x])):
                lab = group_label[g]
                if stem.endswith("__" + lab) or stem.endswith("__" + slug(g)):
                    owner = next(combo for combo in combos if combo[0] == g)
                    break
        (out[owner] if owner else rest).append(path)
    for paths in [*out.values(), rest]:
        paths.sort(key=_figure_order)
    return out, rest


_KINDS = ["volcano", "ma", "pvalue_hist", "qq", "variance_partition", "icc", "shrinkage"]


def _figure_order(path: Path) -> tuple[int, str]:
    """Volcano first, then the other result plots, then the hierarchy; by name within a kind."""
    kind = Path(path).stem.split("__")[0]
    return (_KINDS.index(kind) if kind in _KINDS else len(_KINDS), Path(path).name)


READING_GUIDE = (
    "<b>df</b> is the degrees of freedom of a test: for a contrast between donors about the number of donors minus "
    "the donor-level coefficients, whatever the number of cells. <b>df_prior</b> (moderated tests) is the df "
    "borrowed from the other genes by empirical Bayes; the test uses df + df_prior. Status <b>singular</b> is a fit "
    "with a variance estimated at zero; its test is valid. A very small p-value from few donors rests on very few "
    f"replicates: it says these donors differ, not that the effect will replicate in other donors. Analyses with "
    f"fewer than {FEW_REPLICATES} donors (units of replication) at a contrast level, or a median df of at most "
    f"{FEW_DF}, are flagged below (README, 'Reading a result')."
)


def _few_replicates(a: Analysis) -> list[str]:
    """Why an analysis rests on very few replicates, per group and contrast (df) and per contrast level (units)."""
    table = a.table.copy()
    table["group"] = table["group"].astype(object).where(table["group"].notna(), "all").astype(str)
    reasons = []
    for (group, contrast), sub in table.groupby(["group", "contrast"], sort=False):
        reasons += [f"{group} · {contrast}: {r}" for r in few_replicates(sub)]
    units = a.params.get("units_per_level")
    return reasons + few_replicates(table.iloc[:0], units if isinstance(units, Mapping) else None)


def _banner(reasons: list[str]) -> str:
    items = "".join(f"<li>{_e(r)}</li>" for r in reasons)
    return (
        '<div class="banner" role="alert"><b>Evidence from very few replicates.</b> '
        f"{_e(FEW_REPLICATES_MEANING[0].upper() + FEW_REPLICATES_MEANING[1:])}.<ul>{items}</ul></div>"
    )


def _csv_link(a: Analysis, folder) -> str:
    """A link to the analysis' full result table, when it lies inside the report's folder (moves with it)."""
    if a.source is None or folder is None:
        return ""
    table, folder = Path(a.source).resolve(), Path(folder).resolve()
    if not table.is_relative_to(folder):
        return ""
    href = _e(table.relative_to(folder).as_posix())
    return f'<p class="note">Every row: <a href="{href}">{href}</a>.</p>'


def _anchor(*parts: str) -> str:
    return "s-" + "--".join(slug(p) for p in parts)


def render_report(
    analyses: Sequence[Analysis],
    *,
    title: str = "scmlm results",
    alpha: float = 0.05,
    n_top: int = 20,
    description: str | None = None,
    links_from: str | os.PathLike | None = None,
) -> str:
    """The HTML text of the report (see :func:`write_report`).

    ``links_from``: the folder the page will be written to; a result table inside it is linked from the page.
    """
    if not analyses:
        raise InputError("the report needs at least one analysis.")
    names = [a.name for a in analyses]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"analysis names must be unique; repeated: {dup}.")
    summaries, anchors = [], {}
    used: set[str] = set()
    for a in analyses:
        s = summarise(a.table, alpha=alpha)
        s.insert(0, "analysis", a.name)
        method = a.table["method"].dropna().astype(str).unique() if "method" in a.table else []
        s.insert(1, "method", ", ".join(method) or str(a.params.get("method", "")))
        s["unit"] = "cell types" if _is_abundance(a) else "genes"  # what a row of the analysis' table is
        summaries.append(s)
        for r in s.itertuples(index=False):
            anchor = _anchor(a.name, r.group, r.contrast)
            while anchor in used:  # labels that slug alike stay apart
                anchor += "_"
            used.add(anchor)
            anchors[(a.name, r.group, r.contrast)] = anchor
    summary = pd.concat(summaries, ignore_index=True)

    from . import __version__  # at call time: the package has finished importing

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">scmlm {_e(__version__)} · {len(analyses)} analyses · called at padj &lt; {alpha:g} '
        "(Benjamini–Hochberg within each group and contrast)</p>",
    ]
    if description:
        parts.append(f"<p>{_e(description)}</p>")
    parts.append("<nav>" + "".join(f'<a href="#{_anchor(a.name)}">{_e(a.name)}</a>' for a in analyses) + "</nav>")
    flagged = {a.name: _few_replicates(a) for a in analyses}
    flagged = {k: v for k, v in flagged.items() if v}
    if flagged:
        links = ", ".join(f'<a href="#{_anchor(n)}">{_e(n)}</a>' for n in flagged)
        parts.append(
            f'<div class="banner" role="alert" id="few-replicates"><b>Evidence from very few replicates</b> in '
            f"{links}: a very small p-value there says that these few donors differ, not that the effect will "
            "replicate in other donors (see each analysis).</div>"
        )
    parts.append(f'<details class="guide"><summary>Reading the numbers: df, df_prior, singular, small p-values from '
                 f'few donors</summary><p class="note">{READING_GUIDE}</p></details>')  # fmt: skip
    parts.append('<h2 id="summary-title">What was found</h2>')
    parts.append(
        '<p class="note">One row per analysis, group and contrast: what its rows are (genes, or cell types for a '
        "differential abundance analysis), how many the table holds, how many were tested (with a p-value) and "
        "called, and of those up (log2FC &gt; 0) or down. Click a column to sort, a group to see its top genes and "
        "figures.</p>"
    )
    parts.append(_count_table(summary, anchors, alpha))

    for a in analyses:
        parts.append(f'<h2 id="{_anchor(a.name)}">{_e(a.name)}</h2>')
        if a.name in flagged:
            parts.append(_banner(flagged[a.name]))
        parts.append("<h3>Methods</h3>" + _params(a.params))
        csv_link = _csv_link(a, links_from)
        s = summary[summary["analysis"] == a.name]
        if _is_abundance(a):
            parts += _abundance_section(a, s, anchors, alpha, csv_link)
            continue
        combos = list(zip(s["group"], s["contrast"], strict=True))
        figs, rest = _figures_by_group(list(a.figures), combos)
        table = a.table.copy()
        table["group"] = table["group"].astype(object).where(table["group"].notna(), "all").astype(str)
        table["contrast"] = table["contrast"].astype(str)
        for r in s.itertuples(index=False):
            sub = table[(table["group"] == r.group) & (table["contrast"] == r.contrast)]
            parts.append(
                f'<h3 id="{anchors[(a.name, r.group, r.contrast)]}">{_e(a.name)} · {_e(r.group)} · '
                f"{_e(r.contrast)}</h3>"
            )
            parts.append(
                f'<p class="counts">{r.n_tested} of {r.n_genes} genes tested; <b>{r.n_called}</b> called at padj &lt; '
                f"{alpha:g}: <b>{r.n_up}</b> up, <b>{r.n_down}</b> down.</p>"
            )
            top = _top(sub, n_top)
            if len(top):
                parts.append(f'<p class="note">Top {len(top)} genes by p-value (click a column to sort).</p>')
                parts.append(_collapsed(_table(top), len(top), f"Top {len(top)} genes", csv_link))
            else:
                parts.append('<p class="note">No gene was tested in this group.</p>')
            parts.append(_figures(figs[(r.group, r.contrast)]))
        if rest:
            parts.append("<h3>Other figures</h3>")
            parts.append(_figures(rest))
    parts.append(f"<script>{_JS}</script></main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    path: str | os.PathLike,
    analyses: Mapping[str, object] | Sequence[Analysis],
    *,
    title: str = "scmlm results",
    alpha: float = 0.05,
    n_top: int = 20,
    description: str | None = None,
) -> Path:
    """Write one self-contained HTML page summarising DE analyses, atomically.

    The page opens on a table of every analysis, group and contrast with the number of genes tested and called
    (``padj < alpha``), split into up and down; each group then has its top genes as a sortable table and its
    figures (embedded PNGs), and each analysis its parameters (design, fitted design, contrast, offset, method).
    To keep the page light, figures are embedded as 256-colour PNGs shown at most ``FIGURE_WIDTH`` pixels wide (two
    per group open, the others under "more figures"), tables of more than ``COLLAPSE_ROWS`` rows are collapsed, and
    a result table lying inside the report's folder is linked (every row).
    All names (analyses, groups, genes) are HTML-escaped, so labels such as ``"CD14+ Monocytes"`` or ``"T/NK"`` are
    safe.

    Parameters
    ----------
    path
        The HTML file to write.
    analyses
        ``{name: value}`` where a value is a result folder (``results.csv`` with ``plots/`` and ``hierarchy/``,
        as the workflow writes), a result DataFrame, an AnnData holding one result, ``(adata, key)``, or an
        :class:`Analysis`; or a list of :class:`Analysis`.
    title
        Heading of the page.
    alpha
        Threshold on ``padj`` for a gene to count as called.
    n_top
        Genes per group in the top-gene tables (smallest p-values).
    description
        A paragraph under the title (e.g. the data set).

    Returns
    -------
    The path written.

    Examples
    --------
    >>> import tempfile, scmlm
    >>> pb = scmlm.pp.pseudobulk(scmlm.datasets.simulate(n_donors=6, n_cells=30, n_genes=60, seed=1), "donor",
    ...                          layer="counts")
    >>> scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"))
    >>> out = scmlm.report.write_report(tempfile.mkdtemp() + "/report.html", {"pb": (pb, "pseudobulk_de")})
    >>> "What was found" in out.read_text()
    True
    """
    if isinstance(analyses, Mapping):
        items = [_as_analysis(str(k), v) for k, v in analyses.items()]
    else:
        items = [_as_analysis(getattr(a, "name", str(i)), a) for i, a in enumerate(analyses)]
    path = Path(path)
    text = render_report(
        items, title=title, alpha=alpha, n_top=n_top, description=description, links_from=path.resolve().parent
    )
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
