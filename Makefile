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
# Let Python cache the bytecode of what it imports (some environments turn that off): otherwise every
# one of the demo's dozen processes compiles torch, deepspeed and transformers again (about 4 s each).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

# --no-compile: byte-compiling every installed module takes four fifths of the install (1 min 40 s
# against 20 s on 2 cores); Python compiles what it imports, once, on first use (see above).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-compile --no-deps -e .
	$(PY) -m dist_sense.runtime.warmup
	touch $(STAMP)

# Debian's Slurm (and iproute2) for the tests that start a private Slurm: one node, and two nodes in
# network namespaces (skipped without them).
SYSTEM_STAMP := $(VENV)/.system-packages
$(SYSTEM_STAMP): | $(STAMP)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurmctld slurmd slurm-client munge iproute2) >$(VENV)/apt.log 2>&1; then echo "installed Slurm for the Slurm tests"; \
	  else echo "could not install Slurm (see $(VENV)/apt.log): the Slurm tests will be skipped"; fi; \
	else echo "not root or no apt-get: the Slurm tests will be skipped"; fi
	touch $@

test: install $(SYSTEM_STAMP)
	$(PY) -m pytest tests -q

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

# The main job, end to end on 2 local ranks, in the paper's GLUE setting: a real model
# (all-MiniLM-L6-v2) tuned on a real task (movie-review snippets, fresh or rotten), its sense
# dictionary, the sense student and two baselines (MSE distillation, the student fine-tuned
# directly), all judged through the tuned teacher's head; WordNet 3.0 probes beside.
# Every stage resumes, so rerunning finishes an interrupted demo.
DEMO_RUN ?= runs/demo
DEMO_NPROC ?= 2
DEMO_CFG := $(DEMO_RUN)/demo.json
DS := $(VENV)/bin/deepspeed --num_gpus $(DEMO_NPROC) --master_port $$($(PY) -c 'from dist_sense.comm import free_port; print(free_port())')

demo: install
	$(PY) -m dist_sense.demo --run-dir $(DEMO_RUN)
	$(DS) launcher/finetune.py --deepspeed ds_configs/z2.json --config $(DEMO_CFG)
	$(DS) launcher/extract.py --config $(DEMO_CFG)
	$(VENV)/bin/mpirun -n $(DEMO_NPROC) $(PY) launcher/build_dict.py --config $(DEMO_CFG)
	$(DS) launcher/label.py --config $(DEMO_CFG)
	$(DS) launcher/distill.py --deepspeed ds_configs/z2.json --config $(DEMO_CFG)
	$(DS) launcher/distill.py --deepspeed ds_configs/z2.json --config $(DEMO_CFG) distill.loss=mse
	$(DS) launcher/finetune.py --deepspeed ds_configs/z2.json --config $(DEMO_CFG) finetune.backbone=student
	$(PY) launcher/evaluate.py --config $(DEMO_CFG)
	@echo "report: $(DEMO_RUN)/eval/report.md   metrics: $(DEMO_RUN)/eval/metrics.json   tensorboard --logdir $(DEMO_RUN)/tb"

bench: install
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(TORCH_EXTENSIONS_DIR) .pytest_cache
