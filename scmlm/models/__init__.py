"""Numerics of scmlm on ndarrays: the one seam between the AnnData API (``pp``/``tl``/``pl``/``get``) and the fits.

Everything outside ``scmlm.models`` imports the names listed in ``__all__`` from here, never a private module
(``tests/test_architecture.py`` checks it). Nothing here imports anndata or pandas.

- Cell-level GLMM (Laplace ML / REML, numba kernel): :func:`prepare_glmm`, :func:`fit_glmm`, tests
  :func:`glmm_contrast`, :func:`glmm_wald_f`, :func:`glmm_lrt`, df :func:`satterthwaite_df`,
  :func:`satterthwaite_df_f`, :func:`contrast_df`; families (:data:`FAMILIES`) and random terms (:class:`RandomTerm`).
- Separated genes (no finite estimate, e.g. no counts in one condition): :func:`separated_genes` (the check),
  :func:`sup_loglik`, :func:`separated_lrt` (likelihood ratio at the supremum), :func:`prior_count_coef` (the reported
  fold change), :func:`separation_bound` (exact lower bound of the p-value), :func:`moderate_separated`.
- Moderated GLMM tests (empirical-Bayes prior over genes): :func:`gene_tau2` (the chunk's :class:`CellModel`),
  :func:`moderate`, ...
- GEE with donors as clusters: :func:`prepare_gee` (:class:`GEEData`), :func:`fit_gee` (:class:`GEEResult`).
- Unpooled per-level estimates of a random intercept: :func:`fit_unpooled` (:class:`UnpooledFit`).
- TMM cell offsets on per-sample sums: :func:`sample_sums`, :func:`tmm_sample_factors`, :func:`tmm_cell_offset`,
  :class:`StreamedSums`; the aggregation kernel :func:`accumulate` (also :func:`scmlm.pp.pseudobulk`'s).
- :data:`KERNELS`: every numba kernel of the package, registered by ``scmlm._jit.jit`` as its module loads (what
  ``scmlm.warmup`` compiles).
- Pseudobulk: edgeR QL (:func:`nb_ql`, :func:`nb_ql_multi`, :func:`filter_by_expr`, :func:`tmm_factors`), limma-voom
  (:func:`voom_limma`, :func:`voom_limma_multi`), dream (:func:`dream`, :func:`fit_weighted_lmm`), and the
  empirical-Bayes pieces they share (:func:`lowess`, :func:`squeeze_var`, :func:`fit_f_dist`,
  :func:`fit_f_dist_robustly`).
"""

from .._jit import KERNELS
from ._families import FAMILIES, Family, get_family
from ._random import RandomTerm, build_Z, cov_b, intercept_term, n_theta, q_total, term_slices, variance_components
from .abundance import (
    AbundanceTest,
    between_sample_weights,
    clr_transform,
    fit_abundance_glmm,
    fit_abundance_lm,
    logit_transform,
)
from .aggregate import accumulate
from .dream import LMMResult, dream, fit_weighted_lmm
from .ebayes import fit_f_dist, fit_f_dist_robustly, lowess, squeeze_var
from .edger import filter_by_expr, nb_ql, nb_ql_multi, tmm_factors
from .gee import GEE_DF_METHODS, GEE_FAMILIES, GEE_SMALL_SAMPLE, GEEData, GEEResult, fit_gee, prepare_gee
from .glmm.design import GLMMDesign, prepare_glmm
from .glmm.fit import GLMMResult, fit_glmm, separated_genes
from .glmm.inference import (
    ContrastResult,
    contrast_df,
    glmm_contrast,
    glmm_lrt,
    glmm_wald_f,
    moderate_separated,
    prior_count_coef,
    satterthwaite_df,
    satterthwaite_df_f,
    separated_lrt,
    separation_bound,
    sup_loglik,
)
from .glmm.status import STATUS
from .limma import LimmaResult
from .moderate import PENDING, CellModel, coarser_terms, gene_tau2, moderate, unit_scale
from .offsets import StreamedSums, TMMFactors, sample_sums, tmm_cell_offset, tmm_sample_factors
from .unpooled import UnpooledFit, fit_unpooled
from .voom import voom_limma, voom_limma_multi

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
"""Names of the GLMM response families, in their code order (``nb``, ``poisson``, ``binomial``, ``gaussian``)."""

USABLE_STATUS: tuple[str, ...] = ("ok", "singular", "separated")
"""Statuses of a fit whose estimates and tests are reported (``singular``: a variance component at zero;
``separated``: no finite maximum-likelihood estimate, tested by a likelihood ratio at the supremum with a prior-count
fold change and no SE, see :func:`separated_lrt`)."""

__all__ = [
    "AbundanceTest",
    "CellModel",
    "ContrastResult",
    "FAMILIES",
    "FAMILY_NAMES",
    "Family",
    "GEEData",
    "GEEResult",
    "GEE_DF_METHODS",
    "GEE_FAMILIES",
    "GEE_SMALL_SAMPLE",
    "GLMMDesign",
    "GLMMResult",
    "KERNELS",
    "LMMResult",
    "LimmaResult",
    "PENDING",
    "RandomTerm",
    "STATUS",
    "StreamedSums",
    "TMMFactors",
    "USABLE_STATUS",
    "UnpooledFit",
    "accumulate",
    "between_sample_weights",
    "build_Z",
    "clr_transform",
    "coarser_terms",
    "contrast_df",
    "cov_b",
    "dream",
    "filter_by_expr",
    "fit_abundance_glmm",
    "fit_abundance_lm",
    "fit_f_dist",
    "fit_f_dist_robustly",
    "fit_gee",
    "fit_glmm",
    "fit_unpooled",
    "fit_weighted_lmm",
    "gene_tau2",
    "get_family",
    "glmm_contrast",
    "glmm_lrt",
    "glmm_wald_f",
    "intercept_term",
    "logit_transform",
    "lowess",
    "moderate",
    "n_theta",
    "nb_ql",
    "nb_ql_multi",
    "prepare_gee",
    "prepare_glmm",
    "q_total",
    "sample_sums",
    "satterthwaite_df",
    "satterthwaite_df_f",
    "separated_genes",
    "separated_lrt",
    "separation_bound",
    "sup_loglik",
    "prior_count_coef",
    "moderate_separated",
    "squeeze_var",
    "term_slices",
    "tmm_cell_offset",
    "tmm_factors",
    "tmm_sample_factors",
    "unit_scale",
    "variance_components",
    "voom_limma",
    "voom_limma_multi",
]
