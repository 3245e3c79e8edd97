"""Wheel build hook: compile scmlm's numba kernels while the wheel is built and ship numba's cache files in it.

A first call of ``glmm_de`` compiles about a hundred kernel specialisations (~70 s CPU). numba keys its on-disk cache
by a hash of the source file's *content* (numba >= 0.68), the function's bytecode, the argument types, numba's version
and the CPU, and looks for it in ``__pycache__`` next to the module (``<stem>.<qualname>-<line>.pyXY.nbi/.nbc``). So the
cache files written by ``scmlm.warmup()`` on an identical copy of the package are valid after installation, on the same
CPU with the same numba and Python: installing the wheel then needs no compilation at all.

For the standard wheel only (not the editable wheel, not the sdist) this hook copies the package to a temporary
directory, runs ``scmlm.warmup()`` there in a subprocess (the package first on ``PYTHONPATH``, ``NUMBA_CACHE_DIR``
unset, so the in-tree ``__pycache__`` is filled) and adds every ``*.nbi``/``*.nbc`` file it produced to the wheel at the
same relative path. The warm-up needs the runtime dependencies, so ``[build-system].requires`` lists them. If it
cannot run, the hook warns and builds the wheel without cache files (kernels then compile on first use, or with
``scmlm warmup``). ``SCMLM_BUILD_KERNELS=0`` skips it.

The hook is also usable without hatchling (``tests/test_build.py`` and ``python hatch_build.py OUT_DIR``):
:func:`compile_kernels` does the work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # compile_kernels() alone, e.g. from the tests, where hatchling need not be installed
    BuildHookInterface = object

PACKAGE = "scmlm"
SKIP = "SCMLM_BUILD_KERNELS"  # "0": build the wheel without compiled kernels

_WARMUP = "import json, scmlm\ninfo = scmlm.warmup()\ninfo['module'] = scmlm.__file__\nprint(json.dumps(info))\n"


class KernelBuildError(RuntimeError):
    """The warm-up could not run (missing dependencies, a failing kernel, ...); the message says why."""


def compile_kernels(root: str | os.PathLike, work: str | os.PathLike) -> tuple[list[Path], dict]:
    """Copy ``root/scmlm`` into ``work`` and compile every kernel into the copy's ``__pycache__`` directories.

    Returns the cache files, relative to ``work`` (e.g. ``scmlm/models/glmm/__pycache__/fit.fit_chunk-40.py311.nbi``),
    and what ``scmlm.warmup()`` reported. Raises :class:`KernelBuildError` if the warm-up fails.
    """
    root, work = Path(root).resolve(), Path(work).resolve()
    shutil.copytree(root / PACKAGE, work / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT")}
    # keep the build environment's own entries (pip's isolated build puts its site-customisation there)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(work), os.environ.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    env["MPLCONFIGDIR"] = str(work / ".matplotlib")  # no writes to the builder's home
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WARMUP], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise KernelBuildError(f"scmlm.warmup() failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as err:
        raise KernelBuildError(f"scmlm.warmup() printed no report: {proc.stdout[-500:]!r}") from err
    if not Path(info["module"]).resolve().is_relative_to(work):
        raise KernelBuildError(f"the warm-up imported {info['module']}, not the copy in {work}")
    info["build_seconds"] = time.perf_counter() - t0
    files = sorted(p.relative_to(work) for p in (work / PACKAGE).rglob("__pycache__/*") if p.suffix in (".nbi", ".nbc"))
    if not files:
        raise KernelBuildError("scmlm.warmup() ran but wrote no numba cache file next to the package")
    return files, info


class KernelCacheHook(BuildHookInterface):
    """Add the numba cache files of every scmlm kernel to the standard wheel (see the module docstring)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        """Compile the kernels and add their cache files to ``build_data["force_include"]``."""
        self._work = None
        if self.target_name != "wheel" or version != "standard":
            return
        if os.environ.get(SKIP, "1").strip() == "0":
            self.app.display_info(f"scmlm: {SKIP}=0, the wheel ships no compiled kernels")
            return
        self.app.display_info("scmlm: compiling the numba kernels to ship them in the wheel (about 80 s of CPU)")
        self._work = Path(tempfile.mkdtemp(prefix="scmlm_kernels_"))
        try:
            files, info = compile_kernels(self.root, self._work)
        except (KernelBuildError, OSError) as err:
            self.app.display_warning(
                f"scmlm: WARNING: the wheel ships no compiled kernels, the first call of each tool will compile them"
                f" (or run `scmlm warmup` once after installing): {err}"
            )
            return
        for rel in files:
            build_data["force_include"][str(self._work / rel)] = rel.as_posix()
        self.app.display_info(
            f"scmlm: {info['kernels']} kernels, {info['signatures']} specialisations compiled in"
            f" {info['build_seconds']:.0f} s; {len(files)} cache files added to the wheel"
        )

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        """Remove the temporary copy once the wheel is written."""
        if getattr(self, "_work", None) is not None:
            shutil.rmtree(self._work, ignore_errors=True)


if __name__ == "__main__":  # python hatch_build.py OUT_DIR: the package and its cache files, as the wheel holds them
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    found, report = compile_kernels(Path(__file__).parent, out)
    print(f"{len(found)} cache files, {report['signatures']} specialisations in {report['build_seconds']:.0f} s")
