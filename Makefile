# scmlm: `make demo` sets up .venv and runs the main job on bundled data; `make test` runs ruff + pytest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint clean bench slurm-up

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(VENV)/bin/scmlm warmup  # compile the numba kernels once, here, not in the first call or workflow job
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scmlm.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(wildcard scmlm tests benchmarks workflow/scripts)
	$(VENV)/bin/ruff format --check $(wildcard scmlm tests benchmarks workflow/scripts)

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f; done

clean:
	rm -rf $(VENV) demo_results .pytest_cache
