"""Loaders for the small real multi-donor datasets shipped with scmlm (no network access)."""

from __future__ import annotations

from importlib.resources import files

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

_DATA = files("scmlm.datasets") / "data"

# condition levels, reference first
_LEVELS = {
    "small_airway_cf_pig_aggregatebiovar": ["WT", "CFTRKO"],
    "glioblastoma_zhao2021_lemur": ["ctrl", "panobinostat"],
    "kang2018_muscat_2donors": ["ctrl", "stim"],
    "kang2018_distinct_3donors_100genes": ["ctrl", "stim"],
}
_KEYS = ("donor", "condition", "sample_id", "cell_type", "batch")


def _load(folder: str) -> ad.AnnData:
    adata = _load_folder(_DATA / folder, _LEVELS[folder])
    adata.uns["dataset"] = {"name": folder, "condition_levels": _LEVELS[folder]}
    return adata


def _load_folder(base, condition_levels=None) -> ad.AnnData:
    """Read the bundled layout: ``counts.mtx.gz`` (genes × cells), ``obs.csv.gz`` (with ``cell_id``), ``var.csv``."""
    import gzip

    with (base / "counts.mtx.gz").open("rb") as fh:
        with gzip.open(fh) as gz:
            counts = scipy.io.mmread(gz)
    X = sp.csr_matrix(counts.T, dtype=np.float32)  # files are genes x cells
    with (base / "obs.csv.gz").open("rb") as fh:
        obs = pd.read_csv(fh, compression="gzip", dtype={"donor": str, "sample_id": str, "batch": str})
    with (base / "var.csv").open("r") as fh:
        var = pd.read_csv(fh, dtype=str)
    if "cell_id" in obs:
        obs.index = pd.Index(obs.pop("cell_id").astype(str), name=None)
    var.index = pd.Index(var["gene"].astype(str), name=None)
    var = var.drop(columns="gene")
    for key in _KEYS:
        if key not in obs:
            continue
        if key == "condition" and condition_levels is not None:
            obs[key] = pd.Categorical(obs[key], categories=condition_levels)
        elif obs[key].notna().any():
            obs[key] = pd.Categorical(obs[key].astype("string").astype(object))
        else:
            obs[key] = pd.Categorical(obs[key].astype(object))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    return adata


def pig_airway() -> ad.AnnData:
    """Newborn pig small-airway epithelium, CFTR knockout vs wild type (7 pigs, between-subject).

    1,339 genes (GO "ion transport") × 2,722 cells; 3 CFTR-knockout (SCF1–3) and 4 wild-type (SWT1–4) pigs, one sample
    per pig; 3 cell types (secretory, endothelial, immune). ``condition`` levels: ``WT`` (reference), ``CFTRKO``.
    No batch information. ``nCount_RNA`` is the total over this gene subset only.

    Source: aggregateBioVar's ``small_airway`` data (github.com/jasonratcliff/aggregateBioVar, blob 6082d7c, GPL-3).
    Thurman AL et al., Bioinformatics 37(19):3243 (2021).

    Returns
    -------
    AnnData with raw UMI counts in ``.X`` and ``layers["counts"]``; categorical obs ``donor``, ``condition``,
    ``sample_id``, ``cell_type``, ``batch`` (all NA).

    Examples
    --------
    >>> import scmlm
    >>> adata = scmlm.datasets.pig_airway()
    >>> adata.obs["condition"].cat.categories.tolist()
    ['WT', 'CFTRKO']
    """
    return _load("small_airway_cf_pig_aggregatebiovar")


def glioblastoma() -> ad.AnnData:
    """Glioblastoma slice cultures, DMSO vs panobinostat, 5 patients each with both conditions (paired).

    300 genes × 5,000 cells; 10 samples (patient × condition); no cell-type labels (``cell_type`` is NA).
    ``condition`` levels: ``ctrl`` (reference), ``panobinostat``.

    Source: lemur example data (github.com/const-ae/lemur, ``data/glioblastoma_example_data.rda``, MIT licence).
    Zhao W et al., Genome Medicine 13:82 (2021).
    """
    return _load("glioblastoma_zhao2021_lemur")


def kang2018() -> ad.AnnData:
    """Kang et al. 2018 PBMCs, IFN-β stimulated vs control: muscat's example subset (2 donors, paired).

    1,267 genes × 1,556 cells; 2 donors × 2 conditions; 5 cell types. ``batch`` is the sequencing lane and is fully
    confounded with condition, as in the study. ``condition`` levels: ``ctrl`` (reference), ``stim``.

    Source: muscat ``example_sce`` (github.com/HelenaLC/muscat, GPL-3); data from GEO GSE96583.
    Kang HM et al., Nat Biotechnol 36:89–94 (2018).
    """
    return _load("kang2018_muscat_2donors")


def kang2018_100genes() -> ad.AnnData:
    """Kang et al. 2018 PBMCs: distinct's ``Kang_subset`` (3 donors × ctrl/stim, 100 genes, 9,517 cells).

    8 cell types; many cells, few genes. ``batch`` (lane) is confounded with condition.
    ``condition`` levels: ``ctrl`` (reference), ``stim``.

    Source: distinct ``Kang_subset`` (github.com/SimoneTiberi/distinct, GPL ≥ 3); data from GEO GSE96583.
    """
    return _load("kang2018_distinct_3donors_100genes")
