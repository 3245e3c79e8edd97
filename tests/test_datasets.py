from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scmlm

CASES = [
    ("pig_airway", (2722, 1339), 7, ["WT", "CFTRKO"]),
    ("glioblastoma", (5000, 300), 5, ["ctrl", "panobinostat"]),
    ("kang2018", (1556, 1267), 2, ["ctrl", "stim"]),
    ("kang2018_100genes", (9517, 100), 3, ["ctrl", "stim"]),
]


@pytest.mark.parametrize(("name", "shape", "n_donors", "levels"), CASES)
def test_bundled_dataset(name, shape, n_donors, levels):
    adata = getattr(scmlm.datasets, name)()
    assert adata.shape == shape
    for col in ("donor", "condition", "cell_type", "sample_id"):
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype), col
    assert adata.obs["donor"].nunique() == n_donors
    assert list(adata.obs["condition"].cat.categories) == levels
    assert adata.obs["condition"].notna().all()
    data = adata.layers["counts"].data
    assert (data >= 0).all() and np.array_equal(data, np.round(data))
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert (adata.X != adata.layers["counts"]).nnz == 0


def test_pig_counts_match_ncount():
    adata = scmlm.datasets.pig_airway()
    np.testing.assert_array_equal(np.asarray(adata.X.sum(1)).ravel(), adata.obs["nCount_RNA"].to_numpy())
