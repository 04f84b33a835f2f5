# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# Torch is installed first, pinned (override: make demo TORCH_SPEC="torch==2.x.y"), so pip does not
# pull a multi-gigabyte CUDA build as a dependency of the other packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/rlhf pipeline recipes/tiny/pipeline.yaml

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check rlhf tests benchmarks
	$(BIN)/ruff format --check rlhf tests benchmarks

clean:
	rm -rf outputs
