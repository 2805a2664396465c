# Two-command quick start: `make demo` and `make test`; both install into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/wurst/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
# albumentations (via img2dataset) would otherwise call PyPI on every import.
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-all test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(PY) -m pipelines.demo

test: setup
	$(PY) -m pytest -q tests -m "not slow_e2e"

test-all: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not e2e and not slow_e2e"

bench: setup
	$(PY) bench/filter.py

clean:
	rm -rf $(VENV) data mlruns
