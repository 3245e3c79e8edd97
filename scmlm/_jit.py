"""The one numba decorator of scmlm and the registry of the kernels it compiles.

Every compiled kernel in the package is declared with :func:`jit` (ruff's ``flake8-tidy-imports.banned-api`` rule
forbids ``numba.njit``/``numba.jit`` elsewhere), so all of them share the same options:

* ``cache=True``: the machine code is written to disk the first time a kernel is compiled and loaded from there by
  every later process. numba keys a cache entry by the source file's content, the function, the argument types,
  numba's version and the CPU, and looks for it in ``NUMBA_CACHE_DIR`` if that is set, else in ``__pycache__`` next
  to the installed module, else (read-only installation) in the user's cache directory (``~/.cache/numba``). The
  wheel ships the ``__pycache__`` entries compiled when it was built (``hatch_build.py``); :class:`KernelCache` also
  reads them when numba's cache is elsewhere (``NUMBA_CACHE_DIR``, or a read-only installation), so an installed
  wheel compiles nothing on the machine that built it.
* ``error_model="numpy"``: a division by zero inside a kernel gives ``inf``/``nan`` (which the fits turn into a gene
  status) instead of raising ``ZeroDivisionError`` and failing every gene of the chunk; it also lets LLVM vectorise
  loops that divide.

Compilation is the cost of a first call (tens of seconds for the GLMM kernel); ``scmlm.warmup`` (``scmlm warmup``,
:mod:`scmlm._warmup`) pays it once per installation and CPU. This module imports no other module of scmlm: every
kernel module imports it, so anything it imported would sit in an import cycle with them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
from collections.abc import Callable

import numba
from numba.core.caching import FunctionCache, IndexDataCacheFile

#: every dispatcher created by :func:`jit`, in definition order (the warm-up reports on them)
KERNELS: list = []

_FIXED = ("cache", "error_model", "nopython", "forceobj")


_FROM = re.compile(rb"^[ \t]*from[ \t]+(\.+)([\w.]*)[ \t]+import[ \t]+(?:\(([^)]*)\)|([\w, \t]+))", re.MULTILINE)


def _relative_imports(text: bytes, path: str, root: str) -> set[str]:
    """Files of the package that module ``path`` imports relatively (``from .x import y``, ``from . import x``)."""
    found = set()
    for dots, module, grouped, names in _FROM.findall(text):
        names = grouped or names
        base = os.path.dirname(path)
        for _ in range(len(dots) - 1):
            base = os.path.dirname(base)
        stem = os.path.join(base, *module.decode().split(".")) if module else base
        stems = [stem] + [
            os.path.join(stem, n.strip()) for n in names.decode().replace("\n", ",").split(",") if n.strip()
        ]
        for st in stems:
            for cand in (st + ".py", os.path.join(st, "__init__.py")):
                if cand.startswith(root) and os.path.isfile(cand):
                    found.add(cand)
    return found


@functools.cache
def kernel_sources_stamp() -> str:
    """Return a sha256 of every module that can change what a kernel of scmlm compiles to.

    Those are the modules that define kernels (``from ._jit import jit``) and, transitively, the modules of the package
    they import from (constants and records compiled into the kernels). Computed once per process.
    """
    root = os.path.dirname(os.path.abspath(__file__))
    text: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as fh:
                    text[os.path.join(folder, name)] = fh.read()
    todo = [path for path, src in text.items() if b"_jit import jit" in src]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path not in seen and path in text:
            seen.add(path)
            todo.extend(_relative_imports(text[path], path, root) - seen)
    digest = hashlib.sha256()
    for path in sorted(seen):
        digest.update(os.path.relpath(path, root).encode() + b"\0" + text[path] + b"\0")
    return digest.hexdigest()


class KernelCache(FunctionCache):
    """numba's on-disk cache of one kernel, which falls back to the entries shipped next to the module.

    numba reads and writes one directory per kernel: ``NUMBA_CACHE_DIR``, else the module's ``__pycache__`` if it is
    writable, else the user's cache directory. A wheel installed read-only (or used with ``NUMBA_CACHE_DIR``) would
    then ignore the compiled kernels it ships in ``__pycache__``: this cache looks there when numba's own directory
    has no entry for a signature. New entries are still written to numba's directory only.
    """

    def __init__(self, py_func: Callable) -> None:
        super().__init__(py_func)
        # numba stamps an entry with the content of the kernel's own file only: a kernel whose callee (another
        # module) changed would be loaded stale, with the old callee compiled in. The stamp also covers every kernel
        # module of the package, so an upgrade or an edit of any of them recompiles instead.
        self._cache_file._source_stamp = (self._cache_file._source_stamp, kernel_sources_stamp())
        shipped = os.path.join(os.path.dirname(os.path.abspath(inspect.getfile(py_func))), "__pycache__")
        self._shipped = None
        if os.path.isdir(shipped) and os.path.realpath(shipped) != os.path.realpath(self._cache_path):
            self._shipped = IndexDataCacheFile(shipped, self._impl.filename_base, self._cache_file._source_stamp)

    def _load_overload(self, sig, target_context):
        data = super()._load_overload(sig, target_context)
        if data is None and self._enabled and self._shipped is not None:
            try:
                data = self._shipped.load(self._index_key(sig, target_context.codegen()))
            except OSError:  # an unreadable directory or file: compile, as without it
                data = None
            if data is not None:
                data = self._impl.rebuild(target_context, data)
        return data


def enable_cache(disp) -> None:
    """Give dispatcher ``disp`` a new :class:`KernelCache` (its directory follows numba's configuration now)."""
    disp._cache = KernelCache(disp.py_func)


def jit(func: Callable | None = None, /, **options) -> Callable:
    """Compile ``func`` with numba in nopython mode, cached on disk, with numpy's error model.

    Use as ``@jit`` or ``@jit(nogil=True, fastmath={"reassoc"})``; any ``numba.njit`` option is accepted except those
    this decorator fixes for the whole package (``cache``, ``error_model``, ``nopython``, ``forceobj``).
    """
    fixed = sorted(set(options) & set(_FIXED))
    if fixed:
        raise TypeError(f"scmlm's jit fixes {fixed} for every kernel; remove them from the decorator")

    def wrap(f: Callable) -> Callable:
        # nogil: a kernel called from Python releases the GIL, so gene chunks run in threads (scmlm.engine)
        # cache=False only because numba's own cache object is replaced at once: the kernel is cached on disk
        disp = numba.njit(cache=False, error_model="numpy", **{"nogil": True, **options})(f)
        enable_cache(disp)
        KERNELS.append(disp)
        return disp

    return wrap if func is None else wrap(func)
