# The README's commands. Each sets up .venv (at the repo root) from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/tiny-llama
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: run test bench install clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jaxlm needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstalled whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# Pretrain the tiny decoder on the Python standard library, then sample from it.
# Run again, it resumes (or finds the run complete) and samples again.
run: $(VENV)/.installed
	$(BIN)/jaxlm train --config tiny-llama run_dir=$(RUN_DIR) \
	    $$(test -d $(RUN_DIR)/checkpoints && echo --resume)
	$(BIN)/jaxlm generate --checkpoint $(RUN_DIR) \
	    --prompt 'def fibonacci(n):' --prompt 'import os' --prompt 'class Stack:'

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/jaxlm bench --config bench-cpu

clean:
	rm -rf $(VENV) runs *.egg-info
