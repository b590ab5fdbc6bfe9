# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make main   # venv + install, then the default sweep on the embedded corpus, scaling fits and plots
#   make test   # venv + install (with test extras), then the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SWEEP_DIR ?= runs/model_sizes
# The default ladder cannot resolve the irreducible loss E (docs/scaling.md), so its report fixes it at a
# measured reference for the embedded corpus.
FIX_E ?= 0.8
FIX_E_WHY ?= the xz (LZMA -9e) rate of the embedded corpus, 0.80 nats per byte, a measured reference for its \
  entropy (docs/scaling.md); this ladder cannot resolve E (free fit 0.49, 95% interval 0 to 1.31), and its held-out \
  predictions move by under 0.1% for E anywhere from 0.5 to 1.0

.PHONY: main test test-all test-tpu test-ci setup setup-test lint bench clean
TPU_EXTRA ?= .tpu-extra

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,ray]'

main: setup
	$(BIN)/sktlm sweep sweeps/model_sizes.py --workdir=$(SWEEP_DIR)
	$(BIN)/sktlm scaling $(SWEEP_DIR) --out=$(SWEEP_DIR)/report --fix_E=$(FIX_E) --fix_E_why="$(FIX_E_WHY)"
	@echo "report: $(SWEEP_DIR)/report/report.md"

test: setup-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# AOT compiles of the reduced flagship for a v5p topology (plain and context-parallel): need libtpu (684 MB),
# kept out of the venv so that ordinary jax processes do not probe for TPUs.
test-tpu: setup-test
	$(BIN)/python -m pip install -q --target $(TPU_EXTRA) --no-deps 'libtpu==0.0.42.*'
	SKTLM_CI=1 PYTHONPATH=$(TPU_EXTRA) $(BIN)/python -m pytest -q -m slow tests/test_plan.py tests/test_context.py -k v5p

# CI (.ci/run): every other test, the slow ones included (some are the only check of a claim), with
# SKTLM_CI=1: a missing extra, a broken import or any skip fails (tests/conftest.py).
test-ci: setup-test
	SKTLM_CI=1 $(BIN)/python -m pytest -q -n 2 -k 'not v5p' --durations=25

test-all: setup-test
	$(BIN)/python -m pytest -q

lint: setup-test
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) runs
