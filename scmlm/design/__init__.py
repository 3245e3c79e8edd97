"""Model formulas, design matrices, random-effect terms and contrasts (no AnnData)."""

from ._design import (
    Contrast,
    ContrastSpec,
    Design,
    build_design,
    check_estimable,
    contrast_label,
    contrast_names,
    contrast_param,
    is_multi,
    make_contrast,
    make_contrasts,
    parse_contrasts,
)
from ._fitted import REPLICATION_RULES, FittedDesign, fitted_design, fitted_params, one_or_all, stored_formula
from ._formula import ParsedFormula, RandomSpec, parse_formula
from ._replication import Replication, containment_df, replication, within_parent

__all__ = [
    "Contrast",
    "ContrastSpec",
    "Design",
    "FittedDesign",
    "REPLICATION_RULES",
    "ParsedFormula",
    "RandomSpec",
    "Replication",
    "build_design",
    "check_estimable",
    "containment_df",
    "contrast_label",
    "contrast_names",
    "contrast_param",
    "fitted_design",
    "fitted_params",
    "is_multi",
    "make_contrast",
    "make_contrasts",
    "one_or_all",
    "parse_contrasts",
    "parse_formula",
    "replication",
    "stored_formula",
    "within_parent",
]
