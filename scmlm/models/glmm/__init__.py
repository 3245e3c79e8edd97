"""Cell-level GLMM: per-gene Laplace (ML) and restricted-Laplace (REML) fits with a numba kernel.

Modules: :mod:`~.design` (:func:`prepare_glmm`: covariate patterns and tables), :mod:`~.fit` (:func:`fit_glmm`,
separation), :mod:`~.inference` (Wald, Satterthwaite, containment df, LRT), and the kernel: :mod:`~.records` (the
named records it takes), :mod:`~.special` (softplus, Taylor sums), :mod:`~.linalg` (Cholesky and friends),
:mod:`~.likelihood` (``F_p`` per family, pattern and group surrogates), :mod:`~.laplace` (conditional modes),
:mod:`~.gradient` (criterion and its gradient), :mod:`~.outer` (Newton on the variance parameters) and
:mod:`~.chunk` (a chunk of genes). Status codes: :mod:`~.status`.


Everything here works on *covariate patterns*: the distinct rows of (fixed design, random-term codes and
covariates). Cells of a pattern share the linear predictor ``e_p`` up to their offsets, so the log-likelihood of a
gene is a sum over patterns of one-dimensional functions ``F_p(e_p)`` (plus the dispersion ``tau = log phi``):

* NB2 with ``v = e + tau``, ``r = exp(-tau)``::

      F_p = Y_p e - U_p(v) - r V_p(v),   U_p(v) = sum_{i in p, y_i > 0} y_i softplus(v + o_i),
                                          V_p(v) = sum_{i in p} softplus(v + o_i)

  plus the gene-level ``D(tau) = sum_j c_j log1p(j phi)`` (``c_j`` = number of cells with ``y > j``), which is
  ``sum_i lgamma(y_i + r) - lgamma(r) - y_i log r`` computed in O(max y). ``V_p`` does not depend on the gene: it is
  tabulated once per design (Taylor coefficients on a grid, series in the tails). ``U_p`` only involves the
  gene's non-zero cells; it is replaced by its order-6 Taylor polynomial around a centre that is moved to the current
  mode after every outer step (a cheap O(nnz) pass), so all optimisation work is pattern-level and exact at
  convergence.
* Poisson: ``F_p = Y_p e - M_p exp(e)`` (exact). Binomial (logit): ``F_p = Y_p e - V_p(e)`` with ``V_p`` weighted by
  the trials. Gaussian (identity): exact sufficient statistics, ``tau = log sigma^2``.

For given variance parameters ``psi = (theta, tau)`` the conditional modes of ``gamma = (beta, u)``, ``b = Lambda u``,
are found by Newton's method on the penalised log-likelihood ``h = sum_p F_p - |u|^2/2`` (exact Hessian, as
glmmTMB). The criterion is ``h - log det(H_S)/2`` with ``H_S`` the ``u`` block of the negative Hessian (Laplace ML) or
the whole ``(beta, u)`` Hessian (REML: ``beta`` integrated out as well). ``psi`` is optimised by Newton's method with
the analytic gradient (implicit differentiation of the modes, third derivatives of ``F_p`` in the log-determinant)
and a forward-difference Hessian of that gradient. SDs that reach zero are fixed there (``singular``). For ML a second
stage moves ``beta`` into the outer parameters (only ``u`` integrated), which gives glmmTMB's Laplace-ML ``beta`` and,
from the Hessian in all fixed parameters, its standard errors.

Cost per gene: O(nnz) per re-centring pass (a handful per fit) plus pattern-level algebra; a design whose patterns
are few (categorical fixed effects and random intercepts) therefore costs about the same at 4,000 and 40,000 cells.
A continuous cell-level covariate would make every cell a pattern, and every Newton step O(cells). For the NB
family such cells are grouped instead (``design._line_groups``): the design rows of a group (same random-term levels
and categorical columns) lie on a line ``B0_g + t_i B1_g``, so the group's log-likelihood is a function of two
numbers, and its sums over cells are replaced by bivariate Taylor polynomials re-centred at the modes like ``U_p``
(see ``fam_eval_grp``): O(cells) per re-centring, O(groups) per pass. Designs that do not group (two continuous
covariates, other families) keep one pattern per cell, evaluated exactly. ``benchmarks/bench_glmm_slope.py``
measures ``~ x + (1 + x|donor)`` against categorical designs on the same data.
The compilation (first use in a new environment) takes about a minute of CPU for all families.

Why numba: one fit is a long chain of tiny dense operations (q x q with q = donors + batches) with data-dependent
iteration counts; numpy would spend its time in call overhead and a per-gene Python loop with scipy.optimize is two
orders of magnitude slower. ``cache=True`` keeps the compiled code on disk, so only the first import in a new
environment pays the compilation.

Named records and numba's reference counting: a function that binds a record (``dz.x_rows``, or the record itself
as an argument) increments and later decrements the reference count of every array in it, atomically, which on
small designs (ten patterns) costs more than the arithmetic. The functions of the inner and outer loops that neither
allocate nor call a function that allocates are therefore compiled with ``_nrt=False`` (no reference counting; the
arrays they touch belong to the per-chunk records, alive for the whole call), and the per-row helpers, called once
per pattern, with ``inline="always"``. Functions that allocate (``make_workspace``, ``snap_zero``, ``fit_gene``,
``chunk``) keep numba's runtime, and a function compiled without it must not call one of them. Only
``chunk.fit_chunk`` and ``likelihood.build_tables`` are called from Python; every other kernel is compiled without a
CPython wrapper (``no_cpython_wrapper=True``), which would box and unbox each array of its records and costs a third
of the compilation time.

Compilation time follows the call tree: numba links the optimised module of every callee into its caller, and LLVM
optimises and emits the linked whole again, so a separately compiled function costs about as much as everything
below it. The functions called from one place that sit above the large subtrees (``chunk._fit_one``,
``chunk._fit_stages``; ``outer._fd_hessian``, ``_final_step``, ``_line_search``, ``snap_zero``) are therefore
inlined by numba (``inline="always"``) into ``fit_chunk`` and ``fit_gene``: that removes four re-optimisations of the
whole kernel (a first NB call with an empty cache spent 100 s of CPU in numba's compilation before, 65 s after,
summed from numba's compile events). Inlining more costs more than it saves, as numba's own passes grow faster than
linearly with the size of a function: ``fit_gene`` inlined as well took 81 s, and the gradient helpers inlined into
``objective_grad`` gained nothing. ``benchmarks/bench_cold_start.py --source`` measures the first call.
"""
