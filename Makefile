# Set-up on a fresh machine: `make demo` runs the whole annotation workflow on a generated case,
# `make test` runs the test suite. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch (an unpinned `torch` would pull a multi-GB CUDA build)
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/deepedit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/deepedit

install: $(BIN)/deepedit

demo: install
	mkdir -p out
	$(BIN)/deepedit demo -o out/demo --overwrite

test: install
	$(BIN)/python -m pytest -q Testing

bench: install
	$(BIN)/python benchmarks/annotate.py

clean:
	rm -rf out .pytest_cache
