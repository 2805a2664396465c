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

# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (this
# sandbox, many CI images) every process then recompiles torch, DeepSpeed, MLflow and Ray from source on
# import. Measured on 2 cores: `import deepspeed` 10.4 s -> 4.7 s, a tiny Stage C Ray Train job 152 s -> 53 s.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -e '.[dev]'
	@# DeepSpeed's CPU collectives op, compiled once here rather than by the first training job (~35 s).
	$(PY) -c "from pipelines.training.engine import prebuild_ops; prebuild_ops()" \
	  || echo "warning: could not prebuild DeepSpeed's ops; the first training job will build them" >&2
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
