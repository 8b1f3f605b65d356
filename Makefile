# Every target sets up .venv itself: torch's CPU wheel first (a looser pin would pull a multi-GB CUDA
# build), then paddock in editable mode with its dev extra. pip installs without byte-compiling (paddock's
# dependencies on 2 cores: 147 s -> 51 s), and the targets below let Python write the bytecode of what it
# imports as it imports it (a run imports ~5,400 of the venv's ~25,000 modules), even where the environment
# sets PYTHONDONTWRITEBYTECODE, so that Ray's worker processes do not each compile their imports afresh.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.paddock-installed
BENCH_STAMP := $(VENV)/.paddock-bench-installed
FUZZ_STAMP  := $(VENV)/.paddock-fuzz-installed
TORCH   ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv demo test test-unit test-integration test-reliability bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile $(TORCH)
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

test: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "not gpu" tests

test-unit: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "not integration and not gpu" tests

test-integration: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "integration and not gpu" tests

test-reliability: $(FUZZ_STAMP)
	PADDOCK_FUZZ_EXAMPLES=100 $(BIN)/python -m pytest -m "reliability and not gpu" tests

# The test targets add schemathesis (the fuzz extra); make demo does without it.
$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -e '.[fuzz]'
	touch $(FUZZ_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@ls benchmarks/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	for b in benchmarks/[!_]*.py; do $(BIN)/python $$b || exit 1; done
	$(BIN)/python benchmarks/_summary.py

lint: $(STAMP)
	$(BIN)/ruff check platform jobs tests benchmarks
	$(BIN)/ruff format --check platform jobs tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .paddock
