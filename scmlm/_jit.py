"""The one numba decorator of scmlm and the registry of the kernels it compiles.

Every compiled kernel in the package is declared with :func:`jit` (ruff's ``flake8-tidy-imports.banned-api`` rule
forbids ``numba.njit``/``numba.jit`` elsewhere), so all of them share the same options:

* ``cache=True``: the machine code is written to disk the first time a kernel is compiled and loaded from there by
  every later process. numba keys a cache entry by the source file's content, the function, the argument types and
  the CPU, and looks for it in ``NUMBA_CACHE_DIR`` if that is set, else in ``__pycache__`` next to the installed
  module, else (read-only installation) in the user's cache directory (``~/.cache/numba``).
* ``error_model="numpy"``: a division by zero inside a kernel gives ``inf``/``nan`` (which the fits turn into a gene
  status) instead of raising ``ZeroDivisionError`` and failing every gene of the chunk; it also lets LLVM vectorise
  loops that divide.

Compilation is the cost of a first call (tens of seconds for the GLMM kernel); ``scmlm.warmup`` (``scmlm warmup``,
:mod:`scmlm._warmup`) pays it once per installation and CPU. This module imports no other module of scmlm: every
kernel module imports it, so anything it imported would sit in an import cycle with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numba

#: every dispatcher created by :func:`jit`, in definition order (the warm-up reports on them)
KERNELS: list = []

_FIXED = ("cache", "error_model", "nopython", "forceobj")


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
        disp = numba.njit(cache=True, error_model="numpy", **{"nogil": True, **options})(f)
        KERNELS.append(disp)
        return disp

    return wrap if func is None else wrap(func)
