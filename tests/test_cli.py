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
