from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from scmlm import InputError
from scmlm.results import bh_adjust, finalize_table, merge_shards, parse_shard, shard_indices


def test_bh_matches_statsmodels_and_keeps_nan():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200) ** 2
    p[[3, 50]] = np.nan
    got = bh_adjust(p)
    ok = np.isfinite(p)
    np.testing.assert_allclose(got[ok], multipletests(p[ok], method="fdr_bh")[1])
    assert np.isnan(got[[3, 50]]).all()


def _table(genes, group, p, shard=None):
    df = pd.DataFrame({"gene": genes, "group": group, "contrast": "c", "coef": 0.1, "pvalue": p, "status": "ok"})
    df["converged"] = True
    if shard:
        df["shard"] = shard
    return df


def test_padj_per_group():
    a = _table(["g1", "g2", "g3"], "A", [0.01, 0.02, 0.5])
    b = _table(["g1", "g2", "g3"], "B", [0.04, 0.9, 0.9])
    t = finalize_table(pd.concat([a, b]))
    np.testing.assert_allclose(t.loc[t.group == "A", "padj"], bh_adjust(np.array([0.01, 0.02, 0.5])))
    np.testing.assert_allclose(t.loc[t.group == "B", "padj"], bh_adjust(np.array([0.04, 0.9, 0.9])))
    np.testing.assert_allclose(t["log2fc"], 0.1 / np.log(2))


def test_shards_cover_all_genes_once():
    idx = np.concatenate([shard_indices(103, (i, 7)) for i in range(1, 8)])
    np.testing.assert_array_equal(idx, np.arange(103))
    assert parse_shard("3/10") == (3, 10)
    for bad in ("0/3", "4/3", "x", "1-3"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_merge_recomputes_bh_over_all_genes_and_refuses_incomplete():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=20) ** 3
    genes = np.array([f"g{i}" for i in range(20)])
    shards = [_table(genes[s], "A", p[s], shard=f"{k + 1}/3") for k, s in enumerate(np.array_split(np.arange(20), 3))]
    merged = merge_shards(list(reversed(shards)))
    assert merged["gene"].tolist() == genes.tolist()
    np.testing.assert_allclose(merged["padj"], bh_adjust(p))
    with pytest.raises(InputError, match=r"missing shard\(s\) 2/3"):
        merge_shards([shards[0], shards[2]])
    with pytest.raises(InputError, match="given twice"):
        merge_shards([shards[0], shards[0], shards[1], shards[2]])
    with pytest.raises(InputError, match="no 'shard' column"):
        merge_shards([_table(genes, "A", p)])


def test_engine_progress_bar_and_order(capsys):
    from scmlm.engine import gene_chunks, run_chunks

    Y = np.arange(30, dtype=float).reshape(3, 10)
    chunks = gene_chunks(10, 4)
    out = run_chunks(lambda block: block.sum(axis=0), Y, chunks, progress=True, desc="genes")
    np.testing.assert_array_equal(np.concatenate(out), Y.sum(axis=0))
    assert "10/10" in capsys.readouterr().err
