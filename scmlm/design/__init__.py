"""Model formulas, design matrices, random-effect terms and contrasts (no AnnData)."""

from ._design import Contrast, Design, build_design, check_estimable, contrast_label, make_contrast
from ._formula import ParsedFormula, RandomSpec, parse_formula

__all__ = [
    "Contrast",
    "Design",
    "ParsedFormula",
    "RandomSpec",
    "build_design",
    "check_estimable",
    "contrast_label",
    "make_contrast",
    "parse_formula",
]
