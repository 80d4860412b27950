# make demo: set up .venv and run the whole pipeline on the offline sample (CPU, a few minutes)
# make test: set up .venv and run the test suite
# make setup: only set up .venv (for the real run on a GPU machine: README.md)
# make gguf-setup: add what export.py needs (builds llama.cpp: minutes; not part of setup)
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION := 2.13.0
# A CPU-only machine that would otherwise download the CUDA build of torch can point this at a CPU wheel index.
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin

.PHONY: setup gguf-setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -r requirements.txt -c requirements-lock.txt
	touch $@

gguf-setup: $(VENV)/.gguf-installed

$(VENV)/.gguf-installed: $(VENV)/.installed requirements-gguf.txt
	$(BIN)/pip install --quiet -r requirements-gguf.txt -c requirements-lock.txt
	$(BIN)/python export.py --install_converter
	touch $@

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash demo.sh

test: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q --durations=20 tests

clean:
	rm -rf $(VENV) output/demo output/demo-sft data/demo data/token_cache
