# make demo: set up .venv and run the whole pipeline on the offline sample (CPU ranks; 15–20 minutes on 2 cores, measured: docs/benchmarks.md)
# make test: set up .venv and run the test suite, less the tests marked slow (docs/development.md)
# make test-all: set up .venv (with make gguf-setup) and run every test, the slow ones too (what CI runs)
# make setup: only set up .venv (for the real run on a GPU machine: README.md)
# make gguf-setup: add what export.py needs (builds llama.cpp: minutes; not part of setup)
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION := 2.13.0
# A CPU-only machine that would otherwise download the CUDA build of torch can point this at a CPU wheel index.
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
# The code needs Python 3.11 or newer: an older one would fail later, deep in pip's output or at the first import.
PYTHON_FOUND = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
PYTHON_OK = $(shell $(PYTHON) -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null)

.PHONY: setup gguf-setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-lock.txt
	$(if $(filter True,$(PYTHON_OK)),,$(error $(PYTHON) is Python $(or $(PYTHON_FOUND),(none found)); this project needs 3.11 or newer: make PYTHON=python3.11))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -r requirements.txt -c requirements-lock.txt
	# DeepSpeed compiles the all-reduce of CPU ranks at its first use (33 s; runs started meanwhile wait for it): once
	# here, where the launcher has it look (TORCH_EXTENSIONS_DIR, the environment's own), with the environment's ninja (a
	# build by another ninja is redone). GPU ranks never need it.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c 'import os, sys; os.environ.setdefault("TORCH_EXTENSIONS_DIR", sys.prefix + "/torch_extensions"); \
		os.environ["DS_ACCELERATOR"] = "cpu"; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; \
		ShareMemCommBuilder().load()' > /dev/null 2>&1 \
		|| echo "note: DeepSpeed's CPU all-reduce did not build (a C++ compiler?): CPU ranks build it at their first run"
	touch $@

gguf-setup: $(VENV)/.gguf-installed

$(VENV)/.gguf-installed: $(VENV)/.installed requirements-gguf.txt
	$(BIN)/pip install --quiet -r requirements-gguf.txt -c requirements-lock.txt
	$(BIN)/python export.py --install_converter
	touch $@

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash demo.sh

# Every test's duration is printed, and kept in $(TEST_RESULTS) (JUnit XML), to see where the time goes. The suite
# runs on TEST_WORKERS processes (pytest-xdist; auto: one a core), each module's tests on one of them, so that the
# runs a module shares are made once. PYTEST_ARGS adds pytest flags: -p randomly (shuffled), --reverse, -k NAME.
TEST_RESULTS ?= output/test-results.xml
TEST_WORKERS ?= auto
PYTEST_ARGS ?=
PYTEST = PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q --durations=0 --junitxml=$(TEST_RESULTS) \
	-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

test: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.installed $(VENV)/.gguf-installed  # the GGUF export's test needs llama.cpp
	$(PYTEST) tests

clean:
	rm -rf $(VENV) output/demo output/demo-sft data/demo data/token_cache
