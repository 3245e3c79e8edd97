from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

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


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_h5ad_writers_refuse_another_suffix_before_the_work(tmp_path, capsys):
    """`scmlm simulate`, `dataset` and `pseudobulk` write AnnData as .h5ad only; another suffix fails at once."""
    cells = tmp_path / "cells.h5ad"
    scmlm.datasets.simulate(n_donors=3, n_cells=5, n_genes=5).write_h5ad(cells)
    before = _digest(cells)
    for argv, out in (
        (["simulate", str(tmp_path / "sim.txt"), "--n-donors", "3", "--n-cells", "5"], "sim.txt"),
        (["dataset", "pig_airway", str(tmp_path / "pig.zarr")], "pig.zarr"),
        (["pseudobulk", str(cells), str(tmp_path / "pb.csv"), "--sample-key", "donor"], "pb.csv"),
        (["pseudobulk", str(cells), str(tmp_path / "pb"), "--sample-key", "donor"], "pb"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        stem = out.split(".")[0]
        assert f"output {str(tmp_path / out)!r} ends in" in err[0] and f"'{tmp_path / stem}.h5ad'" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]  # nothing written
    assert _digest(cells) == before


def test_renamed_options_name_their_replacement(tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    scmlm.datasets.simulate(n_donors=4, n_cells=5, n_genes=5).write_h5ad(cells)
    base = ["de", str(cells), "--design", "~ condition", "--contrast", "condition:case:ctrl"]
    out = tmp_path / "res.csv"
    cases = (
        (["--tool", "glmm", "--reml"], "--reml is no longer an option; use --estimation REML"),
        (["--tool", "pseudobulk", "--pb-method", "voom"], "--pb-method is no longer an option; use --method"),
        (["--tool", "pseudobulk", "--pb-method=voom"], "--pb-method is no longer an option; use --method"),
    )
    for extra, message in cases:
        assert main([*base, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"scmlm: error: {err[0].split('error: ', 1)[1]}"] and message in err[0]
    assert not out.exists()


def test_contrast_without_reference_level_shows_the_accepted_forms(tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    scmlm.datasets.simulate(n_donors=4, n_cells=5, n_genes=5).write_h5ad(cells)
    before = _digest(cells)
    out = tmp_path / "res.csv"
    de = ["de", str(cells), "--design", "~ condition", "--out", str(out)]
    for argv in (
        [*de, "--tool", "pseudobulk", "--sample-key", "donor", "--contrast", "condition:case"],
        [*de, "--tool", "glmm", "--contrast", "condition:case"],
        [*de, "--tool", "glmm", "--contrast", "mine=condition:case"],
        ["abundance", "--input", str(cells), "--design", "~ condition", "--contrast", "condition:case",
         "--sample-key", "donor", "--out", str(out)],
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert "'condition:case' names factor 'condition' and level 'case' but no reference level" in err[0]
        assert "e.g. condition:case:ctrl" in err[0] and "accepted forms: factor:test:reference" in err[0]
    # an empty part is refused while the options are read
    for bad in ("condition:", ":case"):
        with pytest.raises(SystemExit) as stop:
            main([*de, "--tool", "glmm", "--contrast", bad])
        assert stop.value.code == 2
        assert f"{bad!r} is not a contrast; the accepted forms are factor:test:reference" in capsys.readouterr().err
    assert not out.exists() and _digest(cells) == before


def test_abundance_on_two_donors_per_condition_warns_of_few_replicates(tmp_path, caplog):
    import logging

    cells = tmp_path / "cells.h5ad"
    scmlm.datasets.simulate(n_donors=4, n_cells=30, n_genes=10, n_cell_types=3).write_h5ad(cells)
    argv = ["abundance", "--input", str(cells), "--design", "~ condition", "--contrast", "condition:case:ctrl"]
    argv += ["--sample-key", "donor", "--method", "clr", "--out", str(tmp_path / "ab.csv")]
    with caplog.at_level(logging.WARNING, logger="scmlm"):
        assert main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "rests on very few replicates" in warned[0]
    assert "condition=case has 2 units of replication (fewer than 3)" in warned[0]
    assert len(pd.read_csv(tmp_path / "ab.csv")) == 3
