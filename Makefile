# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
PYTEST_FLAGS ?= -rs
VENV ?= .venv
BIN := $(VENV)/bin
# XLA on CPU page-faults fresh buffers every step; these glibc malloc settings keep freed memory mapped.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: demo test test-all bench mutants install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned to the CPU build; peft/transformers would otherwise pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $@

# libtpu (the tpu extra), for the test that compiles the train step for TPU chips; the tests still run on the
# CPU (JAX_PLATFORMS=cpu: JAX does not try to start a TPU backend here).
$(BIN)/.tpu: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[tpu]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mellama-jax demo --out runs/demo

# ruff first (lint rules and format in pyproject.toml): a second, not a reason to wait 15 minutes for a typo.
test: $(BIN)/.tpu
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q $(PYTEST_FLAGS)

test-all: $(BIN)/.tpu
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m "" $(PYTEST_FLAGS)

# Plants each bug listed in tests/mutants/*.yaml in a scratch copy and checks its tests fail (not part of `test`).
# MUTANTS_ARGS="--changed origin/main": only the mutants of files changed since that commit.
mutants: $(BIN)/.tpu
	JAX_PLATFORMS=cpu $(BIN)/python tests/mutants/run.py $(MUTANTS_ARGS)

bench: $(BIN)/.installed
	$(BIN)/mellama-jax bench convert
	$(BIN)/mellama-jax bench tokenize --corpus mellama_jax/demo_data/biomedical.jsonl --tokenizer runs/demo/tokenizer --repeat 200

clean:
	rm -rf $(VENV) runs
