"""Cell-level generalised linear mixed models, fitted gene by gene (numpy/scipy API around a numba kernel).

Model for one gene::

    y_i ~ family(mu_i),   g(mu_i) = offset_i + x_i' beta + z_i' b,   b ~ N(0, Lambda(theta) Lambda(theta)')

with any number of crossed or nested random intercepts and correlated or uncorrelated random slopes
(:class:`~scmlm.models.RandomTerm`), and families ``nb`` (NB2, log), ``poisson`` (log), ``binomial``
(logit) and ``gaussian`` (identity).

Estimation (the model glmmTMB fits): conditional modes by penalised Newton/IRLS with the exact Hessian of the joint
log density; variance parameters ``theta`` and the dispersion by maximising the Laplace approximation of the marginal
likelihood. ``method="ML"``: only ``b`` is integrated and ``beta`` maximises the Laplace likelihood together with the
variance parameters; ``cov_beta`` is the ``beta`` block of the inverse Hessian of that likelihood in all fixed
parameters (glmmTMB's ``sdreport``). ``method="REML"``: ``beta`` is integrated out too (log-determinant of the whole
``(beta, b)`` Hessian, glmmTMB's ``REML=TRUE``); ``beta`` is then the joint mode of ``(beta, b)`` and ``cov_beta``
the ``beta`` block of the inverse of that Hessian. See :mod:`scmlm.models.glmm` for the numerical scheme.

Typical use (the engine calls :func:`fit_glmm` on chunks of genes with one shared :class:`GLMMDesign`)::

    design = prepare_glmm(X, terms, offset=np.log(total_counts), family="nb")
    res = fit_glmm(Y_chunk, design, method="REML")
    df = np.minimum(contrast_df(X, terms, L), satterthwaite_df(res, L))
    tab = glmm_contrast(res, L, df=df)

Statuses (``GLMMResult.status``): ``"ok"``; ``"singular"`` (a variance parameter at zero, a valid converged fit);
``"not converged"`` (estimates of the last iterate are kept, ``converged`` is False); ``"separated"`` (some fixed
effect has no finite estimate, or the fitted one is beyond what the data can carry; NaN estimates, see
:func:`separated_genes`; :func:`~scmlm.models.separated_lrt` tests such genes); ``"too few expressing cells"``
and ``"all zero"`` (not fitted); ``"failed: <reason>"`` (NaN estimates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..._jit import jit
from .._families import BINOMIAL, GAUSSIAN, NB
from .._random import RandomTerm, term_slices
from .chunk import fit_chunk
from .design import GLMMDesign
from .records import ChunkInput, FitControl, KernelConfig, KernelOut
from .status import ST_BADY, ST_FEW, ST_NOCONV, ST_NONINT, ST_OK, ST_SEPARATED, ST_SINGULAR, ST_ZERO, STATUS

NB_PHI_BOUNDS = (1e-8, 1e3)
"""Range of the NB dispersion; a fit at the lower bound is a Poisson fit."""

SEP_ETA_RANGE = 15.0
"""A converged fit whose fixed-effect linear predictor (offset excluded) spans more than this between covariate
patterns (a ratio of e^15 ~ 3e6) is taken as near-separated."""

SEP_SE = 100.0
"""... as is one where the SE of some pattern's fixed linear predictor, centred at the mean pattern, exceeds this."""

SEP_MAX_ROWS = 256
"""The exact (linear-programming) separation check runs when the fixed design has at most this many distinct rows."""


@dataclass(frozen=True)
class GLMMResult:
    """Per-gene GLMM fits of one chunk (arrays over genes, in input order).

    ``theta`` holds, per term, the Cholesky factor of its covariance by rows (correlated terms) or its SDs, with a
    non-negative diagonal; ``var`` the variance of each random-effect column (``var[<component name>]``). ``phi`` is
    the NB dispersion (``Var = mu + phi mu^2``) or the Gaussian residual variance, NaN for Poisson and binomial.
    ``loglik`` is the Laplace-approximated marginal log-likelihood (exact for Gaussian) at the estimates, with all
    constants; ``restricted_loglik`` the REML criterion (``beta`` integrated out). ``b``/``b_se`` are the conditional
    modes of the random effects (columns ordered as ``Z``) and their conditional SDs given ``beta`` and the variance
    parameters (square roots of the diagonal of the inverse penalised Hessian, lme4's ``condVar``).
    """

    beta: np.ndarray
    cov_beta: np.ndarray
    theta: np.ndarray
    var: dict[str, np.ndarray]
    phi: np.ndarray
    loglik: np.ndarray
    restricted_loglik: np.ndarray
    b: np.ndarray
    b_se: np.ndarray
    converged: np.ndarray
    status: np.ndarray
    n_iter: np.ndarray
    method: str
    family: str
    hess_psi: np.ndarray | None = None
    """``(G, n_psi, n_psi)`` Hessian of the (restricted) criterion in ``psi = (theta, [log phi])`` at the estimates."""
    dcov_beta: np.ndarray | None = None
    """``(G, n_psi, p, p)`` derivative of ``cov_beta`` in ``psi`` (for :func:`satterthwaite_df`)."""
    psi_at_zero: np.ndarray | None = None
    """``(G, n_psi)`` variance parameters fixed at zero (boundary), excluded from Satterthwaite's approximation."""

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.beta.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# fitting


def _as_gene_columns(Y, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """CSC arrays with genes as columns from a dense ``(G, n)`` array or a sparse ``(n, G)`` matrix."""
    if sp.issparse(Y):
        if Y.shape[0] != n:
            raise ValueError(f"sparse Y must be cells x genes with {n} rows; got shape {Y.shape}.")
        Yc = sp.csc_matrix(Y)
        G = Yc.shape[1]
    else:
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[None, :]
        if Y.shape[1] != n:
            raise ValueError(f"dense Y must be genes x cells with {n} columns; got shape {Y.shape}.")
        Yc = sp.csr_matrix(Y)  # rows = genes: the same layout as CSC of cells x genes
        G = Yc.shape[0]
    Yc.sort_indices()
    return (
        np.asarray(Yc.indptr, dtype=np.int64),
        np.asarray(Yc.indices, dtype=np.int64),
        np.asarray(Yc.data, dtype=np.float64),
        G,
    )


def fit_glmm(
    Y,
    design: GLMMDesign,
    *,
    method: str = "REML",
    min_nonzero: int = 3,
    max_iter: int = 60,
    check_separation: bool = True,
) -> GLMMResult:
    """Fit the GLMM of ``design`` to every gene of ``Y``.

    Parameters
    ----------
    Y
        Responses: dense ``(G, n)`` array (genes x cells) or sparse ``(n, G)`` matrix (cells x genes, e.g. a CSC
        slice of ``adata.X``). Count families need non-negative integers.
    design
        From :func:`prepare_glmm`.
    method
        ``"REML"`` (variance parameters from the restricted Laplace criterion; the default, used for inference) or
        ``"ML"`` (Laplace maximum likelihood, as glmmTMB's default).
    min_nonzero
        Genes with fewer non-zero values get status ``"too few expressing cells"`` and are not fitted.
    max_iter
        Maximum outer (variance-parameter) Newton iterations.
    check_separation
        Flag separated and near-separated genes (:func:`separated_genes`). ``False`` keeps every converged fit, for
        the supremum fits of :func:`~scmlm.models.separated_lrt` (data without the boundary patterns, where a large
        but finite estimate is the supremum itself).

    Returns
    -------
    Per-gene estimates; a gene that cannot be fitted keeps NaN statistics and a ``status`` saying why. Never raises
    for one gene.

    Examples
    --------
    >>> import numpy as np
    >>> from scmlm.models import intercept_term, prepare_glmm
    >>> rng = np.random.default_rng(0)
    >>> donor = np.repeat(np.arange(6), 50)
    >>> X = np.column_stack([np.ones(300), donor % 2])
    >>> Y = rng.poisson(np.exp(0.5 + rng.normal(0, 0.3, 6)[donor]), size=(2, 300))
    >>> res = fit_glmm(Y, prepare_glmm(X, [intercept_term("donor", donor)], family="poisson"))
    >>> res.status.tolist()
    ['ok', 'ok']
    """
    method = method.upper()
    if method not in ("REML", "ML"):
        raise ValueError(f"method={method!r}; use 'REML' or 'ML'.")
    fam = design.family
    indptr, indices, data, G = _as_gene_columns(Y, design.n_obs)
    p, q, nth = design.n_fixed, design.n_random, design.n_theta
    has_tau = fam.code in (NB, GAUSSIAN)
    beta = np.full((G, p), np.nan)
    cov = np.full((G, p, p), np.nan)
    theta = np.full((G, nth), np.nan)
    phi = np.full(G, np.nan)
    ll = np.full(G, np.nan)
    rll = np.full(G, np.nan)
    b = np.full((G, q), np.nan)
    bse = np.full((G, q), np.nan)
    status = np.zeros(G, dtype=np.int64)
    n_iter = np.zeros(G, dtype=np.int64)
    n_psi = nth + int(has_tau)
    hpsi = np.full((G, n_psi, n_psi), np.nan)
    dcov = np.full((G, n_psi, p, p), np.nan)
    frozen = np.zeros((G, n_psi), dtype=bool)
    tau_lo, tau_hi = np.log(np.asarray(NB_PHI_BOUNDS, dtype=np.float64))
    cf = KernelConfig(int(fam.code), int(method == "REML"), int(has_tau), int(nth), int(p), int(q), 0)
    control = FitControl(int(min_nonzero), int(max_iter), float(tau_lo), float(tau_hi))
    out = KernelOut(beta, cov, theta, phi, ll, rll, b, bse, status, n_iter, hpsi, dcov, frozen)
    with np.errstate(all="ignore"):
        fit_chunk(cf, design.kernel_arrays, ChunkInput(indptr, indices, data), control, out)
    if check_separation:
        sep = separated_genes(indptr, indices, data, design, status, beta, cov)
        status[sep] = ST_SEPARATED
    converged = (status == ST_OK) | (status == ST_SINGULAR)
    failed = ~converged & (status != ST_NOCONV)
    for arr in (beta, cov, theta, phi, ll, rll, b, bse, hpsi, dcov):
        arr[failed] = np.nan
    if method == "ML":
        rll[:] = np.nan
    var = _variance_components(design.terms, theta)
    return GLMMResult(
        beta=beta,
        cov_beta=cov,
        theta=theta,
        var=var,
        phi=phi,
        loglik=ll,
        restricted_loglik=rll,
        b=b,
        b_se=bse,
        converged=converged,
        status=np.array([STATUS[int(s)] for s in status], dtype=object),
        n_iter=n_iter,
        method=method,
        family=fam.name,
        hess_psi=hpsi,
        dcov_beta=dcov,
        psi_at_zero=frozen,
    )


def _fixed_rows(design: GLMMDesign) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the fixed design and the row of each cell."""
    Xp, pat = design.kernel_arrays.x_cells, design.kernel_arrays.cell_xrow
    Xf, inv = np.unique(Xp, axis=0, return_inverse=True)
    return Xf, np.asarray(inv).ravel()[pat]


def _separating_direction(Xf: np.ndarray, mixed: np.ndarray, fail: np.ndarray, succ: np.ndarray) -> bool:
    """Whether some ``d != 0`` has ``Xf d = 0`` on ``mixed`` rows, ``<= 0`` on ``fail`` and ``>= 0`` on ``succ`` rows,
    strictly somewhere: the log-likelihood then increases without bound along ``d`` (Albert & Anderson 1984; the
    linear program of Konis 2007, R's ``detectseparation``)."""
    return _separation_lp(Xf, mixed, fail, succ) is not None


def _separation_lp(Xf: np.ndarray, mixed: np.ndarray, fail: np.ndarray, succ: np.ndarray) -> np.ndarray | None:
    """The separating direction ``d`` of :func:`_separating_direction`'s linear program, or None when there is none."""
    from scipy.optimize import linprog

    nf, ns, p = int(fail.sum()), int(succ.sum()), Xf.shape[1]
    if nf + ns == 0:
        return None
    c = Xf[fail].sum(axis=0) - Xf[succ].sum(axis=0)
    A_ub = np.vstack([Xf[fail], -Xf[fail], -Xf[succ], Xf[succ]])
    b_ub = np.concatenate([np.zeros(nf), np.ones(nf), np.zeros(ns), np.ones(ns)])
    A_eq = Xf[mixed] if mixed.any() else None
    b_eq = np.zeros(int(mixed.sum())) if mixed.any() else None
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(None, None)] * p, method="highs")
    return res.x if res.status == 0 and res.fun < -1e-7 else None


def separated_genes(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    design: GLMMDesign,
    status: np.ndarray,
    beta: np.ndarray,
    cov: np.ndarray,
) -> np.ndarray:
    """Genes whose fixed effects have no finite estimate (separation) or whose fit is beyond what the data carry.

    * Exact check on the data (count families, for every fitted gene): a linear combination of the fixed effects that
      is zero on the covariate patterns with non-zero counts and negative on some all-zero pattern (binomial: also
      positive on patterns where every trial is a success) makes the likelihood increase without bound, e.g. a
      contrast level in which the gene has no counts at all. Random effects are penalised and do not change this.
      Run when the fixed design has at most :data:`SEP_MAX_ROWS` distinct rows.
    * Near-separation (converged fits): the fixed-effect linear predictor spans more than :data:`SEP_ETA_RANGE`
      across patterns, or its SE at some pattern (centred at the mean pattern) exceeds :data:`SEP_SE`.

    Returns a boolean mask over genes.
    """
    fam = design.family
    G = status.size
    sep = np.zeros(G, dtype=bool)
    if fam.code == GAUSSIAN or G == 0:
        return sep
    Xf, row = _fixed_rows(design)
    F, n = Xf.shape[0], design.n_obs
    conv = (status == ST_OK) | (status == ST_SINGULAR)
    if conv.any():
        with np.errstate(invalid="ignore", over="ignore"):
            eta = beta[conv] @ Xf.T
            span = np.max(eta, axis=1) - np.min(eta, axis=1)
            w = np.bincount(row, minlength=F) / n
            Xc = Xf - w @ Xf
            se = np.sqrt(np.max(np.abs(np.einsum("ri,gij,rj->gr", Xc, cov[conv], Xc)), axis=1))
        sep[conv] = ~(np.isfinite(span) & (span <= SEP_ETA_RANGE) & np.isfinite(se) & (se <= SEP_SE))
    if F > SEP_MAX_ROWS or F < 2:
        return sep
    fitted = ~np.isin(status, (ST_FEW, ST_ZERO, ST_NONINT, ST_BADY))
    fail, succ = _pattern_extremes(indptr, indices, data, design, row, F)
    for g in np.flatnonzero(fitted & (fail | succ).any(axis=0)):
        if not sep[g] and _separating_direction(Xf, ~fail[:, g] & ~succ[:, g], fail[:, g], succ[:, g]):
            sep[g] = True
    return sep


def _pattern_extremes(indptr, indices, data, design: GLMMDesign, row: np.ndarray, F: int):
    """``(F, G)`` masks of the fixed-design patterns where a gene has no counts (``fail``) and, binomial, where every
    trial is a success (``succ``)."""
    n = design.n_obs
    trials = design.kernel_arrays.trials
    binomial = design.family.code == BINOMIAL
    detect = binomial and trials.size == 0
    if detect:
        trials = np.ones(n)
    # one pass over the non-zeros (sums of integer counts: the same numbers as a sparse product, without building a
    # CSC copy of the chunk and a patterns x cells matrix; issue 20 measured that at 19.5 % of a 400k-cell fit)
    S = _pattern_sums(indptr, indices, data, np.ascontiguousarray(row, dtype=np.int64), int(F), bool(detect))
    T = np.bincount(row, weights=trials if binomial else None, minlength=F).astype(np.float64)
    fail = S == 0
    succ = (S >= T[:, None] - 1e-9) if binomial else np.zeros_like(fail)
    return fail, succ


@jit(nogil=True)
def _pattern_sums(indptr, indices, data, row, n_rows, detect):  # pragma: no cover - compiled
    """``(n_rows, G)`` sums of each gene's values (``detect``: of ``value != 0``) over the cells of each pattern."""
    G = indptr.size - 1
    S = np.zeros((n_rows, G))
    for g in range(G):
        for k in range(indptr[g], indptr[g + 1]):
            v = data[k]
            if detect:
                v = 1.0 if v != 0 else 0.0
            S[row[indices[k]], g] += v
    return S


def _driven_rows(Xf: np.ndarray, free: np.ndarray, fail: np.ndarray, succ: np.ndarray) -> np.ndarray:
    """The ``fail``/``succ`` rows some separating direction drives strictly to the boundary; ``free`` rows (already
    driven) are unconstrained, the other rows held at zero. Same linear program as :func:`_separating_direction`."""
    fail, succ = fail & ~free, succ & ~free
    out = np.zeros(Xf.shape[0], dtype=bool)
    x = _separation_lp(Xf, ~free & ~fail & ~succ, fail, succ)
    if x is None:
        return out
    eta = Xf @ x
    out[fail] = eta[fail] < -1e-7
    out[succ] = eta[succ] > 1e-7
    return out


def boundary_patterns(Y, design: GLMMDesign) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed-design patterns each gene's likelihood drives to the boundary (mean 0, or binomial probability 1).

    A pattern is on the boundary when some direction of the fixed effects along which the likelihood never decreases
    moves its linear predictor to -inf (no counts there) or +inf (binomial: all successes) while keeping every pattern
    not on the boundary fixed. The maximal set is found by repeating the linear program of
    :func:`separated_genes` with the patterns found so far left free. Such cells contribute a factor tending to 1 to
    the likelihood (a probability mass at most 1, so never more), and the supremum of the likelihood is the maximum
    of the model fitted to the other cells (see :func:`~scmlm.models.separated_lrt`).

    Returns ``(Xf, row, on)``: the distinct fixed-design rows ``(F, p)``, the pattern of each cell and the
    ``(G, F)`` mask of boundary patterns (all False when the design has more than :data:`SEP_MAX_ROWS` patterns).
    """
    indptr, indices, data, G = _as_gene_columns(Y, design.n_obs)
    Xf, row = _fixed_rows(design)
    F = Xf.shape[0]
    on = np.zeros((G, F), dtype=bool)
    if F > SEP_MAX_ROWS or design.family.code == GAUSSIAN or G == 0:
        return Xf, row, on
    fail, succ = _pattern_extremes(indptr, indices, data, design, row, F)
    for g in np.flatnonzero((fail | succ).any(axis=0)):
        while True:
            new = _driven_rows(Xf, on[g], fail[:, g], succ[:, g])
            if not new.any():
                break
            on[g] |= new
    return Xf, row, on


def _variance_components(terms: tuple[RandomTerm, ...], theta: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for t, (_, ts) in zip(terms, term_slices(terms), strict=True):
        th = theta[:, ts]
        k = t.k
        if k == 1 or not t.correlated:
            vals = th**2
        else:
            Ls = np.zeros((theta.shape[0], k, k))
            r, c = np.tril_indices(k)
            Ls[:, r, c] = th
            vals = np.einsum("gij,gij->gi", Ls, Ls)
        for j, name in enumerate(t.component_names()):
            out[name] = vals[:, j]
    return out
