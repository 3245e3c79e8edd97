from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd

import scmlm
from scmlm.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "scmlm.cli", *args], capture_output=True, text=True, check=False)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and scmlm.__version__ in r.stdout
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("simulate", "pseudobulk", "de", "merge", "plot"):
        assert cmd in r.stdout


def test_simulate_pseudobulk_round_trip(tmp_path):
    cells = tmp_path / "cells.h5ad"
    pbf = tmp_path / "pb.h5ad"
    assert main(["simulate", str(cells), "--n-donors", "4", "--n-cells", "25", "--n-genes", "40", "--seed", "2"]) == 0
    adata = ad.read_h5ad(cells)
    expected = scmlm.datasets.simulate(n_donors=4, n_cells=25, n_genes=40, seed=2)
    np.testing.assert_array_equal(adata.X.toarray(), expected.X.toarray())
    rc = main(["pseudobulk", str(cells), str(pbf), "--sample-key", "donor", "--layer", "counts", "--min-cells", "5"])
    assert rc == 0
    pb = ad.read_h5ad(pbf)
    direct = scmlm.pp.pseudobulk(expected, "donor", layer="counts", min_cells=5)
    np.testing.assert_array_equal(pb.X, direct.X)
    pd.testing.assert_frame_equal(pb.obs, direct.obs)
    assert pb.uns["pseudobulk"]["sample_key"] == "donor"


def test_bad_input_exits_2_with_message(tmp_path):
    cells = tmp_path / "cells.h5ad"
    scmlm.datasets.simulate(n_donors=3, n_cells=5, n_genes=5).write_h5ad(cells)
    out = tmp_path / "pb.h5ad"
    r = run("pseudobulk", str(cells), str(out), "--sample-key", "patient")
    assert r.returncode == 2
    assert "sample_key 'patient' is not a column of adata.obs" in r.stderr
    assert not out.exists()
    r = run("pseudobulk", str(tmp_path / "missing.h5ad"), str(out), "--sample-key", "donor")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_dataset_command(tmp_path):
    out = tmp_path / "pig.h5ad"
    assert main(["dataset", "pig_airway", str(out)]) == 0
    assert ad.read_h5ad(out).shape == (2722, 1339)


def _de_actions():
    from scmlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["de"]._actions


def test_de_flags_mirror_the_keywords():
    """`scmlm de` spells each option as the API keyword it sets (underscores as dashes)."""
    import inspect

    flags = {opt for action in _de_actions() for opt in action.option_strings}
    shared = ("design", "groups_key", "layer", "key_added", "n_jobs")
    glmm = ("family", "offset", "sample_key", "replication", "estimation", "shard")
    for kw in (*shared, *glmm, "method", "rows_are_samples"):
        assert f"--{kw.replace('_', '-')}" in flags, kw
    for kw in glmm:
        assert kw in inspect.signature(scmlm.tl.glmm_de).parameters, kw
    assert "method" in inspect.signature(scmlm.tl.pseudobulk_de).parameters
    assert "--reml" not in flags and "--pb-method" not in flags
    fam = next(a for a in _de_actions() if "--family" in a.option_strings)
    assert tuple(fam.choices) == scmlm.models.FAMILY_NAMES


def test_de_method_names_the_pseudobulk_method_not_the_tool(capsys):
    try:
        rc = main(["de", "x.h5ad", "--method", "glmm", "--design", "~ a", "--contrast", "a:b:c", "--out", "o.csv"])
    except SystemExit as err:  # argparse exits with status 2
        rc = err.code
    assert rc == 2
    assert "--tool glmm" in capsys.readouterr().err
