#!/usr/bin/env bash
# Minimum-versions job: install scmlm with every declared dependency at its floor (pyproject.toml `>=` bounds,
# turned into `==` constraints by .ci/min_constraints.py) in a fresh venv, then run the fast test loop there.
# A floor that is too low for the code fails here, not on a user's machine.
#
#   .ci/min-versions.sh            (also: make test-min)
#
# Environment: PYTHON (interpreter for the venv, default python3), MIN_VENV (default .venv-min, recreated each run),
# PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MIN_VENV:-.venv-min}
t0=$SECONDS

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
constraints=$VENV/floors.txt
"$VENV/bin/python" .ci/min_constraints.py >"$constraints"
echo "min-versions: $("$VENV/bin/python" --version), floors:" && sed 's/^/  /' "$constraints"
# the library with the extras that the constraints cover, and pytest (the SLURM plugin and the linters are not needed
# by the fast loop and bring floors of their own)
# editable: no kernels are built, so hatchling is the only build requirement (see the Makefile)
"$VENV/bin/python" -m pip install -q "hatchling>=1.21" editables
"$VENV/bin/python" -m pip install -q --no-build-isolation -c "$constraints" -e ".[deseq2,workflow]" "pytest>=8"

# the installed versions must be the floors themselves (a constraint can only fail loudly, but check anyway)
"$VENV/bin/python" - "$constraints" <<'PY'
import sys
from importlib.metadata import version

bad = []
for line in open(sys.argv[1]):
    name, floor = line.strip().split("==")
    if version(name) != floor and version(name) != floor + ".0":
        bad.append(f"{name} {version(name)} (floor {floor})")
if bad:
    sys.exit("min-versions: installed versions differ from the floors: " + ", ".join(bad))
print("min-versions: every dependency installed at its floor")
PY
echo "min-versions: installed in $((SECONDS - t0)) s"

# the fast loop (no end-to-end workflow, no SLURM). Warnings are shown, not errors as in the default suite: an old
# floor warns on its own or next to the newest release of one of its dependencies (anndata 0.11.0 on copying an
# empty slice, matplotlib 3.7 calling pyparsing 3.3's deprecated names), which says nothing about scmlm; warnings that
# scmlm causes are errors in the default suite on current releases.
"$VENV/bin/python" -m pytest -q -m "not slow and not slurm" -p no:cacheprovider -W default ${PYTEST_ARGS:-} tests
echo "min-versions: passed in $((SECONDS - t0)) s"
