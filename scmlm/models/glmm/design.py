"""Design of a cell-level GLMM: covariate patterns, random-term map and ``V_p`` tables, built once per design and
shared by all genes (:func:`prepare_glmm`, :class:`GLMMDesign`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._families import BINOMIAL, NB, Family, get_family
from .._random import RandomTerm, n_theta, q_total, term_slices
from .likelihood import build_tables
from .records import KernelDesign, PatternTables, TermMap
from .special import HV, KV, NSER, TAIL

NDIRECT = 32
"""Patterns with at most this many cells evaluate ``V_p`` directly instead of from a table."""

GROUP_MIN_PATTERNS = 64
"""NB designs with more covariate patterns than this (a cell-level continuous covariate) are tried as groups of cells
on a line (see :func:`_line_groups`)."""


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
    kernel_arrays: KernelDesign | None = field(repr=False, default=None)

    @property
    def has_dispersion(self) -> bool:
        """Whether the family has a dispersion parameter (NB, Gaussian)."""
        return self.family.has_dispersion


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


def _line_groups(X: np.ndarray, terms: tuple[RandomTerm, ...], P: int):
    """Groups of cells whose design rows lie on a line, ``row_i = B0_g + t_i B1_g``, or ``None``.

    Cells share a group when they share the random-term levels and the columns with few distinct values
    (categorical); the remaining (continuous) columns must be affine in one standardised covariate ``t`` within each
    group, as for ``~ x + (1 + x|donor)``. Used when there are at least 8 patterns per group row.
    Returns ``(group of each cell, B0 rows, B1 rows, t of each cell, max |t| per group)`` over ``[X, covariates]``.
    """
    n = X.shape[0]
    A = np.hstack([X] + [np.asarray(t.covariates, dtype=np.float64) for t in terms])
    disc = np.array([np.unique(A[:, j]).size <= 16 for j in range(A.shape[1])], dtype=bool)
    key = np.hstack([np.asarray(t.codes, dtype=np.float64)[:, None] for t in terms] + [A[:, disc]])
    _, gfirst, grp = np.unique(key, axis=0, return_index=True, return_inverse=True)
    grp = np.asarray(grp, dtype=np.int64).ravel()
    G = gfirst.size
    if 16 * G > P:
        return None
    cont = np.flatnonzero(~disc)
    base = A[gfirst].copy()
    slope = np.zeros_like(base)
    t = np.zeros(n)
    tabs = np.zeros(G)
    by_group = np.argsort(grp, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(grp, minlength=G))])
    for g in range(G):
        idx = by_group[ptr[g] : ptr[g + 1]]
        C = A[np.ix_(idx, cont)]
        mu = C.mean(axis=0)
        D = C - mu
        base[g, cont] = mu
        scale = max(float(np.abs(C).max(initial=0.0)), 1.0)
        if np.abs(D).max(initial=0.0) <= 1e-12 * scale:
            continue
        _, s, vt = np.linalg.svd(D, full_matrices=False)
        if s.size > 1 and s[1] > 1e-9 * s[0]:
            return None  # two or more continuous directions
        tg = D @ vt[0]
        sd = float(tg.std())
        tg /= sd
        b1 = vt[0] * sd
        if np.abs(D - np.outer(tg, b1)).max() > 1e-9 * scale:
            return None
        slope[g, cont] = b1
        t[idx] = tg
        tabs[g] = np.abs(tg).max()
    return grp, base, slope, t, tabs


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

    Xp, pat, row_codes, row_cov, groups = _patterns(X, terms, fam)
    P = Xp.shape[0]
    Zc, Zv, tmap = _z_slots(terms, row_codes, row_cov, P)
    th_names = _theta_map(terms)[3]
    cell_cls, cls_pat, cls_off = _offset_classes(pat, off)
    vt, order = _pattern_tables(fam, pat, P, off, trials, groups is not None, (cell_cls, cls_pat, cls_off))
    cw = trials if (fam.code == BINOMIAL and trials is not None) else np.ones(n)
    counts = np.bincount(pat, minlength=P)
    cell_t, tabs = (groups[3], groups[4]) if groups is not None else (None, None)
    none = np.zeros(0)
    dz = KernelDesign(
        x_rows=Xp,
        z_col=np.ascontiguousarray(Zc),
        z_val=np.ascontiguousarray(Zv),
        terms=tmap,
        pat_n=counts.astype(np.float64),
        pat_m=np.bincount(pat, weights=cw * np.exp(off), minlength=P),
        pat_sum_o=np.bincount(pat, weights=off, minlength=P),
        pat_sum_o2=np.bincount(pat, weights=off * off, minlength=P),
        vtabs=vt,
        cell_pat=pat,
        cell_off=np.ascontiguousarray(off),
        trials=np.ascontiguousarray(none if trials is None else trials),
        cell_t_sorted=np.ascontiguousarray(cell_t[order]) if groups is not None else none,
        cell_t=np.ascontiguousarray(cell_t) if groups is not None else none,
        grp_tmax=np.ascontiguousarray(tabs) if groups is not None else none,
        x_cells=Xp if groups is None else groups[5],
        cell_xrow=pat if groups is None else groups[6],
        cell_rank=np.argsort(order).astype(np.int64) if groups is not None else np.zeros(0, dtype=np.int64),
        cell_cls=cell_cls,
        cls_pat=cls_pat,
        cls_off=cls_off,
    )
    comp_names = tuple(c for t in terms for c in t.component_names())
    return GLMMDesign(
        family=fam,
        n_obs=n,
        n_fixed=p,
        n_random=q_total(terms),
        n_theta=n_theta(terms),
        n_patterns=P,
        terms=terms,
        theta_names=tuple(th_names),
        component_names=comp_names,
        kernel_arrays=dz,
    )


def _patterns(X: np.ndarray, terms: tuple[RandomTerm, ...], fam: Family):
    """Covariate patterns: distinct rows of (X, codes, covariates), or groups of cells on a line (NB with a
    cell-level continuous covariate; rows ``2g`` and ``2g + 1`` are a group's base and slope).

    Returns the pattern rows of ``X``, the pattern of each cell, the codes and covariates of the random terms per
    pattern row, and ``None`` or the groups (``_line_groups``' output followed by the distinct rows of ``X`` and the
    row of each cell).
    """
    n, p = X.shape
    key_parts = [X]
    for t in terms:
        key_parts.append(np.asarray(t.codes, dtype=np.float64)[:, None])
        key_parts.append(np.asarray(t.covariates, dtype=np.float64))
    key = np.hstack(key_parts) if key_parts else np.zeros((n, 0))
    _, first, pat = np.unique(key, axis=0, return_index=True, return_inverse=True)
    pat = np.asarray(pat, dtype=np.int64).ravel()
    P = first.size
    Xp = np.ascontiguousarray(X[first])
    row_codes = [np.asarray(t.codes, dtype=np.int64)[first] for t in terms]
    row_cov = [np.asarray(t.covariates, dtype=np.float64)[first] for t in terms]
    groups = _line_groups(X, terms, P) if (fam.code == NB and P > GROUP_MIN_PATTERNS) else None
    if groups is None:
        return Xp, pat, row_codes, row_cov, None
    grp, base, slope, _, _ = groups
    G = base.shape[0]
    rows = np.empty((2 * G, base.shape[1]))
    rows[0::2] = base
    rows[1::2] = slope
    gfirst = np.unique(grp, return_index=True)[1]
    col = p
    for ti, t in enumerate(terms):
        row_codes[ti] = np.repeat(np.asarray(t.codes, dtype=np.int64)[gfirst], 2)
        row_cov[ti] = rows[:, col : col + t.k]
        col += t.k
    return np.ascontiguousarray(rows[:, :p]), 2 * grp, row_codes, row_cov, (*groups, Xp, pat)


def _z_slots(terms: tuple[RandomTerm, ...], row_codes: list, row_cov: list, P: int):
    """``Z`` per pattern row as slots (term ``t`` occupies ``k_t`` slots: u column and covariate) and the term map."""
    m = int(sum(t.k for t in terms))
    Zc = np.zeros((P, m), dtype=np.int64)
    Zv = np.zeros((P, m))
    tk, tslot, tth, tcorr, tcol0, tnlev = [], [], [], [], [], []
    slot = 0
    for ti, (t, (zs, ts)) in enumerate(zip(terms, term_slices(terms), strict=True)):
        k = t.k
        codes = row_codes[ti]
        cov = row_cov[ti]
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
    th_term, th_j, th_i, _ = _theta_map(terms)
    as_int = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.int64))  # noqa: E731
    tmap = TermMap(
        as_int(tk), as_int(tslot), as_int(tth), as_int(tcorr), as_int(tcol0), as_int(tnlev),
        as_int(th_term), as_int(th_j), as_int(th_i),
    )  # fmt: skip
    return Zc, Zv, tmap


def _offset_classes(pat: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(class of each cell, pattern of each class, offset of each class)``: a class holds the cells of one pattern
    with equal offsets (e.g. equal library sizes in one sample: 400,000 cells of 20 donors hold 23,000 classes)."""
    n = off.size
    order = np.lexsort((off, pat))
    ps, os = pat[order], off[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (ps[1:] != ps[:-1]) | (os[1:] != os[:-1])
    cls = np.empty(n, dtype=np.int64)
    cls[order] = np.cumsum(new) - 1
    return cls, np.ascontiguousarray(ps[new], dtype=np.int64), np.ascontiguousarray(os[new], dtype=np.float64)


def _pattern_tables(fam: Family, pat: np.ndarray, P: int, off: np.ndarray, trials, grouped: bool, classes: tuple):
    """The cells sorted by pattern and what evaluating ``V_p`` needs (tables for NB and binomial); also the order.
    ``classes``: :func:`_offset_classes`."""
    n = off.size
    order = np.argsort(pat, kind="stable")
    counts = np.bincount(pat, minlength=P)
    cell_ptr = np.zeros(P + 1, dtype=np.int64)
    cell_ptr[1:] = np.cumsum(counts)
    cw = trials if (fam.code == BINOMIAL and trials is not None) else np.ones(n)
    ser_lo = np.zeros((P, NSER))
    ser_hi = np.zeros((P, NSER))
    for mm in range(1, NSER + 1):
        ser_lo[:, mm - 1] = np.bincount(pat, weights=cw * np.exp(mm * off), minlength=P)
        ser_hi[:, mm - 1] = np.bincount(pat, weights=cw * np.exp(-mm * off), minlength=P)
    needs_v = fam.code in (NB, BINOMIAL)
    omax = np.full(P, -np.inf)
    omin = np.full(P, np.inf)
    np.maximum.at(omax, pat, off)
    np.minimum.at(omin, pat, off)
    # V mode: 0 table, 1 direct sum over the pattern's cells, 2 a single cell (evaluated exactly, no U_p surrogate)
    vmode = np.where(counts <= NDIRECT, 1, 0).astype(np.int64) if needs_v else np.ones(P, dtype=np.int64)
    if needs_v:
        vmode[counts == 1] = 2
    if grouped:
        vmode[:] = 3  # groups: exact sums and bivariate Taylor surrogates in the kernel, no tables
    vlo = np.where(np.isfinite(omax), -TAIL - omax, 0.0)
    vhi = np.where(np.isfinite(omin), TAIL - omin, 0.0)
    tab_n = np.where(vmode == 0, np.ceil((vhi - vlo) / HV).astype(np.int64) + 1, 0).astype(np.int64)
    tab_start = np.zeros(P, dtype=np.int64)
    tab_start[1:] = np.cumsum(tab_n)[:-1]
    vt = PatternTables(
        vmode=vmode,
        vlo=np.ascontiguousarray(vlo),
        vhi=np.ascontiguousarray(vhi),
        tab_start=tab_start,
        tab=np.zeros((int(tab_n.sum()), KV + 1)),
        cell_ptr=cell_ptr,
        cell_o=np.ascontiguousarray(off[order]),
        cell_c=np.ascontiguousarray(cw[order]),
        ser_lo=ser_lo,
        ser_hi=ser_hi,
        sum_c=np.bincount(pat, weights=cw, minlength=P),
        sum_co=np.bincount(pat, weights=cw * off, minlength=P),
    )
    if needs_v and vt.tab.shape[0] > 0:
        cell_cls, cls_pat, cls_off = classes
        cls_ptr = np.zeros(P + 1, dtype=np.int64)
        cls_ptr[1:] = np.cumsum(np.bincount(cls_pat, minlength=P))
        build_tables(vt, tab_n, (np.ascontiguousarray(cell_cls[order]), cls_ptr, cls_off))
    return vt, order
