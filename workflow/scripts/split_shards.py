"""Split the cell-level counts into the gene shards of the GLMM fits, streaming the input once (rule split_shards).

Shard ``i`` of ``n`` is written to ``{outdir}/{i}-of-{n}.h5ad``: every cell and every gene of the input, but counts only
in the columns of that shard's genes (``scmlm.results.shard_indices``, the blocks ``scmlm de --shard i/n`` fits), so a
fit job reads and holds ~1/n of the data instead of all of it. The log total counts over *all* genes, which the
log total-count offset needs, are stored in ``obs["scmlm_log_total"]``, and each GLMM analysis with a TMM offset gets
its per-cell offset computed on all genes (``scmlm.design.StreamedTMM``, the same samples and factors as
``glmm_de(..., offset="tmm")`` on the whole matrix) in ``obs["scmlm_offset_<analysis>"]``.
"""

import os
import shutil
import sys
import traceback
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

OFFSET = "scmlm_log_total"
TARGET_NNZ = 20_000_000  # non-zeros per streamed row block


def _columns(block: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix:
    """``block`` with the entries outside columns [lo, hi) removed (same shape)."""
    keep = (block.indices >= lo) & (block.indices < hi)
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    counts = np.bincount(rows[keep], minlength=block.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return sp.csr_matrix((block.data[keep], block.indices[keep], indptr), shape=block.shape)


def split(path: str, outdir: str, n: int, layer: str | None, tmm: dict | None = None) -> None:
    from anndata.io import read_elem, sparse_dataset, write_elem

    from scmlm.design import streamed_tmm
    from scmlm.io import iter_row_blocks
    from scmlm.results import shard_indices

    out = Path(outdir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with h5py.File(path, "r") as f:
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        key = "X" if layer is None else f"layers/{layer}"
        if key not in f:
            have = sorted(f["layers"].keys()) if "layers" in f else []
            raise SystemExit(f"layer {layer!r} is not in {path}; available layers: {have}")
        n_obs, n_vars = len(obs), len(var)
        tmm_acc = {name: streamed_tmm(obs, spec, n_vars) for name, spec in (tmm or {}).items()}
        bounds = []
        for i in range(1, n + 1):
            idx = shard_indices(n_vars, (i, n))
            bounds.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0))
        files = [h5py.File(tmp / f"{i}-of-{n}.h5ad", "w") for i in range(1, n + 1)]
        matrices = [None] * n
        totals = np.zeros(n_obs)
        try:
            for start, block in iter_row_blocks(f[key], n_obs, n_vars, block_nnz=TARGET_NNZ):
                block = sp.csr_matrix(block)
                block.sort_indices()
                totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=float).ravel()
                for acc in tmm_acc.values():
                    acc.add(start, block)
                for k, (lo, hi) in enumerate(bounds):
                    part = _columns(block, lo, hi)
                    if matrices[k] is None:
                        write_elem(files[k], "X", part)
                        matrices[k] = sparse_dataset(files[k]["X"])
                    else:
                        matrices[k].append(part)
            empty = int((totals <= 0).sum())
            if empty:
                where = "X" if layer is None else f"layer {layer!r}"
                raise SystemExit(
                    f"{empty} cell(s) have zero total counts in {where} of {path}, so the log total-count offset is "
                    "undefined; remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
                )
            obs = obs.copy()
            obs[OFFSET] = np.log(totals)
            for name, acc in tmm_acc.items():
                obs[f"scmlm_offset_{name}"] = acc.offset(obs[OFFSET].to_numpy())[0]
            for fh in files:
                write_elem(fh, "obs", obs)
                write_elem(fh, "var", var)
                for elem in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
                    write_elem(fh, elem, {})
                fh.attrs["encoding-type"] = "anndata"
                fh.attrs["encoding-version"] = "0.1.0"
        finally:
            for fh in files:
                fh.close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    sizes = ", ".join(f"{i}/{n}: genes {lo}-{hi - 1}" for i, (lo, hi) in enumerate(bounds, start=1))
    print(f"split {path} ({n_obs} cells x {n_vars} genes) into {n} gene shards: {sizes}", file=sys.stderr)


if __name__ == "__main__":
    from scmlm import ScmlmError

    smk = globals()["snakemake"]
    with open(smk.log[0], "w") as log:
        sys.stderr = log
        try:
            split(smk.input[0], smk.output[0], int(smk.wildcards.n), smk.params.layer, dict(smk.params.tmm))
        except (SystemExit, ScmlmError) as err:
            print(f"split_shards: error: {err}", file=log)
            raise SystemExit(1) from None
        except Exception:  # noqa: BLE001 (the traceback goes to the job log)
            traceback.print_exc(file=log)
            raise SystemExit(1) from None
