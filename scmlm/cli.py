"""The ``scmlm`` command line: what the Snakemake rules and cluster batch jobs call.

Every command writes its outputs atomically and exits with status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from ._errors import ScmlmError
from ._version import __version__

log = logging.getLogger("scmlm")


def _contrast(text: str):
    parts = text.split(":")
    if len(parts) == 3:
        return tuple(parts)
    return text


def _add_common_de(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="cell-level or pseudobulk .h5ad")
    p.add_argument("--design", required=True, help='model formula, e.g. "~ condition + (1|donor)"')
    p.add_argument(
        "--contrast",
        required=True,
        type=_contrast,
        help="factor:test:reference (e.g. condition:case:ctrl) or a coefficient name",
    )
    p.add_argument("--groups-key", default=None, help="obs column: one fit per group (e.g. cell_type)")
    p.add_argument("--layer", default=None, help="layer with raw counts (default .X)")
    p.add_argument("--out", required=True, help="result table (.csv, .tsv or .parquet)")
    p.add_argument("--out-h5ad", default=None, help="also write the AnnData with the result in .uns")
    p.add_argument("--key-added", default=None, help="uns key of the result")
    p.add_argument("--n-jobs", type=int, default=None, help="worker processes (default 1; -1 = all cores)")


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
    p.add_argument("name", choices=["pig_airway", "glioblastoma", "kang2018", "kang2018_100genes"])
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
    p.add_argument("--method", choices=["pseudobulk", "glmm"], required=True)
    p.add_argument("--pb-method", choices=["nb_ql", "voom", "pydeseq2"], default="nb_ql")
    p.add_argument("--family", choices=["nb", "poisson", "binomial", "gaussian"], default="nb")
    p.add_argument(
        "--sample-key",
        default=None,
        help="the obs column naming the sample. pseudobulk: needed (and the input aggregated by it first) when the "
        "input is cell-level; glmm: the unit of replication of a paired contrast and of the TMM factors",
    )
    p.add_argument("--min-cells", type=int, default=10, help="pseudobulk: drop samples with fewer cells")
    p.add_argument("--no-filter", action="store_true", help="pseudobulk: keep all genes (no filterByExpr)")
    p.add_argument(
        "--offset",
        default="auto",
        help="glmm: auto (tmm for nb/poisson, else log_total), tmm, log_total, an obs column, or none",
    )
    p.add_argument(
        "--replication",
        choices=["auto", "as_written"],
        default="auto",
        help="glmm: add the sample-level term a paired contrast needs (auto) or fit the design as written",
    )
    p.add_argument("--reml", choices=["REML", "ML"], default="REML", help="glmm: variance-component estimation")
    p.add_argument("--shard", default=None, help="fit only gene shard i of n ('i/n', 1-based)")

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
    p.add_argument("--contrast", required=True, type=_contrast)
    p.add_argument("--family", choices=["nb", "poisson", "binomial", "gaussian"], default="nb")
    p.add_argument("--groups-key", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--offset", default="auto", help="as for 'scmlm de --method glmm' (computed on all genes)")
    p.add_argument("--sample-key", default=None, help="as for 'scmlm de --method glmm'")
    p.add_argument("--n-genes", type=int, default=200, help="variance partition of the N most expressed genes")
    p.add_argument("--n-shrinkage", type=int, default=3, help="shrinkage plots of the N most significant genes")
    p.add_argument("--n-jobs", type=int, default=None)
    p.add_argument("--outdir", required=True)

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
    return pd.read_csv(p, sep=sep, keep_default_na=True)


def _run(args: argparse.Namespace) -> int:
    from . import io

    if args.command == "simulate":
        from .datasets import simulate

        _check_outputs([args.out])
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

        _check_outputs([args.out])
        adata = getattr(datasets, args.name)()
        io.write_h5ad(adata, args.out, compression="gzip")
        log.info("wrote %s (%d cells × %d genes)", args.out, adata.n_obs, adata.n_vars)
        return 0

    if args.command == "pseudobulk":
        from .pp import pseudobulk

        _check_outputs([args.out], args.input)
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

    if args.command == "merge":
        from .results import merge_shards

        _check_outputs([args.out], *args.shards)
        tables = [_read_table(p) for p in args.shards]
        merged = merge_shards(tables, sources=args.shards)
        io.write_csv(merged, args.out)
        log.info("merged %d shards → %s (%d rows)", len(tables), args.out, len(merged))
        return 0

    if args.command == "hierarchy":
        return _run_hierarchy(args)

    if args.command == "plot":
        from .pl._de import save_result_plots

        _check_outdir(args.outdir)
        table = _read_table(args.table)
        kinds = args.kind or ["volcano", "pvalue_hist"]
        paths = save_result_plots(table, args.outdir, kinds=kinds)
        for path in paths:
            log.info("wrote %s", path)
        return 0

    raise ScmlmError(f"unknown command {args.command!r}")


def _top_genes(table, n: int, by: str, ascending: bool) -> list[str]:
    ok = table[table["status"].isin(["ok", "singular"]) & table[by].notna()]
    ranked = ok.sort_values(by, ascending=ascending)["gene"].astype(str)
    return list(dict.fromkeys(ranked))[: max(n, 0)]


def _run_hierarchy(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import io, pl, tl
    from .design import parse_formula
    from .pl._utils import file_labels

    _check_outdir(args.outdir)
    if not parse_formula(args.design).has_random:
        raise ScmlmError(f"design {args.design!r} has no random terms; the hierarchy needs e.g. '(1|donor)'.")
    table = _read_table(args.results)
    vp_genes = _top_genes(table, args.n_genes, "base_mean", ascending=False)
    re_genes = _top_genes(table, args.n_shrinkage, "pvalue", ascending=True)
    if not vp_genes:
        raise ScmlmError(f"{args.results!r} has no fitted gene (status ok or singular) to describe.")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    genes = list(dict.fromkeys(vp_genes + re_genes))
    resolved = _resolve_offset(args.offset, args.family)
    tmm = None
    if resolved == "tmm":
        contrast = list(args.contrast) if isinstance(args.contrast, tuple) else args.contrast
        tmm = {"design": args.design, "contrast": contrast, "sample_key": args.sample_key}
        tmm["groups_key"] = args.groups_key
    adata = io.read_genes(args.input, genes, layer=args.layer, tmm=tmm)
    offset = {"tmm": io.TMM_OFFSET, "log_total": io.LOG_TOTAL, "none": None}.get(resolved, resolved)
    log.info("hierarchy: variance partition of %d genes, shrinkage of %d, %d cells", len(vp_genes), len(re_genes),
             adata.n_obs)  # fmt: skip
    # the genes were chosen among those the DE run fitted (with its own min_cells_expressing), as for glmm_de below
    vp = tl.variance_partition(
        adata[:, vp_genes].copy(), args.design, family=args.family, offset=offset, groups_key=args.groups_key,
        min_cells_expressing=1, n_jobs=args.n_jobs, inplace=False,
    )  # fmt: skip
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
        re = tl.random_effects(re_data, genes=re_genes, inplace=False)
        io.write_csv(re, outdir / "random_effects.csv")
        written.append(outdir / "random_effects.csv")
        term = re["term"].iloc[0] if len(re) else None
        pairs = list(re[re["term"] == term].groupby(["gene", "group"], sort=False).groups)
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


def _resolve_offset(offset: str, family: str) -> str:
    """``auto`` as ``glmm_de`` resolves it: TMM for the NB and Poisson families, the log total count otherwise."""
    offset = str(offset)
    if offset.lower() == "none":
        return "none"
    if offset == "auto":
        return "tmm" if family in ("nb", "poisson") else "log_total"
    return offset


def _glmm_offset(adata, offset: str, family: str):
    """The offset argument of glmm_de for a file read by the CLI.

    A workflow gene shard (or a ``read_genes`` subset) holds counts for some genes only: offsets over all genes were
    stored with it (``scmlm_log_total``, and the analysis' TMM offset as an obs column, which the rule passes by
    name). Computing ``log_total``/``tmm`` from its columns would be silently wrong, so they map to the stored columns.
    """
    from . import io

    resolved = _resolve_offset(offset, family)
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


def _check_outputs(outputs, *inputs) -> None:
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


def _check_outdir(path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ScmlmError(f"--outdir {path!r} is a file; give a folder.")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ScmlmError(f"--outdir {path!r} cannot be created or written: {str(parent)!r} is not a writable folder.")


def _run_de(args: argparse.Namespace) -> int:
    from . import io, tl

    shard = args.shard
    _check_outputs([args.out, args.out_h5ad], args.input)
    if args.method == "pseudobulk" and shard is not None:
        raise ScmlmError("--shard applies to --method glmm; pseudobulk fits all genes of a group together.")
    if args.method == "glmm" and args.sample_key is not None:
        raise ScmlmError(
            "--sample-key applies to --method pseudobulk (cells are summed per sample first); a GLMM models the "
            "cells, with the sample as a random term in --design, e.g. '~ condition + (1|donor)'."
        )
    if args.n_jobs is not None and args.n_jobs == 0:
        raise ScmlmError("--n-jobs 0 is not a number of workers; use 1 or more (or -1 for all cores).")
    if shard is not None:
        from .results import parse_shard

        parse_shard(shard)
    if args.method == "pseudobulk":
        adata = io.read(args.input)
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
            method=args.pb_method,
            groups_key=args.groups_key,
            layer=layer,
            filter_genes=not args.no_filter,
            key_added=key,
            inplace=False,
        )
    else:
        adata = io.read(args.input)
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
        offset = _glmm_offset(adata, args.offset, args.family)
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
            method=args.reml,
            key_added=key,
            inplace=False,
        )
    table = res.table
    _log_gene_statuses(table)
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


def analysis_fingerprint(adata, args: argparse.Namespace, n_shards: int) -> str:
    """A short hash of what makes gene shards parts of one analysis: the cells and their obs, and the model.

    The cells (names, obs columns) are the same in every shard of one input; the genes differ by design.
    """
    from .results import fingerprint

    spec = {
        "design": args.design,
        "contrast": list(args.contrast) if isinstance(args.contrast, tuple) else args.contrast,
        "method": args.method,
        "family": args.family,
        "reml": args.reml,
        "offset": args.offset,
        "sample_key": getattr(args, "sample_key", None),
        "replication": getattr(args, "replication", None),
        "groups_key": args.groups_key,
        "layer": args.layer,
        "n_shards": n_shards,
    }
    obs = adata.obs.drop(columns=[c for c in adata.obs.columns if c.startswith("scmlm_")], errors="ignore")
    return fingerprint(adata.obs_names, obs, spec)


_FINE = {"ok", "singular", "filtered"}


def _log_gene_statuses(table) -> None:
    """One log line per gene that could not be tested, with its group and the reason (the job log names them)."""
    bad = table[~table["status"].isin(_FINE)]
    for row in bad.itertuples(index=False):
        log.info("gene %s (group %s): %s", row.gene, row.group, row.status)
    if len(bad):
        log.info("%d of %d gene fits were not tested; see the status column", len(bad), len(table))


def main(argv: list[str] | None = None) -> int:
    """Run the ``scmlm`` command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.WARNING if args.verbose == 0 else logging.INFO
    logging.basicConfig(level=level, format="scmlm: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    from ._settings import settings

    if args.verbose >= 2:
        settings.verbosity = 2
    with warnings.catch_warnings():
        # show each warning once on stderr (status summaries, poorly determined variances), never as an error
        warnings.simplefilter("default")
        try:
            return _run(args)
        except ScmlmError as err:
            print(f"scmlm {args.command}: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
