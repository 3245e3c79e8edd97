"""Reading inputs and writing outputs atomically (temporary file in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._errors import InputError

__all__ = [
    "BackedCounts",
    "atomic_path",
    "check_table_path",
    "check_writable",
    "iter_row_blocks",
    "read",
    "read_genes",
    "write_csv",
    "write_h5ad",
]

LOG_TOTAL = "scmlm_log_total"
"""obs column with each cell's log total count over all genes (the GLMM offset when only some genes are loaded)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an error leaves no half-written file at ``path`` (and removes the temporary file). A write that fails
    for the file system (disk full, quota exceeded, I/O error) raises an :class:`InputError` naming ``path`` and the
    reason. The file gets the mode that the user's umask gives a new file (``mkstemp`` creates it private, 0600).
    """
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def _write_error(path: Path, err: OSError) -> InputError:
    import errno

    reason = err.strerror or str(err)
    hint = {
        errno.ENOSPC: "free some space or write to another disk",
        errno.EDQUOT: "free some space within your quota or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
    }.get(err.errno, "check the folder and the disk, then run again")
    return InputError(f"could not write {str(path)!r}: {reason}; {hint}. Nothing was written there.")


TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
"""File endings of the result tables :func:`write_csv` writes (``.txt`` is tab-separated, as ``.tsv``)."""


def check_table_path(path: str | os.PathLike, *, what: str = "output table") -> Path:
    """Refuse, before any work, a table path whose ending :func:`write_csv` cannot honour (e.g. ``.xlsx``)."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(
            f"{what} {str(path)!r} ends in {path.suffix or 'no suffix'!r}; tables are written as "
            f"{', '.join(TABLE_SUFFIXES)}: e.g. {str(path.with_suffix('.csv'))!r}."
        )
    return path


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Fail early, with an :class:`InputError` naming ``path``, when an output file cannot be written there.

    Checks that ``path`` is not a folder, that its nearest existing parent is a writable folder, and that a
    ``.parquet`` table has its engine (pyarrow or fastparquet). Nothing is created.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'results.csv')!r}.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r} cannot be written: folder {str(parent)!r} is not writable.")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {str(path)!r} exists and is read-only; remove it or choose another path.")
    if path.suffix == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None and importlib.util.find_spec("fastparquet") is None:
            raise InputError(
                f"{what} {str(path)!r}: writing .parquet needs pyarrow (pip install pyarrow); or write .csv/.tsv."
            )
    return path


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, **kwargs) -> None:
    """Write ``adata`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, **kwargs)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, *, index: bool = False, **kwargs) -> None:
    """Write a table to CSV (or ``.tsv``/``.txt`` tab-separated, ``.parquet``) atomically; other endings are refused."""
    path = check_table_path(check_writable(path))
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=index)
        else:
            sep = "\t" if path.suffix in (".tsv", ".txt") else ","
            df.to_csv(tmp, index=index, sep=sep, **kwargs)


def read(path: str | os.PathLike, *, backed: bool = False) -> ad.AnnData:
    """Read an AnnData from ``.h5ad`` (optionally backed), a 10x ``.h5``, or a folder with ``matrix.mtx(.gz)``.

    A folder holding ``counts.mtx.gz`` + ``obs.csv.gz`` + ``var.csv`` in scmlm's bundled-data layout (genes × cells) is
    read too.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {str(path)!r} does not exist.")
    if path.suffix == ".h5ad":
        if path.is_dir():
            raise InputError(f"input {str(path)!r} is a folder, not an .h5ad file.")
        try:
            return ad.read_h5ad(path, backed="r" if backed else None)
        except (OSError, KeyError) as err:
            raise InputError(f"cannot read {str(path)!r} as an .h5ad file (is it complete?): {err}") from err
    if path.suffix == ".h5":
        import scanpy as sc

        return sc.read_10x_h5(path)
    if path.is_dir():
        if (path / "counts.mtx.gz").exists() and (path / "obs.csv.gz").exists():
            from .datasets._bundled import _load_folder

            return _load_folder(path)
        import scanpy as sc

        return sc.read_10x_mtx(path)
    raise InputError(
        f"cannot read {str(path)!r}: expected an .h5ad file, a 10x .h5 file or a folder with matrix.mtx; "
        "convert other formats with anndata/scanpy first."
    )


def iter_row_blocks(
    elem, n_obs: int, n_vars: int, *, block_nnz: int = 20_000_000, max_rows: int | None = None, csc: str = "load"
):
    """Yield ``(start, block)`` over the rows of an on-disk matrix (an h5py dataset or a sparse group of an h5ad).

    Sparse CSR matrices are cut into blocks of about ``block_nnz`` stored entries (and at most ``max_rows`` rows),
    dense ones into blocks of about ``block_nnz`` values; each block is a CSR matrix (dense input: an array). A CSC
    matrix cannot be streamed by rows: ``csc="load"`` reads it whole as one block, ``csc="error"`` raises an
    :class:`InputError` saying how to rewrite it.
    """
    import h5py
    import numpy as np
    from anndata.io import sparse_dataset

    cap = n_obs if max_rows is None else max(1, int(max_rows))
    if isinstance(elem, h5py.Dataset):
        step = min(cap, max(1, block_nnz // max(1, n_vars)))
        for start in range(0, n_obs, step):
            yield start, elem[start : start + step]
        return
    ds = sparse_dataset(elem)
    if ds.format != "csr":
        if csc == "load":
            import scipy.sparse as sp

            yield 0, sp.csr_matrix(ds.to_memory())
            return
        raise InputError(
            f"{elem.name} in {elem.file.filename!r} is stored as {ds.format.upper()}; streaming needs row blocks "
            "(CSR). Rewrite it with adata.X = scipy.sparse.csr_matrix(adata.X), or load it in memory."
        )
    indptr = elem["indptr"][...]
    start = 0
    while start < n_obs:
        stop = int(np.searchsorted(indptr, indptr[start] + block_nnz, side="right")) - 1
        stop = min(n_obs, start + cap, max(stop, start + 1))
        yield start, ds[start:stop]
        start = stop


TMM_OFFSET = "scmlm_offset_tmm"
"""obs column with each cell's TMM offset computed on all genes (``read_genes(..., tmm=...)``)."""


def read_genes(
    path: str | os.PathLike,
    genes,
    *,
    layer: str | None = None,
    block_nnz: int = 20_000_000,
    tmm: dict | None = None,
) -> ad.AnnData:
    """Load only some genes of an h5ad, streaming row blocks, with the all-gene log totals in ``obs``.

    Memory is bounded by the selected genes' counts plus one row block. ``obs["scmlm_log_total"]`` holds the log of
    each cell's total over *all* genes of the layer (kept if the file already has it), so that
    ``scmlm.tl.glmm_de(..., offset="scmlm_log_total")`` on the subset equals the default ``offset="log_total"`` on the
    whole matrix.

    Parameters
    ----------
    path
        ``.h5ad`` file with cells in rows (CSR sparse or dense ``X``/layer).
    genes
        Gene names to keep (in this order).
    layer
        Layer with the counts; ``None`` reads ``X``. The result holds them in ``.X``.
    block_nnz
        Stored entries per streamed row block.
    tmm
        ``{"design", "contrast", "sample_key", "groups_key"}`` of a GLMM analysis: also store in
        ``obs["scmlm_offset_tmm"]`` the offset ``glmm_de(..., offset="tmm")`` computes on all genes.
    """
    import h5py
    import numpy as np
    import scipy.sparse as sp
    from anndata.io import read_elem

    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {str(path)!r} does not exist.")
    with h5py.File(path, "r") as f:
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        key = "X" if layer is None else f"layers/{layer}"
        if key not in f:
            have = sorted(f["layers"].keys()) if "layers" in f else []
            raise InputError(f"layer {layer!r} is not in {str(path)!r}; available layers: {have}.")
        names = [str(g) for g in genes]
        pos = var.index.get_indexer(names)
        missing = [g for g, q in zip(names, pos, strict=True) if q < 0]
        if missing:
            raise InputError(f"genes not in {str(path)!r}: {missing[:10]}{' …' if len(missing) > 10 else ''}.")
        n_obs, n_vars = len(obs), len(var)
        acc = None
        if tmm is not None:
            from .design import streamed_tmm

            acc = streamed_tmm(obs, tmm, n_vars)
        blocks, totals = [], np.zeros(n_obs)
        for start, block in iter_row_blocks(f[key], n_obs, n_vars, block_nnz=block_nnz):
            totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=float).ravel()
            blocks.append(sp.csr_matrix(block[:, pos]))
            if acc is not None:
                acc.add(start, block)
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((n_obs, len(pos)))
    obs = obs.copy()
    if LOG_TOTAL not in obs:
        with np.errstate(divide="ignore"):
            obs[LOG_TOTAL] = np.log(totals)
    if acc is not None:
        if np.any(totals <= 0):
            raise InputError(
                f"{int((totals <= 0).sum())} cell(s) have zero total counts in {str(path)!r}, so the TMM offset is "
                "undefined; remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
            )
        obs[TMM_OFFSET] = acc.offset(np.log(totals))[0]
    return ad.AnnData(X=X, obs=obs, var=var.iloc[pos].copy())


class BackedCounts:
    """The cells × genes matrix (``X`` or a layer) of an h5ad file, read gene block by gene block, never whole.

    Used by the cell-level tools for an AnnData opened with ``backed="r"``; :class:`scmlm.engine.GeneColumns` cuts
    gene chunks from it (:meth:`column_segments`) exactly as from a matrix in memory, so the fits are the same.

    * A CSC matrix on disk is already gene-major: a chunk's columns are read from the file's ``indices``/``data``.
    * A CSR (or dense) matrix is streamed once in row blocks (:func:`iter_row_blocks`) by :meth:`scan`; each block is
      turned to CSC and appended to an anonymous temporary file (deleted when closed), so a chunk's columns are read
      back as one slice per row block. Memory: one row block while scanning, one chunk while fitting.

    :meth:`scan` also checks the values (``"counts"``: non-negative integers; ``"finite"``) and keeps each cell's total,
    which ``sum(axis=1)`` returns as ``matrix.sum(axis=1)`` does in memory (the matrix's sum dtype, cells in order).
    """

    def __init__(self, filename: str | os.PathLike, key: str = "X", *, block_nnz: int = 4_000_000):
        import h5py

        self.filename, self.key, self.block_nnz = str(filename), key, int(block_nnz)
        self._file = h5py.File(self.filename, "r")
        if key not in self._file:
            have = sorted(self._file["layers"].keys()) if "layers" in self._file else []
            self._file.close()
            raise InputError(f"layer {key.split('/')[-1]!r} is not in {self.filename!r}; available layers: {have}.")
        elem = self._file[key]
        if isinstance(elem, h5py.Dataset):
            self.format, self.shape, self.dtype = "dense", tuple(int(s) for s in elem.shape), elem.dtype
        else:
            self.format = str(elem.attrs["encoding-type"]).split("_")[0]
            self.shape = tuple(int(s) for s in elem.attrs["shape"])
            self.dtype = elem["data"].dtype
        self._elem = elem
        self._lock = __import__("threading").Lock()
        self._tmp = None
        self._blocks: list[tuple[int, Any, int, int]] = []  # (first row, indptr, indices offset, data offset)
        self._totals = None
        self._checked: set[str] = set()
        self.has_sorted_indices = self.format != "csc"
        if self.format == "csc":
            self._indptr = np.asarray(elem["indptr"][...], dtype=np.int64)

    @classmethod
    def from_adata(cls, adata: ad.AnnData, layer: str | None) -> BackedCounts:
        """The counts of a backed AnnData (``layer=None``: ``X``)."""
        return cls(adata.filename, "X" if layer is None else f"layers/{layer}")

    def close(self) -> None:
        """Close the h5ad file and delete the temporary file."""
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None
        self._file.close()

    def __del__(self) -> None:
        """Close the files when the matrix is dropped."""
        with contextlib.suppress(Exception):
            self.close()

    @property
    def nnz(self) -> int:
        """Stored entries."""
        if self.format == "dense":
            return int(np.prod(self.shape))
        return int(self._elem["data"].shape[0])

    # ------------------------------------------------ one pass over the file

    def scan(self, check: str | None = None, layer: str | None = None) -> None:
        """Read the matrix once: check the values, keep the cells' totals, write the gene-major temporary file.

        ``check="counts"`` (non-negative integers) or ``"finite"`` raises an :class:`InputError` naming ``layer`` (the
        count of bad entries it gives is that of the first row block holding one). The temporary file is written for
        a row-major (CSR or dense) matrix only. Later calls only check.
        """
        from ._validate import check_counts_values, check_finite_values

        def checked(values) -> None:
            if check == "counts":
                check_counts_values(values, layer)
            elif check == "finite":
                check_finite_values(values, layer)

        if self._totals is not None:  # read before: only the values are checked, in blocks
            if check is not None and check not in self._checked:
                if self.format == "dense":
                    for _, block in iter_row_blocks(self._elem, *self.shape, block_nnz=self.block_nnz):
                        checked(block)
                else:
                    data = self._elem["data"]
                    for start in range(0, data.shape[0], 1 << 24):
                        checked(data[start : start + (1 << 24)])
                self._checked.add(check)
            return
        n_obs, n_vars = self.shape
        totals = None
        if self.format == "csc":
            data, indices = self._elem["data"], self._elem["indices"]
            step = 1 << 24
            acc = np.zeros(n_obs)
            for start in range(0, data.shape[0], step):
                vals = data[start : start + step]
                checked(vals)
                acc += np.bincount(indices[start : start + step], weights=vals, minlength=n_obs)
            totals = acc.astype(_sum_dtype(self.dtype))
        else:
            import tempfile

            self._tmp = tempfile.TemporaryFile(prefix="scmlm_genes_")
            totals = np.zeros(n_obs, dtype=_sum_dtype(self.dtype))
            pos = 0
            for start, block in iter_row_blocks(self._elem, n_obs, n_vars, block_nnz=self.block_nnz, csc="error"):
                if self.format == "dense":
                    checked(block)
                    block = sp.csr_matrix(block)
                else:
                    checked(block.data)
                totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
                csc = block.tocsc()
                idx = csc.indices.astype(np.int32, copy=False)
                self._tmp.write(memoryview(idx))  # the arrays' own buffers: no copy
                self._tmp.write(memoryview(np.ascontiguousarray(csc.data)))
                self._blocks.append((start, csc.indptr.astype(np.int64), pos, pos + idx.nbytes))
                pos += idx.nbytes + csc.data.nbytes
                del block, csc, idx
            self._tmp.flush()
        self._totals = totals
        if check is not None:
            self._checked.add(check)

    def sum(self, axis: int) -> np.ndarray:
        """Each cell's total (``axis=1``; the only axis the tools ask for), after :meth:`scan`."""
        if axis != 1:
            raise ValueError("BackedCounts.sum gives the cells' totals only (axis=1)")
        if self._totals is None:
            self.scan()
        return self._totals

    # ------------------------------------------------ gene blocks

    def column_segments(self, cols: np.ndarray):
        """Yield, in row order, ``(row0, starts, ends, indices, data)`` holding the entries of columns ``cols``.

        The entries of column ``cols[c]`` in a segment are ``indices[starts[c]:ends[c]]`` (rows from ``row0``) and
        the same slice of ``data``. Columns are read in runs (nearby columns in one read); see
        :class:`scmlm.engine.GeneColumns`.
        """
        if self._totals is None and self.format != "csc":
            self.scan()
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        sc = cols[order]
        # runs of columns read together: a gap of more than 64 columns starts a new read
        cuts = np.flatnonzero(np.diff(sc) > 64) + 1
        runs = np.split(np.arange(sc.size), cuts)
        if self.format == "csc":
            for run in runs:
                lo, hi = int(sc[run[0]]), int(sc[run[-1]]) + 1
                a, b = int(self._indptr[lo]), int(self._indptr[hi])
                with self._lock:
                    indices = self._elem["indices"][a:b]
                    data = self._elem["data"][a:b]
                starts = np.zeros(cols.size, dtype=np.int64)
                ends = np.zeros(cols.size, dtype=np.int64)
                starts[order[run]] = self._indptr[sc[run]] - a
                ends[order[run]] = self._indptr[sc[run] + 1] - a
                yield 0, starts, ends, indices, data
            return
        for row0, indptr, ioff, doff in self._blocks:
            for run in runs:
                lo, hi = int(sc[run[0]]), int(sc[run[-1]]) + 1
                a, b = int(indptr[lo]), int(indptr[hi])
                indices = self._pread(ioff + 4 * a, b - a, np.int32)
                data = self._pread(doff + self.dtype.itemsize * a, b - a, self.dtype)
                starts = np.zeros(cols.size, dtype=np.int64)
                ends = np.zeros(cols.size, dtype=np.int64)
                starts[order[run]] = indptr[sc[run]] - a
                ends[order[run]] = indptr[sc[run] + 1] - a
                yield row0, starts, ends, indices, data

    def _pread(self, offset: int, count: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = bytearray(count * dtype.itemsize)
        if buf:
            got = os.preadv(self._tmp.fileno(), [buf], offset)
            if got != len(buf):
                raise OSError(f"short read from the temporary gene-major file ({got} of {len(buf)} bytes)")
        return np.frombuffer(buf, dtype=dtype)


def _sum_dtype(dtype):
    """The dtype of scipy's ``matrix.sum`` for a matrix of ``dtype`` (integers widen, as numpy's sum)."""
    return np.sum(np.zeros(1, dtype=dtype)).dtype
