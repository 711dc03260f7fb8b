# Developer shortcuts. CPU by default; GPU tests run on a CUDA machine with `make test-gpu`.
PY ?= python

.PHONY: install check format test test-gpu bench

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

check:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format:
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks

test:
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m "gpu" tests

bench:
	turbotune bench benchmarks/scenarios.yaml --out bench-out
