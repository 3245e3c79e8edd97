"""Cell-level GLMM differential expression with crossed/nested donor and batch random effects.

``glmm_de`` reads as four steps: :func:`_plan` checks the arguments and gathers what every group shares (the
counts of the selected genes, the offset, the design on all cells) into a :class:`_Run`; :func:`_fit_group` fits
one group (its :class:`~scmlm.design.FittedDesign`, one GLMM per gene, every contrast's test from that fit);
:func:`_finish` moderates and adjusts the tests over all genes; :func:`_params` records the run, and
:meth:`~scmlm.results.DEResult.deliver` returns or stores the result.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, fields, replace
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import InputError, _fmt_list
from .._settings import NOTE
from .._validate import check_not_empty, check_obs_keys, check_unique_names, renamed_arguments
from .._version import __version__
from ..design import (
    MIN_RANDOM_LEVELS,
    REPLICATION_RULES,
    Design,
    FittedDesign,
    build_design,
    containment_df,
    contrast_param,
    fitted_design,
    fitted_params,
    parse_contrasts,
    resolve_offset,
    resolve_samples,
    within_parent,
)
from ..engine import parallel_chunks, resolve_n_jobs, run_chunks
from ..models import (
    FAMILY_NAMES,
    PENDING,
    STATUS,
    USABLE_STATUS,
    CellModel,
    coarser_terms,
    contrast_df,
    fit_glmm,
    gene_tau2,
    glmm_contrast,
    glmm_lrt,
    glmm_wald_f,
    prepare_glmm,
    satterthwaite_df,
    satterthwaite_df_f,
    separated_lrt,
    unit_scale,
)
from ..results import DEResult, finalize_table, finish_moderation, parse_shard, shard_indices
from ._common import (
    cell_groups,
    cell_matrix,
    cell_offset,
    cell_rows,
    check_backed_copy,
    fit_groups,
    gene_columns,
    gene_eligibility,
    gene_indices,
    residual_variance,
    scaled_means,
)

ESTIMATION: tuple[str, ...] = ("REML", "ML")
"""``estimation=`` choices: restricted (REML-type) Laplace criterion, or Laplace maximum likelihood."""
TESTS: tuple[str, ...] = ("wald", "lrt")
log = logging.getLogger(__name__)


@renamed_arguments(method="estimation")
def glmm_de(
    adata: ad.AnnData,
    design: str,
    contrast,
    *,
    family: str = "nb",
    layer: str | None = None,
    offset: str | None = "auto",
    trials: str | None = None,
    groups_key: str | None = None,
    sample_key: str | None = None,
    replication: Literal["auto", "as_written"] = "auto",
    genes=None,
    min_cells_expressing: int = 10,
    estimation: Literal["REML", "ML"] = "REML",
    test: Literal["wald", "lrt"] = "wald",
    moderate: bool = True,
    n_jobs: int | None = None,
    shard: tuple[int, int] | str | None = None,
    key_added: str = "glmm_de",
    inplace: bool = True,
    copy: bool = False,
) -> DEResult | ad.AnnData | None:
    """Differential expression with a cell-level generalised linear mixed model fitted per gene.

    Each gene gets ``g(E y) = offset + X β + Z b`` with ``b ~ N(0, Σ(θ))``: donor and batch random intercepts (crossed
    ``(1|donor) + (1|batch)`` or nested ``(1|batch/donor)``), correlated random slopes ``(1 + x|donor)`` or
    uncorrelated ones ``(1|donor) + (0 + x|donor)``. Estimation is the Laplace approximation with conditional modes by
    penalised IRLS (the model glmmTMB fits); variance components are estimated by the restricted (REML-type)
    criterion by default, which with few donors is what keeps p-values calibrated.

    Unit of replication. Every contrast is tested against the variation of the units it varies between, found from
    the data: the levels of a random term within which it is constant (a case–control condition is constant within
    donors: the donors), or samples, or cells. A contrast that varies within donors but is constant within samples
    (the treated and control samples of each donor in a paired design; samples are the ``sample_key`` column, or
    else the donor × condition combinations of the random grouping factors with the contrast's variables) needs a
    term at the sample level, ``(1|sample)`` or a random slope ``(1 + condition|donor)``: the cells of one sample
    share what happened to that sample (its dissociation and library, the donor's own response to the treatment),
    so without such a term the condition is tested against cell-to-cell noise. On a paired null with donor-specific
    responses (8 donors, sd 0.25 of the condition effect between donors) ``~ condition + (1|donor)`` as written
    gives 11–35 % of genes at p < 0.05. With ``replication="auto"`` (the default) the missing term is added, e.g.
    ``(1|donor:condition)``, said in one INFO line of the ``scmlm`` logger and recorded in ``params``
    (``design_fitted``, ``added_terms``, ``replication_unit``): a default call never tests a sample-level effect
    against cells, and adding the term keeps the call working (refusing would only make every user paste the same
    fix). The same check catches donor labels reused across batches in a crossed ``(1|batch) + (1|donor)``: the
    unit is the batch × donor combination, and the message suggests ``(1|batch/donor)``. ``replication="as_written"``
    fits exactly the design given (for experts), with a warning when a sample-level contrast lacks its term. A
    contrast that varies within samples (a continuous cell-level covariate ``x``; a per-cell genotype, given
    ``sample_key``) is seen in every cell, but its effect can differ between donors, and its average over donors is
    then a donor-level quantity: on nulls with donor slopes of sd 0.25, ``~ x + (1|donor)`` as written gives 20–47 %
    of p < 0.05. The default adds the uncorrelated random slope ``(0 + x|donor)`` (a number) or ``(1|donor:genotype)``
    (a factor), over each random intercept that holds no other term's levels, logged and recorded as above; time
    points as a factor get ``(1|donor:time)`` as the paired condition does, as a number ``(1|sample)`` given
    ``sample_key`` (else the slope). Random intercepts of fewer than five levels that hold whole donors
    (``(1|batch)`` over 3 batches, ``(1|batch/donor)``) are fitted as a fixed effect by default
    (``params["as_fixed"]``, one INFO line; as written they stay random with a warning): a variance on at most 3 df
    miscalibrates and un-moderates the tests between donors. A term that pairs the contrast (the donors of a paired
    design) or is crossed with another grouping stays random, and so does one without which a contrast is not
    estimable. See docs/replication.md.

    Degrees of freedom: a contrast that varies only between donors (e.g. case vs control with condition a donor
    trait) is tested with a t distribution on the between-donor residual df (donors minus donor-level coefficients,
    nlme's containment rule), or on the gene's Satterthwaite df where that is smaller (lmerTest's approximation from
    the curvature of the REML criterion). On a 10-donor case–control null the Wald z test with ML variances calls
    ~15 % of genes at p < 0.05; REML with these df brings it to the nominal 5 %. A paired contrast at the sample
    level (each donor seen under every condition) uses the gene's Satterthwaite df alone: where the sample variance
    is small the cells replicate the contrast too, and capping at the paired t test's ``samples - donors - 1`` df
    would throw that power away (measured on paired nulls, NB: 1.3 % of p < 0.05 with the cap when donors respond
    alike, 3.2 % without; 3.3 % and 5.4 % with donor-specific responses). A contrast without replication at its
    level (one donor per condition: containment df < 1) gets status ``not testable``. A Satterthwaite df below 1 (a
    variance near, not at, zero; down to 2e-11 on unbalanced nulls) is a breakdown of the approximation, and the
    gene gets the containment df as a fit at the boundary does.

    Moderated inference (``moderate=True``, the default): a contrast tested between donors or samples borrows strength
    across genes, as limma's ``eBayes`` and edgeR's quasi-likelihood do for pseudobulk. The between-unit variance each
    gene's contrast is tested against, ``τ̂² = se² / c`` on the containment df (untruncated where the unit variance is
    estimated at zero, on the df of that estimate; ``c`` follows the weights the gene's fit gives units of unequal
    size), is squeezed toward a trend in log ``base_mean`` (one prior per group and contrast: a maximum-likelihood
    scaled-F fit whose prior df are capped where each gene has few df, :func:`scmlm.models.moderate`); the test is a
    moderated t on the containment df plus the prior df. Genes with a variance at zero then
    borrow a sensible value instead of resting on one noisy estimate. Not moderated, keeping the per-gene test:
    contrasts that vary from cell to cell, and contrasts whose variance also rests on a coarser random term not balanced
    over them (donors nested in batches with unequal case/control counts under ``(1|batch)`` as written, or with
    five or more batches: the batch variance is the weak part and a prior for the donor term does not reach it;
    moderated, 10-donor nulls gave 4.3-7.9 % of p < 0.05 on the containment df or on the df left with the batches
    fixed, the per-gene test 5.7 %; a fixed ``batch`` effect is moderated). Extra columns: ``df_prior``,
    ``df_prior_fit``, ``var_prior`` (``τ²`` scale), ``se_raw`` (the gene's own standard error), ``tau2``,
    ``df_resid`` (the df of ``τ̂²``), ``unit_scale`` (``c``), ``df_satterthwaite`` and ``moderation``
    (``moderated``, ``off``, ``cell-level contrast``, ``pending`` in a sharded run, or why not). See
    :func:`scmlm.models.moderate` for the design and its measurements. A sharded run (``shard=``) stores the per-gene
    quantities and :func:`scmlm.results.merge_shards` (``scmlm merge``) finishes the moderation over all genes, giving
    the numbers of an unsharded run.

    Parameters
    ----------
    adata
        Cell-level AnnData with raw counts (count families) or normalised values (``family="gaussian"``).
    design
        Fixed and random terms, e.g. ``"~ condition + (1|donor) + (1|batch)"``. Grouping columns (random-term
        factors, ``sample_key``, ``groups_key``) are factors even when they hold integers; another integer column that
        looks like an ID enters as a number with a warning (write ``C(donor)``).
    contrast
        ``(factor, test_level, reference_level)``, a coefficient name, or a numeric vector. Several contrasts in one
        call: a list of tuples or names, or a dict ``{name: contrast}`` (numeric vectors need a name). A dict value
        that lists several contrasts (coefficient names, tuples, vectors) or is a 2-D array of rows is one joint Wald
        F test (``F = b' L' (L V L')⁻¹ L b / q`` on ``F(q, df)``, "any difference among three doses"): ``df`` follows
        the single contrast's rule for the columns the rows use (containment at their common level, lowered by
        lmerTest's multi-row Satterthwaite df), ``coef`` and ``se`` are NaN and ``stat`` is F. Between units it is
        moderated as a single contrast is: the gene's between-unit variance ``τ̂² = tr(C⁻¹ L V L') / q`` (``C`` the
        rows' unit-level scale) is squeezed and ``F = F_raw · τ̂² / τ̃²`` is tested on ``F(q, d + d0)``; on 3-level
        nulls (1,500 genes, 9–12 donors, 40–100 cells each) 3.2–4.4 % of p < 0.05, against 2.5–3.1 % per gene.
        One fit per gene serves every contrast. With ``replication="auto"`` the fitted model holds every term any of
        the contrasts needs (a paired contrast's ``(1|donor:condition)`` is then also in the model that tests a
        between-donor contrast), and each contrast is tested at its own unit of replication, with its own df and its
        own moderation prior. The ``contrast`` column holds the names (``factor_test_vs_ref`` for a tuple); BH runs
        per group and contrast.
    family
        ``"nb"`` (NB2, dispersion per gene), ``"poisson"``, ``"binomial"`` (detection ``y > 0``, or counts out of the
        obs column ``trials``), ``"gaussian"``.
    layer
        Layer to model; ``None`` uses ``.X``.
    offset
        ``"auto"`` (default): ``"tmm"`` for the NB and Poisson families, ``"log_total"`` otherwise. ``"log_total"``:
        log of each cell's total counts over all genes of the layer (as in the glmmTMB and NEBULA references);
        ``"tmm"``: that plus the log TMM factor of the cell's sample, computed on the pseudobulk as edgeR's
        ``calcNormFactors`` (per group with ``groups_key``), which removes the composition bias that makes every gene
        look down when a few genes take over the library (docs/normalisation.md: on a paired DE simulation the
        observed FDR at padj < 0.05 fell from 0.16 to 0.05); an obs column holding an offset on the link scale (e.g.
        log size factors); or ``None``. ``params["offset"]`` records the resolved choice.
    trials
        Binomial only: obs column with the number of trials of each cell (the layer then holds successes).
    groups_key
        obs column (e.g. cell type): fit the model within each group; BH per group and contrast.
    sample_key
        obs column naming each sample (e.g. one per donor × condition library). ``None``: samples are the
        combinations of the random grouping factors with the contrast's variables. Give it when a categorical
        variable varies within samples (a per-cell genotype), so that its contrast is recognised as cell-level.
        The samples are also the units of the TMM factors of ``offset="tmm"``.
    replication
        ``"auto"`` (default): add the sample-level term a contrast needs when the design lacks it (see above).
        ``"as_written"``: fit the design as given; a warning says when the contrast is then tested against cells.
    genes
        Gene names or a boolean mask over ``var_names``; ``None`` fits all genes.
    min_cells_expressing
        Genes (within a group) with fewer cells with a non-zero value get status ``"too few expressing cells"``.
    estimation
        ``"REML"`` (default, used for inference) or ``"ML"`` (Laplace maximum likelihood, as glmmTMB). ML is for
        comparison with other ML fits only: its variance components are biased down with few donors and its Wald
        tests are anticonservative (6.5–10.5 % of null genes at p < 0.05 on 10-donor nulls).
    test
        ``"wald"`` (moderated or per-gene t, default) or ``"lrt"``: likelihood ratio of ML fits, per gene (not
        moderated); for a contrast between units the LR becomes ``F = df (exp(LR / units) - 1)`` on ``F(1, df)``,
        the exact relation for a normal model of the unit means (see :func:`scmlm.models.glmm_lrt`).
    moderate
        Empirical-Bayes moderated tests for contrasts between donors or samples (see above); ``False`` tests each
        gene alone.
    n_jobs
        Threads fitting gene chunks in parallel (``None``: ``scmlm.settings.n_jobs``); they share the counts, so
        memory does not grow with them. Results do not depend on it.
    shard
        ``(i, n)`` or ``"i/n"``: fit only the i-th of n gene shards (1-based), for cluster arrays; merge with
        ``scmlm merge`` (which recomputes BH and finishes the moderated tests over all genes).
    key_added
        Key in ``adata.uns`` for ``{"params": …, "results": DataFrame}``.
    inplace, copy
        As in :func:`scmlm.tl.pseudobulk_de`.

    Returns
    -------
    ``None``, the copy, or the :class:`~scmlm.results.DEResult`. Columns: ``gene, group, contrast, coef`` (natural
    log), ``log2fc, se, stat, df, pvalue, padj, base_mean, method, converged, status, dispersion, var_<term>,
    icc_<term>`` (latent scale), ``n_iter`` and the moderation columns above. Status: ``ok``, ``singular`` (a
    variance estimated at zero; the fit is valid), ``not testable`` (no replication at the contrast's level; coef
    and se are kept), ``not converged``, ``separated`` (a fixed effect without a finite estimate, e.g. no counts in
    one condition, or a fit beyond what the data carry), ``too few expressing cells``, ``all zero``, ``failed: …``.
    Failed genes keep their row with NaN statistics. A ``separated`` gene is tested (``converged`` False, ``se_raw``
    NaN): ``coef`` is the prior-count fold change of :func:`scmlm.models.prior_count_coef` (finite); a moderated
    contrast tests it against the other genes' prior variance (:func:`scmlm.models.moderate_separated`), other
    contrasts by the likelihood ratio at the supremum (:func:`scmlm.models.separated_lrt`, referred as
    ``test="lrt"``); the p-value is never below ``p_bound`` (exact bound for few counts and, between donors, the
    randomisation bound of the donors with counts; the column appears when a gene is separated).

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=100, seed=0)
    >>> res = scmlm.tl.glmm_de(adata, "~ condition + (1|donor)", ("condition", "case", "ctrl"), inplace=False)
    >>> list(res.table.columns[:10])
    ['gene', 'group', 'contrast', 'coef', 'log2fc', 'se', 'stat', 'df', 'pvalue', 'padj']
    >>> res.params["offset"], bool(res.table["df_resid"].max() <= 6 - 2)  # TMM of the donor samples; donor-level df
    ('tmm', True)
    >>> t = res.table[res.table["moderation"] == "moderated"]
    >>> bool((t["df"] > t["df_resid"]).all())  # the moderated test adds the prior's df
    True

    Paired samples: the default adds the sample-level term.

    >>> paired = scmlm.datasets.simulate(n_donors=6, n_cells=60, n_genes=100, design="within", seed=0)
    >>> res = scmlm.tl.glmm_de(paired, "~ condition + (1|donor)", ("condition", "case", "ctrl"), inplace=False)
    >>> res.params["design_fitted"]
    '~ condition + (1|donor) + (1|donor:condition)'
    """
    check_not_empty(adata, "glmm_de", cells=True)
    check_backed_copy(adata, copy, "glmm_de")
    opts = _Options(
        design=design, contrast=contrast, family=family, layer=layer, offset=offset, trials=trials,
        groups_key=groups_key, sample_key=sample_key, replication=replication, genes=genes,
        min_cells_expressing=int(min_cells_expressing), estimation=estimation, test=test, moderate=moderate,
        n_jobs=n_jobs, shard=shard,
    )  # fmt: skip
    run = _plan(adata, opts)
    if not run.full.parsed.has_random:
        warnings.warn(
            f"design {design!r} has no random terms: this is a cell-level GLM that treats cells as independent "
            "replicates (pseudoreplication). Add e.g. '(1|donor)', or use scmlm.tl.pseudobulk_de.",
            UserWarning,
            stacklevel=2,
        )
    fitted: dict[str, FittedDesign] = {}
    tables = fit_groups(
        cell_groups(adata, groups_key),
        lambda name, rows: _fit_group(run, adata.obs, name, rows, fitted),
        lambda name, err: _not_estimable(run, name, err),
        groups_key=groups_key,
        tool="glmm_de",
    )
    table = _finish(tables, run)
    _report_replication(fitted, run)
    _warn_summary(table)
    return DEResult(table=table, params=_params(run, fitted)).deliver(adata, key_added, inplace=inplace, copy=copy)


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Options:
    """The choices of a ``glmm_de`` call, as given (see its parameters)."""

    design: str
    contrast: object
    family: str
    layer: str | None
    offset: str | None
    trials: str | None
    groups_key: str | None
    sample_key: str | None
    replication: str
    genes: object
    min_cells_expressing: int
    estimation: str
    test: str
    moderate: bool
    n_jobs: int | None
    shard: object


@dataclass(frozen=True)
class _Run(_Options):
    """What every group of a ``glmm_de`` call shares: the checked choices and the data prepared once.

    ``offset`` is resolved (``"tmm"``, ``"log_total"``, an obs column or ``None``), ``shard`` parsed to ``(i, n)``
    or ``None``, and ``moderate`` true only where moderation applies (Wald tests).
    """

    names: list[str]
    offset_samples: object
    full: Design
    """The design on all cells (formula and contrasts checked before any fit)."""
    matrix: object
    """Cells × selected genes (CSC or dense), in ``gene_idx`` order."""
    gene_idx: np.ndarray
    gene_names: np.ndarray
    offset_values: np.ndarray | None
    trial_values: np.ndarray | None


def _check_choices(o: _Options) -> None:
    resolve_n_jobs(o.n_jobs)  # a clear error for n_jobs="two" before any work
    if o.family not in FAMILY_NAMES:
        raise InputError(f"family={o.family!r} is not known; use one of {_fmt_list(FAMILY_NAMES)}.")
    if o.estimation not in ESTIMATION:
        raise InputError(f"estimation={o.estimation!r} must be 'REML' or 'ML'.")
    if o.test not in TESTS:
        raise InputError(f"test={o.test!r} must be 'wald' or 'lrt'.")
    if o.trials is not None and o.family != "binomial":
        raise InputError("trials= is only used with family='binomial'.")
    if o.replication not in REPLICATION_RULES:
        raise InputError(f"replication={o.replication!r} is not known; use one of {_fmt_list(REPLICATION_RULES)}.")


def _plan(adata: ad.AnnData, o: _Options) -> _Run:
    """Check the choices, the data and the model on all cells before any fit; resolve the offset; select genes."""
    _check_choices(o)
    check_unique_names(adata)
    check_obs_keys(adata, [o.trials])
    check_obs_keys(adata, [o.groups_key], what="groups_key", grouping=True)
    check_obs_keys(adata, [o.sample_key], what="sample_key", grouping=True)
    # an AnnData opened with backed="r" is read here once (checks, cell totals) and then gene block by gene block
    matrix = cell_matrix(adata, o.layer, "finite" if o.family == "gaussian" else "counts")
    trial_vec = None if o.trials is None else adata.obs[o.trials].to_numpy(dtype=float)
    full = build_design(adata.obs, o.design, check_rank=o.groups_key is None, factors=[o.sample_key, o.groups_key])
    specs = parse_contrasts(o.contrast)  # clear errors for a malformed list or dict before any fitting
    if o.groups_key is None:
        joint = [c.name for c in full.contrasts(o.contrast) if c.is_f]
    else:
        joint = [c.name for c in specs if c.joint and not (isinstance(c.spec, list) and len(c.spec) == 3)]
    if o.test == "lrt" and joint:
        raise InputError(f"test='lrt' tests single contrasts; the joint test(s) {_fmt_list(joint)} need test='wald'.")
    design, contrast, family, sample_key, offset = o.design, o.contrast, o.family, o.sample_key, o.offset
    # "auto": TMM needs samples (an explicit sample_key, or the design's random factors crossed with the contrast)
    offset = resolve_offset(offset, family, design=design, contrast=contrast, obs=adata.obs, sample_key=sample_key)
    samples = resolve_samples(sample_key, design, contrast, adata.obs) if offset == "tmm" else None
    # over all genes of the layer, before any gene selection
    off = cell_offset(adata, matrix, offset, o.layer, samples=samples, groups_key=o.groups_key)
    gene_idx = gene_indices(adata, o.genes)
    shard = parse_shard(o.shard)
    gene_idx = gene_idx[shard_indices(gene_idx.size, shard)]
    given = {f.name: getattr(o, f.name) for f in fields(_Options)}
    return _Run(
        **{**given, "offset": offset, "shard": shard, "moderate": bool(o.moderate and o.test == "wald")},
        names=[c.name for c in specs],
        offset_samples=samples,
        full=full,
        matrix=gene_columns(matrix, gene_idx),  # CSC (or dense) of the selected genes only, in gene_idx order
        gene_idx=gene_idx,
        gene_names=adata.var_names[gene_idx].to_numpy(),
        offset_values=off,
        trial_values=trial_vec,
    )


@dataclass(frozen=True)
class _ContrastPlan:
    """Per contrast: its df rule, replication level and whether it is moderated."""

    name: str
    L: np.ndarray
    df: float
    """Containment df of a contrast carried by a random term; the cell-level residual df otherwise."""
    between: bool
    """A random term's levels contain the contrast."""
    unit_level: bool
    """Between units, with replication there (containment df >= 1)."""
    coarse: list[str]
    """Coarser random terms the contrast's variance also rests on (which keep it from being moderated)."""
    paired: bool
    joint: bool
    n_units: int | None
    needs_tau2: bool
    """The moderated test needs each gene's between-unit variance."""
    C: np.ndarray | None
    """A joint test's unit-level scale ``L (X_u' X_u)⁻¹ L'``."""


def _support(L: np.ndarray) -> np.ndarray:
    """A vector with the nonzero pattern of ``L`` (the columns a joint test's rows use), for the replication rules."""
    return L if L.ndim == 1 else np.abs(L).sum(axis=0)


def _contrast_plan(d: Design, con, moderate: bool) -> _ContrastPlan:
    """The df rule, replication level and moderation of one contrast (the same for every gene of a group)."""
    v = _support(con.L)
    # df of a contrast carried by a random term: containment at that level (nlme's rule); of a cell-level contrast:
    # the residual df of the cell-level model
    df = containment_df(d, v)
    between = df is not None  # a random term's levels contain the contrast
    unit_level = between and df >= 1
    joint = con.L.ndim == 2
    rows = np.atleast_2d(con.L)
    coarse = sorted({t for r in rows for t in coarser_terms(d.X, d.terms, r)}) if unit_level and moderate else []
    paired = df is not None and within_parent(d, v)
    if df is None:
        df = contrast_df(d.X, d.terms, v)
    return _ContrastPlan(
        name=con.name,
        L=con.L,
        df=df,
        between=between,
        unit_level=unit_level,
        coarse=coarse,
        paired=paired,
        joint=joint,
        n_units=unit_scale(d.X, [t.codes for t in d.terms], v)[1] if unit_level else None,
        needs_tau2=unit_level and moderate and not coarse,
        C=_unit_cov(d, con.L, v) if joint and unit_level else None,
    )


def _unit_cov(d, L: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``C = L (X_u' X_u)⁻¹ L'`` of a joint test's rows on the unit-level design (as ``unit_scale`` for one row)."""
    X = d.X
    k = unit_scale(X, [t.codes for t in d.terms], v)[2]
    if k < 0:
        return np.eye(L.shape[0])
    codes = d.terms[k].codes
    _, first, inv = np.unique(codes, return_index=True, return_inverse=True)
    const = np.array([np.ptp(X[:, j]) == 0 or np.allclose(X[:, j], X[first, j][inv]) for j in range(X.shape[1])])
    Xu = X[np.ix_(first, np.flatnonzero(const))]
    Lu = L[:, const]
    return Lu @ np.linalg.pinv(Xu.T @ Xu) @ Lu.T


# ---------------------------------------------------------------- fit


@dataclass(frozen=True)
class _ChunkModel:
    """What the fit of a chunk of genes needs besides their counts (bound once, sent to each worker once)."""

    gdesign: object
    estimation: str
    test: str
    plans: list[_ContrastPlan]
    X: np.ndarray
    terms: tuple
    offset: np.ndarray | None
    family: str
    trials: np.ndarray | None
    min_nonzero: int = 1


def _cell_model(m: _ChunkModel) -> CellModel:
    """The cell-level model of a chunk, as the moderation's per-gene quantities take it."""
    return CellModel(m.X, m.terms, m.offset, m.family, m.trials)


@dataclass
class _GroupFits:
    """Per gene of a group: the shared fit quantities, and per contrast the test columns."""

    status: np.ndarray
    shared: dict[str, np.ndarray]
    """``dispersion`` and the variance of every random component."""
    components: list[str]
    n_iter: np.ndarray
    converged: np.ndarray
    per: list[dict[str, np.ndarray]]
    """Per contrast: ``coef, se, stat, df, pvalue`` and the moderation inputs ``tau2, uscale, dft, satt``."""


_TEST_COLUMNS = ("coef", "se", "stat", "df", "pvalue", "tau2", "uscale", "dft", "satt", "bound")


def _fit_group(run: _Run, obs: pd.DataFrame, name, rows: np.ndarray, fitted: dict) -> pd.DataFrame:
    """One group: its fitted design, one GLMM per eligible gene, every contrast's test; the group's rows."""
    group = "all" if name is None else name
    fd = fitted_design(
        obs.iloc[rows] if run.groups_key is not None else obs, run.design, run.contrast, sample_key=run.sample_key,
        replication=run.replication, built=run.full if run.groups_key is None else None,
    )  # fmt: skip
    fitted[group] = fd
    d = fd.design
    plans = [_contrast_plan(d, con, run.moderate) for con in fd.contrasts]
    sub = cell_rows(run.matrix, rows)  # the matrix holds only the selected genes
    off = None if run.offset_values is None else run.offset_values[rows]
    size_factor = np.exp(off - off.mean()) if off is not None else np.ones(rows.size)
    base_mean = scaled_means(sub, size_factor)  # first: the same pass over the counts gives the eligibility's sums
    eligible, _, colsum = gene_eligibility(sub, run.family, run.min_cells_expressing)  # variance_partition's rule
    model = _ChunkModel(
        gdesign=prepare_glmm(
            d.X, d.terms, off, family=run.family, trials=None if run.trial_values is None else run.trial_values[rows]
        ),
        estimation=run.estimation, test=run.test, plans=plans, X=d.X, terms=d.terms, offset=off, family=run.family,
        trials=None if run.trial_values is None else run.trial_values[rows],
    )  # fmt: skip
    fits = _fit_genes(model, sub, eligible, run.n_jobs)
    mean_count = colsum / max(rows.size, 1)
    icc = latent_icc({c: fits.shared[c] for c in fits.components}, fits.shared["dispersion"], run.family, mean_count)
    frame = {"gene": run.gene_names, "group": group, "method": f"glmm_{run.family}", "base_mean": base_mean}
    return pd.concat(
        [_contrast_rows(frame, d, pl, cols, fits, icc, run.moderate) for pl, cols in zip(plans, fits.per, strict=True)],
        ignore_index=True,
    )


def _fit_genes(model: _ChunkModel, sub, eligible: np.ndarray, n_jobs: int | None) -> _GroupFits:
    """Fit the eligible genes of a group in chunks (one fit per gene serves every contrast)."""
    n_genes = eligible.size
    comp = list(model.gdesign.component_names)
    fits = _GroupFits(
        status=eligible.copy(),
        shared={c: np.full(n_genes, np.nan) for c in ("dispersion", *comp)},
        components=comp,
        n_iter=np.zeros(n_genes, dtype=int),
        converged=np.zeros(n_genes, dtype=bool),
        per=[{c: np.full(n_genes, np.nan) for c in _TEST_COLUMNS} for _ in model.plans],
    )
    fit = np.flatnonzero(eligible == "ok")
    if not fit.size:
        return fits
    # chunks index the columns of sub directly: no copy of the fitted genes' counts
    entries = None if getattr(sub, "nnz_per_gene", None) is None else sub.nnz_per_gene[fit]  # bounds chunk memory
    chunks = [fit[c] for c in parallel_chunks(fit.size, n_jobs, entries)]
    # threads: the kernel releases the GIL; each thread cuts its chunk out of the shared counts
    results = run_chunks(functools.partial(_fit_chunk, model=model), sub, chunks, n_jobs=n_jobs, backend="threads")
    for g, (res, tests) in zip(chunks, results, strict=True):
        fits.shared["dispersion"][g] = res.phi
        for name in comp:
            fits.shared[name][g] = res.var[name]
        fits.n_iter[g] = res.n_iter
        fits.converged[g] = res.converged
        fits.status[g] = [STATUS.get(int(s), str(s)) if not isinstance(s, str) else s for s in res.status]
        for cols, (c, extra) in zip(fits.per, tests, strict=True):
            cols["coef"][g] = c.coef
            cols["se"][g] = c.se
            cols["stat"][g] = c.stat
            cols["df"][g] = c.df
            cols["pvalue"][g] = c.pvalue
            if c.bound is not None:
                cols["bound"][g] = c.bound
            if extra is not None:
                cols["tau2"][g], cols["uscale"][g], cols["dft"][g], cols["satt"][g] = extra
    return fits


def _fit_chunk(Y, *, model: _ChunkModel):
    """One fit per gene of the chunk, then every contrast's test from it: ``(res, [(con, extra) per plan])``."""
    res = fit_glmm(Y, model.gdesign, method=model.estimation, min_nonzero=model.min_nonzero)
    if model.test == "lrt":
        return res, _lrt_tests(Y, res, model)
    return res, _separated_tests(Y, res, model, [_wald_test(Y, res, model, pl) for pl in model.plans])


SEPARATED = "separated"
"""Status of a gene without a finite estimate; tested by a likelihood ratio, with a prior-count fold change."""
SEPARATED_UNTESTED = "failed: separated, no likelihood-ratio test"


def _separated_tests(Y, res, model: _ChunkModel, tests: list) -> list:
    """Replace the void Wald tests of separated genes by likelihood-ratio tests at the supremum, referred at the
    contrast's level as ``test="lrt"`` is (:func:`scmlm.models.separated_lrt`); the fold change is the prior-count
    estimate. ``test="lrt"`` does the same inside :func:`scmlm.models.glmm_lrt`."""
    sep = np.flatnonzero(res.status == SEPARATED)
    if not sep.size:
        return tests
    m, out = model, []
    for pl, (con, extra) in zip(m.plans, tests, strict=True):
        # a contrast between units assigned to conditions (case-control donors): the gene's evidence is at most what
        # its units with counts can give (without it, 11 % of separated null genes at p < 0.05 on 6 + 6 donors)
        k = unit_scale(m.X, [t.codes for t in m.terms], _support(pl.L))[2] if pl.unit_level and not pl.paired else -1
        lr = separated_lrt(
            Y, m.X, m.terms, pl.L, m.offset, family=m.family, trials=m.trials, df=pl.df, n_units=pl.n_units,
            genes=sep, units=m.terms[k].codes if k >= 0 else None,
        )  # fmt: skip
        bound = np.full(con.coef.size, np.nan)
        bound[sep] = lr.bound
        for name in ("coef", "se", "stat", "df", "pvalue"):
            getattr(con, name)[sep] = getattr(lr, name)
        out.append((replace(con, bound=bound), extra))
    return out


def _lrt_tests(Y, res, model: _ChunkModel) -> list:
    m = model
    full = res if m.estimation == "ML" else fit_glmm(Y, m.gdesign, method="ML", min_nonzero=m.min_nonzero)
    return [
        (
            glmm_lrt(
                Y,
                m.X,
                m.terms,
                pl.L,
                m.offset,
                family=m.family,
                trials=m.trials,
                df=pl.df,
                full=full,
                min_nonzero=m.min_nonzero,
                n_units=pl.n_units,
            ),  # fmt: skip
            None,
        )
        for pl in m.plans
    ]


def _wald_test(Y, res, model: _ChunkModel, pl: _ContrastPlan) -> tuple:
    """One contrast's Wald test of the chunk's fits: ``(con, (tau2, unit scale, df of tau2, Satterthwaite df))``."""
    m, L, df = model, pl.L, pl.df
    # containment df (between-donor residual df), lowered per gene by Satterthwaite where the variance
    # parameters are less informative than that count suggests (measured: 10-donor null, 400 cells per donor,
    # 6.3 % of p < 0.05 with the containment rule alone, 5.0-5.9 % with the minimum); several rows (a joint F
    # test): lmerTest's multi-row Satterthwaite df
    sdf = satterthwaite_df_f(res, L) if L.ndim == 2 else satterthwaite_df(res, L)
    # a Satterthwaite df below 1 is the approximation breaking down near the boundary (a variance close to zero,
    # not at it: minimum 2e-11 on unbalanced nulls), where a fit at the boundary gets the containment df; such
    # genes get the containment df too, so no gene's df falls below 1 from a degenerate estimate
    sdf = np.where(sdf < 1, np.inf, sdf)
    if pl.paired:
        # a within-donor contrast at the sample level: the gene's Satterthwaite df alone. Where the sample
        # variance is small the contrast is replicated by cells as well, and capping at the sample count throws
        # that away (within-donor null, 8 donors x 2 samples x 120 cells, NB: 1.3 % of p < 0.05 with the cap
        # when donors respond alike, 3.2 % without; 3.3 % and 5.4 % with donor-specific responses)
        gene_df = np.where(np.isfinite(sdf), sdf, df)
    else:
        gene_df = np.where(np.isfinite(sdf), np.minimum(df, sdf), df)
    if L.ndim == 2:
        con = glmm_wald_f(res, L, df=gene_df)
        if not pl.needs_tau2:
            return con, (np.full(con.stat.size, np.nan), np.nan, np.nan, sdf)
        # the joint test's between-unit variance: tr(C⁻¹ L V L') / q with C = L (X_u' X_u)⁻¹ L' (a
        # variance on the containment df in the balanced LMM of unit means, like se² / c of one row)
        M = np.einsum("ai,gij,bj->gab", L, res.cov_beta, L)
        raw = np.einsum("ab,gba->g", np.linalg.inv(pl.C), M) / L.shape[0]
        v = _support(L)
        c_v = unit_scale(m.X, [t.codes for t in m.terms], v)[0]
        with np.errstate(invalid="ignore"):
            # the unweighted unit scale: tau2 = raw is on the variance scale of the joint test itself
            tau2, _, dft = gene_tau2(Y, res, np.sqrt(raw * c_v), _cell_model(m), v, df, weighted=False)
        return con, (tau2, np.nan, dft, sdf)
    con = glmm_contrast(res, L, df=gene_df)
    if pl.needs_tau2:
        tau2, scale, dft = gene_tau2(Y, res, con.se, _cell_model(m), L, df, weighted=True)
    else:
        tau2 = scale = dft = np.nan
    return con, (tau2, scale, dft, sdf)


# ---------------------------------------------------------------- rows of a group


def _contrast_rows(frame: dict, d, pl: _ContrastPlan, cols: dict, fits: _GroupFits, icc: dict, moderate: bool):
    """The rows of one contrast of a group: estimates, test, status, variance components and moderation inputs."""
    conv = fits.converged
    out = pd.DataFrame(
        {
            "gene": frame["gene"],
            "group": frame["group"],
            "contrast": pl.name,
            "method": frame["method"],
            "base_mean": frame["base_mean"],
            "converged": conv,
        }
    )
    for c in ("coef", "se", "stat", "df", "pvalue"):
        out[c] = cols[c]
    out["dispersion"] = fits.shared["dispersion"]
    # separated genes: no finite estimate, but a likelihood-ratio test and a prior-count fold change
    sep = fits.status == SEPARATED
    bad = ~conv & ~(sep & np.isfinite(cols["pvalue"]))
    for c in ("stat", "pvalue"):
        out.loc[bad, c] = np.nan
    # no replication at the contrast's level (e.g. one donor per condition), or a gene whose variance
    # parameters leave less than one df: the fit stands, the test does not
    st = fits.status.copy()
    untestable = conv & ~(cols["df"] >= 1)
    if untestable.any():
        out.loc[untestable, ["stat", "pvalue"]] = np.nan
        st[untestable] = "not testable"
    out["status"] = st
    for name in fits.components:
        out[f"var_{name}"] = fits.shared[name]
    for name in fits.components:
        out[f"icc_{name}"] = icc[name]
    out["n_iter"] = fits.n_iter
    _moderation_columns(out, d, pl, cols["tau2"], moderate, cols["uscale"], cols["dft"])
    out["df_satterthwaite"] = cols["satt"]
    if sep.any():  # only then: the tables of runs without separated genes keep their columns
        out["p_bound"] = cols["bound"]
        _separated_rows(out, sep, d, pl)
    return out


def _separated_rows(out: pd.DataFrame, sep: np.ndarray, d, pl: _ContrastPlan) -> None:
    """Status and moderation inputs of the separated genes of one contrast (their tests: :func:`_separated_tests`).

    A moderated contrast leaves them pending: :func:`scmlm.results.finish_moderation` tests them with the prior of
    the other genes (:func:`scmlm.models.moderate_separated`); otherwise they keep the likelihood-ratio test."""
    tested = np.isfinite(out["pvalue"].to_numpy(dtype=float))
    no_df = ~(out["df"].to_numpy(dtype=float) >= 1)  # no replication at the contrast's level
    out.loc[sep, "status"] = np.where(tested, SEPARATED, np.where(no_df, "not testable", SEPARATED_UNTESTED))[sep]
    out.loc[sep, ["se_raw", "tau2"]] = np.nan
    if pl.unit_level and not pl.joint:
        out.loc[sep, "unit_scale"] = unit_scale(d.X, [t.codes for t in d.terms], pl.L)[0]
    pending = sep & tested & (out["moderation"] == PENDING).to_numpy() & np.isfinite(out["coef"].to_numpy(dtype=float))
    out.loc[sep & tested & ~pending, "moderation"] = "not moderated: separated, likelihood-ratio test of the gene alone"


def latent_icc(var: dict[str, np.ndarray], phi: np.ndarray, family: str, mean_count: np.ndarray) -> dict:
    """Intraclass correlation of each random term on the latent (link) scale.

    ``icc_k = σ²_k / (Σ_j σ²_j + σ²_ε)`` with the distribution-specific residual variance ``σ²_ε`` of
    :func:`~scmlm.tl._common.residual_variance` (Nakagawa, Johnson & Schielzeth 2017).
    """
    total = sum(np.nan_to_num(v) for v in var.values()) if var else np.zeros_like(phi, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = total + residual_variance(family, phi, mean_count)
        return {k: v / denom for k, v in var.items()}


def _moderation_columns(out: pd.DataFrame, d, pl: _ContrastPlan, tau2, moderate: bool, uscale=None, dft=None) -> None:
    """Per-gene inputs of the moderated test (:func:`scmlm.models.moderate`), finished over all genes of the group.

    ``uscale`` and ``dft`` are the unit scale ``c_g`` and the df of each gene's ``τ̂²`` (boundary fits: the df of
    their moment estimate, at most the containment df) from :func:`~scmlm.models.gene_tau2`."""
    unit = pl.unit_level
    out["se_raw"] = out["se"]
    out["tau2"] = tau2
    if not unit:
        out["df_resid"] = np.nan
    else:  # boundary fits: the df of their moment estimate of tau2 (gene_tau2), at most the containment df
        out["df_resid"] = float(pl.df) if dft is None else np.fmin(float(pl.df), dft)
    if pl.joint:
        # a joint test: tau2 is on the variance scale itself; the moderated F is f_raw · tau2 / posterior
        out["unit_scale"] = 1.0 if unit else np.nan
        out["f_raw"] = out["stat"]
        out["df_num"] = float(pl.L.shape[0])
    else:
        c = unit_scale(d.X, [t.codes for t in d.terms], pl.L)[0] if unit else np.nan
        # per gene where the unit design is weighted as the gene's fit weighs the units (gene_tau2), else c
        out["unit_scale"] = c if uscale is None else np.where(np.isfinite(uscale), uscale, c)
    out["df_prior"] = np.nan
    out["var_prior"] = np.nan
    if moderate and unit and pl.coarse:
        out["moderation"] = (
            f"not moderated: the contrast's variance also rests on {', '.join(f'(1|{c})' for c in pl.coarse)}, a "
            "term over whole units with few levels; per-gene test (a fixed effect for it allows moderation)"
        )
    elif moderate and unit:
        out["moderation"] = PENDING
    elif unit:
        out["moderation"] = "off"
    else:
        out["moderation"] = (
            "not moderated: no replication at the contrast's level" if pl.between else "cell-level contrast"
        )


def _not_estimable(run: _Run, name, err) -> pd.DataFrame:
    """The rows of a group whose design cannot be fitted: every gene and contrast, with the reason."""
    return pd.DataFrame(
        {
            "gene": np.tile(run.gene_names, len(run.names)),
            "group": name,
            "contrast": np.repeat(run.names, run.gene_idx.size),
            "method": f"glmm_{run.family}",
            "converged": False,
            "status": f"not estimable: {err}",
            "moderation": "not moderated: the group's design is not estimable",
        }
    )


# ---------------------------------------------------------------- finish and deliver


def _finish(tables: list[pd.DataFrame], run: _Run) -> pd.DataFrame:
    """Moderate the tests over all genes of each group and contrast (left to ``merge_shards`` in a sharded run)."""
    table = pd.concat(tables, ignore_index=True)
    if run.shard is None:  # a sharded run leaves it to scmlm.results.merge_shards: the prior needs all genes
        table = finish_moderation(table)
    return finalize_table(table)


def _params(run: _Run, fitted: dict[str, FittedDesign]) -> dict:
    single = len(run.names) == 1 and not isinstance(run.contrast, dict)
    return {
        "tool": "glmm_de",
        "design": run.design,
        **fitted_params(fitted, run.design, run.names, single=single),
        "replication": run.replication,
        "sample_key": run.sample_key,
        "contrast": contrast_param(run.contrast),
        "contrasts": run.names,
        "family": run.family,
        "estimation": run.estimation,
        "test": run.test,
        "moderate": run.moderate,
        "offset": run.offset,
        "offset_samples": run.offset_samples,
        "trials": run.trials,
        "layer": run.layer,
        "groups_key": run.groups_key,
        "min_cells_expressing": run.min_cells_expressing,
        "shard": "" if run.shard is None else f"{run.shard[0]}/{run.shard[1]}",
        "scmlm_version": __version__,
    }


def _report_replication(fitted: dict[str, FittedDesign], run: _Run) -> None:
    """Say, once per unit and contrast, where a sample-level contrast got its term (INFO) or lacks it (a warning);
    and once per term, which random term of few levels is fitted as a fixed effect (INFO) or kept random (a warning)."""
    seen = set()
    for fd in fitted.values():
        for term in fd.few_levels:
            if term in seen:
                continue
            seen.add(term)
            why = (
                f"random term {term} of {run.design!r} has fewer than {MIN_RANDOM_LEVELS} levels and holds whole units "
                "of replication: its variance rests on at most 3 df and a contrast between those units is miscalibrated"
            )
            if term in fd.as_fixed:
                log.log(NOTE, "glmm_de: %s; fitted it as a fixed effect: %r (replication='auto').", why, fd.formula)
            else:
                warnings.warn(
                    f"glmm_de: {why}. Kept random (replication='as_written'); a fixed effect is calibrated.",
                    UserWarning,
                    stacklevel=3,
                )
        for name, rep in zip(run.names, fd.replication, strict=True):
            if rep.level not in ("sample", "slope") or (rep.unit, name) in seen:
                continue
            seen.add((rep.unit, name))
            why = rep.message(name, run.design)
            if fd.added_terms:
                log.log(
                    NOTE,
                    "glmm_de: %s; added %s and fitted %r (replication='auto'; replication='as_written' fits the "
                    "design as written).",
                    why,
                    " + ".join(fd.added_terms),
                    fd.formula,
                )
            elif run.replication == "as_written":
                warnings.warn(
                    f"glmm_de: {why}. Fitting it as written (replication='as_written'): its p-values treat cells as "
                    "replicates of the contrast.",
                    UserWarning,
                    stacklevel=3,
                )


def _warn_summary(table: pd.DataFrame) -> None:
    counts = table["status"].value_counts()
    notable = {k: int(v) for k, v in counts.items() if k not in USABLE_STATUS}
    if notable:
        parts = ", ".join(f"{v} {k}" for k, v in counts.items())
        warnings.warn(f"glmm_de: {len(table)} gene fits: {parts}.", UserWarning, stacklevel=3)
