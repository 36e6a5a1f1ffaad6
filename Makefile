# fastloss: the README's two commands.
#   make bench   builds fastloss into .venv (creating it if missing) and runs the benchmark CLI on its default problem
#   make test    the same build, then the test suite
# Variables: VENV (default .venv), TORCH_SPEC (which torch to install into a new venv), FASTLOSS_CUDA (ON/OFF/AUTO),
# HF_SPEC (the optional Hugging Face stack the integration tests and the example use; empty to leave it out),
# BUILD_DIR (CMake's build folder, default build/<venv name>), PYTEST_ARGS, BENCH_ARGS.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch>=2.11
HF_SPEC     ?= transformers==5.23.0 accelerate==1.15.0
FASTLOSS_CUDA ?= AUTO
PY          := $(VENV)/bin/python
BUILD_DIR   ?= build/$(notdir $(VENV))
STAMP       := $(VENV)/.fastloss-deps

export FASTLOSS_CUDA

.PHONY: all install test bench clean

all: test

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy pybind11 ninja "scikit-build-core>=0.10" "cmake>=3.26" pytest expecttest $(HF_SPEC)
	touch $@

# --no-build-isolation: the extension must be compiled against the torch it will run with.
install: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -C build-dir=$(BUILD_DIR) .

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/fastloss-bench $(BENCH_ARGS)

clean:
	rm -rf build dist
