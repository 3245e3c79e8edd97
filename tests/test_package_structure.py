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
        kw = sig.parameters
        for p in ("key_added", "inplace"):
            assert p in kw and kw[p].kind == kw[p].KEYWORD_ONLY, f"{name}: {p} must be keyword-only"
    if name.startswith("pl."):
        for p in ("ax", "show", "save"):
            assert p in sig.parameters, f"{name}: plotting functions take {p}="


def test_all_lists_are_sorted_and_exist():
    for mod in MODULES.values():
        assert list(mod.__all__) == sorted(mod.__all__)
        for name in mod.__all__:
            assert callable(getattr(mod, name))
