# The two commands of the README:  make demo   and   make test.  Both set up what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1
# One ninja for every process (the venv's): two ninjas hash the build command differently and rebuild
# DeepSpeed's shm_comm op (75-120 s) whenever they alternate.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint format bench gpu-wheels dali-wheel

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q tests

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Wheels a GPU host without DeepSpeed needs for bench/gpu_session.sh (into .whl/base/, git-ignored).
gpu-wheels: setup
	@bash scripts/gpu_wheels.sh

# DALI's wheel for the GPU host, split into parts that fit a device call (into .whl/dali/, git-ignored).
dali-wheel: setup
	@bash scripts/dali_wheel.sh
