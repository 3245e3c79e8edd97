from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scmlm
from scmlm.design import build_design, parse_formula
from scmlm.errors import DesignError, EstimabilityError


@pytest.fixture(scope="module")
def obs():
    return scmlm.datasets.simulate(n_donors=8, n_cells=10, n_genes=5, seed=0).obs


def test_parse_random_terms():
    p = parse_formula("~ condition + (1|donor) + (1|batch)")
    assert p.fixed == "~ condition"
    assert [str(r) for r in p.random] == ["(1 | donor)", "(1 | batch)"]
    nested = parse_formula("~ x + (1|site/donor)")
    assert [r.group for r in nested.random] == [("site",), ("site", "donor")]
    unc = parse_formula("~ (1 + x||donor)")
    assert [(r.lhs, r.group_name) for r in unc.random] == [("1", "donor"), ("0 + x", "donor")]
    assert parse_formula("~ (1|donor)").fixed == "~ 1"


@pytest.mark.parametrize(
    ("formula", "match"),
    [
        ("condition", "no '~'"),
        ("y ~ condition", "response"),
        ("~ condition + 1|donor", "must be in parentheses"),
        ("~ condition + (1|donor", "unbalanced"),
        ("~ condition + offset(log_total)", "offset= argument"),
    ],
)
def test_parse_errors(formula, match):
    with pytest.raises(DesignError, match=match):
        parse_formula(formula)


def test_fixed_design_and_contrasts(obs):
    d = build_design(obs, "~ batch + condition")
    assert d.columns == ["(Intercept)", "batch[T.batch1]", "batch[T.batch2]", "condition[T.case]"]
    c = d.contrast(("condition", "case", "ctrl"))
    np.testing.assert_array_equal(c.L, [0, 0, 0, 1])
    assert c.name == "condition_case_vs_ctrl"
    np.testing.assert_array_equal(d.contrast(("condition", "ctrl", "case")).L, [0, 0, 0, -1])
    np.testing.assert_array_equal(d.contrast(("batch", "batch2", "batch1")).L, [0, -1, 1, 0])
    np.testing.assert_array_equal(d.contrast("conditioncase").L, d.contrast("condition[T.case]").L)
    np.testing.assert_array_equal(d.contrast([0, 0, 1.0, 0]).L, [0, 0, 1, 0])


def test_interaction_contrast(obs):
    o = obs.copy()
    o["sex"] = pd.Categorical(np.where(o["donor"].cat.codes % 4 < 2, "F", "M"))
    d = build_design(o, "~ condition * sex")
    c = d.contrast(("condition", "case", "ctrl"))  # effect at the reference sex, as R's coefficient
    assert c.L[d.columns.index("condition[T.case]")] == 1
    assert c.L.sum() == 1


def test_random_terms_built(obs):
    o = obs.copy()
    o["pair"] = pd.Categorical(np.where(o["donor"].cat.codes < 4, "a", "b"))
    with pytest.warns(UserWarning, match="only 2 levels"):
        build_design(o, "~ condition + (1|pair)")
    d = build_design(obs, "~ condition + (1|donor) + (1|batch)")
    assert [t.name for t in d.terms] == ["donor", "batch"]
    assert [t.n_levels for t in d.terms] == [8, 3]
    nested = build_design(obs, "~ condition + (1|batch/donor)")
    assert [t.name for t in nested.terms] == ["batch", "batch:donor"]
    slope = build_design(obs, "~ size_factor + (1 + size_factor|batch)")
    assert slope.terms[0].k == 2 and slope.terms[0].correlated
    assert slope.terms[0].component_names() == ["batch", "batch:size_factor"]


def test_unknown_column_lists_valid(obs):
    with pytest.raises(DesignError, match=r"uses 'sex', not found among the columns: 'donor', 'batch'"):
        build_design(obs, "~ sex + condition")
    with pytest.raises(DesignError, match=r"uses 'patient'"):
        build_design(obs, "~ condition + (1|patient)")


def test_unknown_level_lists_valid(obs):
    d = build_design(obs, "~ condition")
    with pytest.raises(DesignError, match=r"level 'treated' of 'condition' is not in the data; its levels are: "):
        d.contrast(("condition", "treated", "ctrl"))
    with pytest.raises(DesignError, match=r"coefficient 'conditionx' is not in the design"):
        d.contrast("conditionx")
    with pytest.raises(DesignError, match=r"numeric contrast has shape \(3,\)"):
        d.contrast([0, 1, 0])


def test_single_level_factor(obs):
    with pytest.raises(DesignError, match=r"factor 'cell_type' .* has a single level"):
        build_design(obs, "~ cell_type + condition")
    with pytest.raises(DesignError, match=r"'cell_type' has a single level"):
        build_design(obs, "~ condition + (1|cell_type)")


def test_confounded_kang_batch_condition():
    pb = scmlm.pp.pseudobulk(scmlm.datasets.kang2018(), "sample_id")
    with pytest.raises(EstimabilityError, match=r"'batch' and 'condition' are confounded"):
        build_design(pb.obs, "~ batch + condition")


def test_donor_level_effect_with_fixed_donor(obs):
    with pytest.raises(EstimabilityError, match=r"'condition' is constant within each level of 'donor'.*\(1\|donor\)"):
        build_design(obs, "~ condition + donor")


def test_more_coefficients_than_samples():
    o = pd.DataFrame({"a": pd.Categorical(list("abcd")), "x": [1.0, 2.0, 3.0, 5.0]})
    with pytest.raises(EstimabilityError, match="5 coefficients but only 4 observations"):
        build_design(o, "~ a + x")


def test_non_estimable_contrast(obs):
    d = build_design(obs, "~ condition")
    with pytest.raises(EstimabilityError, match="zero for every coefficient"):
        d.contrast([0.0, 0.0])


def test_fitted_design_adds_the_sample_term_a_paired_contrast_needs():
    """One decision of the formula glmm_de fits: as written, or with the terms its contrasts' replication needs."""
    from scmlm.design import FittedDesign, fitted_design, fitted_params, stored_formula

    paired = scmlm.datasets.simulate(n_donors=4, n_cells=20, n_genes=5, design="within", seed=0).obs
    between = scmlm.datasets.simulate(n_donors=4, n_cells=20, n_genes=5, seed=0).obs
    design, contrast = "~ condition + (1|donor)", ("condition", "case", "ctrl")
    fd = fitted_design(paired, design, contrast)
    assert isinstance(fd, FittedDesign)
    assert fd.written == design and fd.added_terms == ("(1|donor:condition)",)
    assert fd.formula == "~ condition + (1|donor) + (1|donor:condition)" == fd.design.formula
    assert fd.units == ("donor:condition",) and fd.replication[0].level == "sample"
    assert [c.name for c in fd.contrasts] == ["condition_case_vs_ctrl"]
    as_written = fitted_design(paired, design, contrast, replication="as_written")
    assert as_written.formula == design and as_written.added_terms == () and as_written.units == fd.units
    plain = fitted_design(between, design, contrast)
    assert plain.formula == design and plain.units == ("donor",)
    with pytest.raises(scmlm.InputError, match="replication='sometimes' is not known"):
        fitted_design(paired, design, contrast, replication="sometimes")
    # what params store, and how it is read back per group
    params = {"design": design, **fitted_params({"a": fd, "b": plain}, design, ["c"], single=True)}
    assert params["design_fitted"] == {"a": fd.formula, "b": design}
    assert params["added_terms"] == ["(1|donor:condition)"]
    assert params["replication_unit"] == {"a": "donor:condition", "b": "donor"}
    assert stored_formula(params, "a") == fd.formula and stored_formula(params, "b") == design
    same = fitted_params({"a": fd, "b": fd}, design, ["c"], single=False)
    assert same["design_fitted"] == fd.formula and same["replication_unit"] == {"c": "donor:condition"}
    assert stored_formula({"design": design, "design_fitted": fd.formula}, "all") == fd.formula
