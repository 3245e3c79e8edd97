"""Per-gene status codes of the GLMM fits and their strings (the one definition)."""

from __future__ import annotations

ST_OK, ST_SINGULAR, ST_NOCONV, ST_FEW, ST_ZERO, ST_NONFINITE, ST_NOTPD, ST_NONINT, ST_BADY = range(9)
ST_SEPARATED = 9  # set after the kernel by fit_glmm: some fixed effect has no finite estimate

STATUS = {
    ST_OK: "ok",
    ST_SINGULAR: "singular",
    ST_NOCONV: "not converged",
    ST_FEW: "too few expressing cells",
    ST_ZERO: "all zero",
    ST_NONFINITE: "failed: non-finite estimates",
    ST_NOTPD: "failed: Hessian not positive definite",
    ST_NONINT: "failed: counts must be non-negative integers",
    ST_BADY: "failed: successes exceed trials",
    ST_SEPARATED: "separated",
}
"""Per-gene status codes of the kernel and their strings."""
