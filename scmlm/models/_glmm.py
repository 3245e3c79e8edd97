"""Cell-level generalised linear mixed models, fitted gene by gene (numpy/scipy API around a numba kernel).

Model for one gene::

    y_i ~ family(mu_i),   g(mu_i) = offset_i + x_i' beta + z_i' b,   b ~ N(0, Lambda(theta) Lambda(theta)')

with any number of crossed or nested random intercepts and correlated or uncorrelated random slopes
(:class:`~scmlm.models._random.RandomTerm`), and families ``nb`` (NB2, log), ``poisson`` (log), ``binomial``
(logit) and ``gaussian`` (identity).

Estimation (the model glmmTMB fits): conditional modes by penalised Newton/IRLS with the exact Hessian of the joint
log density; variance parameters ``theta`` and the dispersion by maximising the Laplace approximation of the marginal
likelihood. ``method="ML"``: only ``b`` is integrated and ``beta`` maximises the Laplace likelihood together with the
variance parameters; ``cov_beta`` is the ``beta`` block of the inverse Hessian of that likelihood in all fixed
parameters (glmmTMB's ``sdreport``). ``method="REML"``: ``beta`` is integrated out too (log-determinant of the whole
``(beta, b)`` Hessian, glmmTMB's ``REML=TRUE``); ``beta`` is then the joint mode of ``(beta, b)`` and ``cov_beta``
the ``beta`` block of the inverse of that Hessian. See ``_glmm_kernel`` for the numerical scheme.

Typical use (the engine calls :func:`fit_glmm` on chunks of genes with one shared :class:`GLMMDesign`)::

    design = prepare_glmm(X, terms, offset=np.log(total_counts), family="nb")
    res = fit_glmm(Y_chunk, design, method="REML")
    df = np.minimum(contrast_df(X, terms, L), satterthwaite_df(res, L))
    tab = glmm_contrast(res, L, df=df)

Statuses (``GLMMResult.status``): ``"ok"``; ``"singular"`` (a variance parameter at zero, a valid converged fit);
``"not converged"`` (estimates of the last iterate are kept, ``converged`` is False); ``"separated"`` (some fixed
effect has no finite estimate, or the fitted one is beyond what the data can carry; NaN estimates, see
:func:`separated_genes`); ``"too few expressing cells"`` and ``"all zero"`` (not fitted); ``"failed: <reason>"``
(NaN estimates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import stats

from . import _glmm_kernel as K
from ._families import BINOMIAL, GAUSSIAN, NB, Family, get_family
from ._random import RandomTerm, n_theta, q_total, term_slices

STATUS = {
    K.ST_OK: "ok",
    K.ST_SINGULAR: "singular",
    K.ST_NOCONV: "not converged",
    K.ST_FEW: "too few expressing cells",
    K.ST_ZERO: "all zero",
    K.ST_NONFINITE: "failed: non-finite estimates",
    K.ST_NOTPD: "failed: Hessian not positive definite",
    K.ST_NONINT: "failed: counts must be non-negative integers",
    K.ST_BADY: "failed: successes exceed trials",
    K.ST_SEPARATED: "separated",
}
"""Per-gene status codes of the kernel and their strings."""

NDIRECT = 32
"""Patterns with at most this many cells evaluate ``V_p`` directly instead of from a table."""

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
class GLMMDesign:
    """Everything about a GLMM that does not depend on the gene; build once with :func:`prepare_glmm`.

    The observations are grouped into covariate patterns (distinct rows of the fixed design and the random-term
    codes and covariates); the kernel works on pattern-level sums, so its cost per gene is the number of non-zero
    counts plus the number of patterns. The object is small and picklable (it is sent to every worker).
    """

    family: Family
    n_obs: int
    n_fixed: int
    n_random: int
    n_theta: int
    n_patterns: int
    terms: tuple[RandomTerm, ...] = field(repr=False)
    theta_names: tuple[str, ...] = ()
    component_names: tuple[str, ...] = ()
    kernel_arrays: tuple = field(repr=False, default=())

    @property
    def has_dispersion(self) -> bool:
        return self.family.has_dispersion


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
        return self.beta.shape[0]


@dataclass(frozen=True)
class ContrastResult:
    """Test of ``L' beta = 0`` per gene."""

    coef: np.ndarray
    se: np.ndarray
    stat: np.ndarray
    df: np.ndarray
    pvalue: np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# design


def _theta_map(terms: tuple[RandomTerm, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    th_term, th_j, th_i, names = [], [], [], []
    for ti, t in enumerate(terms):
        k = t.k
        if k == 1:
            th_term.append(ti)
            th_j.append(0)
            th_i.append(0)
            names.append(f"{t.name}")
        elif t.correlated:
            for j in range(k):
                for i in range(j + 1):
                    th_term.append(ti)
                    th_j.append(j)
                    th_i.append(i)
                    names.append(f"{t.name}[{t.col_names[j]},{t.col_names[i]}]")
        else:
            for j in range(k):
                th_term.append(ti)
                th_j.append(j)
                th_i.append(j)
                names.append(f"{t.name}[{t.col_names[j]}]")
    as_int = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return as_int(th_term), as_int(th_j), as_int(th_i), names


def prepare_glmm(
    X: np.ndarray,
    terms: tuple[RandomTerm, ...] | list[RandomTerm],
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
) -> GLMMDesign:
    """Precompute the covariate patterns and tables shared by all genes of a GLMM.

    Parameters
    ----------
    X
        ``n x p`` fixed-effect design (full column rank).
    terms
        Random-effect terms; may be empty (a GLM).
    offset
        Length-``n`` offset on the linear-predictor scale (e.g. log total counts); zero when ``None``. For the
        Gaussian family it is subtracted from the response.
    family
        ``"nb"``, ``"poisson"``, ``"binomial"`` or ``"gaussian"``.
    trials
        Binomial only: length-``n`` numbers of trials shared by all genes. ``None`` means 0/1 detection
        (``y > 0`` counts as a success, one trial per cell).

    Returns
    -------
    The design object to pass to :func:`fit_glmm`.
    """
    fam = get_family(family)
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-d array, got shape {X.shape}.")
    n, p = X.shape
    terms = tuple(terms)
    off = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64).ravel()
    if off.shape != (n,):
        raise ValueError(f"offset has shape {off.shape}; expected ({n},).")
    if not np.all(np.isfinite(off)):
        raise ValueError("offset has non-finite values (log of a zero library size?).")
    if trials is not None:
        if fam.code != BINOMIAL:
            raise ValueError("trials is only used by the binomial family.")
        trials = np.asarray(trials, dtype=np.float64).ravel()
        if trials.shape != (n,) or np.any(trials < 0):
            raise ValueError(f"trials must be a non-negative vector of length {n}.")
    for t in terms:
        if t.codes.shape != (n,) or t.covariates.shape[0] != n:
            raise ValueError(f"random term {t.name!r} does not have {n} observations.")

    # patterns: distinct rows of (X, codes, covariates); the offset is per cell
    key_parts = [X]
    for t in terms:
        key_parts.append(np.asarray(t.codes, dtype=np.float64)[:, None])
        key_parts.append(np.asarray(t.covariates, dtype=np.float64))
    key = np.hstack(key_parts) if key_parts else np.zeros((n, 0))
    _, first, pat = np.unique(key, axis=0, return_index=True, return_inverse=True)
    pat = np.asarray(pat, dtype=np.int64).ravel()
    P = first.size
    Xp = np.ascontiguousarray(X[first])

    # Z structure per pattern: slots (term t occupies k_t slots)
    q = q_total(terms)
    m = int(sum(t.k for t in terms))
    Zc = np.zeros((P, max(m, 1)), dtype=np.int64)
    Zv = np.zeros((P, max(m, 1)))
    tk, tslot, tth, tcorr, tcol0, tnlev = [], [], [], [], [], []
    slot = 0
    for t, (zs, ts) in zip(terms, term_slices(terms), strict=True):
        k = t.k
        codes = np.asarray(t.codes, dtype=np.int64)[first]
        cov = np.asarray(t.covariates, dtype=np.float64)[first]
        for j in range(k):
            Zc[:, slot + j] = zs.start + codes * k + j
            Zv[:, slot + j] = cov[:, j]
        tk.append(k)
        tslot.append(slot)
        tth.append(ts.start)
        tcorr.append(1 if (t.correlated and k > 1) else 0)
        tcol0.append(zs.start)
        tnlev.append(t.n_levels)
        slot += k
    if m == 0:
        Zc = np.zeros((P, 0), dtype=np.int64)
        Zv = np.zeros((P, 0))
    th_term, th_j, th_i, th_names = _theta_map(terms)

    # cells sorted by pattern
    order = np.argsort(pat, kind="stable")
    counts = np.bincount(pat, minlength=P)
    cell_ptr = np.zeros(P + 1, dtype=np.int64)
    cell_ptr[1:] = np.cumsum(counts)
    cell_o = np.ascontiguousarray(off[order])
    if fam.code == BINOMIAL and trials is not None:
        cw = trials
    else:
        cw = np.ones(n)
    cell_c = np.ascontiguousarray(cw[order])
    npat = counts.astype(np.float64)
    w = np.exp(off)
    Mp = np.bincount(pat, weights=cw * w, minlength=P)
    sum_o = np.bincount(pat, weights=off, minlength=P)
    sum_o2 = np.bincount(pat, weights=off * off, minlength=P)
    lin_c = np.bincount(pat, weights=cw, minlength=P)
    lin_co = np.bincount(pat, weights=cw * off, minlength=P)
    ser_lo = np.zeros((P, K.NSER))
    ser_hi = np.zeros((P, K.NSER))
    for mm in range(1, K.NSER + 1):
        ser_lo[:, mm - 1] = np.bincount(pat, weights=cw * np.exp(mm * off), minlength=P)
        ser_hi[:, mm - 1] = np.bincount(pat, weights=cw * np.exp(-mm * off), minlength=P)

    # V_p tables (NB and binomial)
    needs_v = fam.code in (NB, BINOMIAL)
    omax = np.full(P, -np.inf)
    omin = np.full(P, np.inf)
    np.maximum.at(omax, pat, off)
    np.minimum.at(omin, pat, off)
    # V mode: 0 table, 1 direct sum over the pattern's cells, 2 a single cell (evaluated exactly, no U_p surrogate)
    vmode = np.where(counts <= NDIRECT, 1, 0).astype(np.int64) if needs_v else np.ones(P, dtype=np.int64)
    if needs_v:
        vmode[counts == 1] = 2
    vlo = -K.TAIL - omax
    vhi = K.TAIL - omin
    tab_n = np.where(vmode == 0, np.ceil((vhi - vlo) / K.HV).astype(np.int64) + 1, 0).astype(np.int64)
    tab_start = np.zeros(P, dtype=np.int64)
    tab_start[1:] = np.cumsum(tab_n)[:-1]
    tab = np.zeros((int(tab_n.sum()), K.KV + 1))
    if needs_v and tab.shape[0] > 0:
        K.build_tables(cell_ptr, cell_o, cell_c, vmode, vlo, tab_start, tab_n, tab)

    tr = np.zeros(0) if trials is None else trials
    # compact kernel arrays (see the index map in _glmm_kernel)
    TI = np.array([tk, tslot, tth, tcorr, tcol0, tnlev], dtype=np.int64).T.reshape(len(terms), 6)
    THI = np.array([th_term, th_j, th_i], dtype=np.int64).T.reshape(th_term.size, 3)
    PF = np.column_stack([npat, Mp, vlo, vhi, lin_c, lin_co, sum_o, sum_o2, ser_lo, ser_hi])
    PI = np.zeros((P + 1, 3), dtype=np.int64)
    PI[:P, 0] = vmode
    PI[:P, 1] = tab_start
    PI[:, 2] = cell_ptr
    dz = (
        Xp,
        np.ascontiguousarray(Zc),
        np.ascontiguousarray(Zv),
        np.ascontiguousarray(TI),
        np.ascontiguousarray(THI),
        np.ascontiguousarray(PF),
        PI,
        tab,
        cell_o,
        cell_c,
        pat,
        np.ascontiguousarray(off),
        np.ascontiguousarray(tr),
    )
    comp_names = tuple(c for t in terms for c in t.component_names())
    return GLMMDesign(
        family=fam,
        n_obs=n,
        n_fixed=p,
        n_random=q,
        n_theta=n_theta(terms),
        n_patterns=P,
        terms=terms,
        theta_names=tuple(th_names),
        component_names=comp_names,
        kernel_arrays=dz,
    )


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

    Returns
    -------
    Per-gene estimates; a gene that cannot be fitted keeps NaN statistics and a ``status`` saying why. Never raises
    for one gene.

    Examples
    --------
    >>> import numpy as np
    >>> from scmlm.models._random import intercept_term
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
    tau_bounds = np.log(np.asarray(NB_PHI_BOUNDS, dtype=np.float64))
    with np.errstate(all="ignore"):
        K.fit_chunk(
            fam.code,
            method == "REML",
            has_tau,
            nth,
            p,
            q,
            design.kernel_arrays,
            indptr,
            indices,
            data,
            int(min_nonzero),
            int(max_iter),
            tau_bounds,
            beta,
            cov,
            theta,
            phi,
            ll,
            rll,
            b,
            bse,
            status,
            n_iter,
            hpsi,
            dcov,
            frozen,
        )
    sep = separated_genes(indptr, indices, data, design, status, beta, cov)
    status[sep] = K.ST_SEPARATED
    converged = (status == K.ST_OK) | (status == K.ST_SINGULAR)
    failed = ~converged & (status != K.ST_NOCONV)
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
    Xp, pat = design.kernel_arrays[0], design.kernel_arrays[10]
    Xf, inv = np.unique(Xp, axis=0, return_inverse=True)
    return Xf, np.asarray(inv).ravel()[pat]


def _separating_direction(Xf: np.ndarray, mixed: np.ndarray, fail: np.ndarray, succ: np.ndarray) -> bool:
    """Whether some ``d != 0`` has ``Xf d = 0`` on ``mixed`` rows, ``<= 0`` on ``fail`` and ``>= 0`` on ``succ`` rows,
    strictly somewhere: the log-likelihood then increases without bound along ``d`` (Albert & Anderson 1984; the
    linear program of Konis 2007, R's ``detectseparation``)."""
    from scipy.optimize import linprog

    nf, ns, p = int(fail.sum()), int(succ.sum()), Xf.shape[1]
    if nf + ns == 0:
        return False
    c = Xf[fail].sum(axis=0) - Xf[succ].sum(axis=0)
    A_ub = np.vstack([Xf[fail], -Xf[fail], -Xf[succ], Xf[succ]])
    b_ub = np.concatenate([np.zeros(nf), np.ones(nf), np.zeros(ns), np.ones(ns)])
    A_eq = Xf[mixed] if mixed.any() else None
    b_eq = np.zeros(int(mixed.sum())) if mixed.any() else None
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(None, None)] * p, method="highs")
    return bool(res.status == 0 and res.fun < -1e-7)


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
    conv = (status == K.ST_OK) | (status == K.ST_SINGULAR)
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
    fitted = ~np.isin(status, (K.ST_FEW, K.ST_ZERO, K.ST_NONINT, K.ST_BADY))
    Y = sp.csc_matrix((data, indices, indptr), shape=(n, G))
    trials = design.kernel_arrays[12]
    binomial = fam.code == BINOMIAL
    if binomial and trials.size == 0:
        Y.data = (Y.data != 0).astype(np.float64)
        trials = np.ones(n)
    A = sp.csr_matrix((np.ones(n), (row, np.arange(n))), shape=(F, n))
    S = np.asarray((A @ Y).todense())
    T = A @ (trials if binomial else np.ones(n))
    fail = S == 0
    succ = (S >= T[:, None] - 1e-9) if binomial else np.zeros_like(fail)
    for g in np.flatnonzero(fitted & (fail | succ).any(axis=0)):
        if not sep[g] and _separating_direction(Xf, ~fail[:, g] & ~succ[:, g], fail[:, g], succ[:, g]):
            sep[g] = True
    return sep


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


# ----------------------------------------------------------------------------------------------------------------
# inference


def glmm_contrast(result: GLMMResult, L: np.ndarray, df: float | np.ndarray | None = None) -> ContrastResult:
    """Wald test of ``L' beta = 0`` for every gene.

    Parameters
    ----------
    result
        From :func:`fit_glmm` (use ``method="REML"`` for calibrated tests with few donors).
    L
        Length-``p`` contrast vector.
    df
        Denominator degrees of freedom, a number or one per gene; ``None`` or ``inf`` gives a z test, otherwise a t
        test. Recommended for REML fits: ``np.minimum(contrast_df(X, terms, L), satterthwaite_df(result, L))``
        (on simulated 10-donor case-control nulls the containment df alone gives 4-6.3 % of p < 0.05, the minimum
        4-5.9 %; the z test 9-15 %).

    Returns
    -------
    ``coef = L' beta``, ``se``, ``stat = coef / se``, ``df`` and the two-sided ``pvalue``; NaN for genes that failed.
    """
    L = np.asarray(L, dtype=np.float64).ravel()
    if L.size != result.beta.shape[1]:
        raise ValueError(f"contrast has {L.size} entries; the model has {result.beta.shape[1]} coefficients.")
    coef = result.beta @ L
    with np.errstate(invalid="ignore"):
        var = np.einsum("i,gij,j->g", L, result.cov_beta, L)
        se = np.sqrt(np.where(var >= 0, var, np.nan))
        stat = coef / se
    G = coef.size
    dfa = np.full(G, np.inf) if df is None else np.broadcast_to(np.asarray(df, dtype=np.float64), (G,)).copy()
    pvalue = np.full(G, np.nan)
    ok = np.isfinite(stat)
    zmask = ok & ~np.isfinite(dfa)
    tmask = ok & np.isfinite(dfa)
    pvalue[zmask] = 2.0 * stats.norm.sf(np.abs(stat[zmask]))
    pvalue[tmask] = 2.0 * stats.t.sf(np.abs(stat[tmask]), dfa[tmask])
    return ContrastResult(coef=coef, se=se, stat=stat, df=dfa, pvalue=pvalue)


def satterthwaite_df(result: GLMMResult, L: np.ndarray) -> np.ndarray:
    """Satterthwaite degrees of freedom of ``L' beta`` for every gene.

    ``df = 2 V^2 / (g' A g)`` with ``V = L' cov(beta) L``, ``g`` its derivative in the variance parameters
    ``psi = (theta, [log phi])`` and ``A`` the inverse negative Hessian of the criterion in ``psi`` (lmerTest's
    method, with the REML criterion of a ``method="REML"`` fit). Parameters estimated at zero are treated as known.
    Derivatives are forward differences from the last Newton iteration of the fit.

    Parameters
    ----------
    result
        From :func:`fit_glmm`.
    L
        Length-``p`` contrast vector.

    Returns
    -------
    ``(G,)`` degrees of freedom (``inf`` when the variance parameters do not affect the contrast; NaN for failed
    genes).
    """
    L = np.asarray(L, dtype=np.float64).ravel()
    G = result.beta.shape[0]
    out = np.full(G, np.nan)
    if result.hess_psi is None or result.dcov_beta is None:
        return out
    V = np.einsum("i,gij,j->g", L, result.cov_beta, L)
    grad = np.einsum("i,gkij,j->gk", L, result.dcov_beta, L)
    for g in range(G):
        keep = ~result.psi_at_zero[g]
        H = -result.hess_psi[g][np.ix_(keep, keep)]
        gv = grad[g, keep]
        if not (np.isfinite(V[g]) and np.all(np.isfinite(H)) and np.all(np.isfinite(gv))):
            continue
        if gv.size == 0:
            out[g] = np.inf
            continue
        lam, U = np.linalg.eigh(0.5 * (H + H.T))
        pos = lam > 1e-10 * max(lam.max(initial=0.0), 1e-300)
        c = U[:, pos].T @ gv
        var_v = float(np.sum(c**2 / lam[pos]))
        out[g] = 2.0 * V[g] ** 2 / var_v if var_v > 0 else np.inf
    return out


def glmm_wald_f(result: GLMMResult, L: np.ndarray, df: float | np.ndarray | None = None) -> ContrastResult:
    """Joint Wald test of ``L beta = 0`` (``L``: q x p, rows linearly independent) for every gene.

    ``F = (L b)' (L cov(b) L')^{-1} (L b) / q`` on ``F(q, df)``; ``df`` ``None`` or ``inf`` gives the Wald
    chi-square on ``q`` df (as ``F * q``). ``coef`` and ``se`` are NaN (there is no single estimate), ``stat`` is F.
    With one row this is the square of :func:`glmm_contrast`'s t and the same p-value.
    """
    L = np.atleast_2d(np.asarray(L, dtype=np.float64))
    q, p = L.shape
    if p != result.beta.shape[1]:
        raise ValueError(f"contrast has {p} columns; the model has {result.beta.shape[1]} coefficients.")
    G = result.beta.shape[0]
    est = result.beta @ L.T  # G x q
    M = np.einsum("ai,gij,bj->gab", L, result.cov_beta, L)
    stat = np.full(G, np.nan)
    ok = np.all(np.isfinite(est), axis=1) & np.all(np.isfinite(M), axis=(1, 2))
    for g in np.flatnonzero(ok):
        try:
            c = np.linalg.cholesky(0.5 * (M[g] + M[g].T))
        except np.linalg.LinAlgError:
            continue
        z = np.linalg.solve(c, est[g])
        stat[g] = float(z @ z) / q
    dfa = np.full(G, np.inf) if df is None else np.broadcast_to(np.asarray(df, dtype=np.float64), (G,)).copy()
    pvalue = np.full(G, np.nan)
    fin = np.isfinite(stat)
    zmask = fin & ~np.isfinite(dfa)
    fmask = fin & np.isfinite(dfa)
    pvalue[zmask] = stats.chi2.sf(stat[zmask] * q, q)
    pvalue[fmask] = stats.f.sf(stat[fmask], q, dfa[fmask])
    nan = np.full(G, np.nan)
    return ContrastResult(coef=nan, se=nan.copy(), stat=stat, df=dfa, pvalue=pvalue)


def satterthwaite_df_f(result: GLMMResult, L: np.ndarray) -> np.ndarray:
    """Denominator df of the joint Wald F of ``L beta`` (q x p), lmerTest's method for several contrasts.

    Per gene, ``L cov(beta) L' = P diag(lam) P'``; each direction ``P' L`` gets its Satterthwaite df ``nu_i`` as in
    :func:`satterthwaite_df`, and ``E = sum nu_i / (nu_i - 2)`` gives ``df = 2 E / (E - q)``; equal ``nu_i`` give
    their value and any ``nu_i <= 2`` gives 2 (lmerTest's ``get_Fstat_ddf``). One row: :func:`satterthwaite_df`.
    """
    L = np.atleast_2d(np.asarray(L, dtype=np.float64))
    q = L.shape[0]
    if q == 1:
        return satterthwaite_df(result, L[0])
    G = result.beta.shape[0]
    out = np.full(G, np.nan)
    if result.hess_psi is None or result.dcov_beta is None:
        return out
    M = np.einsum("ai,gij,bj->gab", L, result.cov_beta, L)
    for g in range(G):
        if not np.all(np.isfinite(M[g])):
            continue
        lam, P = np.linalg.eigh(0.5 * (M[g] + M[g].T))
        rows = P.T @ L
        keep = ~result.psi_at_zero[g]
        H = -result.hess_psi[g][np.ix_(keep, keep)]
        if not np.all(np.isfinite(H)):
            continue
        nu = np.full(q, np.inf)
        if keep.any():
            hl, U = np.linalg.eigh(0.5 * (H + H.T))
            pos = hl > 1e-10 * max(hl.max(initial=0.0), 1e-300)
            for i in range(q):
                gv = np.einsum("i,kij,j->k", rows[i], result.dcov_beta[g], rows[i])[keep]
                if not np.all(np.isfinite(gv)):
                    nu[i] = np.nan
                    continue
                c = U[:, pos].T @ gv
                var_v = float(np.sum(c**2 / hl[pos]))
                nu[i] = 2.0 * lam[i] ** 2 / var_v if var_v > 0 else np.inf
        if np.any(np.isnan(nu)):
            continue
        if np.all(np.isinf(nu)):
            out[g] = np.inf
            continue
        if np.all(np.abs(np.diff(nu)) < 1e-8 * np.abs(nu[:-1])):
            out[g] = float(np.mean(nu))
        elif np.any(nu <= 2):
            out[g] = 2.0
        else:
            E = float(np.sum(np.where(np.isinf(nu), 1.0, nu / (nu - 2))))
            out[g] = 2.0 * E / (E - q)
    return out


def _constant_within(x: np.ndarray, codes: np.ndarray, n_levels: int, tol: float) -> bool:
    lo = np.full(n_levels, np.inf)
    hi = np.full(n_levels, -np.inf)
    np.minimum.at(lo, codes, x)
    np.maximum.at(hi, codes, x)
    present = np.isfinite(lo)
    return bool(np.all(hi[present] - lo[present] <= tol * (1.0 + np.abs(x).max())))


def _rank(A: np.ndarray) -> int:
    if A.size == 0:
        return 0
    A = np.unique(A, axis=0)
    return int(np.linalg.matrix_rank(A))


def contrast_df(X: np.ndarray, terms: tuple[RandomTerm, ...] | list[RandomTerm], L: np.ndarray) -> float:
    """Denominator degrees of freedom of a Wald t test of ``L' beta`` (between-level residual df, as nlme).

    A contrast of donor-level coefficients (e.g. case vs control across donors) is estimated from donor-level
    variation: its standard error depends on the estimated donor variance, which carries about
    ``n_donors - (number of donor-level coefficients)`` degrees of freedom, not ``n_cells``. With 10 donors the Wald z
    test gives ~15 % of p < 0.05 on null genes and a t test with 8 df on the REML fit ~4.5 %. The rule:

    * for each random term's grouping factor ``g`` such that every column of ``X`` used by the contrast is constant
      within the levels of ``g``: ``df_g = n_levels(g) - rank(columns of X constant within g)``; a contrast column
      that is the covariate of a random slope at ``g`` also counts as contained in ``g``; then
      ``df_g = n_levels(g) - rank(those slope columns)``;
    * ``df = min_g df_g`` over the grouping factors that contain the contrast;
    * otherwise (a within-level contrast, e.g. condition varying within donor without a random slope) the residual
      degrees of freedom ``n - rank([X, Z])``, which is large, so within-donor contrasts keep the power of the z test.

    The result does not depend on the gene; compute it once per design and contrast. Satterthwaite's approximation
    would adapt to the gene's variance components but needs the derivative of the contrast variance in ``theta``
    for every gene; the containment rule is what the calibration tests use.

    Parameters
    ----------
    X
        ``n x p`` fixed design.
    terms
        Random-effect terms.
    L
        Length-``p`` contrast vector.

    Returns
    -------
    Degrees of freedom (at least 1).
    """
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    L = np.asarray(L, dtype=np.float64).ravel()
    if L.size != p:
        raise ValueError(f"contrast has {L.size} entries; X has {p} columns.")
    used = np.flatnonzero(np.abs(L) > 1e-12)
    best = np.inf
    for t in terms:
        codes = np.asarray(t.codes, dtype=np.int64)
        nl = int(t.n_levels)
        n_present = int(np.unique(codes).size)
        const = np.array([_constant_within(X[:, j], codes, nl, 1e-8) for j in range(p)], dtype=bool)
        # X columns that are covariates of a random slope over the same grouping factor
        slope = np.zeros(p, dtype=bool)
        for t2 in terms:
            if t2.n_levels != nl or not np.array_equal(np.asarray(t2.codes), codes):
                continue
            for c, cname in enumerate(t2.col_names):
                if cname == "(Intercept)":
                    continue
                cov = np.asarray(t2.covariates[:, c], dtype=np.float64)
                for j in range(p):
                    if np.allclose(X[:, j], cov, rtol=1e-10, atol=1e-12):
                        slope[j] = True
        if used.size and np.all(const[used]):
            dfg = n_present - _rank(X[:, const])
        elif used.size and np.all(const[used] | slope[used]):
            dfg = n_present - _rank(X[:, slope])
        else:
            continue
        best = min(best, dfg)
    if not np.isfinite(best):
        Zcols = [X]
        for t in terms:
            Zd = np.zeros((n, t.q))
            cols = np.asarray(t.codes, dtype=np.int64)[:, None] * t.k + np.arange(t.k)[None, :]
            np.put_along_axis(Zd, cols, np.asarray(t.covariates, dtype=np.float64), axis=1)
            Zcols.append(Zd)
        best = n - _rank(np.hstack(Zcols))
    return float(max(best, 1))


def glmm_lrt(
    Y,
    X: np.ndarray,
    terms: tuple[RandomTerm, ...] | list[RandomTerm],
    L: np.ndarray,
    offset: np.ndarray | None = None,
    *,
    family: str | Family = "nb",
    trials: np.ndarray | None = None,
    df: float | None = None,
    full: GLMMResult | None = None,
    min_nonzero: int = 3,
    n_units: int | None = None,
) -> ContrastResult:
    """Likelihood-ratio test of ``L' beta = 0`` (Laplace ML fits of the full and the constrained model).

    The constrained model uses ``X N`` with ``N`` an orthonormal basis of the null space of ``L'``. The statistic is
    ``LR = 2 (loglik_full - loglik_reduced)``; the p-value is chi-square(1) when ``df`` is ``None``. With ``df`` (the
    contrast's residual df at its level) and ``n_units`` (the number of units it is replicated by, e.g. donors) the
    LR is turned into the F statistic it is a function of in a normal linear model of the ``n_units`` unit means,
    ``F = df (exp(LR / n_units) - 1)``, referred to ``F(1, df)``; without ``n_units``, ``F = LR``. Referring LR
    itself to F(1, df) is far too conservative with few units (LR grows only like ``n log(1 + t²/df)``), and
    chi-square(1) anticonservative (ML variances are biased down). ``coef``/``se`` are the Wald values of the full
    ML fit; ``stat`` is the signed root of the LR statistic.

    Parameters
    ----------
    Y
        As for :func:`fit_glmm`.
    X, terms, offset, family, trials
        As for :func:`prepare_glmm`.
    L
        Length-``p`` contrast vector.
    df
        Denominator df, or ``None`` for the chi-square reference.
    n_units
        Number of units replicating the contrast (see above); ``None`` for a cell-level contrast.
    full
        An ML fit of the full model of the same genes, if already available.
    min_nonzero
        As for :func:`fit_glmm`.
    """
    X = np.asarray(X, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64).ravel()
    if full is None:
        full = fit_glmm(
            Y, prepare_glmm(X, terms, offset, family=family, trials=trials), method="ML", min_nonzero=min_nonzero
        )
    elif full.method != "ML":
        raise ValueError("the likelihood-ratio test needs an ML fit of the full model (method='ML').")
    _, s, vt = np.linalg.svd(L[None, :])
    N = vt[1:].T
    red = fit_glmm(
        Y, prepare_glmm(X @ N, terms, offset, family=family, trials=trials), method="ML", min_nonzero=min_nonzero
    )
    wald = glmm_contrast(full, L)
    with np.errstate(invalid="ignore"):
        lr = np.maximum(2.0 * (full.loglik - red.loglik), 0.0)
        ok = full.converged & red.converged & np.isfinite(lr)
        lr = np.where(ok, lr, np.nan)
        stat = np.sign(wald.coef) * np.sqrt(lr)
    G = lr.size
    pvalue = np.full(G, np.nan)
    if df is None or not np.isfinite(df):
        pvalue[ok] = stats.chi2.sf(lr[ok], 1)
        dfa = np.full(G, np.inf)
    else:
        fstat = lr[ok] if not n_units else float(df) * np.expm1(lr[ok] / float(n_units))
        pvalue[ok] = stats.f.sf(fstat, 1, df)
        dfa = np.full(G, float(df))
    return ContrastResult(coef=wald.coef, se=wald.se, stat=stat, df=dfa, pvalue=pvalue)
