# Every target provisions .venv itself, so each works on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,experiments]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/00_demo_selective_copying.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python experiments/bench_scan.py
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache checkpoints
