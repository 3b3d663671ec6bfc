# The two commands: `make demo` and `make test`. Both install into .venv first, if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.cpift-installed
TORCH_PIN ?= torch==2.13.0
EXT_SOURCES := setup.py pyproject.toml cpift_fast/_extension.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
CU_SOURCES  := $(shell find csrc -name '*.cu' 2>/dev/null)

.PHONY: install demo test bench gpu-check cuda-check clean

install: $(STAMP)

# Re-runs only when the build inputs change; a second `make install` re-installs nothing.
$(STAMP): $(EXT_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already in $(VENV): keeping it" \
		|| $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q "setuptools>=77" wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	@$(PY) -c "import cpift_fast, json; print(json.dumps(cpift_fast.backend_info()['built'], indent=1))"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/cpift demo

test: install cuda-check
	$(PY) -m pytest -v --durations=15 tests

bench: install
	$(VENV)/bin/cpift bench --size full

# On a CUDA machine: the gpu-marked tests and every benchmark on the GPU; records in bench/results/gpu/,
# summary in bench/results/gpu-check.md.
gpu-check: install
	$(PY) bench/gpu_check.py

# CUDA sources cannot run here, but they must keep compiling: `nvcc -c` against torch's headers,
# with the nvcc flags of the real build (cpift_fast/_extension.py). A CPU-only torch lacks one
# generated CUDA header; a stand-in is written for the check.
CUDA_CHECK_DIR := build/cuda-check
cuda-check: install
	@if command -v nvcc >/dev/null && [ -n "$(CU_SOURCES)" ]; then \
		mkdir -p $(CUDA_CHECK_DIR)/c10/cuda/impl; \
		printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $(CUDA_CHECK_DIR)/c10/cuda/impl/cuda_cmake_macros.h; \
		inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))"); \
		pyinc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
		flags=$$($(PY) -c "from cpift_fast._extension import NVCC_FLAGS; print(' '.join(NVCC_FLAGS))"); \
		for f in $(CU_SOURCES); do \
			echo "cuda-check: nvcc -c $$f"; \
			nvcc -c $$flags $$inc -I$(CUDA_CHECK_DIR) -I$$pyinc \
				"$$f" -o $(CUDA_CHECK_DIR)/$$(basename $$f).o || exit 1; \
		done; \
	else echo "cuda-check: no nvcc or no .cu sources, skipped"; fi

clean:
	rm -rf build *.egg-info cpift_fast/*.so
