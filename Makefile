# scmlm: `make demo` sets up .venv and runs the main job on bundled data; `make test` runs ruff + the whole suite.
#
#   make demo        .venv (scmlm with the workflow, test and PyDESeq2 extras), then the Snakemake workflow on bundled data
#   make test        lint + every test, SLURM included: starts the local SLURM first (.ci/slurm-up.sh, root + apt,
#                    as in CI, which runs this target through .ci/run)
#   make test-fast   developer loop: lint + every test except the end-to-end workflow, SLURM and long calibration
#                    runs (marked `slow` / `slurm`); needs neither root nor SLURM
#   make test-min    minimum-versions job: a fresh .venv-min with every dependency at its declared floor
#                    (.ci/min-versions.sh), then the fast loop there
#   make lint        ruff check + ruff format --check + snakefmt --check
#   make slurm-up    start (install if needed) the single-node SLURM of the workflow tests; needs root
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINTED := $(wildcard scmlm tests benchmarks workflow/scripts .ci hatch_build.py)

.PHONY: demo test test-fast test-min venv lint clean bench slurm-up

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the editable install builds no kernels (hatch_build.py compiles them for a standard wheel only), so it needs
	# only hatchling, not the isolated build environment with every runtime dependency that the wheel build needs
	$(PY) -m pip install -q "hatchling>=1.21" editables
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(VENV)/bin/scmlm warmup  # compile the numba kernels once, here, not in the first call or workflow job
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scmlm.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/snakefmt --check workflow

slurm-up:
	bash .ci/slurm-up.sh

test: $(STAMP) lint slurm-up
	$(PY) -m pytest -q tests

test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow and not slurm" tests

test-min:
	bash .ci/min-versions.sh

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f; done

clean:
	rm -rf $(VENV) .venv-min demo_results .pytest_cache
