"""Cold start: the first call of ``glmm_de`` and ``pseudobulk_de`` in a fresh process, from a fresh installation.

The wheel is built once, as ``pip install REPO`` builds it (``pip wheel --no-deps``, isolated build environment: the
build hook ``hatch_build.py`` compiles the kernels and ships numba's cache files in the wheel); its build time (wall
and CPU), size and number of cache files are printed. Then each figure comes from its own Python process (wall and
CPU time from interpreter start, imports included, and how many kernels the process compiled instead of loading them
from numba's cache):

  cold     first process after a fresh non-editable install of that wheel (the package directory is deleted before
           installing, and the user-wide cache directory is new: only the cache files shipped in the wheel exist)
  second   the next process on the same installation
  ro-cold  a read-only installation (the package directory bind-mounted read-only in a private mount namespace, so
           numba can write neither there nor, as root, ignore the permissions), first process
  ro-2nd   the next process on it
  ro-warm  the same read-only installation after ``scmlm warmup`` (numba's user-wide cache)
  ro-dir   the same read-only installation with ``NUMBA_CACHE_DIR`` filled by ``scmlm warmup --cache-dir``

Bars (issue 20): cold first call ≤ 10 s and second process ≤ 3 s (wall, imports included); read-only after one
warm-up ≤ 3 s. The last lines say whether each bar is met (wall time, and CPU time, which load does not inflate).

    python benchmarks/bench_cold_start.py [--venv /tmp/venv_cold] [--wheel dist/scmlm-*.whl] [--skip-readonly]
    python benchmarks/bench_cold_start.py --source /path/to/old/checkout --source . [--only glmm_de]

``--source`` (repeatable) measures source checkouts instead of an installation, with this interpreter: each
checkout on ``PYTHONPATH``, numba's cache in a new empty ``NUMBA_CACHE_DIR`` per figure:

  cold     first process with an empty cache
  second   the next process on the same cache
  warmup   ``scmlm.warmup()`` into another empty cache
  warmed   a process on the cache the warm-up filled (should compile nothing)

``--venv`` reuses a venv that already has the dependencies (scmlm itself is reinstalled there from the wheel,
``--force-reinstall --no-deps``); without it a new venv is built in a temporary directory and the wheel installed with
its dependencies. ``--wheel`` measures an existing wheel instead of building one. The read-only runs need root and
``unshare`` (a mount namespace); they are skipped otherwise. The load average is printed with every figure: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR_COLD, BAR_SECOND = 10.0, 3.0  # seconds (issue 20)
# the read-only runs: the package directory ($0) bind-mounted read-only in a private mount namespace, then the command
_READONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'

# the kernels this process compiled (numba's cache misses)
_COMPILED = "from scmlm._jit import KERNELS\nprint(sum(sum(d.stats.cache_misses.values()) for d in KERNELS))\n"

# what a user's first call looks like: a small simulated dataset, the public API, default settings
PROBE = {
    "glmm_de": (
        "import scmlm\n"
        # 3 batches: with 2, batch (donor % 2) is the condition (odd donors) and no gene is testable
        "a = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=60, n_batches=3, seed=1)\n"
        "a = a[a.X.sum(axis=1).A1 > 0].copy()\n"
        "scmlm.tl.glmm_de(a, '~ condition + (1|donor) + (1|batch)', ('condition', 'case', 'ctrl'),"
        " min_cells_expressing=5)\n"
        "assert (a.uns['glmm_de']['results']['status'] == 'ok').any()\n" + _COMPILED
    ),
    "pseudobulk_de": (
        "import scmlm\n"
        "a = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=200, n_batches=2, seed=1)\n"
        "pb = scmlm.pp.pseudobulk(a, 'donor')\n"
        "scmlm.tl.pseudobulk_de(pb, '~ condition', ('condition', 'case', 'ctrl'))\n"
        "assert (pb.uns['pseudobulk_de']['results']['status'] == 'ok').any()\n" + _COMPILED
    ),
}


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _site_packages(py: Path) -> Path:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _build_wheel(py: Path, repo: Path, out: Path) -> Path:
    """Build the wheel of ``repo`` as ``pip install REPO`` does (isolated build environment, build hook included)."""
    cmd = [str(py), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(repo)]
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    (wheel,) = out.glob("scmlm-*.whl")
    print(f"wheel build: {dt:.1f} s wall {dc:.1f} s cpu ({_load()})", flush=True)
    return wheel


def _describe(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    nbi = sum(n.endswith(".nbi") for n in names)
    nbc = sum(n.endswith(".nbc") for n in names)
    print(f"wheel: {wheel.name} {wheel.stat().st_size / 1e6:.1f} MB, {nbi} .nbi + {nbc} .nbc numba cache files")


def _install(py: Path, wheel: Path, deps: bool) -> None:
    """(Re)install ``wheel``. The old package directory is removed first: pip leaves numba's cache files written after
    installation (not in the wheel's RECORD) in ``__pycache__``, and numba keys them by source content, so they would
    be reused."""
    old = _site_packages(py) / "scmlm"
    if old.exists():
        subprocess.run(["chmod", "-R", "u+w", str(old)], check=True)
        shutil.rmtree(old)
    cmd = [str(py), "-m", "pip", "install", "-q", "--force-reinstall", str(wheel)]
    if not deps:
        cmd.insert(-1, "--no-deps")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _env(cache_home: Path, numba_dir: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "SCMLM_"))}
    env.update(XDG_CACHE_HOME=str(cache_home), HOME=str(cache_home), OMP_NUM_THREADS="1", MPLCONFIGDIR=str(cache_home))
    if numba_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_dir)
    return env


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], env: dict, readonly: Path | None = None) -> tuple[float, float, str]:
    """Wall time, CPU time (user + system, all threads; less sensitive to load) and the last line ``cmd`` printed;
    ``readonly``: run with that directory mounted read-only."""
    if readonly is not None:
        cmd = ["unshare", "--mount", "sh", "-c", _READONLY, str(readonly), *cmd]
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=env["HOME"])
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return dt, dc, lines[-1] if lines else ""


def _home(tmp: Path) -> Path:
    """A new empty home (and XDG cache), so no numba cache of an earlier run is found."""
    return Path(tempfile.mkdtemp(dir=tmp))


def _probe(py: Path, what: str, env: dict, readonly: Path | None = None) -> tuple[float, float, str]:
    return _run([str(py), "-c", PROBE[what]], env, readonly)


_FIGURES: dict = {}  # (label, what) -> [(wall, cpu, compiled), ...]


def _report(label: str, what: str, t: tuple[float, float, str]) -> None:
    compiled = f"{t[2]:>4s} kernels compiled" if t[2].isdigit() else " " * 21
    print(f"  {what:14s} {label:8s} {t[0]:7.1f} s wall {t[1]:7.1f} s cpu {compiled}  ({_load()})", flush=True)
    _FIGURES.setdefault((label, what), []).append(t)


def _bars(whats: list[str]) -> None:
    """Whether the worst run of each measured function meets the issue's bars, by wall and by CPU time."""
    for what in whats:
        cold, second = _FIGURES.get(("cold", what)), _FIGURES.get(("second", what))
        if not cold or not second:
            continue
        for i, kind in enumerate(("wall", "cpu")):
            c, s = max(t[i] for t in cold), max(t[i] for t in second)
            ok = c <= BAR_COLD and s <= BAR_SECOND
            verdict = "" if ok else "NOT "
            print(
                f"{what} ({kind}): cold first call {c:.1f} s, second process {s:.1f} s: "
                f"{verdict}cold first call ≤ {BAR_COLD:.0f} s and second process ≤ {BAR_SECOND:.0f} s"
            )
        ro = _FIGURES.get(("ro-warm", what))
        for i, kind in enumerate(("wall", "cpu") if ro else ()):
            w = max(t[i] for t in ro)
            print(f"{what} ({kind}): read-only after one warm-up {w:.1f} s: {'' if w <= BAR_SECOND else 'NOT '}≤ 3 s")


def _sources(sources: list[str], whats: list[str], repeat: int, tmp: Path) -> None:
    """Cold, second, warm-up and warmed figures of source checkouts (``--source``), this interpreter."""
    py = Path(sys.executable)
    for rep in range(repeat):
        print(f"run {rep + 1}")
        for src in sources:
            src_path = Path(src).resolve()
            print(f" {src_path}")

            def env(cache: Path, src_path=src_path) -> dict:
                return {**_env(Path(tempfile.mkdtemp(dir=tmp)), cache), "PYTHONPATH": str(src_path)}

            for what in whats:
                e = env(Path(tempfile.mkdtemp(dir=tmp)))
                _report("cold", what, _probe(py, what, e))
                _report("second", what, _probe(py, what, e))
            e = env(Path(tempfile.mkdtemp(dir=tmp)))
            _report("warmup", "(all kernels)", _run([str(py), "-c", "import scmlm; scmlm.warmup()"], e))
            for what in whats:
                _report("warmed", what, _probe(py, what, e))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=None, help="venv with the dependencies installed (scmlm is reinstalled)")
    ap.add_argument("--repo", default=str(REPO), help="source tree to install (default: this checkout)")
    ap.add_argument("--wheel", default=None, help="install this wheel instead of building one from --repo")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the whole measurement")
    ap.add_argument("--skip-readonly", action="store_true")
    ap.add_argument("--only", choices=sorted(PROBE), action="append", help="measure only this function")
    ap.add_argument("--source", action="append", help="measure this source checkout (repeatable), not an install")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    whats = args.only or sorted(PROBE)
    tmp = Path(tempfile.mkdtemp(prefix="scmlm_cold_"))
    os.chmod(tmp, 0o755)
    if args.source:
        try:
            _sources(args.source, whats, args.repeat, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    try:
        venv = Path(args.venv) if args.venv else tmp / "venv"
        py = venv / "bin" / "python"
        if args.venv is None:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # built by the pip of the measured environment, exactly as `pip install REPO` would build it there
        wheel = Path(args.wheel).resolve() if args.wheel else _build_wheel(py, repo, tmp / "dist")
        _describe(wheel)
        if args.venv is None:
            _install(py, wheel, deps=True)
        site = _site_packages(py)
        readonly = not args.skip_readonly and os.geteuid() == 0 and shutil.which("unshare") is not None
        print(f"scmlm cold start: {py} ({site / 'scmlm'})")
        for rep in range(args.repeat):
            print(f"run {rep + 1}")
            for what in whats:
                _install(py, wheel, deps=False)  # a fresh installation: only the cache files the wheel ships
                home = Path(tempfile.mkdtemp(dir=tmp))
                env = _env(home)
                _report("cold", what, _probe(py, what, env))
                _report("second", what, _probe(py, what, env))
            if not readonly:
                continue
            _install(py, wheel, deps=False)
            ro = site / "scmlm"
            scmlm_cli = str(venv / "bin" / "scmlm")
            for what in whats:
                env = _env(_home(tmp))
                _report("ro-cold", what, _probe(py, what, env, ro))
                _report("ro-2nd", what, _probe(py, what, env, ro))
            env = _env(_home(tmp))
            _report("warmup", "(all kernels)", _run([scmlm_cli, "warmup"], env, ro))
            for what in whats:
                _report("ro-warm", what, _probe(py, what, env, ro))
            shared = _home(tmp) / "numba_cache"
            _report("warmup", "(--cache-dir)", _run([scmlm_cli, "warmup", "--cache-dir", str(shared)], env, ro))
            for what in whats:
                _report("ro-dir", what, _probe(py, what, _env(_home(tmp), shared), ro))
        _bars(whats)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
