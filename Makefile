# `make install` sets up .venv; `make test` installs if needed and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the CPU build that lies on disk here (an open range pulls a multi-GB CUDA build).
TORCH := torch==2.13.0

.PHONY: install test bench quickstart clean

$(BIN)/dscoder: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' $(TORCH)
	touch $@

install: $(BIN)/dscoder

test: install
	$(BIN)/python -m pytest

quickstart: install
	$(BIN)/dscoder quickstart

bench: install
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
