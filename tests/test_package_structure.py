"""Public API conventions (as scanpy's test_package_structure): adata first, ≤3 positional args, keyword-only rest."""

from __future__ import annotations

import inspect

import pytest

import scmlm

MODULES = {"pp": scmlm.pp, "tl": scmlm.tl, "pl": scmlm.pl, "get": scmlm.get}
FUNCS = [(f"{m}.{name}", getattr(mod, name)) for m, mod in MODULES.items() for name in mod.__all__]
FIRST = {"adata", "pb", "data"}


@pytest.mark.parametrize(("name", "func"), FUNCS, ids=[n for n, _ in FUNCS])
def test_signature(name, func):
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name}: more than three positional parameters"
    if name.startswith(("pp.", "tl.", "get.")) and name not in ("get.result_keys",):
        assert positional[0].name in FIRST, f"{name}: first parameter should be the AnnData"
    assert func.__doc__, f"{name}: missing docstring"
    if name.startswith("tl."):
        # the sibling convention of every tool: adata first, no optional positional argument, and the same
        # keyword-only output arguments (each returns through DEResult.deliver)
        assert positional[0].name == "adata", f"{name}: first parameter should be named adata"
        assert all(p.default is p.empty for p in positional), f"{name}: optional positional parameters"
        kw = sig.parameters
        for p in ("key_added", "inplace", "copy"):
            assert p in kw and kw[p].kind == kw[p].KEYWORD_ONLY, f"{name}: {p} must be keyword-only"
    if name.startswith("pl."):
        for p in ("ax", "show", "save"):
            assert p in sig.parameters, f"{name}: plotting functions take {p}="


_SIBLING_SPELLINGS = {"estimation": {"REML", "ML"}}


def test_tl_tools_spell_shared_arguments_alike():
    """One spelling per argument: a choice two tools share has one keyword, and ``method`` names no estimation."""
    for name in scmlm.tl.__all__:
        sig = inspect.signature(getattr(scmlm.tl, name))
        method = sig.parameters.get("method")
        assert method is None or method.default not in _SIBLING_SPELLINGS["estimation"], f"tl.{name}: method="
    assert inspect.signature(scmlm.tl.glmm_de).parameters["estimation"].default == "REML"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tl_tools_return_through_deliver():
    """``inplace=False`` returns the DEResult of every tool, with its own ``params["tool"]``."""
    import numpy as np

    from scmlm.results import DEResult

    a = scmlm.datasets.simulate(n_donors=4, n_cells=25, n_genes=6, seed=1)
    a = a[np.asarray(a.X.sum(axis=1)).ravel() > 0].copy()
    kw = {"min_cells_expressing": 1, "offset": None}
    vp = scmlm.tl.variance_partition(a, "~ (1|donor)", inplace=False, **kw)
    assert isinstance(vp, DEResult) and vp.params["tool"] == "variance_partition"
    scmlm.tl.glmm_de(a, "~ condition + (1|donor)", ("condition", "case", "ctrl"), **kw)
    re = scmlm.tl.random_effects(a, genes=list(a.var_names[:2]), inplace=False)
    assert isinstance(re, DEResult) and re.params["tool"] == "random_effects"
    assert "random_effects" not in a.uns


def test_all_lists_are_sorted_and_exist():
    for mod in MODULES.values():
        assert list(mod.__all__) == sorted(mod.__all__)
        for name in mod.__all__:
            assert callable(getattr(mod, name))
