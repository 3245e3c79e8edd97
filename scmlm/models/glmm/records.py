"""Named records of the GLMM kernel: what the numba functions take instead of positional tuples and int arrays.

All are module-level ``typing.NamedTuple`` classes of arrays and scalars, which numba compiles as (heterogeneous)
tuples read by attribute, and which its on-disk cache can key. Arrays are C-contiguous with one dtype per field
(int64 indices and codes, float64 values, bool flags), so one specialisation of every kernel serves every design.

* :class:`KernelDesign` (built once per design by :func:`~scmlm.models.glmm.design.prepare_glmm`): the covariate
  patterns, their random-term map (:class:`TermMap`), their ``V_p`` tables (:class:`PatternTables`) and the cells.
* :class:`KernelConfig`: the model of one fit (family code, REML, dispersion, sizes, Laplace-ML ``beta``).
* :class:`GeneData`: one gene's pattern sums, non-zero cells and the Taylor surrogate of ``U_p`` (or of a group).
* :class:`Workspace`: the scratch arrays of one fit, allocated once per chunk.
* :class:`OuterWork`: the outer (variance-parameter) Newton loop of one stage: its limits, scratch and results.
* :class:`Estimates`: a gene's estimates and the buffers of its two stages.
* :class:`ChunkInput`, :class:`FitControl`, :class:`KernelOut`: a chunk's counts (CSC, genes as columns), the fit
  settings, and the per-gene output arrays the kernel fills.
* :class:`Rows`, :class:`Scratch`, :class:`OuterParam`: small views for the per-row helpers and the family
  evaluations (numba passes a record field by field, so the helpers called once per pattern take small ones), and
  one outer parameter as the gradient sees it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TermMap(NamedTuple):
    """Random terms (one entry per term) and the variance parameters ``theta`` (one entry per parameter)."""

    k: np.ndarray
    """Columns of the term (1: intercept, ``[1, x]``: slope)."""
    slot: np.ndarray
    """First slot of the term in a pattern's row of ``Z`` (``KernelDesign.z_col``/``z_val``)."""
    theta0: np.ndarray
    """Position of the term's first parameter in ``theta``."""
    corr: np.ndarray
    """1 when the term has a full (correlated) covariance and ``k > 1``."""
    col0: np.ndarray
    """First column of the term in ``u``."""
    n_levels: np.ndarray
    """Levels of the grouping factor."""
    th_term: np.ndarray
    """Term of each parameter."""
    th_j: np.ndarray
    """Row of each parameter in the term's Cholesky factor."""
    th_i: np.ndarray
    """Column of each parameter in the term's Cholesky factor."""


class PatternTables(NamedTuple):
    """What evaluating ``V_p(v) = sum_{i in p} c_i softplus(v + o_i)`` needs, per pattern ``p``."""

    vmode: np.ndarray
    """0: table; 1: direct sum over the cells; 2: one cell (exact, no surrogate); 3: a group of cells on a line."""
    vlo: np.ndarray
    """Below this ``v`` every cell is in the lower tail (series)."""
    vhi: np.ndarray
    """Above this ``v`` every cell is in the upper tail (linear term plus series)."""
    tab_start: np.ndarray
    """First row of the pattern in ``tab``."""
    tab: np.ndarray
    """``(rows, KV + 1)`` Taylor coefficients of ``V_p`` at the grid nodes ``vlo + j HV``."""
    cell_ptr: np.ndarray
    """``(P + 1,)`` first cell of each pattern in ``cell_o``/``cell_c`` (cells sorted by pattern)."""
    cell_o: np.ndarray
    """Offsets of the cells sorted by pattern."""
    cell_c: np.ndarray
    """Weights (binomial trials, else 1) of the cells sorted by pattern."""
    ser_lo: np.ndarray
    """``(P, NSER)``: ``sum c exp(m o)`` for ``m = 1..NSER`` (lower-tail series)."""
    ser_hi: np.ndarray
    """``(P, NSER)``: ``sum c exp(-m o)`` (upper-tail series)."""
    sum_c: np.ndarray
    """``sum c`` (also the weight of a single-cell pattern)."""
    sum_co: np.ndarray
    """``sum c o``."""


class KernelDesign(NamedTuple):
    """Everything the kernel needs about a design that does not depend on the gene (``GLMMDesign.kernel_arrays``).

    Without groups every covariate pattern is a row of the design. With groups (a cell-level continuous covariate,
    NB family), group ``g`` is two rows: ``2g`` its base ``B0`` and ``2g + 1`` its slope ``B1``; its cells are listed
    under pattern ``2g`` in ``vtabs`` and ``cell_pat`` maps a cell to ``2g``.
    """

    x_rows: np.ndarray
    """``(P, p)`` rows of the fixed design per pattern."""
    z_col: np.ndarray
    """``(P, m)`` column of ``u`` of each slot of a pattern's row of ``Z``."""
    z_val: np.ndarray
    """``(P, m)`` covariate value of each slot."""
    terms: TermMap
    pat_n: np.ndarray
    """Cells per pattern."""
    pat_m: np.ndarray
    """``sum c exp(o)`` per pattern (Poisson mean factor)."""
    pat_sum_o: np.ndarray
    """``sum o`` per pattern (the offset of a single-cell pattern)."""
    pat_sum_o2: np.ndarray
    """``sum o^2`` per pattern."""
    vtabs: PatternTables
    cell_pat: np.ndarray
    """Pattern of each cell."""
    cell_off: np.ndarray
    """Offset of each cell."""
    trials: np.ndarray
    """Binomial trials of each cell; empty for 0/1 detection."""
    cell_t_sorted: np.ndarray
    """Groups only (else empty): the standardised covariate ``t`` of the cells sorted by pattern."""
    cell_t: np.ndarray
    """Groups only: ``t`` of each cell."""
    grp_tmax: np.ndarray
    """Groups only: ``max |t|`` per group; its length is the number of groups (0: no groups)."""
    x_cells: np.ndarray
    """Distinct rows of the fixed design before grouping (``x_rows`` without groups)."""
    cell_xrow: np.ndarray
    """Row of ``x_cells`` of each cell."""
    cell_rank: np.ndarray
    """Groups only: position of each cell in the order of ``vtabs.cell_o``."""
    cell_cls: np.ndarray
    """Offset class of each cell: cells of one pattern with the same offset share a class (their ``softplus(v +
    o)`` are equal, so a re-centring pass evaluates it once per class of the gene's non-zero cells)."""
    cls_pat: np.ndarray
    """Pattern of each offset class."""
    cls_off: np.ndarray
    """Offset of each offset class."""


class KernelConfig(NamedTuple):
    """The model of one fit (all int64)."""

    family: int
    """Family code (``scmlm.models._families``)."""
    reml: int
    """1: restricted Laplace criterion (``beta`` integrated out)."""
    has_tau: int
    """1: the family has a dispersion ``tau = log phi`` (NB, Gaussian)."""
    n_theta: int
    """Variance parameters of the random terms."""
    n_fixed: int
    """Fixed effects ``p``."""
    q: int
    """Random effects."""
    laplace_beta: int
    """1: ``beta`` is an outer parameter with the variance parameters and only ``u`` is integrated (glmmTMB's ML);
    0: ``beta`` at the joint mode with ``u`` (REML, and the first stage of ML)."""


class GeneData(NamedTuple):
    """One gene: pattern sums, non-zero cells and the Taylor surrogates (moved to the modes by ``recentre``)."""

    y_pat: np.ndarray
    """``Y_p``: sum of the responses per pattern (groups: rows ``2g + 1`` hold ``sum y t``)."""
    ucen: np.ndarray
    """Centres of the ``U_p`` surrogates (groups: ``(s, c)`` in rows ``2g``, ``2g + 1``)."""
    ucoef: np.ndarray
    """Taylor coefficients of ``U_p`` (groups: bivariate moments of U in row ``2g`` and of V in ``2g + 1``)."""
    s1: np.ndarray
    """Gaussian: ``sum (y - o)`` per pattern."""
    s2: np.ndarray
    """Gaussian: ``sum (y - o)^2`` per pattern."""
    cj: np.ndarray
    """NB: ``c_j``, the number of cells with ``y > j`` (``j >= 1`` at index ``j - 1``)."""
    nz_pat: np.ndarray
    """Pattern of each non-zero cell."""
    nz_off: np.ndarray
    """Offset of each non-zero cell."""
    nz_y: np.ndarray
    """Response of each non-zero cell (1 for binomial detection)."""
    nz_t: np.ndarray
    """Groups only: ``t`` of each non-zero cell."""
    y_sorted: np.ndarray
    """Groups only: the responses of all cells in the order of ``vtabs.cell_o``."""
    const: float
    """The terms of the log-likelihood that do not depend on the parameters."""
    nz_slot: np.ndarray
    """Slot of each non-zero cell: the gene's offset classes (``KernelDesign.cell_cls``) numbered as first met."""
    sl_pat: np.ndarray
    """Pattern of each slot."""
    sl_off: np.ndarray
    """Offset of each slot."""
    sl_w: np.ndarray
    """``(slots, KU + 1)`` scratch: the softplus derivatives of each slot at a re-centring."""


class GeneScratch(NamedTuple):
    """Per-chunk buffers that :func:`~scmlm.models.glmm.chunk._gene_data` fills for each gene."""

    lgam: np.ndarray
    """``lgamma(k + 1)`` for small counts ``k``."""
    cls_slot: np.ndarray
    """Slot of each offset class in the current gene, -1 if none (reset after each gene)."""
    sl_cls: np.ndarray
    """Offset class of each slot."""
    sl_pat: np.ndarray
    sl_off: np.ndarray
    sl_w: np.ndarray


class Workspace(NamedTuple):
    """Scratch arrays of one fit (``make_workspace``)."""

    FE: np.ndarray
    """``(P, 7)``: ``F_p`` and its derivatives ``(F, F', F'', F''', dF/dtau, dF'/dtau, dF''/dtau)``."""
    av: np.ndarray
    """``(P, m)``: ``Lambda' z_p`` at the slots."""
    vbuf: np.ndarray
    """Derivatives of ``V_p`` (groups: powers of the shift in ``s``)."""
    ubuf: np.ndarray
    """Derivatives of ``U_p`` (groups: powers of the shift in ``c``)."""
    wbuf: np.ndarray
    """Softplus derivatives."""
    g: np.ndarray
    """Gradient of ``h`` in ``gamma``."""
    step: np.ndarray
    """Newton step in ``gamma``."""
    gtry: np.ndarray
    """Trial ``gamma`` of the line search."""
    rvec: np.ndarray
    """Derivative of the gradient of ``h`` in one outer parameter."""
    gdot: np.ndarray
    """Derivative of the modes in one outer parameter."""
    e: np.ndarray
    """Linear predictor per pattern."""
    rho: np.ndarray
    """``a_p' H_S^{-1} a_p`` per pattern."""
    ee: np.ndarray
    """Direct derivative of the linear predictor in one outer parameter."""
    H: np.ndarray
    """``(d, d)`` negative Hessian of ``h`` in ``gamma``."""
    L: np.ndarray
    """Its Cholesky factor."""
    Hinv: np.ndarray
    """Its inverse."""
    dd_scratch: np.ndarray
    """``(d, d)`` scratch."""
    Luu: np.ndarray
    """Cholesky factor of the ``u`` block of ``H``."""
    Huinv: np.ndarray
    """Inverse of the ``u`` block."""
    FG: np.ndarray
    """``(G, 40)`` per-group derivatives and moments (groups only; see ``likelihood.fam_eval_grp``)."""
    crit: np.ndarray
    """``[h, logdet(H), logdet(H_uu), ok]`` of the last ``objective_grad``."""


class Scratch(NamedTuple):
    """The workspace's small scratch vectors (what the family evaluations write)."""

    vbuf: np.ndarray
    ubuf: np.ndarray
    wbuf: np.ndarray


class Rows(NamedTuple):
    """The arrays of the design rows and of the workspace that the per-row helpers of the inner problem and of the
    gradient read (a small record: the helpers run once per pattern, and numba passes a record field by field)."""

    x_rows: np.ndarray
    z_col: np.ndarray
    z_val: np.ndarray
    av: np.ndarray
    FE: np.ndarray
    FG: np.ndarray
    g: np.ndarray
    H: np.ndarray
    Hinv: np.ndarray
    Huinv: np.ndarray
    rho: np.ndarray
    ee: np.ndarray
    gdot: np.ndarray
    rvec: np.ndarray


class OuterWork(NamedTuple):
    """One stage of the outer Newton loop over ``psi``: limits, scratch and what it leaves for the caller."""

    tau_lo: float
    tau_hi: float
    snap_sd: float
    """SDs below this are tried at exactly zero."""
    max_outer: int
    grad: np.ndarray
    """Gradient of the criterion in ``psi`` at the estimate."""
    hess: np.ndarray
    """Forward-difference Hessian in ``psi`` at the estimate."""
    dcov: np.ndarray
    """``(n, p, p)`` derivative of the conditional covariance of ``beta`` in each ``psi[k]``."""
    frozen: np.ndarray
    """Parameters fixed at zero."""
    gk: np.ndarray
    step: np.ndarray
    psik: np.ndarray
    psit: np.ndarray
    gam0: np.ndarray
    gamt: np.ndarray
    free: np.ndarray
    C0: np.ndarray


class OuterParam(NamedTuple):
    """One outer parameter, as the gradient of the criterion needs it."""

    kind: int
    """0: an entry of ``theta``; 1: ``tau``; 2: a fixed effect (Laplace-ML ``beta``)."""
    col: int
    """The fixed effect's column (kind 2)."""
    slot: int
    """Kind 0: the slot of the parameter's column ``i`` in the term's Cholesky factor."""
    jslot: int
    """Kind 0: the slot of its row ``j``."""


class Estimates(NamedTuple):
    """A gene's estimates and the buffers of its stages (allocated once per chunk)."""

    psi: np.ndarray
    """Variance parameters ``(theta, [tau])``."""
    gamma: np.ndarray
    """Modes ``(beta, u)``."""
    psil: np.ndarray
    """Outer parameters of the stages (stage 1 appends ``beta``)."""
    gaml: np.ndarray
    """Modes of the stages."""
    covl: np.ndarray
    """``cov(beta)`` of the Laplace-ML stage."""
    grad: np.ndarray
    """Gradient in ``psi`` of the final evaluation."""


class ChunkInput(NamedTuple):
    """Responses of a chunk of genes: CSC arrays of the cells x genes matrix (one column per gene)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


class FitControl(NamedTuple):
    """Settings of a chunk's fits."""

    min_nonzero: int
    """Genes with fewer non-zero values are not fitted."""
    max_outer: int
    """Outer Newton iterations per stage."""
    tau_lo: float
    """NB: lower bound of ``log phi``."""
    tau_hi: float
    """NB: upper bound of ``log phi``."""


class KernelOut(NamedTuple):
    """Per-gene results the kernel fills (NaN-initialised by the caller)."""

    beta: np.ndarray
    cov: np.ndarray
    theta: np.ndarray
    phi: np.ndarray
    loglik: np.ndarray
    rloglik: np.ndarray
    b: np.ndarray
    b_se: np.ndarray
    status: np.ndarray
    n_iter: np.ndarray
    hess_psi: np.ndarray
    dcov: np.ndarray
    frozen: np.ndarray
