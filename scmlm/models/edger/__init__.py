"""edgeR's pseudobulk pipeline in numpy/scipy: filterByExpr, TMM, estimateDisp, glmQLFit(robust) and glmQLFTest.

The statistical method follows edgeR 3.40 (Bioconductor 3.16) step by step, so that results agree with R to
numerical precision on the same data. One module per step:

:mod:`~scmlm.models.edger.filter`
    ``filterByExpr.default`` (:func:`filter_by_expr`).
:mod:`~scmlm.models.edger.tmm`
    ``calcNormFactors(method = "TMM")`` (:func:`tmm_factors`).
:mod:`~scmlm.models.edger.glm`
    NB GLMs as ``mglmLevenberg`` (:func:`fit_nb_glm`, :class:`GLMFit`): the batched numpy path and the driver of
    the compiled kernel.
:mod:`~scmlm.models.edger.kernel`
    The numba kernels: the gene-by-gene Levenberg fit (:func:`~scmlm.models.edger.kernel.levenberg_nb`, on the
    named records ``KernelDesign``, ``KernelConfig`` and ``KernelOut``), ``mglmOneGroup``, one-pass sums over
    the counts.
:mod:`~scmlm.models.edger.dispersion`
    ``estimateDisp`` and ``aveLogCPM`` (:func:`estimate_disp`, :func:`ave_log_cpm`).
:mod:`~scmlm.models.edger.ql`
    ``glmQLFit(robust = TRUE)`` and ``glmQLFTest`` (:func:`nb_ql`, :func:`nb_ql_multi`, :class:`QLResult`).

The empirical-Bayes squeeze (limma's ``squeezeVar``) comes from :mod:`scmlm.models.ebayes`.
"""

from .dispersion import DispersionResult, ave_log_cpm, estimate_disp
from .filter import filter_by_expr
from .glm import GLMFit, fit_nb_glm
from .ql import QLResult, nb_ql, nb_ql_multi
from .tmm import tmm_factors

__all__ = [
    "DispersionResult",
    "GLMFit",
    "QLResult",
    "ave_log_cpm",
    "estimate_disp",
    "filter_by_expr",
    "fit_nb_glm",
    "nb_ql",
    "nb_ql_multi",
    "tmm_factors",
]
