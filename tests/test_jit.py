"""One numba decorator for the package, and the warm-up that fills numba's cache once per installation."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from numba.core.dispatcher import Dispatcher

import scmlm
from scmlm import _jit, _warmup

KERNEL_MODULE = """
import numpy as np

from scmlm._jit import jit


@jit
def total(x):
    s = 0.0
    for v in x:
        s += v / (v - 1.0)  # v = 1 divides by zero: inf under numpy's error model, not ZeroDivisionError
    return s


if __name__ == "__main__":
    import sys

    print(total(np.array([float(a) for a in sys.argv[1:]])))
    print(sum(total.stats.cache_hits.values()), sum(total.stats.cache_misses.values()))
"""


DEFAULT_CALLS = """
import json
import warnings

import numpy as np

warnings.simplefilter("ignore")
import scmlm
from scmlm import _jit, _warmup

_warmup._kernel_modules()
con = ("condition", "case", "ctrl")
des = "~ condition + (1|donor) + (1|batch)"
a = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=30, n_batches=3, seed=1)
a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
b = a.copy()
b.X = (b.X > 0).astype(np.float64)
g = a.copy()
g.X = np.log1p(g.X.toarray())
scmlm.tl.glmm_de(a, des, con, min_cells_expressing=5)
scmlm.tl.glmm_de(a, des, con, family="poisson", min_cells_expressing=5, key_added="poisson")
scmlm.tl.glmm_de(b, des, con, family="binomial", offset=None, min_cells_expressing=5)
scmlm.tl.glmm_de(g, des, con, family="gaussian", offset=None, min_cells_expressing=5)
scmlm.tl.random_effects(a, genes=list(a.var_names[:3]))
scmlm.tl.variance_partition(a, des, min_cells_expressing=5)
scmlm.tl.gee_de(a, "~ condition", con, min_cells_expressing=5)
import tempfile, anndata
with tempfile.TemporaryDirectory() as tmp:
    a.write_h5ad(tmp + "/a.h5ad")
    f = anndata.read_h5ad(tmp + "/a.h5ad", backed="r")
    scmlm.tl.glmm_de(f, des, con, min_cells_expressing=5, inplace=False)
    f.file.close()
pb = scmlm.pp.pseudobulk(a, "donor")
scmlm.tl.pseudobulk_de(pb, "~ condition", con)
scmlm.tl.pseudobulk_de(pb, "~ condition", con, method="voom")
c = scmlm.datasets.simulate_composition(n_cells=(50, 100), seed=0)
scmlm.tl.abundance_de(c, "~ condition", con)
print(json.dumps({
    "compiled": {d.py_func.__qualname__: n for d in _jit.KERNELS if (n := sum(d.stats.cache_misses.values()))},
    "loaded": sum(sum(d.stats.cache_hits.values()) for d in _jit.KERNELS),
}))
"""


def _all_modules():
    for info in pkgutil.walk_packages(scmlm.__path__, "scmlm."):
        if info.name not in ("scmlm.demo",):
            yield importlib.import_module(info.name)


def test_every_kernel_goes_through_the_package_decorator():
    _warmup._kernel_modules()
    found = [
        (mod.__name__, name, obj)
        for mod in _all_modules()
        for name, obj in vars(mod).items()
        if isinstance(obj, Dispatcher) and obj.py_func.__module__ == mod.__name__
    ]
    assert len(found) >= 40  # the GLMM, edgeR and aggregation kernels
    registered = {id(d) for d in _jit.KERNELS}
    for mod, name, disp in found:
        assert id(disp) in registered, f"{mod}.{name} is compiled without scmlm._jit.jit"
        assert disp.targetoptions["error_model"] == "numpy", f"{mod}.{name}"
        assert isinstance(disp._cache, _jit.KernelCache), f"{mod}.{name} is not cached on disk"


@pytest.mark.parametrize("option", ["cache", "error_model", "nopython"])
def test_jit_refuses_to_change_the_package_options(option):
    with pytest.raises(TypeError, match=option):
        _jit.jit(**{option: False})


def test_cache_dir_is_filled_once_and_read_by_the_next_process(tmp_path):
    """A kernel compiled in one process is loaded, not compiled, by the next one that sets the same cache dir; the
    directory takes precedence over the in-tree ``__pycache__`` (what a read-only installation needs)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny_kernel.py").write_text(textwrap.dedent(KERNEL_MODULE))
    cache = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(src)}

    def run(*args):
        out = subprocess.run(
            [sys.executable, str(src / "tiny_kernel.py"), *args], env=env, capture_output=True, text=True, check=True
        )
        value, counts = out.stdout.strip().splitlines()
        return float(value), tuple(int(c) for c in counts.split())

    value, (hits, misses) = run("2", "3")
    assert value == pytest.approx(2.0 + 1.5)
    assert (hits, misses) == (0, 1)
    assert any(p.suffix == ".nbi" for p in cache.rglob("*")), "no cache index written to NUMBA_CACHE_DIR"
    assert not (src / "__pycache__").exists() or not any((src / "__pycache__").glob("*.nbi"))
    value, (hits, misses) = run("2", "1")
    assert value == float("inf")
    assert (hits, misses) == (1, 0)


def test_cache_shipped_next_to_the_module_is_read_when_numba_caches_elsewhere(tmp_path):
    """What a wheel ships: entries in the module's ``__pycache__`` (compiled at build time) are loaded, not compiled
    again, when numba's cache is elsewhere (``NUMBA_CACHE_DIR`` here; the user's cache directory for a read-only
    installation), and nothing new is written next to the module; a signature not shipped is compiled into numba's
    directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny_kernel.py").write_text(textwrap.dedent(KERNEL_MODULE))
    base = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}

    def run(env, *args):
        out = subprocess.run(
            [sys.executable, str(src / "tiny_kernel.py"), *args], env=env, capture_output=True, text=True, check=True
        )
        value, counts = out.stdout.strip().splitlines()
        return float(value), tuple(int(c) for c in counts.split())

    root = str(Path(scmlm.__file__).resolve().parents[1])  # the scmlm under test, not another installed one
    # no NUMBA_CACHE_DIR: numba caches in the module's __pycache__, as the wheel build does
    shipped = {**base, "PYTHONPATH": os.pathsep.join([str(src), root])}
    assert run(shipped, "2", "3") == (pytest.approx(3.5), (0, 1))
    in_tree = sorted(p.name for p in (src / "__pycache__").glob("*.nb[ic]"))
    assert in_tree, "no cache written next to the module"
    cache = tmp_path / "cache"
    elsewhere = {**shipped, "NUMBA_CACHE_DIR": str(cache)}
    assert run(elsewhere, "2", "3") == (pytest.approx(3.5), (1, 0))
    assert not any(cache.rglob("*.nbi")), "a shipped kernel was compiled again into NUMBA_CACHE_DIR"
    # another signature (integers): compiled, and written to numba's directory, not next to the module
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import numpy as np, tiny_kernel as t; t.total(np.arange(2, 4));"
            "print(sum(t.total.stats.cache_misses.values()))",
        ],
        env=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1"
    assert any(cache.rglob("*.nbi"))
    assert sorted(p.name for p in (src / "__pycache__").glob("*.nb[ic]")) == in_tree


def test_warmup_compiles_one_specialisation_per_kernel_and_later_calls_reuse_it():
    first = scmlm.warmup()
    assert first["kernels"] == len(_jit.KERNELS)
    # the tools normalise dtypes before the kernels: one specialisation each, except the aggregation kernel, which
    # keeps the stored dtypes of the count matrix (4 value dtypes x 2 index widths)
    per_kernel = {d.py_func.__name__: len(d.signatures) for d in _jit.KERNELS}
    assert per_kernel["_csr_group_sums"] == 8
    assert per_kernel["fit_chunk"] == 1
    assert per_kernel["levenberg_nb"] == 1
    # the engine's kernels that cut gene blocks out of the stored matrix read it in place, so they too follow the
    # stored dtypes (copying an atlas to one dtype first is what they avoid); so do those reading a backed h5ad's
    # segments (the file's dtypes)
    stored = {"_csr_group_sums", "_csr_count", "_csr_fill", "_csr_stats", "_csc_count", "_csc_fill"}
    stored |= {"_seg_count", "_seg_fill", "_seg_group_sums"}
    # edgeR's row-sum helpers are called only from other kernels, with whole and sliced arrays (one specialisation per
    # array layout); they get signatures only in a process that compiles their callers (a cold cache), never from Python
    inner = {"_rsum", "_rsum2"}
    assert max(per_kernel[k] for k in inner) <= 2, {k: per_kernel[k] for k in inner}
    assert max(v for k, v in per_kernel.items() if k not in stored | inner) == 1, {
        k: v for k, v in per_kernel.items() if v > 1
    }
    again = scmlm.warmup()
    assert again["compiled"] == 0
    assert again["signatures"] == first["signatures"]


def test_after_warmup_a_default_call_of_every_tool_compiles_nothing():
    """What ``scmlm warmup`` leaves in numba's cache covers the default call of every tool: a later process (same
    installation and cache directory) loads every kernel it needs and compiles none (numba's cache-miss counters)."""
    scmlm.warmup()
    root = str(Path(scmlm.__file__).resolve().parents[1])  # the scmlm under test, not another installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", DEFAULT_CALLS], env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["compiled"] == {}, f"compiled after the warm-up: {counts['compiled']}"
    assert counts["loaded"] > 0


def test_a_kernel_is_recompiled_when_only_its_callee_module_changed(tmp_path):
    """numba stamps a cache entry with its own file's content only; scmlm's stamp also covers the kernel modules of the
    package and what they import, so a kernel whose callee (in another module) changed is not loaded stale."""
    pkg = tmp_path / "kpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_jit.py").write_text(Path(_jit.__file__).read_text())
    (pkg / "consts.py").write_text("SCALE = 2.0\n")
    callee = "from ._jit import jit\nfrom .consts import SCALE\n\n\n@jit\ndef inner(x):\n    return SCALE * x + {}\n"
    (pkg / "callee.py").write_text(callee.format("1.0"))
    (pkg / "caller.py").write_text(
        "from ._jit import jit\nfrom .callee import inner\n\n\n@jit\ndef outer(x):\n    return inner(x)\n"
    )
    probe = "from kpkg.caller import outer\nprint(outer(1.0), sum(outer.stats.cache_misses.values()))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["PYTHONPATH"] = str(tmp_path)

    def run():
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        value, misses = out.stdout.split()
        return float(value), int(misses)

    assert run() == (3.0, 1)  # compiled and cached
    assert run() == (3.0, 0)  # loaded
    (pkg / "callee.py").write_text(callee.format("5.0"))  # the caller's own file is unchanged
    assert run() == (7.0, 1)
    (pkg / "consts.py").write_text("SCALE = 3.0\n")  # a constant compiled into the callee
    assert run() == (8.0, 1)
    assert run() == (8.0, 0)
