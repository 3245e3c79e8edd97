"""The warm-up that compiles every numba kernel of scmlm into numba's on-disk cache (``scmlm warmup``).

Compilation is the cost of a first call (tens of seconds for the GLMM kernel). :func:`warmup` pays it once per
installation and CPU: ``make venv`` runs it after installing, and the Snakemake workflow runs it in one job into a
cache directory that all shard jobs read (``NUMBA_CACHE_DIR``). Kernel inputs are normalised to one dtype per argument
before the call (int64 indices, float64 values), so one specialisation per kernel covers every input and the warm-up
compiles exactly what later calls use.

The kernels and their decorator live below the tools (``scmlm._jit``, imported by the kernel modules of
:mod:`scmlm.models`); the warm-up runs the public tools, so it sits above them, at the top of the package.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numba

from .models import KERNELS


def _kernel_modules() -> None:
    """Import every module that defines kernels (they register in :data:`scmlm.models.KERNELS` as they load).

    Every kernel is in :mod:`scmlm.models`; some of its modules load their kernel module only when first called, so
    every module of the package and of its subpackages is imported here.
    """
    from . import models

    for info in pkgutil.walk_packages(models.__path__, f"{models.__name__}."):
        importlib.import_module(info.name)


def use_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """Send numba's cache of every scmlm kernel (and of later processes started from this one) to ``cache_dir``.

    Sets ``NUMBA_CACHE_DIR`` in ``os.environ`` (inherited by worker processes and subprocesses) and in numba's
    configuration, and points the kernels already defined in this process to the new directory.
    """
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    numba.config.CACHE_DIR = str(path)
    _kernel_modules()
    for disp in KERNELS:
        # a new cache of the same class (scmlm._jit.KernelCache) picks its locator from the configuration just set
        disp._cache = type(disp._cache)(disp.py_func)
    return path


def _counts() -> tuple[int, int]:
    hits = sum(sum(d.stats.cache_hits.values()) for d in KERNELS)
    misses = sum(sum(d.stats.cache_misses.values()) for d in KERNELS)
    return hits, misses


def warmup(cache_dir: str | os.PathLike | None = None, *, verbose: bool = False) -> dict:
    """Compile every scmlm kernel for the argument types the package uses, and store the machine code on disk.

    Runs every public tool with its defaults on a small simulated dataset (a few seconds once compiled): cell-level
    GLMM fits (all families, REML and ML, Wald and LRT), ``variance_partition``, ``random_effects``, ``gee_de``,
    ``abundance_de``, pseudobulk aggregation (float and integer counts, 32- and 64-bit sparse indices) and pseudobulk
    DE (``nb_ql``, ``voom``). Later processes on this installation and CPU load the kernels from numba's cache instead
    of compiling them (``tests/test_jit.py`` checks that a default call of every tool then compiles nothing). Run it
    once after installing (``make venv`` does), or once per run of the workflow into a shared ``cache_dir``.

    Parameters
    ----------
    cache_dir
        Directory for numba's cache (``NUMBA_CACHE_DIR``), e.g. on a file system that every node of a cluster
        sees; later processes must set the same ``NUMBA_CACHE_DIR``. ``None``: numba's default (``__pycache__``
        next to the installed modules, or the user's cache directory if the installation is read-only).
    verbose
        Print one line per step (on stderr).

    Returns
    -------
    dict
        ``seconds`` (wall time), ``kernels`` (number of compiled kernels), ``signatures`` (specialisations held),
        ``loaded`` and ``compiled`` (specialisations read from the cache and compiled by this call), ``cache_dir``.
    """
    import warnings

    import numpy as np
    import scipy.sparse as sp

    from . import datasets, pp, tl

    t0 = time.perf_counter()
    if cache_dir is not None:
        use_cache_dir(cache_dir)
    _kernel_modules()
    hits0, misses0 = _counts()

    def step(name: str, fn: Callable) -> None:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        if verbose:
            print(f"scmlm warmup: {name} ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)

    # 60 cells a donor: some covariate patterns hold more than NDIRECT (32) cells, so the NB fit builds its V_p
    # tables (``build_tables``, called from Python only for such patterns) as a user's first call does. 6 donors in 3
    # batches and 30 genes: the contrast is testable (with 2 batches, batch = donor % 2 is the condition) and enough
    # genes are usable (models.moderate.MIN_GENES) for the moderation and its kernels (models/moderate_kernel.py) to run
    a = datasets.simulate(n_donors=6, n_cells=60, n_genes=30, n_batches=3, frac_de=0.5, seed=0)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    design = "~ condition + (1|donor) + (1|batch)"
    contrast = ("condition", "case", "ctrl")
    kw = {"min_cells_expressing": 1, "inplace": False, "n_jobs": 1}
    step("glmm_de nb REML", lambda: tl.glmm_de(a, design, contrast, **kw))
    step("glmm_de nb ML lrt", lambda: tl.glmm_de(a, design, contrast, estimation="ML", test="lrt", **kw))
    step("glmm_de poisson", lambda: tl.glmm_de(a, design, contrast, family="poisson", **kw))
    b = a.copy()
    b.X = sp.csr_matrix((np.asarray(a.X.todense()) > 0).astype(np.float64))
    step("glmm_de binomial", lambda: tl.glmm_de(b, design, contrast, family="binomial", offset=None, **kw))
    g = a.copy()
    g.X = sp.csr_matrix(np.log1p(np.asarray(a.X.todense(), dtype=np.float64)))
    step("glmm_de gaussian", lambda: tl.glmm_de(g, design, contrast, family="gaussian", offset=None, **kw))
    step("variance_partition", lambda: tl.variance_partition(a, design, min_cells_expressing=1, n_jobs=1))

    def random_effects() -> None:  # refits the genes of a glmm_de result
        fitted = tl.glmm_de(a, design, contrast, min_cells_expressing=1, n_jobs=1, copy=True)
        tl.random_effects(fitted, genes=list(a.var_names[:2]), inplace=False, n_jobs=1)

    step("random_effects", random_effects)
    step("gee_de", lambda: tl.gee_de(a, "~ condition", contrast, min_cells_expressing=1, inplace=False, n_jobs=1))

    def backed() -> None:  # an h5ad opened backed: gene blocks are read from the file (its float32 / int32 CSR)
        import anndata

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "warmup.h5ad")
            a.write_h5ad(path)
            f = anndata.read_h5ad(path, backed="r")
            try:
                tl.glmm_de(f, design, contrast, **kw)
            finally:
                f.file.close()

    step("glmm_de backed h5ad", backed)
    comp = datasets.simulate_composition(n_donors=4, n_cell_types=3, n_cells=(40, 80), seed=0)
    step("abundance_de", lambda: tl.abundance_de(comp, "~ condition", contrast, inplace=False, n_jobs=1))
    # aggregation keeps the stored dtypes (a cast would copy the whole matrix): every value dtype a count matrix is
    # stored with, and 32- or 64-bit indices (the latter in files with more than 2^31 non-zeros, or written so)
    for dtype in (np.float32, np.float64, np.int32, np.int64):
        for idx in (np.int32, np.int64):
            c = a.copy()
            m = sp.csr_matrix(a.X, dtype=dtype)
            m.indices, m.indptr = m.indices.astype(idx), m.indptr.astype(idx)
            c.X = m
            name = f"pseudobulk {np.dtype(dtype).name} values, {np.dtype(idx).name} indices"
            step(name, lambda c=c: pp.pseudobulk(c, "donor", groups_key="batch"))
    pb = pp.pseudobulk(a, "donor")
    step("pseudobulk_de nb_ql", lambda: tl.pseudobulk_de(pb, "~ condition", contrast, inplace=False))
    step("pseudobulk_de voom", lambda: tl.pseudobulk_de(pb, "~ condition", contrast, method="voom", inplace=False))
    hits, misses = _counts()
    out = {
        "seconds": time.perf_counter() - t0,
        "kernels": len(KERNELS),
        "signatures": sum(len(d.signatures) for d in KERNELS),
        "loaded": hits - hits0,
        "compiled": misses - misses0,
        "cache_dir": os.environ.get("NUMBA_CACHE_DIR") or None,
    }
    return out
