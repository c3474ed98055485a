# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# CPU unless a GPU is really there; DeepSpeed's CPU ops are built once into the project.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m dist_sense.warmup
	touch $(STAMP)

test: install
	$(PY) -m pytest tests -q

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

demo: install
	@echo "make demo arrives with the SenseEncoder/demo issue (issue 6)"; exit 2

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(TORCH_EXTENSIONS_DIR) .pytest_cache
