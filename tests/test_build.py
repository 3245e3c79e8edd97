"""The wheel ships the compiled kernels (``hatch_build.py``): an installed wheel compiles nothing on its first call."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import scmlm
from scmlm import _jit, _warmup

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# a user's first call (as benchmarks/bench_cold_start.py), then the kernels this process compiled (cache misses)
FIRST_CALL = """
import json, warnings
warnings.simplefilter("ignore")
import scmlm
from scmlm import _jit
a = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=60, n_batches=3, seed=1)
a = a[a.X.sum(axis=1).A1 > 0].copy()
scmlm.tl.glmm_de(a, "~ condition + (1|donor) + (1|batch)", ("condition", "case", "ctrl"), min_cells_expressing=5)
assert (a.uns["glmm_de"]["results"]["status"] == "ok").any()
pb = scmlm.pp.pseudobulk(a, "donor")
scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"))
print(json.dumps({
    "module": scmlm.__file__,
    "compiled": {d.py_func.__qualname__: n for d in _jit.KERNELS if (n := sum(d.stats.cache_misses.values()))},
    "loaded": sum(sum(d.stats.cache_hits.values()) for d in _jit.KERNELS),
}))
"""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_build_environment_has_every_runtime_dependency():
    """The build hook runs ``scmlm.warmup()``: pip's isolated build environment must hold what scmlm imports."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = {_name(r) for r in conf["build-system"]["requires"]}
    runtime = {_name(r) for r in conf["project"]["dependencies"]}
    assert "hatchling" in build
    assert runtime <= build, f"missing from [build-system].requires: {sorted(runtime - build)}"
    hook = conf["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"]
    assert (ROOT / hook.get("path", "hatch_build.py")).is_file()
    assert "hatch_build.py" in conf["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]


def _hook():
    spec = importlib.util.spec_from_file_location("scmlm_hatch_build", ROOT / "hatch_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_warmup_that_cannot_run_is_reported_not_shipped(tmp_path):
    """The hook turns a failing warm-up into an error that names the cause (it then builds the wheel without kernels,
    with a warning) rather than shipping a partial cache."""
    hook = _hook()
    (tmp_path / "src" / "scmlm").mkdir(parents=True)
    (tmp_path / "src" / "scmlm" / "__init__.py").write_text("import a_dependency_the_build_env_lacks\n")
    with pytest.raises(hook.KernelBuildError, match="a_dependency_the_build_env_lacks"):
        hook.compile_kernels(tmp_path / "src", tmp_path / "work")
    (tmp_path / "src" / "scmlm" / "__init__.py").write_text("def warmup():\n    return {}\n")
    with pytest.raises(hook.KernelBuildError, match="no numba cache file"):
        hook.compile_kernels(tmp_path / "src", tmp_path / "work2")


def _hatchling_path(tmp_path: Path) -> str:
    """Where hatchling can be imported from: this environment, else a target directory it is installed into."""
    if importlib.util.find_spec("hatchling") is not None:
        return ""
    target = tmp_path / "hatchling"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "hatchling"],
        check=True,
        capture_output=True,
    )
    return str(target)


@pytest.mark.slow  # compiles every kernel once (~80 s CPU)
def test_installed_wheel_ships_every_kernel_and_its_first_call_compiles_nothing(tmp_path):
    """Build the wheel with its hook (this environment's packages, no download of dependencies), check that it holds
    numba's cache of every kernel, install it into an empty directory and make a user's first call of ``glmm_de``
    and ``pseudobulk_de`` in a fresh process: every kernel is loaded from the shipped cache, none compiled, both with
    numba's default cache location (next to the package) and with ``NUMBA_CACHE_DIR`` elsewhere (what a read-only
    installation does: it then reads the shipped entries without writing anything)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "SCMLM_"))}
    env["PYTHONPATH"] = _hatchling_path(tmp_path)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "no compiled kernels" not in build.stdout + build.stderr, build.stdout[-3000:]
    (wheel,) = dist.glob("scmlm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        site = tmp_path / "site"
        zf.extractall(site)
    # numba's cache index of the kernels of every kernel module, next to the module
    _warmup._kernel_modules()
    top = Path(scmlm.__file__).resolve().parents[1]
    for module in {Path(d.py_func.__code__.co_filename).resolve().relative_to(top) for d in _jit.KERNELS}:
        index = f"{module.parent.as_posix()}/__pycache__/{module.stem}."
        assert any(n.startswith(index) and n.endswith(".nbi") for n in names), f"no compiled kernel of {module}"
        assert any(n.startswith(index) and n.endswith(".nbc") for n in names), f"no compiled kernel of {module}"
    home = tmp_path / "home"  # also the working directory: `python -c` puts it first on sys.path
    home.mkdir()
    run_env = {**env, "PYTHONPATH": str(site), "HOME": str(home), "XDG_CACHE_HOME": str(home)}
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*.nb[ic]")}
    for numba_dir in (None, tmp_path / "numba_cache"):
        e = run_env if numba_dir is None else {**run_env, "NUMBA_CACHE_DIR": str(numba_dir)}
        out = subprocess.run(
            [sys.executable, "-c", FIRST_CALL], env=e, cwd=home, capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr[-3000:]
        counts = json.loads(out.stdout.strip().splitlines()[-1])
        assert Path(counts["module"]).resolve().is_relative_to(site.resolve())
        assert counts["compiled"] == {}, f"compiled on first call ({numba_dir}): {counts['compiled']}"
        assert counts["loaded"] > 10
    # the wheel holds all that `scmlm warmup` compiles (every default call of every tool), read from elsewhere too
    e = {**run_env, "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}
    warm = "import json, scmlm; print(json.dumps(scmlm.warmup()))"
    out = subprocess.run([sys.executable, "-c", warm], env=e, cwd=home, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["compiled"] == 0
    # every specialisation the warm-up calls directly was read from the wheel (kernels called only from other kernels
    # are linked into their callers' cached code and never loaded on their own)
    assert info["loaded"] == info["signatures"] > 15
    assert {p: p.stat().st_mtime_ns for p in site.rglob("*.nb[ic]")} == before  # nothing compiled or written
    assert not any((tmp_path / "numba_cache").rglob("*.nbi"))
