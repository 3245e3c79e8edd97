"""scmlm: multilevel models for multi-donor single-cell and omics data.

Use it like scanpy::

    import scmlm
    pb = scmlm.pp.pseudobulk(adata, "donor", groups_key="cell_type", layer="counts")
    scmlm.tl.pseudobulk_de(pb, "~ condition", ("condition", "case", "ctrl"), groups_key="cell_type")
    scmlm.get.de_df(pb, key="pseudobulk_de", padj_max=0.05)

``scmlm.warmup()`` (``scmlm warmup``) compiles the numba kernels once per installation, so that no later call does.
"""

from . import datasets, get, pl, pp, report, tl
from ._errors import DesignError, EstimabilityError, InputError, ScmlmError
from ._settings import settings
from ._version import __version__
from ._warmup import warmup

__all__ = [
    "DesignError",
    "EstimabilityError",
    "InputError",
    "ScmlmError",
    "__version__",
    "datasets",
    "get",
    "pl",
    "pp",
    "report",
    "settings",
    "tl",
    "warmup",
]
