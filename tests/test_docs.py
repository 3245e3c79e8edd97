"""The documentation runs: every ```python snippet of README.md and docs/*.md, the README's command-line snippet, and
the examples in scmlm's docstrings.

The snippets of one page run in order in one namespace (as a reader pastes them one after another), in a temporary
folder, on the data they name. A snippet that cannot run here says so in the page itself, with an HTML comment
``<!-- not run: reason -->`` on the line before its fence; the list of such snippets is checked below, so a new one
is a visible change.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import scmlm

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!--\s*not run:(?P<why>[^>]*)-->\s*\n)?^(?P<ind>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^(?P=ind)```",
    re.M | re.S,
)

#: Snippets that are not run, by page and first line, with the reason given in the page.
NOT_RUN = {
    ("README.md", 'configfile: "config/scmlm.yaml"'),  # Snakemake syntax (a module import), run by test_workflow
    ("handoff.md", "import decoupler as dc"),  # decoupler is not a dependency and its networks need internet
}


def snippets(page: Path, lang: str) -> list[tuple[str, str | None]]:
    """(code, reason it is not run or None) of every block fenced as ``lang``, in page order."""
    out = []
    for m in FENCE.finditer(page.read_text()):
        if m.group("lang") == lang:
            why = m.group("why")
            # a block indented inside a list item runs as written, without its indentation
            out.append((textwrap.dedent(m.group("code")), why.strip() if why is not None else None))
    return out


def test_every_page_has_snippets_and_only_known_ones_are_not_run():
    skipped = set()
    for page in PAGES:
        for code, why in snippets(page, "python"):
            if why is not None:
                assert why, f"{page.name}: a 'not run' snippet must say why"
                first = code.strip().splitlines()[0]
                skipped.add(next(((n, start) for n, start in NOT_RUN if n == page.name and first.startswith(start)),
                                 (page.name, first)))  # fmt: skip
    assert skipped == NOT_RUN
    assert all(snippets(p, "python") for p in PAGES if p.name in ("README.md", "tutorial.md", "normalisation.md"))


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    # a reader sees scmlm's warnings (e.g. how many gene fits were not tested); they are not errors here
    warnings.filterwarnings("default", category=UserWarning)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for i, (code, why) in enumerate(snippets(page, "python")):
        if why is not None:
            continue
        try:
            exec(compile(code, f"{page.name} snippet {i + 1}", "exec"), namespace)
        except Exception as err:
            what = f"{page.name}, python snippet {i + 1} fails:\n{code}\n{type(err).__name__}: {err}"
            raise AssertionError(what) from err
        finally:
            plt.close("all")
        ran += 1
    assert ran > 0


def test_readme_command_line_runs_as_written(tmp_path):
    """The README's ```bash block that uses the scmlm command line, line by line in one shell, in a fresh folder."""
    blocks = [code for code, _ in snippets(REPO / "README.md", "bash") if code.lstrip().startswith("scmlm ")]
    assert len(blocks) == 1, blocks
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "-e", "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{blocks[0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in ("sim.h5ad", "pb.h5ad", "pb.csv", "glmm.csv", "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any((tmp_path / "plots").glob("volcano__*.png"))
    shrinkage = list((tmp_path / "hier").glob("shrinkage__*.png"))
    assert shrinkage
    report = (tmp_path / "report.html").read_text()
    n_png = len(list((tmp_path / "plots").glob("*.png"))) + len(list((tmp_path / "hier").glob("*.png")))
    assert report.count('src="data:image/png;base64,') == n_png
    assert '<h2 id="s-pseudobulk">pseudobulk</h2>' in report and '<h2 id="s-glmm">glmm</h2>' in report


MODULES = sorted(m.name for m in pkgutil.walk_packages(scmlm.__path__, "scmlm.") if not m.name.startswith("scmlm.__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    warnings.filterwarnings("default", category=UserWarning)
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    try:
        result = doctest.testmod(module, optionflags=flags, report=True, verbose=False)
    finally:
        plt.close("all")
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail (see above)"
