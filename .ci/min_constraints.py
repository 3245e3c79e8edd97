"""Write pip constraints that pin every declared dependency of scmlm to its floor (``name>=X`` → ``name==X``).

pip has no "lowest versions" resolution, so the minimum-versions job (``.ci/min-versions.sh``) installs scmlm with
these constraints: if a floor in pyproject.toml is too low for the code, the job fails there instead of on a user's
machine. Covered: ``[project] dependencies`` and the extras named on the command line (default: PyDESeq2 and the
workflow). Developer tools (pytest, ruff, snakefmt) are left to resolve freely.

    python .ci/min_constraints.py [EXTRA ...] > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# `slurm` is left out: its plugin's own floors (pandas>=2.2.3 for plugin 2.0.1) cannot meet the library's, and the
# SLURM tests are not part of the fast loop this job runs
DEFAULT_EXTRAS = ("deseq2", "workflow")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def floors(pyproject: Path, extras: tuple[str, ...] = DEFAULT_EXTRAS) -> dict[str, str]:
    """Return ``{name: floor}`` for every requirement of the project and the given extras.

    Parameters
    ----------
    pyproject
        Path of ``pyproject.toml``.
    extras
        Optional-dependency groups to include besides the core dependencies.

    Returns
    -------
    dict
        Normalised distribution name → lowest allowed version.

    Raises
    ------
    SystemExit
        When a requirement has no ``>=`` floor (every dependency must declare one) or an extra is unknown.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    reqs = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            sys.exit(f"min_constraints: unknown extra {extra!r}; pyproject.toml declares {sorted(optional)}")
        reqs += [r for r in optional[extra] if not r.startswith(f"{project['name']}[")]
    out: dict[str, str] = {}
    for req in reqs:
        m = _REQ.match(req)
        if m is None:
            sys.exit(f"min_constraints: cannot parse requirement {req!r}")
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", m.group(3))
        if floor is None:
            sys.exit(f"min_constraints: {req!r} declares no floor (>=); give every dependency one")
        out[name] = floor.group(1)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name, version in floors(root / "pyproject.toml", tuple(sys.argv[1:]) or DEFAULT_EXTRAS).items():
        print(f"{name}=={version}")
