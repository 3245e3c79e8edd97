"""The ``scmlm`` command line: what the Snakemake rules and cluster batch jobs call.

Every command writes its outputs atomically and exits with status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings
from pathlib import Path

from . import __version__
from .checks import (
    CONTRAST_HELP,
    FEW_REPLICATES_MEANING,
    bundled_datasets,
    check_contrast_levels,
    check_h5ad_path,
    check_outdir,
    check_outputs,
    contrast_arg,
    contrast_item,
    few_replicates,
    json_contrast,
    reading_guide,
    renamed_option,
    replicates,
    report_tool,
)
from .errors import ScmlmError
from .models import FAMILY_NAMES, USABLE_STATUS

log = logging.getLogger("scmlm")


def _add_common_de(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="cell-level or pseudobulk .h5ad")
    p.add_argument("--design", required=True, help='model formula, e.g. "~ condition + (1|donor)"')
    p.add_argument("--contrast", required=True, type=contrast_item, action="append", help=CONTRAST_HELP)
    p.add_argument("--groups-key", default=None, help="obs column: one fit per group (e.g. cell_type)")
    p.add_argument("--layer", default=None, help="layer with raw counts (default .X)")
    p.add_argument("--out", required=True, help="result table (.csv, .tsv or .parquet)")
    p.add_argument("--out-h5ad", default=None, help="also write the AnnData with the result in .uns")
    p.add_argument("--key-added", default=None, help="uns key of the result")
    p.add_argument("--n-jobs", type=int, default=None, help="worker processes (default 1; -1 = all cores)")


def _pb_method(text: str) -> str:
    """A ``--method`` value: the pseudobulk method; the tool, which ``--method`` once named, is ``--tool``."""
    if text in ("pseudobulk", "glmm"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is a tool: choose it with --tool {text}; --method names the pseudobulk method (nb_ql, voom, "
            "pydeseq2), as pseudobulk_de's method= does"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """Build the ``scmlm`` argument parser with one subcommand per tool (``scmlm --help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog="scmlm",
        description="Multilevel models for multi-donor single-cell data: pseudobulk DE, cell-level GLMMs, workflow.",
    )
    parser.add_argument("--version", action="version", version=f"scmlm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: progress bars)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate multi-donor NB counts with known truth → .h5ad")
    p.add_argument("out", help="output .h5ad")
    p.add_argument("--n-donors", type=int, default=10)
    p.add_argument("--n-cells", type=int, default=400, help="cells per donor")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-batches", type=int, default=3)
    p.add_argument("--design", choices=["between", "within"], default="between")
    p.add_argument("--frac-de", type=float, default=0.1)
    p.add_argument("--n-cell-types", type=int, default=1)
    p.add_argument("--null", action="store_true", help="no differential expression")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("dataset", help="write a bundled real dataset to .h5ad")
    p.add_argument("name", choices=bundled_datasets())
    p.add_argument("out", help="output .h5ad")

    p = sub.add_parser("pseudobulk", help="sum counts per sample (× group) → pseudobulk .h5ad")
    p.add_argument("input", help="cell-level .h5ad (read backed, streamed in row chunks)")
    p.add_argument("out", help="output .h5ad")
    p.add_argument("--sample-key", required=True)
    p.add_argument("--groups-key", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--min-cells", type=int, default=1)

    p = sub.add_parser("de", help="differential expression: pseudobulk (edgeR-QL / voom) or cell-level GLMM")
    _add_common_de(p)
    p.add_argument(
        "--tool", choices=["pseudobulk", "glmm"], required=True, help="pseudobulk_de (pseudobulk) or glmm_de (glmm)"
    )
    p.add_argument(
        "--method",
        type=_pb_method,
        choices=["nb_ql", "voom", "pydeseq2"],
        default=None,
        help="pseudobulk: edgeR-style QL (nb_ql), limma-voom / dream (voom) or PyDESeq2, as pseudobulk_de's method=",
    )
    p.add_argument("--family", choices=FAMILY_NAMES, default=None, help="glmm: response family (default nb)")
    p.add_argument(
        "--sample-key",
        default=None,
        help="the obs column naming the sample. pseudobulk: needed (and the input aggregated by it first) when the "
        "input is cell-level; glmm: the unit of replication of a paired contrast and of the TMM factors",
    )
    p.add_argument("--min-cells", type=int, default=None, help="pseudobulk: drop samples with fewer cells (default 10)")
    p.add_argument(
        "--no-filter", action="store_true", default=None, help="pseudobulk: keep all genes (no filterByExpr)"
    )
    p.add_argument(
        "--rows-are-samples",
        action="store_true",
        default=None,
        help="pseudobulk: the input's rows are samples (bulk data) although it carries no aggregation record",
    )
    p.add_argument(
        "--offset",
        default=None,
        help="glmm: auto (tmm for nb/poisson, else log_total), tmm, log_total, an obs column, or none",
    )
    p.add_argument(
        "--replication",
        choices=["auto", "as_written"],
        default=None,
        help="glmm: add the sample-level term a paired contrast needs (auto) or fit the design as written",
    )
    p.add_argument(
        "--estimation", choices=["REML", "ML"], default=None, help="glmm: variance-component estimation (REML or ML)"
    )
    p.add_argument(
        "--no-moderate",
        action="store_true",
        default=None,
        help="glmm: per-gene tests instead of the empirical-Bayes moderated tests of between-unit contrasts",
    )
    p.add_argument("--shard", default=None, help="fit only gene shard i of n ('i/n', 1-based)")

    _add_abundance_parser(sub)

    p = sub.add_parser("merge", help="merge gene-shard tables; recompute BH per group and contrast")
    p.add_argument("shards", nargs="+", help="shard tables written by 'scmlm de --shard i/n'")
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "hierarchy",
        help="variance partition, ICC and shrinkage (BLUPs) for the top genes of a GLMM result → tables + PNGs",
    )
    p.add_argument("input", help="cell-level .h5ad (only the selected genes are loaded, streamed in row blocks)")
    p.add_argument("--results", required=True, help="the GLMM result table of the same analysis (scmlm de/merge)")
    p.add_argument("--design", required=True, help="the analysis design, with random terms")
    p.add_argument("--contrast", required=True, type=contrast_item, action="append", help=CONTRAST_HELP)
    p.add_argument("--family", choices=FAMILY_NAMES, default="nb")
    p.add_argument("--groups-key", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--offset", default="auto", help="as for 'scmlm de --tool glmm' (computed on all genes)")
    p.add_argument("--sample-key", default=None, help="as for 'scmlm de --tool glmm'")
    p.add_argument("--n-genes", type=int, default=200, help="variance partition of the N most expressed genes")
    p.add_argument("--n-shrinkage", type=int, default=3, help="shrinkage plots of the N most significant genes")
    p.add_argument("--n-jobs", type=int, default=None)
    p.add_argument("--outdir", required=True)

    p = sub.add_parser(
        "warmup",
        help="compile every numba kernel once into numba's cache (run after installing, or once per workflow run)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="numba cache directory (NUMBA_CACHE_DIR) shared by later jobs; default: next to the installed package,"
        " or the user's cache directory for a read-only installation",
    )

    p = sub.add_parser(
        "report", help="one self-contained HTML page: genes called per analysis and group, top genes, figures, methods"
    )
    p.add_argument("out", help="the HTML file to write")
    p.add_argument(
        "analyses",
        nargs="+",
        metavar="[NAME=]RESULT",
        help="a result folder (results.csv with plots/ and hierarchy/, as the workflow writes) or a result table; "
        "NAME defaults to the folder's name",
    )
    p.add_argument(
        "--params",
        default=None,
        help="JSON file (or JSON text) {analysis: {method: glmm|pseudobulk|abundance, design: ..., contrast: ..., "
        "offset: ...}} shown under Methods; with --input, a GLMM analysis' design and contrast (as written: "
        "[factor, level, reference], a coefficient name, or a mapping name -> one of those) give its fitted design. "
        "method may be left out when the result table's method column (or keys such as family, pb_method) names it",
    )
    p.add_argument(
        "--figures",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="PNG figures of analysis NAME in folder DIR (repeatable; a result folder's plots/ and hierarchy/ are "
        "always read)",
    )
    p.add_argument(
        "--input",
        default=None,
        help="the cell-level .h5ad the analyses were fitted on: for each GLMM analysis whose --params give design and "
        "contrast, the report also lists the fitted design (with the sample-level term replication=auto adds)",
    )
    p.add_argument("--title", default="scmlm results")
    p.add_argument("--alpha", type=float, default=0.05, help="padj threshold of a called gene")
    p.add_argument("--n-top", type=int, default=20, help="genes per group in the top-gene tables")

    p = sub.add_parser("plot", help="plots of a result table → PNG files")
    p.add_argument("table", help="result table (.csv)")
    p.add_argument("--outdir", required=True)
    p.add_argument(
        "--kind",
        action="append",
        choices=["volcano", "ma", "pvalue_hist", "qq"],
        help="plot kind (repeatable; default volcano and pvalue_hist)",
    )
    return parser


def _read_table(path: str):
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise ScmlmError(f"result table {path!r} does not exist.")
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    sep = "\t" if p.suffix in (".tsv", ".txt") else ","
    try:
        return pd.read_csv(p, sep=sep, keep_default_na=True)
    except pd.errors.EmptyDataError as err:
        raise ScmlmError(
            f"result table {path!r} is empty (no header, no rows); give the table written by 'scmlm de' or "
            "'scmlm merge' (rerun the step that wrote it if it was interrupted)."
        ) from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ScmlmError(
            f"result table {path!r} cannot be read as a {'tab' if sep != ',' else 'comma'}-separated "
            f"table: {str(err).splitlines()[0]}"
        ) from err


def _run(args: argparse.Namespace) -> int:
    from . import io

    if args.command == "warmup":
        from . import warmup

        info = warmup(args.cache_dir, verbose=args.verbose > 0)
        print(
            f"scmlm warmup: {info['kernels']} kernels, {info['signatures']} specialisations "
            f"({info['compiled']} compiled, {info['loaded']} loaded from the cache) in {info['seconds']:.1f} s; "
            f"cache: {info['cache_dir'] or 'numba default (next to the package, else the user cache)'}"
        )
        return 0
    if hasattr(args, "contrast"):
        args.contrast = contrast_arg(args.contrast)

    if args.command == "simulate":
        from .datasets import simulate

        check_outputs([args.out])
        check_h5ad_path(args.out)
        adata = simulate(
            n_donors=args.n_donors,
            n_cells=args.n_cells,
            n_genes=args.n_genes,
            n_batches=args.n_batches,
            design=args.design,
            frac_de=args.frac_de,
            n_cell_types=args.n_cell_types,
            null=args.null,
            seed=args.seed,
        )
        io.write_h5ad(adata, args.out, compression="gzip")
        log.info("wrote %s (%d cells × %d genes)", args.out, adata.n_obs, adata.n_vars)
        return 0

    if args.command == "dataset":
        from . import datasets

        check_outputs([args.out])
        check_h5ad_path(args.out)
        adata = getattr(datasets, args.name)()
        io.write_h5ad(adata, args.out, compression="gzip")
        log.info("wrote %s (%d cells × %d genes)", args.out, adata.n_obs, adata.n_vars)
        return 0

    if args.command == "pseudobulk":
        from .pp import pseudobulk

        check_outputs([args.out], args.input)
        check_h5ad_path(args.out)
        adata = io.read(args.input, backed=True)
        try:
            pb = pseudobulk(
                adata, args.sample_key, groups_key=args.groups_key, layer=args.layer, min_cells=args.min_cells
            )
        finally:
            if adata.isbacked:
                adata.file.close()
        io.write_h5ad(pb, args.out)
        log.info("wrote %s (%d pseudobulk samples × %d genes)", args.out, pb.n_obs, pb.n_vars)
        for col, why in pb.uns["pseudobulk"]["dropped_reasons"].items():
            log.info("obs column %r not carried: %s", col, why)
        return 0

    if args.command == "de":
        return _run_de(args)

    if args.command == "abundance":
        return _run_abundance(args)

    if args.command == "merge":
        from .results import merge_shards

        check_outputs([args.out], *args.shards)
        io.check_table_path(args.out, what="--out")
        tables = [_read_table(p) for p in args.shards]
        merged = merge_shards(tables, sources=args.shards)
        io.write_csv(merged, args.out)
        log.info("merged %d shards → %s (%d rows)", len(tables), args.out, len(merged))
        return 0

    if args.command == "hierarchy":
        return _run_hierarchy(args)

    if args.command == "report":
        return _run_report(args)

    if args.command == "plot":
        from .pl.files import save_result_plots

        check_outdir(args.outdir)
        table = _read_table(args.table)
        kinds = args.kind or ["volcano", "pvalue_hist"]
        paths = save_result_plots(table, args.outdir, kinds=kinds)
        for path in paths:
            log.info("wrote %s", path)
        return 0

    raise ScmlmError(f"unknown command {args.command!r}")


def _run_report(args: argparse.Namespace) -> int:
    import json

    from .report import analysis_from_folder, write_report

    given = [a.split("=", 1)[1] if "=" in a and not Path(a).exists() else a for a in args.analyses]
    check_outputs([args.out], *[p for p in given if Path(p).is_file()])
    params = {}
    if args.params:
        text = args.params
        if not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise ScmlmError(f"--params {text!r} is neither a JSON file nor JSON text.")
            text = Path(text).read_text()
        try:
            params = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScmlmError(f"--params is not valid JSON: {err}.") from None
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise ScmlmError("--params must map each analysis name to an object of parameters.")
    figure_dirs: dict[str, list[str]] = {}
    for spec in args.figures:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ScmlmError(f"--figures {spec!r} must be NAME=DIR (an analysis name and a folder of PNG files).")
        figure_dirs.setdefault(name, []).append(folder)
    analyses = []
    for arg, path in zip(args.analyses, given, strict=True):
        name = arg.split("=", 1)[0] if path != arg else None
        key = name or (Path(path).name if Path(path).is_dir() else Path(path).stem)
        a = analysis_from_folder(path, name=name, figure_dirs=figure_dirs.get(key, ()))
        a.params = {**a.params, **params.get(a.name, {})}  # a folder's params.json, then --params
        analyses.append(a)
    names = [a.name for a in analyses]
    for option, given_names in (("--params", params), ("--figures", figure_dirs)):
        unknown = sorted(set(given_names) - set(names))
        if unknown:
            raise ScmlmError(f"{option} names analyses {unknown} that are not in the report: {names}.")
    if args.input is not None:
        _add_fitted_designs(analyses, args.input)
    if args.n_top < 0:
        raise ScmlmError(f"--n-top {args.n_top} must be 0 or more.")
    if not 0 < args.alpha < 1:
        raise ScmlmError(f"--alpha {args.alpha} must lie between 0 and 1.")
    write_report(args.out, analyses, title=args.title, alpha=args.alpha, n_top=args.n_top)
    log.info("wrote %s (%d analyses, %d figures)", args.out, len(analyses), sum(len(a.figures) for a in analyses))
    return 0


def _add_fitted_designs(analyses, path: str) -> None:
    """``design_fitted`` of each GLMM analysis, from the input's obs (read backed: no counts are loaded)."""
    from . import io
    from .report import fitted_design

    adata = io.read(path, backed=True)
    try:
        obs = adata.obs
    finally:
        if adata.isbacked:
            adata.file.close()
    for a in analyses:
        p = a.params
        if "design" not in p or "contrast" not in p or "design_fitted" in p:
            continue
        tool = report_tool(p, a.table)
        if tool is None:
            raise ScmlmError(
                f"--params of analysis {a.name!r} give design and contrast but no 'method' (glmm, pseudobulk or "
                'abundance), and its result table does not name one; add "method": "glmm" (or the analysis\' '
                "method)."
            )
        if tool != "glmm":
            continue
        a.params["design_fitted"] = fitted_design(
            obs, p["design"], json_contrast(p["contrast"]), groups_key=p.get("groups_key"),
            sample_key=p.get("sample_key"), replication=p.get("replication", "auto"),
        )  # fmt: skip
    for a in analyses:
        p = a.params
        if "design" in p and "contrast" in p:
            units = replicates(obs, p["design"], p["contrast"], unit_key=p.get("sample_key"),
                               groups_key=p.get("groups_key") or p.get("cell_type_key"))  # fmt: skip
            if units:
                a.params["units_per_level"] = units


def _top_genes(table, n: int, by: str, ascending: bool) -> list[str]:
    ok = table[table["status"].isin(USABLE_STATUS) & table[by].notna()]
    ranked = ok.sort_values(by, ascending=ascending)["gene"].astype(str)
    return list(dict.fromkeys(ranked))[: max(n, 0)]


def _run_hierarchy(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import io, pl, tl
    from .design import parse_formula
    from .pl.files import file_labels

    check_outdir(args.outdir)
    if not parse_formula(args.design).has_random:
        raise ScmlmError(f"design {args.design!r} has no random terms; the hierarchy needs e.g. '(1|donor)'.")
    table = _read_table(args.results)
    vp_genes = _top_genes(table, args.n_genes, "base_mean", ascending=False)
    term = _shrinkage_term(args.design)
    chosen = _shrinkage_pairs(table, args.n_shrinkage, term)
    re_genes = list(dict.fromkeys(gene for gene, _ in chosen))
    if not vp_genes:
        raise ScmlmError(f"{args.results!r} has no fitted gene (status ok or singular) to describe.")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    genes = list(dict.fromkeys(vp_genes + re_genes))
    resolved = _resolve_offset(
        args.offset, args.family, design=args.design, contrast=args.contrast, sample_key=args.sample_key
    )
    tmm = None
    if resolved == "tmm":
        from .design import contrast_param

        tmm = {"design": args.design, "contrast": contrast_param(args.contrast), "sample_key": args.sample_key}
        tmm["groups_key"] = args.groups_key
    adata = io.read_genes(args.input, genes, layer=args.layer, tmm=tmm)
    offset = {"tmm": io.TMM_OFFSET, "log_total": io.LOG_TOTAL, "none": None}.get(resolved, resolved)
    log.info("hierarchy: variance partition of %d genes, shrinkage of %d, %d cells", len(vp_genes), len(re_genes),
             adata.n_obs)  # fmt: skip
    # the genes were chosen among those the DE run fitted (with its own min_cells_expressing), as for glmm_de below
    vp_design = _fitted_design(adata.obs, args.design, args.contrast, args.sample_key)
    vp = tl.variance_partition(
        adata[:, vp_genes].copy(), vp_design, family=args.family, offset=offset, groups_key=args.groups_key,
        min_cells_expressing=1, n_jobs=args.n_jobs, inplace=False,
    ).table  # fmt: skip
    io.write_csv(vp.rename_axis("gene").reset_index(), outdir / "variance_partition.csv")
    groups = [None] if args.groups_key is None else sorted(vp["group"].astype(str).unique())
    written = [outdir / "variance_partition.csv"]
    group_names = file_labels(g for g in groups if g is not None)
    for g in groups:
        suffix = "" if g is None else "__" + group_names[g]
        sub = vp if g is None else vp[vp["group"].astype(str) == g]
        for kind, func in (("variance_partition", pl.variance_partition), ("icc", pl.icc)):
            path = outdir / f"{kind}{suffix}.png"
            ax = func(sub, show=False, save=path)
            plt.close(ax.get_figure())
            written.append(path)
    if re_genes:
        re_data = adata[:, re_genes].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tl.glmm_de(
                re_data, args.design, args.contrast, family=args.family, offset=offset, groups_key=args.groups_key,
                min_cells_expressing=1,
            )  # fmt: skip
        re = tl.random_effects(re_data, genes=re_genes, inplace=False).table
        io.write_csv(re, outdir / "random_effects.csv")
        written.append(outdir / "random_effects.csv")
        if term not in set(re["term"].astype(str)):
            term = re["term"].iloc[0] if len(re) else None
        fitted = list(re[re["term"] == term].groupby(["gene", "group"], sort=False).groups)
        # each group's own chosen genes (a gene chosen in one group may have a zero variance in another)
        pairs = [p for p in fitted if (str(p[0]), str(p[1])) in chosen] or fitted
        pair_names = file_labels(f"{gene}__{group}" for gene, group in pairs)
        for gene, group in pairs:
            safe = pair_names[f"{gene}__{group}"]
            path = outdir / f"shrinkage__{safe}.png"
            ax = pl.shrinkage(re, gene, term=term, group=group, show=False, save=path)
            plt.close(ax.get_figure())
            written.append(path)
    for path in written:
        log.info("wrote %s", path)
    return 0


def _shrinkage_term(design: str) -> str:
    """The random term whose BLUPs the shrinkage plots show: the first one of the design (e.g. ``donor``)."""
    from .design import parse_formula

    return parse_formula(design).random[0].group_name


def _shrinkage_pairs(table, n: int, term: str) -> list[tuple[str, str]]:
    """(gene, group) pairs for shrinkage plots: per group, the ``n`` most significant genes with ``var_<term> > 0``.

    A zero variance makes every BLUP 0 and the plot empty, so such genes are passed over. A group where no gene has a
    positive variance (or a table without the ``var_<term>`` column) falls back to its most significant genes, and a
    log line says so.
    """
    col = f"var_{term}"
    groups = table["group"].astype(str) if "group" in table.columns else None
    pairs = []
    for group in [None] if groups is None else list(dict.fromkeys(groups)):
        sub = table if group is None else table[groups == group]
        genes = []
        if col in sub.columns:
            genes = _top_genes(sub[sub[col].astype(float) > 0], n, "pvalue", ascending=True)
            if not genes:
                log.info("hierarchy: no fitted gene of group %s has %s > 0; shrinkage plots show its most "
                         "significant genes", group, col)  # fmt: skip
        else:
            log.info("hierarchy: the results have no %r column; shrinkage plots show the most significant genes", col)
        genes = genes or _top_genes(sub, n, "pvalue", ascending=True)
        pairs += [(gene, str(group)) for gene in genes]
    return pairs


def _fitted_design(obs, design: str, contrast, sample_key):
    """The design glmm_de fits (``replication="auto"`` may add a sample-level term), as a :class:`FittedDesign`.

    The variance partition of the hierarchy step then has a component for every level the DE model has. A design
    that cannot be resolved on all cells (e.g. estimable only within each group) is passed on as written: the groups'
    fits say more.
    """
    from .design import fitted_design

    try:
        fitted = fitted_design(obs, design, contrast, sample_key=sample_key)
    except ScmlmError:
        return design
    if fitted.added_terms:
        log.info("hierarchy: variance partition of %r (the terms glmm_de adds for the contrasts)", fitted.formula)
    return fitted


def _resolve_offset(offset: str, family: str, *, design: str, contrast, sample_key=None, obs=None) -> str:
    """``--offset`` as ``glmm_de`` resolves it (:func:`scmlm.design.resolve_offset`, the one rule); ``"none"`` kept."""
    from .design import resolve_offset

    offset = str(offset)
    if offset.lower() == "none":
        return "none"
    return resolve_offset(offset, family, design=design, contrast=contrast, obs=obs, sample_key=sample_key)


def _glmm_offset(adata, args):
    """The offset argument of glmm_de for a file read by the CLI.

    A workflow gene shard (or a ``read_genes`` subset) holds counts for some genes only: offsets over all genes were
    stored with it (``scmlm_log_total``, and the analysis' TMM offset as an obs column, which the rule passes by
    name). Computing ``log_total``/``tmm`` from its columns would be silently wrong, so they map to the stored columns.
    """
    from . import io

    offset = args.offset
    resolved = _resolve_offset(
        offset, args.family, design=args.design, contrast=args.contrast, sample_key=args.sample_key, obs=adata.obs
    )
    if resolved == "none":
        return None
    if io.LOG_TOTAL in adata.obs.columns and resolved in ("log_total", "tmm"):
        col = io.LOG_TOTAL if resolved == "log_total" else io.TMM_OFFSET
        if col not in adata.obs.columns:
            raise ScmlmError(
                f"the input holds counts of some genes only (obs has {io.LOG_TOTAL!r}), so offset={resolved!r} cannot "
                f"be computed from it; pass --offset with the obs column holding that analysis' offset over all genes "
                f"(the workflow's split_shards writes 'scmlm_offset_<analysis>'), or --offset {io.LOG_TOTAL}."
            )
        return col
    return offset


# options of `scmlm de` that only one --tool reads, with their defaults (None in the parser: given or not)
_TOOL_OPTIONS = {
    "pseudobulk": {"method": "nb_ql", "min_cells": 10, "no_filter": False, "rows_are_samples": False},
    "glmm": {
        "family": "nb", "offset": "auto", "replication": "auto", "estimation": "REML", "no_moderate": False,
        "shard": None,
    },
}  # fmt: skip


def _tool_options(args: argparse.Namespace) -> None:
    """Refuse an option the chosen --tool does not read (it would be ignored silently); fill in the defaults."""
    for tool, options in _TOOL_OPTIONS.items():
        given = [name for name in options if getattr(args, name, None) is not None]
        if tool != args.tool and given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ScmlmError(f"{flags} applies to --tool {tool} only; remove it or use --tool {tool}.")
        for name, default in options.items():
            if getattr(args, name, None) is None:
                setattr(args, name, default)


def _run_de(args: argparse.Namespace) -> int:
    from . import io, tl

    _tool_options(args)
    shard = args.shard
    check_outputs([args.out, args.out_h5ad], args.input)
    io.check_table_path(args.out, what="--out")
    if args.out_h5ad is not None:
        check_h5ad_path(args.out_h5ad, what="--out-h5ad")
    if args.n_jobs is not None and args.n_jobs == 0:
        raise ScmlmError("--n-jobs 0 is not a number of workers; use 1 or more (or -1 for all cores).")
    if shard is not None:
        from .results import parse_shard

        parse_shard(shard)
    if args.tool == "pseudobulk":
        adata = io.read(args.input)
        check_contrast_levels(adata.obs, args.contrast)
        if args.sample_key is not None:
            from .pp import pseudobulk

            adata = pseudobulk(
                adata, args.sample_key, groups_key=args.groups_key, layer=args.layer, min_cells=args.min_cells
            )
            layer = "counts"
        else:
            layer = args.layer
        key = args.key_added or "pseudobulk_de"
        res = tl.pseudobulk_de(
            adata,
            args.design,
            args.contrast,
            method=args.method,
            groups_key=args.groups_key,
            layer=layer,
            filter_genes=not args.no_filter,
            rows_are_samples=args.rows_are_samples,
            key_added=key,
            inplace=False,
        )
    else:
        adata = io.read(args.input)
        check_contrast_levels(adata.obs, args.contrast)
        key = args.key_added or "glmm_de"
        if shard is not None:
            from .results import parse_shard, shard_indices

            i, n = parse_shard(shard)
            idx = shard_indices(adata.n_vars, (i, n))
            if idx.size:
                log.info(
                    "shard %d/%d: genes %d-%d of %d (%s … %s)",
                    i, n, idx[0] + 1, idx[-1] + 1, adata.n_vars, adata.var_names[idx[0]], adata.var_names[idx[-1]],
                )  # fmt: skip
            else:
                log.info("shard %d/%d: no genes (only %d genes for %d shards)", i, n, adata.n_vars, n)
        offset = _glmm_offset(adata, args)
        res = tl.glmm_de(
            adata,
            args.design,
            args.contrast,
            family=args.family,
            layer=args.layer,
            offset=offset,
            groups_key=args.groups_key,
            n_jobs=args.n_jobs,
            shard=shard,
            sample_key=args.sample_key,
            replication=args.replication,
            moderate=not args.no_moderate,
            estimation=args.estimation,
            key_added=key,
            inplace=False,
        )
    table = res.table
    _log_gene_statuses(table)
    units = replicates(adata.obs, args.design, args.contrast, groups_key=args.groups_key,
                       unit_key=args.sample_key if args.tool == "glmm" else None,
                       rows_are_units=args.tool == "pseudobulk")  # fmt: skip
    _log_reading_guide(table, units)
    if shard is not None:
        from .results import parse_shard

        i, n = parse_shard(shard)
        table = table.copy()
        table["padj"] = float("nan")
        table["shard"] = f"{i}/{n}"
        table["analysis_id"] = analysis_fingerprint(adata, args, n)
    io.write_csv(table, args.out)
    if args.out_h5ad:
        res.to_uns(adata, key)
        io.write_h5ad(adata, args.out_h5ad)
    counts = table["status"].value_counts().to_dict()
    log.info("wrote %s: %d rows; status %s", args.out, len(table), counts)
    return 0


_ABUNDANCE_METHODS = ("glmm", "clr", "logit")


def _add_abundance_parser(sub) -> None:
    """``scmlm abundance``: differential abundance of cell types (tl.abundance_de); flags mirror its keywords."""
    p = sub.add_parser(
        "abundance",
        help="differential abundance: which cell types change in share between conditions, tested between samples",
    )
    p.add_argument("--input", required=True, help="cell-level .h5ad (only obs is read)")
    p.add_argument("--design", required=True, help='sample-level formula, e.g. "~ condition + (1|donor)" (paired)')
    p.add_argument("--contrast", required=True, type=contrast_item, action="append", help=CONTRAST_HELP)
    p.add_argument("--cell-type-key", default="cell_type", help="obs column with each cell's type (cluster)")
    p.add_argument("--sample-key", default="sample", help="obs column naming each sample: the unit of replication")
    p.add_argument(
        "--method",
        choices=_ABUNDANCE_METHODS,
        default="glmm",
        help="glmm (binomial GLMM per type, default), clr (centred log-ratios, the reference-free check) or logit",
    )
    p.add_argument(
        "--replication",
        choices=["auto", "as_written"],
        default="auto",
        help="glmm: add (1|<sample key>) for the over-dispersion between samples (auto) or fit the design as written",
    )
    p.add_argument("--estimation", choices=["REML", "ML"], default="REML", help="glmm: REML (default) or Laplace ML")
    p.add_argument("--min-cells", type=int, default=10, help="types with fewer cells over all samples are not tested")
    p.add_argument("--pseudocount", type=float, default=0.5, help="clr/logit: added to each count before the log")
    p.add_argument("--key-added", default=None, help="uns key of the result (default abundance_de)")
    p.add_argument("--out", required=True, help="result table (.csv, .tsv or .parquet): one row per cell type")
    p.add_argument(
        "--out-params",
        default=None,
        help="also write the result's parameters (fitted design, added terms, ...) as JSON; the report reads a "
        "result folder's params.json",
    )
    p.add_argument(
        "--plots",
        default=None,
        metavar="DIR",
        help="also write composition.png and abundance_effects__<contrast>.png into DIR",
    )


def _run_abundance(args: argparse.Namespace) -> int:
    """Read the cells' obs, run tl.abundance_de, write the table (and plots) atomically."""
    import anndata as ad

    from . import io, tl

    check_outputs([args.out, args.out_params], args.input)
    io.check_table_path(args.out, what="--out")
    if args.plots is not None:
        if Path(args.plots).resolve() == Path(args.input).resolve():
            raise ScmlmError(f"--plots {args.plots!r} is the input; choose a folder for the plots.")
        check_outdir(args.plots)
    if args.min_cells < 0:
        raise ScmlmError(f"--min-cells {args.min_cells} must be 0 or more.")
    backed = io.read(args.input, backed=True)
    try:
        obs = backed.obs.copy()
    finally:
        if backed.isbacked:
            backed.file.close()
    for flag, col in (("--cell-type-key", args.cell_type_key), ("--sample-key", args.sample_key)):
        if col not in obs.columns:
            raise ScmlmError(
                f"{flag} {col!r} is not a column of the input's obs; columns: {', '.join(map(repr, obs.columns))}."
            )
    check_contrast_levels(obs, args.contrast)
    adata = ad.AnnData(obs=obs)
    key = args.key_added or "abundance_de"
    res = tl.abundance_de(
        adata,
        args.design,
        args.contrast,
        cell_type_key=args.cell_type_key,
        sample_key=args.sample_key,
        method=args.method,
        replication=args.replication,
        estimation=args.estimation,
        min_cells=args.min_cells,
        pseudocount=args.pseudocount,
        key_added=key,
        inplace=False,
    )
    table = res.table
    for row in table[~table["status"].isin(_FINE)].itertuples(index=False):
        log.info("cell type %s (%s): %s", row.gene, row.contrast, row.status)
    _log_reading_guide(table, replicates(obs, args.design, args.contrast, unit_key=args.sample_key))
    io.write_csv(table, args.out)
    p = res.params
    if args.out_params:
        import json

        with io.atomic_path(args.out_params) as tmp:
            Path(tmp).write_text(json.dumps(p, indent=1, default=str) + "\n")
    log.info("abundance: fitted %r (added %s) with method %s", p["design_fitted"], p["added_terms"] or "no term",
             p["method"])  # fmt: skip
    log.info("wrote %s: %d cell types × %d contrasts", args.out, p["n_cell_types"], len(p["contrasts"]))
    if args.plots is not None:
        res.to_uns(adata, key)
        for path in _abundance_plots(adata, key, table, args.plots):
            log.info("wrote %s", path)
    return 0


def _abundance_plots(adata, key: str, table, outdir: str) -> list[Path]:
    """composition.png and one abundance_effects__<contrast>.png per contrast with effects (not joint F tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl
    from .pl.files import file_labels

    folder = Path(outdir)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "composition.png"]
    ax = pl.composition(adata, key=key, show=False, save=written[0])
    plt.close(ax.get_figure())
    contrasts = list(dict.fromkeys(table["contrast"].astype(str)))
    names = file_labels(contrasts)
    for c in contrasts:
        rows = table[table["contrast"].astype(str) == c]
        if not (rows["coef"].notna() & rows["se"].notna()).any():
            log.info("abundance: contrast %s has no effect size (joint F test or nothing tested); no effects plot", c)
            continue
        path = folder / f"abundance_effects__{names[c]}.png"
        ax = pl.abundance_effects(adata, key, contrast=c, show=False, save=path)
        plt.close(ax.get_figure())
        written.append(path)
    return written


def analysis_fingerprint(adata, args: argparse.Namespace, n_shards: int) -> str:
    """A short hash of what makes gene shards parts of one analysis: the cells and their obs, and the model.

    The cells (names, obs columns) are the same in every shard of one input; the genes differ by design.
    """
    from .design import contrast_param
    from .results import fingerprint

    spec = {
        "design": args.design,
        "contrast": contrast_param(args.contrast),
        "tool": args.tool,
        "family": args.family,
        "estimation": args.estimation,
        "offset": args.offset,
        "sample_key": getattr(args, "sample_key", None),
        "replication": getattr(args, "replication", None),
        "moderate": not getattr(args, "no_moderate", False),
        "groups_key": args.groups_key,
        "layer": args.layer,
        "n_shards": n_shards,
    }
    obs = adata.obs.drop(columns=[c for c in adata.obs.columns if c.startswith("scmlm_")], errors="ignore")
    return fingerprint(adata.obs_names, obs, spec)


_FINE = {*USABLE_STATUS, "filtered"}


def _log_gene_statuses(table) -> None:
    """One log line per gene that could not be tested, with its group and the reason (the job log names them)."""
    bad = table[~table["status"].isin(_FINE)]
    for row in bad.itertuples(index=False):
        log.info("gene %s (group %s): %s", row.gene, row.group, row.status)
    if len(bad):
        log.info("%d of %d gene fits were not tested; see the status column", len(bad), len(table))


def _log_reading_guide(table, units) -> None:
    """One line saying what df, df_prior and 'singular' mean; a warning when the tests rest on very few replicates."""
    log.info("%s", reading_guide(table))
    few = few_replicates(table, units)
    if few:
        log.warning("warning: this analysis rests on very few replicates (%s): %s.", "; ".join(few),
                    FEW_REPLICATES_MEANING)  # fmt: skip


def _format_warning(command: str, message, category, filename, lineno, line=None) -> str:
    """Format a warning on the command line as ``scmlm de: warning: …``.

    The category is named only when it is not a plain UserWarning; the file path and source line Python shows by
    default are left out.
    """
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"scmlm {command}: warning{kind}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the ``scmlm`` command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    renamed = renamed_option(sys.argv[1:] if argv is None else argv)
    if renamed is not None:
        print(f"scmlm: error: {renamed}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.WARNING if args.verbose == 0 else logging.INFO
    logging.basicConfig(level=level, format="scmlm: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    from . import settings

    if args.verbose >= 2:
        settings.verbosity = 2
    fmt = warnings.formatwarning
    with warnings.catch_warnings():
        # show each warning once on stderr (status summaries, poorly determined variances), never as an error, and as
        # one line that names the command, not the source file and line of the package that raised it
        warnings.simplefilter("default")
        warnings.formatwarning = functools.partial(_format_warning, args.command)
        try:
            return _run(args)
        except ScmlmError as err:
            print(f"scmlm {args.command}: error: {err}", file=sys.stderr)
            return 2
        finally:
            warnings.formatwarning = fmt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
