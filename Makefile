# Every target provisions .venv itself, so each works on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# One stamp per set of extras; re-installs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

demo: $(VENV)/.installed-experiments
	$(BIN)/python experiments/00_demo_selective_copying.py

test: $(VENV)/.installed-test+experiments
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-all: $(VENV)/.installed-test+experiments
	$(BIN)/python -m pytest -q -n 2

bench: $(VENV)/.installed-bench+experiments
	$(BIN)/python experiments/bench_scan.py
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache checkpoints
