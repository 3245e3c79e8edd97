"""Reading inputs and writing outputs atomically (temporary file in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import pandas as pd

from ._errors import InputError

__all__ = ["atomic_path", "read", "write_csv", "write_h5ad"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an error leaves no half-written file at ``path`` (and removes the temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, **kwargs) -> None:
    """Write ``adata`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, **kwargs)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, *, index: bool = False, **kwargs) -> None:
    """Write a table to CSV (or ``.tsv`` tab-separated, ``.parquet``) atomically."""
    path = Path(path)
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
        return ad.read_h5ad(path, backed="r" if backed else None)
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
