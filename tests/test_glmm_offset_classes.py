"""Offset classes of the GLMM kernel: cells of one pattern with equal offsets share their softplus evaluations in a
re-centring pass, which must give the same numbers as evaluating every cell."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scmlm.models import fit_glmm, intercept_term, prepare_glmm
from scmlm.models.glmm.design import _offset_classes


def test_offset_classes_group_equal_offsets_within_patterns():
    pat = np.array([0, 1, 0, 0, 1, 2, 1, 0])
    off = np.array([1.5, 1.5, 2.0, 1.5, 1.5, 1.5, 0.5, 2.0])
    cls, cls_pat, cls_off = _offset_classes(pat, off)
    assert cls_pat.size == cls_off.size == 5  # (0, 1.5), (0, 2.0), (1, 0.5), (1, 1.5), (2, 1.5)
    np.testing.assert_array_equal(cls_pat[cls], pat)
    np.testing.assert_array_equal(cls_off[cls], off)
    assert cls[0] == cls[3] and cls[2] == cls[7] and cls[1] == cls[4]
    assert len({cls[0], cls[1], cls[2], cls[5], cls[6]}) == 5


def _data(seed: int):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(8), 150)
    n = donor.size
    X = np.column_stack([np.ones(n), donor % 2])
    lib = rng.integers(200, 260, n)  # library sizes with ties within each donor
    off = np.log(lib)
    mu = np.exp(off - 5.0 + 0.3 * X[:, 1] + rng.normal(0, 0.4, 8)[donor])
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu[None, :] * rng.uniform(0.3, 3.0, (12, 1))))
    return X, [intercept_term("donor", donor)], off, Y.astype(float)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_fits_with_offset_classes_equal_fits_cell_by_cell(method):
    X, terms, off, Y = _data(3)
    design = prepare_glmm(X, terms, off, family="nb")
    ka = design.kernel_arrays
    n_cls = ka.cls_pat.size
    assert n_cls < 0.5 * X.shape[0]  # the ties are there: far fewer classes than cells
    # the same design with one class per cell: every softplus evaluated at its own cell
    n = X.shape[0]
    single = dataclasses.replace(
        design,
        kernel_arrays=ka._replace(
            cell_cls=np.arange(n, dtype=np.int64), cls_pat=ka.cell_pat.copy(), cls_off=ka.cell_off.copy()
        ),
    )
    a = fit_glmm(Y, design, method=method)
    b = fit_glmm(Y, single, method=method)
    assert (a.status == "ok").sum() + (a.status == "singular").sum() >= 10
    for name in ("beta", "cov_beta", "theta", "phi", "loglik", "b", "n_iter"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_v_tables_from_offset_classes_equal_tables_cell_by_cell():
    from scmlm.models.glmm.likelihood import build_tables

    X, terms, off, _ = _data(5)
    vt = prepare_glmm(X, terms, off, family="nb").kernel_arrays.vtabs
    assert (vt.vmode == 0).all() and vt.tab.shape[0] > 0
    tab_n = np.diff(np.append(vt.tab_start, vt.tab.shape[0]))
    # one class per cell: every node's softplus evaluated at each cell
    n = vt.cell_o.size
    cell_by_cell = vt._replace(tab=np.zeros_like(vt.tab))
    build_tables(cell_by_cell, tab_n, (np.arange(n, dtype=np.int64), vt.cell_ptr.copy(), vt.cell_o.copy()))
    np.testing.assert_array_equal(cell_by_cell.tab, vt.tab)
    assert np.abs(vt.tab).max() > 0
