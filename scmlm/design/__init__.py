"""Model formulas, design matrices, random-effect terms and contrasts (no AnnData)."""

from ._design import Contrast, Design, build_design, check_estimable, contrast_label, make_contrast
from ._formula import ParsedFormula, RandomSpec, parse_formula
from ._replication import Replication, containment_df, replication, within_parent

__all__ = [
    "Contrast",
    "Design",
    "ParsedFormula",
    "RandomSpec",
    "Replication",
    "build_design",
    "check_estimable",
    "containment_df",
    "contrast_label",
    "make_contrast",
    "parse_formula",
    "replication",
    "within_parent",
]
