# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install everything on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch (pulled in by xgrammar or
# transformers) would download several GB of CUDA packages.
# llama-cpp-python compiles llama.cpp; a native build (-march=native) takes AMX tile
# instructions wherever the CPU advertises them, and a VM whose kernel does not grant the
# tile state kills the process with SIGILL at the first batched matmul. A portable AVX2
# build runs everywhere this project runs.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/citebacktrack ask "When was the Eiffel Tower built, and how tall is it?"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: lint
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/decoder_overhead.py
	$(PY) benchmarks/local_backends.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
