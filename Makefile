# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.encdec-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# exactly this spec: it takes the local CPU wheel (a looser one pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,mpi]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python tools/demo.py

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "" $(PYTEST_ARGS)

# On a CUDA machine whose Python already has the dependencies (no venv: the GPU image has no package
# index): the CUDA-only cases, then the Triton kernel and step tests with the kernels compiled for the
# GPU (on a CPU they run in Triton's interpreter). Inductor's compiles dominate; keeping
# TORCHINDUCTOR_CACHE_DIR between runs makes the second run much shorter.
test-gpu:
	PYTHONPATH=.:families:plugins $(PY) -m pytest -q -p no:cacheprovider -m gpu $(PYTEST_ARGS) tests
	PYTHONPATH=.:families:plugins $(PY) -m pytest -q -p no:cacheprovider -m "not gpu and not slow" $(PYTEST_ARGS) \
		tests/test_triton_kernels.py tests/test_fused_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
