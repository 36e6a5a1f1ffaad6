# fastloss: the README's two commands.
#   make bench   builds fastloss into .venv (creating it if missing) and runs the benchmark CLI on its default problem
#   make test    the same build, then the test suite
# Variables: VENV (default .venv), TORCH_SPEC (which torch to install into a new venv), FASTLOSS_CUDA (ON/OFF/AUTO),
# HF_SPEC (the optional Hugging Face stack the integration tests and the example use; empty to leave it out),
# BUILD_DIR (CMake's build folder, default build/<venv name>), PYTEST_ARGS, BENCH_ARGS.
#
#   make test-stacks  the transformers patch inside training stacks (PEFT, FSDP2 / DDP on gloo processes, gradient
#                  checkpointing, autocast, torch.compile) and TRL's trainers on fastloss: installs STACKS_SPEC (peft,
#                  trl) into VENV, runs the tests marked
#                  `stacks` (skipped by `make test`).
#   make audit-cuda  the static audit of the CUDA kernels' sm_90 code (bench/audit_cuda.py) on VENV's CUDA build:
#                  installs AUDIT_TOOLS (cuobjdump, nvdisasm) into VENV, writes bench/results/<date>-audit-cuda-sm90.md
#                  and .json, and fails on local memory or a global access under 16 bytes not marked in the source.
#   make test-emu  the CUDA kernels run on the CPU (csrc/cuda_emu): a FASTLOSS_CUDA_EMU=ON build in its own venv
#                  (EMU_VENV, default .venv-emu) and build folder, the test suite on it (every compiled kernel must
#                  launch), bench/gpu_workload.py (every compiled kernel instantiation must launch), then the suite
#                  and the workload again on a build with AddressSanitizer + UndefinedBehaviorSanitizer (EMU_SANITIZE,
#                  empty to skip; without the tests that run compilers -- build configuration, the layer's own
#                  self-test, which has its own sanitizer build -- and the peak-memory test, which ASan's redzones
#                  defeat). CXX names the compiler whose libasan / libstdc++ are preloaded (default g++).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch>=2.11
HF_SPEC     ?= transformers==5.23.0 accelerate==1.15.0
STACKS_SPEC ?= peft==0.21.2 trl==1.16.0
FASTLOSS_CUDA ?= AUTO
PY          := $(VENV)/bin/python
BUILD_DIR   ?= build/$(notdir $(VENV))
STAMP       := $(VENV)/.fastloss-deps

export FASTLOSS_CUDA

AUDIT_TOOLS ?= nvidia-cuda-cuobjdump==13.* nvidia-cuda-nvdisasm==13.*
EMU_VENV    ?= .venv-emu
EMU_SANITIZE ?= address,undefined
EMU_SCHEDULE ?= mix

.PHONY: all install test test-stacks bench clean test-emu audit-cuda

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

test-stacks: install
	$(PY) -m pip install -q $(HF_SPEC) $(STACKS_SPEC)
	FASTLOSS_STACKS=1 $(PY) -m pytest tests -q -m stacks $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/fastloss-bench $(BENCH_ARGS)

audit-cuda: install
	$(PY) -m pip install -q $(AUDIT_TOOLS)
	$(PY) bench/audit_cuda.py --out bench/results --check

# Threads of a block run as fibers in a changing order (EMU_SCHEDULE: mix = reverse / random / warp-greedy, a
# different one per launch), so a race changes the result instead of passing by luck.
# The sanitized build's Python: libasan first (and libstdc++, which ASan's __cxa_throw interceptor must find at
# start-up: python does not link it).
SANITIZED_PY = PYTHONPATH=$(CURDIR)/build/emu-sanitize/site \
  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  FASTLOSS_EMU_SCHEDULE=$(EMU_SCHEDULE) $(EMU_VENV)/bin/python

test-emu:
	$(MAKE) install VENV=$(EMU_VENV) BUILD_DIR=build/emu FASTLOSS_CUDA_EMU=ON
	FASTLOSS_EMU_SCHEDULE=$(EMU_SCHEDULE) FASTLOSS_EMU_REQUIRE_ALL=1 $(EMU_VENV)/bin/python -m pytest tests -q $(PYTEST_ARGS)
	FASTLOSS_EMU_SCHEDULE=$(EMU_SCHEDULE) $(EMU_VENV)/bin/python bench/gpu_workload.py --device cpu --size small
ifneq ($(EMU_SANITIZE),)
	FASTLOSS_CUDA_EMU=ON FASTLOSS_SANITIZE=$(EMU_SANITIZE) $(EMU_VENV)/bin/python -m pip install -q --no-build-isolation \
	  --no-deps --upgrade -C build-dir=build/emu-sanitize --target build/emu-sanitize/site .
	$(SANITIZED_PY) -m pytest tests -q -p no:cacheprovider --deselect tests/test_build_config.py \
	  --deselect tests/test_cuda_emu.py::test_emulated \
	  --deselect tests/test_linear_cross_entropy.py::test_cpu_extra_peak_memory_within_budget \
	  --deselect tests/test_distillation.py::test_linear_extra_peak_memory_within_a_few_chunks \
	  --deselect tests/test_bench_distillation.py::test_linear_versions_need_less_memory_than_the_composite
	$(SANITIZED_PY) bench/gpu_workload.py --device cpu --size small
endif

clean:
	rm -rf build dist
