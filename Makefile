# Every target provisions its environment itself, so each works on a fresh machine.
#
#   .venv     Python 3.11 (PYTHON): the jax pip gives there (0.10.x), torch 2.13.0 (CPU)
#             for the comparisons with transformers. demo, bench and test-all use it.
#   .venv312  Python 3.12 (PYTHON_NEWEST): the newest jax, as Colab and TPU VMs have it;
#             no torch (PyPI has only CUDA builds for 3.12: ~0.8 GB to download, ~5 GB
#             installed), so the test modules that import torch or transformers (the
#             comparisons with the reference) run in .venv only.
#
# `make test` runs the non-slow suite in both, .venv first, and fails if either fails.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# pyenv puts a python3.12 shim on PATH that fails unless 3.12 is selected: take the first
# candidate that runs.
PYTHON_NEWEST ?= $(shell for p in python3.12 "$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)"/versions/3.12*/bin/python3.12; do \
	"$$p" -c "import sys" >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
VENV312 := .venv312
BIN312  := $(VENV312)/bin

# The test runs use the CPU even where libtpu is installed (the TPU compile tests ask for
# a TPU topology themselves), and libtpu does not query a cloud metadata server.
TEST_ENV := JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1
PYTEST   := -m pytest -q -n 2 --durations=20

.PHONY: demo test test-floor test-newest test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(BIN312)/python:
	@test -n "$(PYTHON_NEWEST)" || { echo "make: no working python3.12 found (set PYTHON_NEWEST=/path/to/python3.12)" >&2; exit 1; }
	$(PYTHON_NEWEST) -m venv $(VENV312)
	$(BIN312)/python -m pip install -q --upgrade pip

# One stamp per set of extras; re-installs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(subst +,$(comma),$*)]"
	touch $@

# Here jax is upgraded to the newest release (with the libtpu that matches it).
$(VENV312)/.installed-%: pyproject.toml | $(BIN312)/python
	$(BIN312)/python -m pip install -q --upgrade -e ".[$(subst +,$(comma),$*)]" "jax[tpu]"
	touch $@

comma := ,

demo: $(VENV)/.installed-experiments
	$(BIN)/python experiments/00_demo_selective_copying.py

test:
	@status=0; \
	$(MAKE) --no-print-directory test-floor || status=1; \
	$(MAKE) --no-print-directory test-newest || status=1; \
	exit $$status

test-floor: $(VENV)/.installed-test+parity+tpu+experiments
	@echo "== tests: $$($(BIN)/python -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)')"
	$(TEST_ENV) $(BIN)/python $(PYTEST) -m "not slow"

test-newest: $(VENV312)/.installed-test+tpu+experiments
	@echo "== tests: $$($(BIN312)/python -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)')"
	@skip=; if ! $(BIN312)/python -c "import torch, transformers" 2>/dev/null; then \
	  for f in $$(grep -lE '^(import|from) (torch|transformers)' tests/test_*.py); do skip="$$skip --ignore=$$f"; done; \
	  echo "== no torch in $(VENV312): modules that import torch/transformers run in $(VENV) only:$$skip"; fi; \
	echo '$(TEST_ENV) $(BIN312)/python $(PYTEST) -m "not slow"' $$skip; \
	$(TEST_ENV) $(BIN312)/python $(PYTEST) -m "not slow" $$skip

test-all: $(VENV)/.installed-test+parity+tpu+experiments
	$(TEST_ENV) $(BIN)/python $(PYTEST)

bench: $(VENV)/.installed-bench+experiments
	$(BIN)/python experiments/bench_scan.py
	$(BIN)/python experiments/bench_forward.py
	$(BIN)/python experiments/bench_train_step.py
	$(BIN)/python experiments/profile_train_step.py

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache checkpoints
