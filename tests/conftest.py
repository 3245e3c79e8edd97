"""Shared fixtures."""

from __future__ import annotations

import anndata as ad
import matplotlib
import pytest
from helpers import load_reference

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def sim_between() -> ad.AnnData:
    return load_reference("sim_between_small")


@pytest.fixture(scope="session")
def sim_within() -> ad.AnnData:
    return load_reference("sim_within_small")


def pytest_addoption(parser):
    parser.addoption(
        "--overwrite",
        action="store_true",
        default=False,
        help="rewrite the golden-master snapshot (tests/test_golden_master.py) instead of comparing with it",
    )
