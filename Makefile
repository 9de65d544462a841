# Set-up and tests on a fresh CPU machine: `make test` (creates .venv, installs the CPU build of torch
# and star-sp in editable mode, runs the suite). CI runs exactly this (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test setup gpu-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

gpu-test:
	bash tools/run_gpu_tests.sh

clean:
	rm -rf $(VENV) .pytest_cache
